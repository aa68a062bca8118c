"""Ray Train adapter: runs `engine.loop.train_worker` in TorchTrainer workers fed by Ray Data.

Everything here is glue: where batches come from (dataset shards), how the model
is wrapped (`prepare_model`), where metrics and checkpoints go (`ray.train.report`)
and what a restarted worker group resumes from (`ray.train.get_checkpoint`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchConfig, TorchTrainer

from proco_ray.config import DATA_CPUS, Config, ConfigError, config_from_dict, load_config, save_config
from proco_ray.data.manifest import Manifest, check_manifest, read_manifest
from proco_ray.data.pipeline import StoredSplit, build_dataset, store_split
from proco_ray.data.train_input import TrainInput
from proco_ray.engine.distributed import process_group_backend
from proco_ray.engine.feeds import Batch, DataFeed
from proco_ray.engine.loop import WorkerEnv, train_worker
from proco_ray.launch.cluster import check_paths_reach_every_node, connect_or_start_ray, live_nodes
from proco_ray.launch.ray_compat import (
    RAY_CHECKPOINT_DIR,
    RAY_TRAIN_SNAPSHOT,
    TrainSnapshot,
    parse_train_snapshot,
    train_report_logger_name,
)
from proco_ray.launch.run_claim import claimed, storage_full, storage_gone
from proco_ray.method.registry import resolved, train_inputs
from proco_ray.metric_keys import BEST_EPOCH, CHECKPOINT_SCORE, EPOCH, TEST, VAL
from proco_ray.storage.s3 import is_s3, join, resolve, write_bytes

ON_INTERRUPT = "rerun the same command to resume from the run's latest checkpoint"  # printed by the CLI on Ctrl-C
TRAIN_PREFIX = "train_"  # training datasets are named by TrainInput.dataset: train_shuffled, train_resampled


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


def read_snapshot(run_path: str, filesystem: pafs.FileSystem | None = None) -> TrainSnapshot | None:
    """Ray Train's snapshot of a run's registered checkpoints, None before the first registration."""
    filesystem = filesystem or pafs.LocalFileSystem()
    path = f"{run_path}/{RAY_TRAIN_SNAPSHOT}"
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as stream:
        return parse_train_snapshot(stream.read())


def resumed_epoch(run_path: str, filesystem: pafs.FileSystem | None = None) -> int:
    """Epochs done by the checkpoint a (re)started worker group resumes from, 0 for a new run.

    Read from Ray Train's own snapshot of registered checkpoints, whose latest entry is what
    `ray.train.get_checkpoint()` hands the workers: a checkpoint written but not registered when a worker
    died is neither resumed from nor counted here. `run_path`/`filesystem` as run_storage gives them (the
    filesystem travels with the run, so the Train controller needs no credentials of its own).
    """
    snapshot = read_snapshot(run_path, filesystem)
    return int(snapshot.latest.metrics[EPOCH]) if snapshot and snapshot.latest else 0


def remove_unregistered_checkpoints(run_path: str, filesystem: pafs.FileSystem | None = None) -> list[str]:
    """Delete the checkpoint folders of a finished run that Ray Train never registered; return their names.

    A worker uploads its checkpoint before the report that registers it; a worker group that fails in
    between leaves a folder that no resume reads and keep_checkpoints never counts. Only folders named as
    Ray Train names checkpoints, directly in the run folder, are candidates; everything the snapshot
    lists (kept, latest, pending) stays.
    """
    filesystem = filesystem or pafs.LocalFileSystem()
    snapshot = read_snapshot(run_path, filesystem)
    registered = snapshot.dir_names() if snapshot else set()
    listing = filesystem.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
    orphans = sorted(
        info.base_name
        for info in listing
        if info.type == pafs.FileType.Directory
        and RAY_CHECKPOINT_DIR.fullmatch(info.base_name)
        and info.base_name not in registered
    )
    for name in orphans:
        filesystem.delete_dir(f"{run_path}/{name}")
    return orphans


def train_dataset_factory(
    config: Config, source: TrainInput, stored: StoredSplit, run_path: str, filesystem: pafs.FileSystem | None
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
                resample=source.resample,
                seed=config.train.seed,
                first_epoch=resumed_epoch(run_path, filesystem),
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


def build_datasets(config: Config, manifest: Manifest, run_path: str, filesystem: pafs.FileSystem | None) -> dict[str, Any]:
    """Training dataset factories (see train_dataset_factory) and the evaluation datasets."""
    data = config.data
    stored = store_split(data.uri, data.train_split)
    datasets: dict[str, Any] = {
        source.dataset: train_dataset_factory(config, source, stored, run_path, filesystem) for source in train_inputs(config)
    }
    datasets[data.val_split] = quiet_dataset(build_dataset(data.uri, data.val_split, train=False))
    if data.test_split in manifest.splits:
        datasets[data.test_split] = quiet_dataset(build_dataset(data.uri, data.test_split, train=False))
    return datasets


def shard_feed(config: Config, context: dict[str, Any]) -> DataFeed:
    """This worker's DataFeed over its Ray Data shards: uint8 batches copied to the worker's device from
    pinned memory, `data.prefetch_batches` ahead of the step, so that the copy overlaps it.

    Training shards are split equally across workers, so every rank runs the same
    number of steps; evaluation splits are not split, rank 0 evaluates all of
    them and the confusion matrix reduction adds nothing from the other ranks.
    """
    world = ray.train.get_context().get_world_size()
    rank = ray.train.get_context().get_world_rank()
    local_batch = config.data.batch_size // world
    train_rows = context["train_rows"]
    steps = (train_rows // world) // local_batch
    device = ray.train.torch.get_device()
    transfer = dict(device=device, pin_memory=device.type == "cuda", prefetch_batches=config.data.prefetch_batches)

    def train_batches(source: TrainInput, epoch: int) -> Iterator[Batch]:
        shard = ray.train.get_dataset_shard(source.dataset)
        yield from shard.iter_torch_batches(batch_size=local_batch, drop_last=True, **transfer)

    def eval_batches(split: str) -> Iterator[Batch]:
        if rank != 0:
            return iter(())
        shard = ray.train.get_dataset_shard(split)
        return shard.iter_torch_batches(batch_size=config.data.eval_batch_size, **transfer)

    return DataFeed(context["classes"], context["class_counts"], steps, train_batches, eval_batches, set(context["eval_splits"]))


class TensorBoardSync:
    """Rank 0 writes TensorBoard files locally; for s3:// run storage they are copied up after every epoch."""

    def __init__(self, run_uri: str, filesystem: Any = None) -> None:
        self.remote = join(run_uri, "tensorboard")
        self.local = Path(tempfile.mkdtemp(prefix="proco-tb-")) if is_s3(run_uri) else Path(self.remote)
        default_fs, self.path = resolve(self.remote)
        self.filesystem = filesystem or default_fs

    def push(self) -> None:
        if self.local == Path(self.remote):
            return
        import pyarrow.fs as pafs

        pafs.copy_files(str(self.local), self.path, destination_filesystem=self.filesystem)

    def close(self) -> None:
        """Last push, then remove the local copy of s3:// runs (nothing is left in the temp directory)."""
        if self.local != Path(self.remote):
            try:
                self.push()
            finally:
                shutil.rmtree(self.local, ignore_errors=True)


