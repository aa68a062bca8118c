"""Finished trials -> mean ± std over seeds per group, tables, per-epoch curves (no Ray session needed)."""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from proco_ray.experiments.spec import SEED_KEY, SELECTED_VAL_COLUMN, SIDE_METRICS, VARIANT_KEY, Experiment
from proco_ray.metric_keys import EPOCH, HEADLINE


@dataclass
class TrialRecord:
    """One finished (or stopped, or failed) trial: its parameters and every epoch it reported."""

    trial_id: str
    params: dict[str, Any]
    history: list[dict[str, Any]]
    error: str | None = None

    @property
    def epochs(self) -> int:
        return max((int(row[EPOCH]) for row in self.history if EPOCH in row), default=0)

    @property
    def group(self) -> str:
        return group_label(self.params)


def group_label(params: Mapping[str, Any]) -> str:
    """Trials that differ only in seed share a group: the variant name, else the non-seed parameters."""
    if params.get(VARIANT_KEY) is not None:
        return str(params[VARIANT_KEY])
    rest = [(k, v) for k, v in sorted(params.items()) if k != SEED_KEY]
    return ", ".join(f"{k}={_short(v)}" for k, v in rest) or "base"


def trial_name(params: Mapping[str, Any]) -> str:
    """A local sweep's folder name of one trial: `<group label>_seed<seed>` (parse_trial_name reads it back)."""
    label = group_label(params).replace(", ", "_").replace("=", "-").replace("/", "-")
    return f"{label}_seed{params.get(SEED_KEY, 0)}"


def parse_trial_name(name: str) -> tuple[str, int] | None:
    """(group label, seed) of a `trial_name`, None for a folder that is not a trial's."""
    label, sep, seed = name.rpartition("_seed")
    return (label, int(seed)) if sep and label and seed.isdigit() else None


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def final_metrics(history: Sequence[Mapping[str, Any]]) -> tuple[str, dict[str, float]]:
    """('test', test/*) when the trial reported test metrics, else ('val', the last val/*); keys unprefixed.

    test/* in a report are the test metrics of the epoch with the best validation macro-F1 so far (the
    training loop evaluates the test split only when validation improves), so the last report holds
    the test metrics of the model selected on validation.
    """
    if not history:
        return "none", {}
    last = history[-1]
    for source in ("test", "val"):
        values = {k[len(source) + 1 :]: float(v) for k, v in last.items() if k.startswith(f"{source}/") and _finite(v)}
        if values:
            return source, values
    return "none", {}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def format_mean_std(mean: float, std: float, n: int, digits: int = 3) -> str:
    """'0.812 ± 0.013'; a single run has no spread to show."""
    if n == 0 or math.isnan(mean):
        return "–"
    if n == 1:
        return f"{mean:.{digits}f} (n=1)"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


@dataclass
class GroupSummary:
    """A variant/config over its seeds."""

    group: str
    params: dict[str, Any]
    trials: int
    n: int
    sources: tuple[str, ...]
    stats: dict[str, tuple[float, float]]
    epochs: tuple[int, ...]
    stopped_early: int
    errors: int
    recall: dict[str, tuple[float, float]]
    side: dict[str, tuple[float, float]] = field(default_factory=dict)


def last_reported(history: Sequence[Mapping[str, Any]], key: str) -> float | None:
    """The last finite value of `key` in a trial's history (a two-stage method logs some keys in one stage only)."""
    return next((float(row[key]) for row in reversed(history) if _finite(row.get(key))), None)


def summarise_groups(records: Sequence[TrialRecord], max_epochs: int, order: Sequence[str] = ()) -> list[GroupSummary]:
    """Mean ± std over seeds per variant/config; groups in `order` first, then by `validation_score`."""
    groups: dict[str, list[TrialRecord]] = {}
    for record in records:
        groups.setdefault(record.group, []).append(record)
    out = []
    for name, members in groups.items():
        finals = [final_metrics(r.history) for r in members if r.error is None]
        finals = [(s, m) for s, m in finals if s != "none"]
        stats = {k: mean_std([m[k] for _, m in finals if k in m]) for k in HEADLINE}
        classes = sorted({k for _, m in finals for k in m if k.startswith("recall/")})
        recall = {c[len("recall/") :]: mean_std([m[c] for _, m in finals if c in m]) for c in classes}
        params = {k: v for k, v in members[0].params.items() if k != SEED_KEY}
        out.append(
            GroupSummary(
                group=name,
                params=params,
                trials=len(members),
                n=len(finals),
                sources=tuple(sorted({s for s, _ in finals})),
                stats=stats,
                epochs=tuple(sorted(r.epochs for r in members)),
                stopped_early=sum(1 for r in members if r.error is None and r.epochs < max_epochs),
                errors=sum(1 for r in members if r.error is not None),
                recall=recall,
                side={
                    name: mean_std(values)
                    for name, key in SIDE_METRICS.items()
                    if (values := [v for r in members if r.error is None and (v := last_reported(r.history, key)) is not None])
                },
            )
        )
    rank = {name: i for i, name in enumerate(order)}
    return sorted(out, key=lambda g: (rank.get(g.group, len(rank)), -validation_score(g)))


