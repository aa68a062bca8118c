"""The paper's Table 2 beside ours: each method's test metrics from finished local sweeps (both readings, mean ±
std over seeds), the paper's numbers and ranks, the rank correlation of the two orderings, and ProCo's paired
differences with the two strongest baselines.

Methods are ranked by macro-F1: the paper's by its reported F1, ours by the mean test macro-F1 of each seed's
best-validation epoch. Both of our ProCo forms stand against the paper's one ProCo row; the correlation is given
once with each. The two strongest baselines are chosen on validation (mean selected validation macro-F1), never
on the test metrics they are compared on.

    proco-ray paper-table --dataset isic2018 --sweep RUNS/t2-e100 [--sweep RUNS/more-e100]
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from proco_ray.experiments.length import READINGS, difference_cells, finished_trials, metric_by_seed, paired_difference
from proco_ray.experiments.stats import format_mean_std, mean_std
from proco_ray.metric_keys import BEST_VAL_MACRO_F1, HEADLINE, TEST

# Table 2 of the paper (ResNet-50, 224 px, 1,000 epochs on ISIC 2018 and 2,000 on APTOS 2019, a random stratified
# 7:3 split): (accuracy, F1) per method under our registry's names.
PAPER_TABLE2: dict[str, dict[str, tuple[float, float]]] = {
    "isic2018": {
        "ce": (0.850, 0.716),
        "ce_resample": (0.861, 0.735),
        "focal": (0.849, 0.728),
        "ldam_drw": (0.857, 0.734),
        "ohem": (0.818, 0.660),
        "mtl": (0.811, 0.667),
        "danil": (0.825, 0.674),
        "cl": (0.865, 0.739),
        "cl_resample": (0.868, 0.751),
        "proco": (0.887, 0.763),
    },
    "aptos2019": {
        "ce": (0.812, 0.608),
        "ce_resample": (0.802, 0.583),
        "focal": (0.815, 0.629),
        "ldam_drw": (0.813, 0.620),
        "ohem": (0.813, 0.631),
        "mtl": (0.813, 0.632),
        "danil": (0.825, 0.660),
        "cl": (0.825, 0.652),
        "cl_resample": (0.816, 0.608),
        "proco": (0.837, 0.674),
    },
}
PROCO_FORMS = {"proco": "proco", "proco_paper": "proco"}  # our variant -> the paper's row it stands for
PERMUTATIONS = 100_000  # random pairings for the correlation's p-value when n! is larger (n > 8)


Trials = dict[str, dict[int, dict[str, Any]]]
"""{variant: {seed: the trial's last report}}."""


def read_sweeps(folders: Sequence[Path]) -> Trials:
    """The finished trials of several local-sweep folders; a (variant, seed) in two folders is an error, since the
    table would silently pick one."""
    trials: Trials = {}
    for folder in folders:
        for variant, seeds in finished_trials(folder).items():
            for seed, last in seeds.items():
                if seed in trials.get(variant, {}):
                    raise ValueError(f"{variant} seed {seed} is finished in more than one of the folders given ({folder})")
                trials.setdefault(variant, {})[seed] = last
    return trials


def ranks(scores: Mapping[str, float]) -> dict[str, float]:
    """Rank 1 for the highest score; ties share their mean rank (as scipy.stats.rankdata's 'average')."""
    from scipy.stats import rankdata

    names = list(scores)
    return dict(zip(names, (float(r) for r in rankdata([-scores[n] for n in names], method="average"))))


@dataclass(frozen=True)
class RankCorrelation:
    """Spearman's rho of two orderings of the same methods, its two-sided permutation p-value, and a 95 % interval
    from resampling each method's seeds (how far our ordering's seed noise moves rho)."""

    methods: tuple[str, ...]
    rho: float
    p_value: float
    low: float
    high: float


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks (scipy.stats.spearmanr)."""
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def spearman_p_value(x: Sequence[float], y: Sequence[float], seed: int = 0) -> float:
    """Two-sided p-value of rho = 0 by permuting the pairings: exact for up to 8 methods, else `PERMUTATIONS` random
    pairings (seeded); the t approximation scipy's spearmanr returns is poor for the 10 methods of a table."""
    from scipy.stats import permutation_test, rankdata

    rank_x, rank_y = rankdata(x), rankdata(y)

    def rho(permuted: np.ndarray, axis: int) -> np.ndarray:
        a = rank_x - rank_x.mean()
        b = permuted - permuted.mean(axis=axis, keepdims=True)
        return (b * a).sum(axis=axis) / np.sqrt((a * a).sum() * (b * b).sum(axis=axis))

    exact = math.factorial(len(x)) <= PERMUTATIONS
    result = permutation_test(
        (rank_y,),
        rho,
        permutation_type="pairings",
        n_resamples=np.inf if exact else PERMUTATIONS,
        alternative="two-sided",
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    return float(result.pvalue)


def rank_correlation(
    paper: Mapping[str, float], ours: Mapping[str, Mapping[int, float]], resamples: int = 2000, seed: int = 0
) -> RankCorrelation:
    """rho between the paper's scores and the means of ours over seeds, on the methods both have."""
    methods = tuple(m for m in paper if ours.get(m))
    x = [paper[m] for m in methods]
    y = [statistics.fmean(ours[m].values()) for m in methods]
    if len(methods) < 3:
        return RankCorrelation(methods, math.nan, math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    seeds = [np.array(list(ours[m].values())) for m in methods]
    samples = []
    for _ in range(resamples):
        samples.append(spearman_rho(x, [float(rng.choice(values, size=len(values)).mean()) for values in seeds]))
    low, high = np.nanpercentile(samples, [2.5, 97.5])
    return RankCorrelation(methods, spearman_rho(x, y), spearman_p_value(x, y, seed), float(low), float(high))


def strongest_baselines(trials: Trials, count: int = 2) -> list[str]:
    """The `count` non-ProCo variants with the highest mean selected validation macro-F1."""
    scored = {
        variant: statistics.fmean(values)
        for variant, seeds in trials.items()
        if variant not in PROCO_FORMS and (values := list(metric_by_seed(seeds, BEST_VAL_MACRO_F1).values()))
    }
    return sorted(scored, key=scored.__getitem__, reverse=True)[:count]


def _cell(values: Mapping[int, float]) -> str:
    return format_mean_std(*mean_std(list(values.values())), len(values))


def _forms_of(method: str) -> list[str]:
    return [form for form, row in PROCO_FORMS.items() if row == method]


def _rank_cell(rank: float | None) -> str:
    return "–" if rank is None else (f"{rank:.0f}" if rank == int(rank) else f"{rank:.1f}")


def _correlation_line(name: str, correlation: RankCorrelation) -> str:
    if math.isnan(correlation.rho):
        return f"- {name}: fewer than 3 methods in both tables"
    return (
        f"- {name}: Spearman rho = {correlation.rho:+.2f} over {len(correlation.methods)} methods, "
        f"p = {correlation.p_value:.3f} (permutation, two-sided); 95 % seed-resampling interval "
        f"[{correlation.low:+.2f}, {correlation.high:+.2f}]"
    )


def paper_table(trials: Trials, dataset: str) -> str:
    """Markdown: the side-by-side table, the rank correlations, the paired differences."""
    paper = PAPER_TABLE2[dataset]
    f1 = {variant: metric_by_seed(seeds, f"{TEST}/macro_f1") for variant, seeds in trials.items()}
    our_rank = ranks({v: statistics.fmean(s.values()) for v, s in f1.items() if s})
    paper_f1 = {method: f1_score for method, (_, f1_score) in paper.items()}
    paper_rank = ranks(paper_f1)
    order = [form for method in paper for form in (_forms_of(method) or [method])]
    order += [variant for variant in trials if variant not in order]

    metrics = [(reading, prefix, name) for reading, prefix in READINGS.items() for name in HEADLINE]
    short = {"accuracy": "acc.", "macro_f1": "macro-F1", "balanced_accuracy": "bal. acc."}
    header = ["method", "paper acc.", "paper F1", "paper rank"]
    header += [f"{short[name]} ({'best val.' if prefix == TEST else 'last'})" for _, prefix, name in metrics]
    header += ["our rank", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in order:
        row_of = PROCO_FORMS.get(variant, variant)
        seeds = trials.get(variant, {})
        cells = [f"`{variant}`"]
        if row_of in paper:
            cells += [f"{paper[row_of][0]:.3f}", f"{paper_f1[row_of]:.3f}", _rank_cell(paper_rank[row_of])]
        else:
            cells += ["–", "–", "–"]
        cells += [_cell(metric_by_seed(seeds, f"{prefix}/{name}")) for _, prefix, name in metrics]
        cells += [_rank_cell(our_rank.get(variant)), str(len(seeds))]
        lines.append("| " + " | ".join(cells) + " |")

    lines += ["", "Rank correlation with the paper's F1 ordering (our test macro-F1, best-validation epoch):"]
    for form in PROCO_FORMS:
        ours = {PROCO_FORMS.get(v, v): f1[v] for v in f1 if v == form or v not in PROCO_FORMS}
        lines.append(_correlation_line(f"with `{form}` as the paper's ProCo", rank_correlation(paper_f1, ours)))

    baselines = strongest_baselines(trials)
    lines += [
        "",
        f"Paired differences in test macro-F1 (per seed; mean and paired-t 95 % interval) against the two "
        f"strongest baselines on validation ({', '.join(f'`{b}`' for b in baselines) or 'none finished'}):",
        "",
    ]
    lines += ["| method − baseline | reading | per seed | mean [95 % CI] |", "|---|---|---|---|"]
    for form in (f for f in PROCO_FORMS if f in trials):
        for baseline in baselines:
            for reading, prefix in READINGS.items():
                key = f"{prefix}/macro_f1"
                difference = paired_difference(metric_by_seed(trials[form], key), metric_by_seed(trials[baseline], key))
                lines.append(f"| `{form}` − `{baseline}` | {reading} | {' | '.join(difference_cells(difference))} |")
    return "\n".join(lines)