def quiet_report_lines() -> None:
    """Ray Train V2 logs every report ("Reporting training result ...") at INFO from a logger named by its
    file path, outside the "ray.train" hierarchy that LoggingConfig sets: lift that one logger to WARNING."""
    name = train_report_logger_name()
    if name is not None:  # another Ray layout: its lines stay, nothing breaks
        logging.getLogger(name).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The TorchTrainer entry point on every worker."""
    quiet_report_lines()
    config = config_from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    feed_factory = loop_config.get("feed_factory")
    feed = feed_factory(config, rank, context.get_world_size()) if feed_factory else shard_feed(config, loop_config)
    tensorboard = TensorBoardSync(loop_config["run_uri"], loop_config.get("run_filesystem")) if rank == 0 else None

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        if tensorboard is not None:
            tensorboard.push()
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def prepare(model, find_unused: bool):
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": find_unused})

    env = WorkerEnv(
        device=ray.train.torch.get_device(),
        prepare_model=prepare,
        report=report,
        log_dir=tensorboard.local if tensorboard else None,
        print_progress=True,
    )
    checkpoint = ray.train.get_checkpoint()
    try:
        if checkpoint is None:
            train_worker(config, feed, env)
            return
        with checkpoint.as_directory() as directory:
            env.resume_from = Path(directory)
            train_worker(config, feed, env)
    finally:
        if tensorboard is not None:
            tensorboard.close()


FeedFactory = Callable[[Config, int, int], DataFeed]


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
    run_uri = join(config.train.storage_path, config.train.name)
    loop_config: dict[str, Any] = {"config": config.to_dict(), "run_uri": run_uri}
    storage_path, storage_filesystem = run_storage(config.train.storage_path)
    datasets: dict[str, Any] = {}
    if feed_factory is not None:
        loop_config["feed_factory"] = feed_factory
    else:
        manifest = read_manifest(config.data.uri)
        check_manifest(config, manifest)
        datasets = build_datasets(config, manifest, f"{storage_path}/{config.train.name}", storage_filesystem)
        loop_config.update(
            classes=manifest.classes,
            class_counts=manifest.class_counts(config.data.train_split),
            train_rows=manifest.num_rows(config.data.train_split),
            eval_splits=[s for s in datasets if not s.startswith(TRAIN_PREFIX)],
        )
    loop_config["run_filesystem"] = storage_filesystem
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
            name=config.train.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
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


def run_storage(storage_path: str) -> tuple[str, Any]:
    """(path, filesystem) for Ray Train's RunConfig. For s3:// the filesystem is built here, from this
    process's endpoint and credentials, and travels with the run, so the Train controller and workers
    reach the same S3 whatever their own environment holds."""
    if is_s3(storage_path):
        filesystem, path = resolve(storage_path)
        return path, filesystem
    return os.path.abspath(storage_path), None


def write_run_file(config: Config, filename: str, data: bytes) -> str:
    """A file in the run's folder (local or s3://), next to its checkpoints."""
    return write_bytes(join(config.train.storage_path, config.train.name, filename), data)


