"""Reports for people: confusion-matrix pictures and per-class tables."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def plot_confusion_matrix(confusion: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """A PNG of the confusion matrix, rows normalised to recall, with the counts written in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def per_class_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"class": name, "support": support, "precision": p, "recall": r, "f1": f}
        for name, support, p, r, f in zip(
            metrics["class_names"], metrics["support"], metrics["precision"], metrics["recall"], metrics["f1"]
        )
    ]


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
