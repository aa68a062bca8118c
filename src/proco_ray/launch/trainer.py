"""Ray Train's driver: checks a run before it starts, builds its TorchTrainer and datasets, fits, and sums it up.

What runs inside the workers is in `launch.train_worker`; the command line is `commands.train`.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchConfig, TorchTrainer

from proco_ray.config import DATA_CPUS, Config, ConfigError, save_config
from proco_ray.data.manifest import Manifest, check_manifest, read_manifest
from proco_ray.data.pipeline import StoredSplit, build_dataset, store_split
from proco_ray.data.train_input import TrainInput
from proco_ray.distributed import process_group_backend
from proco_ray.launch.cluster import check_paths_reach_every_node, live_nodes
from proco_ray.launch.run_claim import storage_full, storage_gone, storage_unreachable_from_a_worker
from proco_ray.launch.train_worker import FeedFactory, train_loop_per_worker
from proco_ray.method.registry import resolved, train_inputs
from proco_ray.metric_keys import BEST_EPOCH, CHECKPOINT_SCORE, EPOCH, TEST, VAL
from proco_ray.runs import CONFIG_FILE, RunFolder

TRAIN_PREFIX = "train_"  # training datasets are named by TrainInput.dataset: train_instance_balanced, train_class_balanced


def check_resources(config: Config, streams_data: bool = True) -> None:
    """Refuse, before anything starts, a run the cluster cannot hold (Ray would wait forever)."""
    if config.train.wait_for_autoscaler:
        return
    available = ray.cluster_resources()
    need = config.run_resources(streams_data)
    if any(amount > available.get(resource, 0) for resource, amount in need.items()):
        raise ConfigError(
            f"train.num_workers={config.train.num_workers} x train.cpus_per_worker={config.train.cpus_per_worker}"
            f"{f' (+{config.train.gpus_per_worker:g} GPU each, train.use_gpu=true)' if config.train.use_gpu else ''}"
            f"{f' + {DATA_CPUS} CPU for Ray Data' if streams_data else ''} needs "
            + ", ".join(f"{r}={a:g}" for r, a in need.items())
            + ", the Ray cluster has "
            + ", ".join(f"{r}={available.get(r, 0):g}" for r in need)
            + " (set train.wait_for_autoscaler=true on an autoscaling cluster)"
        )


def check_gpu_sharing(config: Config) -> None:
    """Workers that share a GPU need a backend that allows it: NCCL refuses two ranks on one device."""
    train = config.train
    if train.gpus_per_worker <= 0:
        raise ConfigError(f"train.gpus_per_worker must be positive, got {train.gpus_per_worker:g}")
    backend = process_group_backend(train.use_gpu, train.dist_backend)
    if train.use_gpu and train.gpus_per_worker < 1 and train.num_workers > 1 and "nccl" in backend:
        raise ConfigError(
            f"train.gpus_per_worker={train.gpus_per_worker:g} puts several workers on one GPU, where NCCL "
            f"(train.dist_backend={train.dist_backend} -> {backend}) refuses to run: set train.dist_backend=gloo"
        )


def train_dataset_factory(
    config: Config, source: TrainInput, stored: StoredSplit, run: RunFolder
) -> Callable[[], ray.data.Dataset]:
    """A training dataset built when Ray Train starts (or restarts) the worker group, so its first epoch is
    the resumed run's next epoch and a resumed run sees the row orders of an uninterrupted one. The rows
    were read and checked once, by the driver (`stored`)."""
    data = config.data

    def build() -> ray.data.Dataset:
        return quiet_dataset(
            build_dataset(
                data.uri,
                data.train_split,
                train=True,
                sampling=source.sampling,
                seed=config.train.seed,
                first_epoch=run.resumed_epoch(),
                stored=stored,
            )
        )

    return build


def quiet_dataset(dataset: ray.data.Dataset) -> ray.data.Dataset:
    """The training loop prints its own progress; Ray Data's bars, drawn in workers without a terminal,
    came out as screens of blank lines, and every epoch's execution announced itself and its plan."""
    dataset.context.enable_progress_bars = False
    dataset.context.print_on_execution_start = False
    return dataset


def build_datasets(config: Config, manifest: Manifest, run: RunFolder) -> dict[str, Any]:
    """Training dataset factories (see train_dataset_factory) and the evaluation datasets."""
    data = config.data
    stored = store_split(data.uri, data.train_split)
    datasets: dict[str, Any] = {
        source.dataset: train_dataset_factory(config, source, stored, run) for source in train_inputs(config)
    }
    datasets[data.val_split] = quiet_dataset(build_dataset(data.uri, data.val_split, train=False))
    if data.test_split in manifest.splits:
        datasets[data.test_split] = quiet_dataset(build_dataset(data.uri, data.test_split, train=False))
    return datasets