def save_resolved_config(config: Config) -> str:
    """The resolved config (no `auto` left: it states the sampling, augmentation and proto-loss form the method
    chose), so that a run can be repeated and evaluated from its folder."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "config.yaml"
        save_config(resolved(config), local)
        return write_run_file(config, "config.yaml", local.read_bytes())


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
    storage_path, filesystem = run_storage(config.train.storage_path)
    done = resumed_epoch(f"{storage_path}/{config.train.name}", filesystem)
    if done:
        run = join(config.train.storage_path, config.train.name)
        print(f"resuming run {run} from its latest checkpoint: epoch {done} of {config.optim.epochs} done", flush=True)


def fit_and_tidy(trainer: TorchTrainer, config: Config) -> ray.train.Result:
    """`trainer.fit()`, then the run's unregistered checkpoint folders removed (remove_unregistered_checkpoints).

    Only after fit returns: the Train controller has then ended, so no checkpoint is being uploaded. A
    fit that raises (an interrupted driver) leaves the folder as it is.
    """
    result = trainer.fit()
    storage_path, filesystem = run_storage(config.train.storage_path)
    removed = remove_unregistered_checkpoints(f"{storage_path}/{config.train.name}", filesystem)
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
    metrics = {k: v for k, v in (result.metrics or {}).items() if k.startswith((f"{VAL}/", f"{TEST}/", "best/", EPOCH))}
    by_epoch = {m.get(EPOCH): c for c, m in result.best_checkpoints or []}
    best = by_epoch.get(metrics.get(BEST_EPOCH))
    if best is None and result.best_checkpoints:
        best = result.get_best_checkpoint(CHECKPOINT_SCORE, "max")
    return {
        "metrics": metrics,
        "best_checkpoint": storage_uri(best.path, config) if best else None,
        "latest_checkpoint": storage_uri(result.checkpoint.path, config) if result.checkpoint else None,
        "tensorboard": join(config.train.storage_path, config.train.name, "tensorboard"),
        "run": storage_uri(result.path, config),
    }


def storage_uri(path: str, config: Config) -> str:
    """A path Ray reports inside the run storage, as a URI the next command takes (Ray drops the s3:// scheme)."""
    if is_s3(config.train.storage_path) and not is_s3(path):
        return "s3://" + path.lstrip("/")
    return path


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
        explained = storage_gone(config) or storage_full(config, error)
        if explained is None:
            raise
        raise explained from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default="isic2018.yaml",
        help="YAML file, or a shipped config's name (proco_ray/configs; default isic2018.yaml)",
    )
    parser.add_argument("--data", help="prepared dataset URI (sets data.uri)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.num_workers=4")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"data.uri={args.data}"] if args.data else [])
    config = resolved(load_config(args.config, overrides))
    if not config.data.uri:
        raise ConfigError("no dataset: pass --data URI or set data.uri (prepare one with proco-ray prepare)")
    check_manifest(config, read_manifest(config.data.uri))  # before Ray starts: a bad --data fails in a second
    with claimed(config):  # before Ray starts too: a second live run of this name is refused at once
        connect_or_start_ray(min_cpus=config.run_resources()["CPU"])
        summary = json.dumps(summarise(fit_or_explain(config), config), indent=2, default=str)
    print(summary)
    print(f"summary written to {write_run_file(config, 'summary.json', summary.encode())}")
    return 0
