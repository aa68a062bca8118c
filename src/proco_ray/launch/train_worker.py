"""What runs inside Ray Train's TorchTrainer workers: `train_loop_per_worker` and the pieces only it uses.

The driver (`launch.trainer`) builds the TorchTrainer and hands each worker its config, its run folder and what
it needs to read its dataset shards; every worker then runs `engine.loop.train_worker`, the same loop a plain
process runs without Ray, with Ray's device, model wrapper, report and checkpoint plugged in.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray.train
import ray.train.torch

from proco_ray.config import Config, config_from_dict
from proco_ray.data.train_input import TrainInput
from proco_ray.engine.feeds import DataFeed
from proco_ray.engine.loop import WorkerEnv, train_worker
from proco_ray.method.base import Batch
from proco_ray.ray_compat import skip_progress_bars_off_notice, train_report_logger_name
from proco_ray.runs import TENSORBOARD_DIR, RunFolder
from proco_ray.storage.s3 import is_s3

FeedFactory = Callable[[Config, int, int], DataFeed]  # (config, rank, world size) -> the worker's feed, built in the worker


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

    def __init__(self, run: RunFolder) -> None:
        self.run = run
        self.remote = is_s3(run.uri)
        self.local = Path(tempfile.mkdtemp(prefix="proco-tb-")) if self.remote else Path(run.path) / TENSORBOARD_DIR

    def push(self) -> None:
        if self.remote:
            pafs.copy_files(str(self.local), f"{self.run.path}/{TENSORBOARD_DIR}", destination_filesystem=self.run.fs)

    def close(self) -> None:
        """Last push, then remove the local copy of s3:// runs (nothing is left in the temp directory)."""
        if self.remote:
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
    skip_progress_bars_off_notice()  # the datasets' bars are off (trainer.quiet_dataset): the loop prints its progress
    config = config_from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    feed_factory = loop_config.get("feed_factory")
    feed = feed_factory(config, rank, context.get_world_size()) if feed_factory else shard_feed(config, loop_config)
    tensorboard = TensorBoardSync(loop_config["run"]) if rank == 0 else None

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