def build_trainer(
    config: Config, feed_factory: FeedFactory | None = None, callbacks: Sequence[UserCallback] = ()
) -> TorchTrainer:
    """A TorchTrainer for `config`; the same call builds a trial's trainer inside Ray Tune.

    By default workers read the prepared dataset at `data.uri` through Ray Data;
    `feed_factory(config, rank, world_size)` replaces that with a feed built in
    each worker (generated data in tests). `callbacks` go to the run's RunConfig
    (`TuneReportCallback()` when the trainer runs inside a Ray Tune trial).
    """
    check_gpu_sharing(config)
    run = RunFolder.of_config(config)
    loop_config: dict[str, Any] = {"config": config.to_dict(), "run": run}
    datasets: dict[str, Any] = {}
    if feed_factory is not None:
        loop_config["feed_factory"] = feed_factory
    else:
        manifest = read_manifest(config.data.uri)
        check_manifest(config, manifest)
        datasets = build_datasets(config, manifest, run)
        loop_config.update(
            classes=manifest.classes,
            class_counts=manifest.class_counts(config.data.train_split),
            train_rows=manifest.num_rows(config.data.train_split),
            eval_splits=[s for s in datasets if not s.startswith(TRAIN_PREFIX)],
        )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=process_group_backend(config.train.use_gpu, config.train.dist_backend)),
        scaling_config=ScalingConfig(
            num_workers=config.train.num_workers,
            use_gpu=config.train.use_gpu,
            resources_per_worker={
                "CPU": config.train.cpus_per_worker,
                **({"GPU": config.train.gpus_per_worker} if config.train.use_gpu else {}),
            },
        ),
        run_config=RunConfig(
            logging_config=LoggingConfig(log_level="WARNING"),  # our own progress lines; Train's INFO repeats each report
            name=run.name,
            storage_path=run.storage,
            storage_filesystem=run.filesystem,
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.train.keep_checkpoints,
                checkpoint_score_attribute=CHECKPOINT_SCORE,
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=config.train.max_failures),
            callbacks=list(callbacks),
        ),
        datasets=datasets or None,
        dataset_config=ray.train.DataConfig(datasets_to_split=[d for d in datasets if d.startswith(TRAIN_PREFIX)]),
    )


def save_resolved_config(config: Config) -> str:
    """The resolved config (no `auto` left: it states the sampling, augmentation and proto-loss form the method
    chose), so that a run can be repeated and evaluated from its folder."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / CONFIG_FILE
        save_config(resolved(config), local)
        return RunFolder.of_config(config).write_file(CONFIG_FILE, local.read_bytes())


def fit(config: Config, feed_factory: FeedFactory | None = None) -> ray.train.Result:
    """Train on the connected Ray cluster; rerunning with the same train.name and storage resumes."""
    config = resolved(config)
    check_resources(config, streams_data=feed_factory is None)
    check_paths_reach_every_node(
        {"data.uri": config.data.uri if feed_factory is None else "", "train.storage_path": config.train.storage_path},
        live_nodes(),
        config.train.shared_filesystem,
    )
    trainer = build_trainer(config, feed_factory)
    save_resolved_config(config)
    announce_resume(config)
    return fit_and_tidy(trainer, config)


def announce_resume(config: Config) -> None:
    """Say so when this run picks up an earlier one of the same name (Ray Train resumes it silently)."""
    run = RunFolder.of_config(config)
    done = run.resumed_epoch()
    if done:
        print(f"resuming run {run.uri} from its latest checkpoint: epoch {done} of {config.optim.epochs} done", flush=True)


def fit_and_tidy(trainer: TorchTrainer, config: Config) -> ray.train.Result:
    """`trainer.fit()`, then the run's unregistered checkpoint folders removed (RunFolder.remove_unregistered_checkpoints).

    Only after fit returns: the Train controller has then ended, so no checkpoint is being uploaded. A
    fit that raises (an interrupted driver) leaves the folder as it is.
    """
    result = trainer.fit()
    removed = RunFolder.of_config(config).remove_unregistered_checkpoints()
    if removed:
        print(
            f"removed {len(removed)} checkpoint folder(s) that a failed worker group wrote but never registered: {', '.join(removed)}"
        )
    return result


def summarise(result: ray.train.Result, config: Config) -> dict[str, Any]:
    """What a user wants after a run: the model selected on validation, its metrics, and where the outputs are.

    `metrics` are the last report's: validation metrics of the last epoch and, under best/* and test/*, the
    epoch with the best validation macro-F1 and its test metrics; `best_checkpoint` is that epoch's checkpoint.
    """
    if result.error is not None:
        raise result.error
    run = RunFolder.of_config(config)
    metrics = {k: v for k, v in (result.metrics or {}).items() if k.startswith((f"{VAL}/", f"{TEST}/", "best/", EPOCH))}
    by_epoch = {m.get(EPOCH): c for c, m in result.best_checkpoints or []}
    best = by_epoch.get(metrics.get(BEST_EPOCH))
    if best is None and result.best_checkpoints:
        best = result.get_best_checkpoint(CHECKPOINT_SCORE, "max")
    return {
        "metrics": metrics,
        "best_checkpoint": run.uri_of(best.path) if best else None,
        "latest_checkpoint": run.uri_of(result.checkpoint.path) if result.checkpoint else None,
        "tensorboard": run.tensorboard,
        "run": run.uri_of(result.path),
    }


def fit_or_explain(config: Config) -> ray.train.Result:
    """`fit` for the command line: Ctrl-C raises KeyboardInterrupt (exit 130; rerunning resumes), and a run whose
    storage went away or filled up is reported in one line that says how to resume.

    Ray Train takes over SIGINT when fit runs in the main thread and then exits the process with status 1
    and no message; run in a thread, it leaves SIGINT to this process.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = fit(config)
        except BaseException as error:  # handed to the main thread as it is
            outcome["error"] = error

    thread = threading.Thread(target=target, name="proco-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)
    try:
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]
    except Exception as error:
        explained = storage_gone(config) or storage_full(config, error) or storage_unreachable_from_a_worker(config, error)
        if explained is None:
            raise
        raise explained from None
