"""Ray Tune adapter: an experiment (configs/tune/*.yaml) as a sweep of TorchTrainer trials, then its tables and plots.

Train V2 inside Tune: each trial (`launch.tune_trial.ProCoTrial`) runs one TorchTrainer and
ASHA decides which trials continue. The trial actor holds 1 CPU and only drives its trainer (the Train controller
takes none); the workers hold train.num_workers x train.cpus_per_worker (+ train.gpus_per_worker GPUs each).

Layout of `<storage>/<name>/`:
    experiment.json            the definition, to refuse resuming with a different one
    tuner.pkl, experiment_state-*.json, basic-variant-state-*.json   Tune's state (resume)
    <trial>/                   Tune's per-trial results (result.json, progress.csv, TensorBoard + HParams)
    <trial>/train/             the trial's Train run: checkpoints, rank-0 TensorBoard, config.yaml
    results/                   results.md, results.csv, trials.csv, best.yaml, *.png
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.tune
from ray.tune import Tuner
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from proco_ray.config import Config, ConfigError
from proco_ray.experiments.results import write_results
from proco_ray.experiments.spec import (
    DRIVER_CPUS,
    Asha,
    Domain,
    Experiment,
    check_data,
    max_concurrent_trials,
    trial_resources,
    validate,
)
from proco_ray.experiments.stats import TrialRecord
from proco_ray.launch.cluster import check_paths_reach_every_node, live_nodes
from proco_ray.launch.train_worker import FeedFactory
from proco_ray.launch.tune_trial import ProCoTrial, TrialSetup
from proco_ray.metric_keys import EPOCH, HEADLINE, TEST, VAL
from proco_ray.ray_compat import HParamsFilterLogger
from proco_ray.storage.s3 import is_s3, join, read_bytes, write_bytes

HPARAM_METRICS = tuple(f"{split}/{name}" for split in (VAL, TEST) for name in HEADLINE)


def trial_dirname(trial: Any) -> str:
    """`<trial id>-<variant or params>`: readable TensorBoard run names (module level: pickled for resume)."""
    params = trial.evaluated_params or {}
    label = "_".join(
        f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}" for k, v in params.items()
    )
    label = re.sub(r"[^A-Za-z0-9_.=+-]", "", label.replace("variant=", ""))[:80]
    return f"{trial.trial_id}-{label}" if label else trial.trial_id


class HParamsLogger(HParamsFilterLogger):
    """Tune's TensorBoard logger (per-trial scalars + HParams), with only the headline metrics in the HParams table.

    Being a TBXLoggerCallback, it replaces Tune's default one instead of doubling it.
    """

    def hparams_metrics(self, result: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in result.items() if k.removeprefix("ray/tune/") in HPARAM_METRICS + (EPOCH,)}


def to_tune(domain: Domain) -> Any:
    """A search Domain as a Tune search-space object."""
    if domain.kind == "grid":
        return domain.values[0] if len(domain.values) == 1 else ray.tune.grid_search(list(domain.values))
    if domain.kind == "choice":
        return ray.tune.choice(list(domain.values))
    if domain.kind == "uniform":
        return ray.tune.uniform(*domain.values)
    if domain.kind == "loguniform":
        return ray.tune.loguniform(*domain.values)
    if domain.kind == "randint":
        return ray.tune.randint(*domain.values)
    raise ConfigError(f"unknown search kind '{domain.kind}'")


# --------------------------------------------------------------------------- the sweep


@dataclass
class SweepPlan:
    """What `validate_sweep` settled before anything starts."""

    configs: list[Config]
    max_epochs: int
    per_trial: dict[str, float]
    max_concurrent: int


def validate_sweep(
    experiment: Experiment,
    base: Mapping[str, Any],
    cluster: Mapping[str, float],
    feed_factory: FeedFactory | None,
    max_concurrent: int | None = None,
) -> SweepPlan:
    """Every check that can fail before a trial starts: keys, values, metric, resources, data."""
    configs = validate(experiment, base)
    per_trial: dict[str, float] = {}
    for config in configs:
        for resource, amount in trial_resources(config, streams_data=feed_factory is None).items():
            per_trial[resource] = max(per_trial.get(resource, 0.0), amount)
    autoscaling = any(c.train.wait_for_autoscaler for c in configs)
    fits = max_concurrent_trials(cluster, per_trial, autoscaling)
    if feed_factory is None:
        check_data(configs)
    return SweepPlan(configs, max(c.optim.epochs for c in configs), per_trial, max_concurrent or fits)


def _definition(experiment: Experiment, base: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps({"experiment": dataclasses.asdict(experiment), "base": base}, default=str))


def _check_same_definition(experiment_uri: str, definition: dict[str, Any]) -> None:
    """Resuming with a changed search space or base config would mix two experiments in one table."""
    saved = read_bytes(join(experiment_uri, "experiment.json"))
    if saved is None:
        return
    previous = json.loads(saved)
    if previous == definition:
        return
    changed = sorted(
        {f"experiment.{k}" for k in definition["experiment"] if previous["experiment"].get(k) != definition["experiment"][k]}
        | {f"base.{k}" for k in definition["base"] if previous["base"].get(k) != definition["base"][k]}
    )
    raise ConfigError(
        f"the sweep at {experiment_uri} was started with a different definition (changed: {', '.join(changed)}); "
        "resume it unchanged, or pass a new --name"
    )


def experiment_folder(storage_path: str, name: str) -> str:
    """A sweep's folder: `<storage_path>/<name>`, an absolute path on local disk (Tune's storage_path must be)."""
    return join(storage_path if is_s3(storage_path) else os.path.abspath(storage_path), name)


def build_tuner(experiment: Experiment, plan: SweepPlan, trainable: Any, name: str, storage_path: str) -> Tuner:
    scheduler = (
        ASHAScheduler(
            time_attr=EPOCH,
            max_t=plan.max_epochs,
            grace_period=experiment.asha.grace_period,
            reduction_factor=experiment.asha.reduction_factor,
        )
        if experiment.asha is not None
        else FIFOScheduler()
    )
    return Tuner(
        trainable,
        param_space={key: to_tune(domain) for key, domain in experiment.plan().items()},
        tune_config=ray.tune.TuneConfig(
            metric=experiment.metric,
            mode=experiment.mode,
            scheduler=scheduler,
            num_samples=experiment.num_samples,
            max_concurrent_trials=plan.max_concurrent,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=ray.tune.RunConfig(name=name, storage_path=storage_path, callbacks=[HParamsLogger()]),
    )


@dataclass
class SweepResult:
    experiment_uri: str
    records: list[TrialRecord]
    outputs: dict[str, str]
    resumed: bool


def sweep(
    experiment: Experiment,
    base: Mapping[str, Any],
    *,
    name: str,
    storage_path: str,
    feed_factory: FeedFactory | None = None,
    resume: bool | None = None,
    max_concurrent: int | None = None,
) -> SweepResult:
    """Run (or resume) the experiment on the connected Ray cluster and write its results.

    `resume=None` resumes a sweep found at `<storage_path>/<name>` and starts one
    otherwise; `resume=True` insists on resuming. Finished trials are not rerun;
    unfinished and failed ones restart, and their Train runs resume from their
    latest checkpoints.
    """
    plan = validate_sweep(experiment, base, ray.cluster_resources(), feed_factory, max_concurrent)
    nodes = live_nodes()
    for config in plan.configs:
        check_paths_reach_every_node(
            {"data.uri": config.data.uri if feed_factory is None else "", "--storage-path": storage_path},
            nodes,
            config.train.shared_filesystem,
        )
    experiment_uri = experiment_folder(storage_path, name)
    definition = _definition(experiment, base)
    setup = TrialSetup(dict(base), {k: dict(v) for k, v in experiment.variants.items()}, experiment_uri, feed_factory)
    # The trial actor only drives the trainer; Train places the workers' resources itself.
    trainable = ray.tune.with_resources(ray.tune.with_parameters(ProCoTrial, setup=setup), {"cpu": DRIVER_CPUS})
    resumed = Tuner.can_restore(experiment_uri)
    if resumed:
        _check_same_definition(experiment_uri, definition)
        tuner = Tuner.restore(experiment_uri, trainable=trainable, resume_errored=True)
    elif resume:
        raise ConfigError(f"nothing to resume at {experiment_uri}: no Tune experiment state there")
    else:
        write_bytes(join(experiment_uri, "experiment.json"), json.dumps(definition, indent=2).encode())
        tuner = build_tuner(experiment, plan, trainable, name, experiment_uri.rsplit("/", 1)[0])
    grid = tuner.fit()
    records = records_from(grid)
    outputs = write_results(records, experiment, experiment_uri, plan.max_epochs)
    return SweepResult(experiment_uri, records, outputs, resumed)


def records_from(grid: ray.tune.ResultGrid) -> list[TrialRecord]:
    """Each trial's parameters and per-epoch history from Tune's results (progress.csv)."""
    records = []
    for result in grid:
        frame = result.metrics_dataframe
        history = []
        if frame is not None:
            for row in frame.to_dict("records"):
                history.append({k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))})
        history.sort(key=lambda row: (row.get(EPOCH, 0), row.get("timestamp", 0)))
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name.split("-")[0]
        error = None if result.error is None else f"{type(result.error).__name__}: {result.error}"
        records.append(TrialRecord(str(trial_id), dict(result.config or {}), history, error))
    return sorted(records, key=lambda r: r.trial_id)


# --------------------------------------------------------------------------- results


def report(experiment_uri: str, experiment: Experiment | None = None) -> dict[str, str]:
    """(Re)write results/ for an existing sweep without running anything (e.g. while it is still running)."""
    saved = read_bytes(join(experiment_uri, "experiment.json"))
    if experiment is None:
        if saved is None:
            raise ConfigError(f"no experiment.json at {experiment_uri}: not a proco-ray sweep")
        experiment = _experiment_from_definition(json.loads(saved)["experiment"])
    base = json.loads(saved)["base"] if saved else {}
    setup = TrialSetup(base, {k: dict(v) for k, v in experiment.variants.items()}, experiment_uri)
    grid = Tuner.restore(experiment_uri, trainable=ray.tune.with_parameters(ProCoTrial, setup=setup)).get_results()
    configs = validate(experiment, base)
    return write_results(records_from(grid), experiment, experiment_uri, max(c.optim.epochs for c in configs))


def _experiment_from_definition(values: Mapping[str, Any]) -> Experiment:
    return Experiment(
        **{
            **values,
            "seeds": tuple(values["seeds"]),
            "search_space": {k: Domain(d["kind"], tuple(d["values"])) for k, d in values["search_space"].items()},
            "asha": Asha(**values["asha"]) if values["asha"] else None,
        }
    )


# --------------------------------------------------------------------------- command line
