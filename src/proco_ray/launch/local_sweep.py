"""An experiment's grid (variants x seeds) on one machine without Ray: `proco-ray local-sweep`.

Each trial is the per-worker loop (`engine.loop.train_worker`) on a `feeds.local_feed` over the
prepared dataset (the same shards, checks, row orders and stored uint8 images as the Ray Data
pipeline; the loop makes the views on the trial's device), in its own process; `--parallel` trials run at once and share the machine's CPUs
and its one GPU. It is for a single GPU machine or a workstation, where a Ray cluster buys
nothing; `proco-ray tune` runs the same experiment files on a cluster, with ASHA.

Layout of `--out`:
    <trial>/config.yaml, <trial>/history.json   every epoch's metrics; a complete history is not rerun
    <trial>/checkpoint_epoch_NNNN/              the trial's latest checkpoint: an interrupted trial resumes
                                                  from it when the sweep is rerun (the final model once complete)
    results/                                      the same tables and plots as `proco-ray tune`
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import multiprocessing
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from proco_ray.config import Config, ConfigError, load_config, save_config
from proco_ray.engine.checkpoint import CheckpointFolder
from proco_ray.experiments.results import write_results
from proco_ray.experiments.spec import (
    SEED_KEY,
    Experiment,
    check_data,
    trial_config,
    validate,
)
from proco_ray.experiments.stats import TrialRecord, trial_name
from proco_ray.method.registry import resolved
from proco_ray.metric_keys import EPOCH, VAL_MACRO_F1


def grid_trials(experiment: Experiment) -> list[dict[str, Any]]:
    """Every (variant, seed) combination, seeds slowest: every variant runs once before any runs twice."""
    plan = experiment.plan()
    not_grid = [key for key, domain in plan.items() if domain.kind != "grid"]
    if not_grid or experiment.num_samples != 1:
        raise ConfigError(
            f"experiment '{experiment.name}': a local sweep runs grids of variants and seeds only "
            f"(sampled parameters {not_grid}, num_samples {experiment.num_samples}); use proco-ray tune"
        )
    keys = sorted(plan, key=lambda key: key != SEED_KEY)
    return [dict(zip(keys, values)) for values in itertools.product(*(plan[k].values for k in keys))]


def _history_path(out: Path, name: str) -> Path:
    return out / name / "history.json"


def run_trial(config_dict: dict[str, Any], trial_dir: str, device: str, threads: int, workers: int) -> dict[str, Any]:
    """One trial in this process; returns {'history': [...]} or {'error': '...'}.

    Every epoch it writes history.json, then its checkpoint: a trial stopped at any point resumes from its
    latest checkpoint, with the history cut back to that epoch (the loop reseeds every epoch, so the resumed
    trial draws what an uninterrupted one draws).
    """
    import torch

    from proco_ray.config import config_from_dict
    from proco_ray.engine.feeds import local_feed
    from proco_ray.engine.loop import WorkerEnv, train_worker

    torch.set_num_threads(threads)
    config = config_from_dict(config_dict)
    directory = Path(trial_dir)
    folder = CheckpointFolder(directory, keep=1, history_file=directory / "history.json")
    latest = next(reversed(folder.checkpoints()), None)
    if latest is not None and folder.history_file.is_file():
        folder.history = [row for row in json.loads(folder.history_file.read_text()) if row[EPOCH] <= latest[0]]

    try:
        feed = local_feed(config.data.uri, config, workers=workers)
        env = WorkerEnv(
            device=torch.device(device),
            report=folder,
            print_progress=False,
            resume_from=latest[1] if latest is not None else None,
        )
        train_worker(config, feed, env)
        return {"history": folder.history}
    except Exception as error:  # noqa: BLE001 - a failed trial is recorded, the sweep goes on
        (directory / "error.txt").write_text(traceback.format_exc())
        return {"history": folder.history, "error": f"{type(error).__name__}: {error}"}


def local_sweep(
    experiment: Experiment,
    base: dict[str, Any],
    out: Path,
    parallel: int = 1,
    device: str = "cpu",
    threads: int = 1,
    workers: int = 1,
    report_only: bool = False,
) -> list[TrialRecord]:
    """Run every trial not already complete in `out`, `parallel` at a time, resuming interrupted ones from their
    latest checkpoint; write results/; return the records.

    `report_only` trains nothing and writes results/ from the trials found (running, cut short or complete).
    """
    configs = validate(experiment, base)
    if not report_only:
        check_data(configs)
    epochs = configs[0].optim.epochs if configs else 0
    trials = grid_trials(experiment)
    out.mkdir(parents=True, exist_ok=True)
    todo: list[tuple[str, Config]] = []
    for params in [] if report_only else trials:
        name = trial_name(params)
        config = resolved(trial_config(base, experiment.variants, params, name=name, storage_path=str(out)))
        history_file = _history_path(out, name)
        saved = out / name / "config.yaml"
        if saved.is_file() and resolved(load_config(saved)).to_dict() != config.to_dict():
            raise ConfigError(
                f"{out / name} was run with another config than experiment '{experiment.name}' now gives this "
                f"trial (its variant or the overrides changed): use another --out, or delete that folder to rerun it"
            )
        if history_file.is_file() and len(json.loads(history_file.read_text())) >= config.optim.epochs:
            continue
        (out / name).mkdir(exist_ok=True)
        (out / name / "error.txt").unlink(missing_ok=True)
        save_config(config, out / name / "config.yaml")
        kept = CheckpointFolder(out / name).checkpoints()
        if kept:
            epoch, folder = kept[-1]
            print(f"{name}: resuming after epoch {epoch} of {config.optim.epochs} ({folder.name})", flush=True)
        todo.append((name, config))
    if not report_only:
        print(
            f"{len(trials)} trials, {len(trials) - len(todo)} already complete, {len(todo)} to run, {parallel} at a time",
            flush=True,
        )
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, parallel), mp_context=context) as pool:
        futures = {
            pool.submit(run_trial, config.to_dict(), str(out / name), device, threads, workers): name for name, config in todo
        }
        for done, future in enumerate(as_completed(futures), 1):
            name = futures[future]
            outcome = future.result()
            last = outcome["history"][-1] if outcome["history"] else {}
            status = outcome.get("error") or (
                f"best epoch {last.get('best/epoch')}: val macro-F1 {last.get('best/val_macro_f1', float('nan')):.3f}, "
                f"test macro-F1 {last.get('test/macro_f1', float('nan')):.3f} (last epoch's val "
                f"{last.get(VAL_MACRO_F1, float('nan')):.3f})"
            )
            print(
                f"[{done}/{len(todo)}] {name}: {status} ({time.perf_counter() - start:.0f} s since the sweep began)", flush=True
            )
    records = []
    for params in trials:
        name = trial_name(params)
        history_file = _history_path(out, name)
        history = json.loads(history_file.read_text()) if history_file.is_file() else []
        error_file = out / name / "error.txt"
        error = error_file.read_text().strip().splitlines()[-1] if error_file.is_file() else None
        if history or error is not None or not report_only:
            records.append(TrialRecord(name, params, history, error))
    write_results(records, experiment, str(out), epochs)
    return records


def narrow(experiment: Experiment, only: str | None = None, seeds: str | None = None) -> Experiment:
    """The experiment restricted to some of its variants and seeds (comma-separated names and numbers),
    so that a sweep can be split over machines or completed piece by piece under the same trial names."""
    if only:
        chosen = only.split(",")
        unknown = [v for v in chosen if v not in experiment.variants]
        if unknown:
            raise ConfigError(
                f"--only: no variant {unknown} in experiment '{experiment.name}' (it has {list(experiment.variants)})"
            )
        experiment = dataclasses.replace(experiment, variants={v: experiment.variants[v] for v in chosen})
    if seeds:
        try:
            chosen_seeds = [int(seed) for seed in seeds.split(",")]
        except ValueError:
            raise ConfigError(f"--seeds: '{seeds}' is not a comma-separated list of integers") from None
        unknown = [seed for seed in chosen_seeds if seed not in experiment.seeds]
        if unknown:
            raise ConfigError(f"--seeds: no seed {unknown} in experiment '{experiment.name}' (it has {list(experiment.seeds)})")
        experiment = dataclasses.replace(experiment, seeds=tuple(chosen_seeds))
    return experiment
