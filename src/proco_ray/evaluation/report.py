"""Reports for people: confusion-matrix pictures and per-class tables."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    """matplotlib without a display (workers and CI have none); imported only when a picture is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path


def plot_confusion_matrix(
    confusion: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """A PNG of the confusion matrix, rows normalised to recall, with the counts written in each cell."""
    plt = _pyplot()
    counts = np.asarray(confusion, dtype=np.int64)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.7 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(class_names)):
        for j in range(len(class_names)):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", color="white" if rates[i, j] > 0.5 else "black")
    if title:
        ax.set_title(title)
    return _save(fig, path, dpi=120)


def plot_reliability(bins: Sequence[dict[str, float]], path: str | Path, title: str = "") -> Path:
    """A reliability diagram: accuracy against mean confidence per confidence bin, the diagonal is calibrated."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    used = [b for b in bins if b["count"]]
    ax.bar(
        [b["low"] for b in used],
        [b["accuracy"] for b in used],
        width=[b["high"] - b["low"] for b in used],
        align="edge",
        edgecolor="black",
        alpha=0.7,
        label="accuracy",
    )
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="calibrated")
    ax.plot([b["confidence"] for b in used], [b["accuracy"] for b in used], "o", color="tab:red", label="mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence of the predicted class")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left")
    if title:
        ax.set_title(title)
    return _save(fig, path, dpi=120)


def per_class_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [
        {"class": name, "support": support, "precision": p, "recall": r, "f1": f}
        for name, support, p, r, f in zip(
            metrics["class_names"], metrics["support"], metrics["precision"], metrics["recall"], metrics["f1"]
        )
    ]
    for row in rows if "roc_auc" in metrics else []:
        row["roc_auc"] = metrics["roc_auc"][row["class"]]
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """A GitHub markdown table; floats to 3 decimals."""
    if not rows:
        return ""
    headers = list(rows[0])
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(row[h]) for h in headers) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# --------------------------------------------------------------------------- Ray Tune experiments


def plot_trial_curves(
    curves: dict[str, Sequence[tuple[int, float]]],
    path: str | Path,
    metric: str,
    stopped: Sequence[str] = (),
    rungs: Sequence[float] = (),
    title: str = "",
) -> Path:
    """The metric per epoch for every trial; trials ASHA stopped end in a red cross, its rungs are dotted lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for label, points in curves.items():
        if not points:
            continue
        epochs, values = zip(*points)
        (line,) = ax.plot(epochs, values, marker="o", markersize=3, linewidth=1.2, label=label)
        if label in stopped:
            ax.plot(epochs[-1], values[-1], marker="X", markersize=11, color="red", markeredgecolor=line.get_color())
    for rung in rungs:
        ax.axvline(rung, color="grey", linestyle=":", linewidth=1)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} per epoch (X: stopped early by ASHA; dotted: ASHA rungs)")
    if len(curves) <= 24:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def plot_grouped_bars(
    values: dict[str, dict[str, tuple[float, float]]],
    path: str | Path,
    ylabel: str = "recall",
    title: str = "",
) -> Path:
    """Grouped bars: x = category (e.g. class), one bar per series (variant) with its ± std as an error bar."""
    plt = _pyplot()
    series = list(values)
    categories = sorted({c for per in values.values() for c in per})
    x = np.arange(len(categories))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(categories) * max(1, len(series)) * 0.35 + 3), 4.8))
    for i, name in enumerate(series):
        means = [values[name].get(c, (np.nan, 0.0))[0] for c in categories]
        stds = [values[name].get(c, (np.nan, 0.0))[1] for c in categories]
        ax.bar(x - 0.4 + width * (i + 0.5), means, width, yerr=stds, capsize=2, label=name)
    ax.set_xticks(x, categories, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def plot_epochs_reached(
    trials: Sequence[tuple[str, int, str]],
    path: str | Path,
    max_epochs: int,
    rungs: Sequence[float] = (),
) -> Path:
    """Last epoch each trial reached, coloured by outcome (completed / stopped by ASHA / failed)."""
    plt = _pyplot()
    colours = {"completed": "tab:green", "stopped": "tab:orange", "failed": "tab:red"}
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(trials) + 1.5))
    y = np.arange(len(trials))
    ax.barh(y, [epochs for _, epochs, _ in trials], color=[colours.get(o, "grey") for _, _, o in trials])
    ax.set_yticks(y, [label for label, _, _ in trials], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(max_epochs, color="black", linewidth=1)
    for rung in rungs:
        ax.axvline(rung, color="grey", linestyle=":", linewidth=1)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    ax.legend(handles, list(colours), fontsize=7, loc="lower right")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("last epoch reached (dotted: ASHA rungs, solid: optim.epochs)")
    return _save(fig, path)
