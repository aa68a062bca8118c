"""Training length: one comparison run at several lengths -> paired differences per seed, and the length curve.

Each length is a finished `proco-ray local-sweep` folder (its trials `<variant>_seed<k>/history.json`). Two
readings of every trial: the test macro-F1 of its best-validation epoch (`test/macro_f1` of the last
report) and of its last epoch (`last/test/macro_f1`, no selection). Two methods are compared seed by
seed (same seed, same split): the mean of their differences with a paired-t 95 % interval.

    proco-ray length-curve --method proco --baseline ce_resample \\
        --dataset "ISIC 2018, 32 px" --sweep 30=RUNS/isic-e30 --sweep 100=RUNS/isic-e100 \\
        --dataset "RetinaMNIST, 28 px" --sweep 15=RUNS/retina-e15 ... --figure length-curve.png
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proco_ray.experiments.stats import parse_trial_name
from proco_ray.metric_keys import LAST_TEST, LAST_TEST_MACRO_F1, TEST

READINGS = {"best-validation epoch": TEST, "last epoch": LAST_TEST}  # the prefix of each reading's test metrics


@dataclass(frozen=True)
class PairedDifference:
    """method - baseline over the seeds both have: per seed, the mean and its paired-t 95 % interval."""

    per_seed: dict[int, float]
    mean: float
    low: float
    high: float


def paired_difference(method: Mapping[int, float], baseline: Mapping[int, float]) -> PairedDifference:
    """Differences on the seeds both ran; the interval is scipy's paired t (nan below 2 seeds)."""
    seeds = sorted(set(method) & set(baseline))
    differences = {seed: method[seed] - baseline[seed] for seed in seeds}
    if len(seeds) < 2:
        value = differences[seeds[0]] if seeds else math.nan
        return PairedDifference(differences, value, math.nan, math.nan)
    mean = statistics.fmean(differences.values())
    if max(differences.values()) - min(differences.values()) <= 1e-12:  # no spread (to rounding): the interval is
        # the point (scipy warns of catastrophic cancellation and returns nan)
        return PairedDifference(differences, mean, mean, mean)
    from scipy.stats import ttest_rel

    interval = ttest_rel([method[s] for s in seeds], [baseline[s] for s in seeds]).confidence_interval(0.95)
    return PairedDifference(differences, mean, float(interval.low), float(interval.high))


def finished_trials(folder: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """{variant: {seed: last report}} of the finished trials of a local-sweep folder: those whose last report has
    the last epoch's test metrics (reported at the final epoch only) and no error."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for history_file in sorted(folder.glob("*/history.json")):
        trial = parse_trial_name(history_file.parent.name)
        history = json.loads(history_file.read_text())
        if trial is None or not history or (history_file.parent / "error.txt").exists():
            continue
        if LAST_TEST_MACRO_F1 in history[-1]:
            variant, seed = trial
            out.setdefault(variant, {})[seed] = history[-1]
    return out


def metric_by_seed(seeds: Mapping[int, Mapping[str, Any]], key: str) -> dict[int, float]:
    """{seed: value of `key`} over the trials of one variant that reported it."""
    return {seed: float(last[key]) for seed, last in seeds.items() if key in last}


def sweep_readings(folder: Path) -> dict[str, dict[str, dict[int, float]]]:
    """{variant: {reading: {seed: test macro-F1}}} of the finished trials of a local-sweep folder."""
    return {
        variant: {
            reading: values for reading, prefix in READINGS.items() if (values := metric_by_seed(seeds, f"{prefix}/macro_f1"))
        }
        for variant, seeds in finished_trials(folder).items()
    }


def _cell(values: Mapping[int, float]) -> str:
    if not values:
        return "–"
    numbers = list(values.values())
    spread = f" ± {statistics.stdev(numbers):.3f}" if len(numbers) > 1 else ""
    return f"{statistics.fmean(numbers):.3f}{spread} (n={len(numbers)})"


def difference_cells(difference: PairedDifference) -> tuple[str, str]:
    """('+0.030, -0.010, +0.050', '+0.023 [-0.040, +0.087]'): the per-seed differences and their summary."""
    per_seed = ", ".join(f"{d:+.3f}" for _, d in sorted(difference.per_seed.items())) or "–"
    if math.isnan(difference.low):
        return per_seed, "–"
    return per_seed, f"{difference.mean:+.3f} [{difference.low:+.3f}, {difference.high:+.3f}]"


Readings = dict[str, dict[int, dict[str, dict[str, dict[int, float]]]]]
"""{dataset: {epochs: sweep_readings(folder)}}."""


def read_datasets(datasets: Mapping[str, Mapping[int, Path]]) -> Readings:
    """Every sweep folder read once, for the table and the figure."""
    return {
        dataset: {epochs: sweep_readings(folder) for epochs, folder in sorted(sweeps.items())}
        for dataset, sweeps in datasets.items()
    }


def length_table(datasets: Readings, method: str, baseline: str, others: Sequence[str] = ()) -> str:
    """A markdown table: one row per dataset, length and reading; the methods' test macro-F1 (mean ± std over
    seeds) and method - baseline per seed with its mean and 95 % interval."""
    names = [method, baseline, *others]
    header = ["dataset", "epochs", "reading", *names, f"{method} − {baseline} per seed", "mean [95 % CI]"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for dataset, sweeps in datasets.items():
        for epochs, readings in sweeps.items():
            for reading in READINGS:
                values = {name: readings.get(name, {}).get(reading, {}) for name in names}
                per_seed, summary = difference_cells(paired_difference(values[method], values[baseline]))
                cells = [dataset, str(epochs), reading, *(_cell(values[n]) for n in names), per_seed, summary]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_length_curve(datasets: Readings, names: Sequence[str], path: Path) -> Path:
    """Test macro-F1 (best-validation epoch, solid; last epoch, dashed) against epochs, a panel per dataset, a
    line per method, error bars from the seeds' standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for axis, (dataset, readings) in zip(axes[0], datasets.items()):
        for index, name in enumerate(names):
            for reading, style in zip(READINGS, ("-", "--")):
                points = [
                    (epochs, list(values))
                    for epochs, r in readings.items()
                    if (values := r.get(name, {}).get(reading, {}).values())
                ]
                if not points:
                    continue
                x = [epochs for epochs, _ in points]
                y = [statistics.fmean(v) for _, v in points]
                error = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in points]
                label = f"{name} ({reading})"
                axis.errorbar(x, y, yerr=error, fmt=style + "o", color=f"C{index}", capsize=3, label=label, alpha=0.9)
        axis.set_xscale("log")
        axis.minorticks_off()
        axis.set_xticks(list(readings), [str(e) for e in readings])
        axis.set_xlabel("epochs")
        axis.set_ylabel("test macro-F1")
        axis.set_title(dataset)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)  # per panel: a dataset may show methods the others lack
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