def table_rows(groups: Sequence[GroupSummary], markdown: bool) -> list[dict[str, Any]]:
    """Markdown rows ('mean ± std' cells) or CSV rows (separate mean/std columns)."""
    shown_side = [name for name in SIDE_METRICS if any(name in g.side for g in groups)]
    rows = []
    for g in groups:
        row: dict[str, Any] = {"variant": g.group, "seeds": g.n, "metrics from": "+".join(g.sources) or "–"}
        for key in HEADLINE:
            mean, std = g.stats[key]
            if markdown:
                row[key.replace("_", " ")] = format_mean_std(mean, std, g.n)
            else:
                row[f"{key}_mean"], row[f"{key}_std"] = mean, std
        for name in shown_side:
            mean, std = g.side.get(name, (math.nan, math.nan))
            if markdown:
                row[name.replace("_", " ")] = format_mean_std(mean, std, g.n, digits=3 if "f1" in name else 4)
            else:
                row[f"{name.replace(' ', '_')}_mean"], row[f"{name.replace(' ', '_')}_std"] = mean, std
        row["epochs reached" if markdown else "epochs"] = ",".join(str(e) for e in g.epochs)
        row["stopped early" if markdown else "stopped_early"] = g.stopped_early
        row["failed"] = g.errors
        rows.append(row)
    return rows


def validation_score(group: GroupSummary) -> float:
    """Mean over seeds of the validation macro-F1 each trial's kept checkpoint was selected on (-inf without one).

    Settings are chosen on validation: the test metrics the tables report must not choose them.
    """
    mean = group.side.get(SELECTED_VAL_COLUMN, (math.nan, math.nan))[0]
    return -math.inf if math.isnan(mean) else mean


def best_group(groups: Sequence[GroupSummary]) -> GroupSummary | None:
    """The variant/config with the highest `validation_score` among groups with a validation score."""
    scored = [g for g in groups if validation_score(g) > -math.inf]
    return max(scored, key=validation_score) if scored else None


def best_trial(records: Sequence[TrialRecord], metric: str, mode: str) -> TrialRecord | None:
    """The trial whose last reported `metric` is best (the metric ASHA compared)."""
    scored = [(r.history[-1][metric], r) for r in records if r.history and _finite(r.history[-1].get(metric))]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda item: item[0])[1]


def curves(records: Sequence[TrialRecord], metric: str) -> dict[str, list[tuple[int, float]]]:
    """Per trial, (epoch, metric) points in epoch order, for the per-epoch plot."""
    out = {}
    for r in records:
        points = sorted(
            {int(row[EPOCH]): float(row[metric]) for row in r.history if EPOCH in row and _finite(row.get(metric))}.items()
        )
        out[f"{r.group} [{r.trial_id}]"] = points
    return out


def asha_rungs(max_t: int, grace_period: int, reduction_factor: float) -> list[float]:
    """The epochs at which ASHA compares trials, read from Ray's own scheduler so that they cannot drift from it
    (a hand-written formula had dropped the rung at max_t)."""
    from ray.tune.schedulers import ASHAScheduler

    scheduler = ASHAScheduler(
        time_attr=EPOCH, metric="m", mode="max", max_t=max_t, grace_period=grace_period, reduction_factor=reduction_factor
    )
    return sorted(milestone for milestone, _ in scheduler._brackets[0]._rungs)


def product_labels(experiment: Experiment) -> list[str]:
    """Every grid combination's group label (variants first), in definition order, for table order."""
    plan = {k: d for k, d in experiment.plan().items() if d.kind == "grid" and k != SEED_KEY}
    labels = []
    for values in itertools.product(*(d.values for d in plan.values())):
        label = group_label(dict(zip(plan, values)))
        if label not in labels:
            labels.append(label)
    return labels
