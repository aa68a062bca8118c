"""An experiment's results/ folder: mean ± std tables over seeds, per-trial rows, best variant, plots.

Free of Ray, so a Ray Tune sweep (`proco_ray.launch.tune`) and a local sweep (`proco_ray.launch.local_sweep`)
write the same files from their trial records.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml

from proco_ray.evaluation.report import markdown_table, plot_epochs_reached, plot_grouped_bars, plot_trial_curves, write_csv
from proco_ray.experiments.spec import SEED_KEY, SELECTED_VAL_COLUMN, Experiment, trial_overrides
from proco_ray.experiments.stats import (
    TrialRecord,
    asha_rungs,
    best_group,
    best_trial,
    curves,
    final_metrics,
    product_labels,
    summarise_groups,
    table_rows,
)
from proco_ray.metric_keys import BEST_EPOCH, HEADLINE, VAL_MACRO_F1
from proco_ray.storage.s3 import is_s3, join, resolve


def outcome(record: TrialRecord, max_epochs: int) -> str:
    if record.error is not None:
        return "failed"
    return "completed" if record.epochs >= max_epochs else "stopped"


def write_results(records: Sequence[TrialRecord], experiment: Experiment, experiment_uri: str, max_epochs: int) -> dict[str, str]:
    """results/ in the experiment folder: markdown + CSV tables (mean ± std over seeds), best config, plots."""
    if is_s3(experiment_uri):
        with tempfile.TemporaryDirectory() as tmp:
            names = _write_results_to(Path(tmp), records, experiment, max_epochs)
            import pyarrow.fs as pafs

            fs, path = resolve(join(experiment_uri, "results"))
            fs.create_dir(path, recursive=True)
            pafs.copy_files(tmp, path, destination_filesystem=fs)
        return {key: join(experiment_uri, "results", name) for key, name in names.items()}
    out = Path(experiment_uri) / "results"
    names = _write_results_to(out, records, experiment, max_epochs)
    return {key: str(out / name) for key, name in names.items()}


def _write_results_to(out: Path, records: Sequence[TrialRecord], experiment: Experiment, max_epochs: int) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    groups = summarise_groups(records, max_epochs, order=product_labels(experiment) if experiment.variants else ())
    rungs = asha_rungs(max_epochs, experiment.asha.grace_period, experiment.asha.reduction_factor) if experiment.asha else []
    names: dict[str, str] = {}

    trial_rows = []
    for r in records:
        source, final = final_metrics(r.history)
        last = r.history[-1] if r.history else {}
        trial_rows.append(
            {
                "trial": r.trial_id,
                "variant": r.group,
                "seed": r.params.get(SEED_KEY, ""),
                "outcome": outcome(r, max_epochs),
                "epochs": r.epochs,
                "best epoch": last.get(BEST_EPOCH, ""),
                "metrics from": source,
                **{k: final.get(k, "") for k in HEADLINE},
                experiment.metric: last.get(experiment.metric, ""),
                "error": r.error or "",
            }
        )
    if trial_rows:
        names["trials_csv"] = write_csv(trial_rows, out / "trials.csv").name
    if groups:
        names["csv"] = write_csv(table_rows(groups, markdown=False), out / "results.csv").name

    best = best_group(groups)
    top = best_trial(records, experiment.metric, experiment.mode)
    if best is not None:
        variants = {k: dict(v) for k, v in experiment.variants.items()}
        val_mean, val_std = best.side[SELECTED_VAL_COLUMN]
        best_yaml = {
            "variant": best.group,
            "overrides": trial_overrides(variants, best.params),
            "chosen_by": "mean validation macro-F1 of each seed's selected epoch",
            "val_macro_f1": {"mean": val_mean, "std": val_std},
            "macro_f1": {"mean": best.stats["macro_f1"][0], "std": best.stats["macro_f1"][1], "seeds": best.n},
            "metrics_from": list(best.sources),
        }
        (out / "best.yaml").write_text(yaml.safe_dump(best_yaml, sort_keys=False))
        names["best"] = "best.yaml"

    for metric in dict.fromkeys((experiment.metric, VAL_MACRO_F1)):
        points = curves(records, metric)
        stopped = [f"{r.group} [{r.trial_id}]" for r in records if outcome(r, max_epochs) == "stopped"]
        file = f"curves_{metric.replace('/', '_')}.png"
        plot_trial_curves(points, out / file, metric, stopped=stopped, rungs=rungs)
        names[f"curves:{metric}"] = file
    recall = {g.group: g.recall for g in groups if g.recall}
    if recall:
        plot_grouped_bars(recall, out / "recall.png", "recall (mean ± std over seeds)", "per-class recall per variant")
        names["recall"] = "recall.png"
    reached = [(f"{r.group} [{r.trial_id}]", r.epochs, outcome(r, max_epochs)) for r in records]
    if reached:
        plot_epochs_reached(reached, out / "epochs.png", max_epochs, rungs)
        names["epochs"] = "epochs.png"

    lines = [f"# {experiment.name}", ""]
    if experiment.description:
        lines += [experiment.description.strip(), ""]
    lines += [
        f"{len(records)} trials; {sum(outcome(r, max_epochs) == 'completed' for r in records)} ran all {max_epochs} epochs, "
        f"stopped early ({'by ASHA, or ' if experiment.asha else ''}by an interrupted sweep): "
        f"{sum(outcome(r, max_epochs) == 'stopped' for r in records)}, "
        f"failed: {sum(outcome(r, max_epochs) == 'failed' for r in records)}.",
        "",
        "Metrics are mean ± sample std over seeds. *metrics from* says which split: `test` (the test metrics "
        "of each trial's epoch with the best validation macro-F1, the checkpoint kept as best), `val` (the last "
        "val/* reported) where the data has no test split.",
        "",
        markdown_table(table_rows(groups, markdown=True)) if groups else "(no trial reported a result)\n",
    ]
    if best is not None:
        lines += [
            f"**Best variant/config**, chosen on validation (mean selected val macro-F1): `{best.group}` — "
            f"val {val_mean:.3f} ± {val_std:.3f}, "
            f"{'+'.join(best.sources)} macro-F1 {best.stats['macro_f1'][0]:.3f} ± {best.stats['macro_f1'][1]:.3f} "
            f"over {best.n} seed(s); overrides in best.yaml.",
            "",
        ]
    if top is not None:
        lines += [
            f"**Best trial** by {experiment.metric} ({experiment.mode}): `{top.trial_id}` ({top.group}), "
            f"{top.history[-1][experiment.metric]:.4g} at epoch {top.epochs}.",
            "",
        ]
    lines += [f"![{key}]({file})" for key, file in names.items() if file.endswith(".png")]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    names["markdown"] = "results.md"
    return names
