"""The main job on embedded defaults: a short ProCo run on a generated long-tailed dataset, in one process."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from proco_ray.config import load_config
from proco_ray.feeds import tensor_feed
from proco_ray.synthetic import generate_images, long_tailed_counts
from proco_ray.train_loop import LocalCheckpoints, WorkerEnv, train_worker

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "cpu-small.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/cpu-small.yaml)")
    parser.add_argument("--run-dir", default="runs/demo", help="where checkpoints and TensorBoard logs go")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.epochs=3")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    counts = long_tailed_counts(5, head=160, imbalance=16)
    images, labels = generate_images(counts, config.data.image_size, seed=config.train.seed)
    test_images, test_labels = generate_images([40] * 5, config.data.image_size, seed=config.train.seed + 1)
    names = [f"class_{c}" for c in range(5)]
    feed = tensor_feed(
        (images, labels),
        {"val": (test_images, test_labels), "test": (test_images, test_labels)},
        names,
        config.data.batch_size,
        seed=config.train.seed,
    )
    run_dir = Path(args.run_dir)
    checkpoints = LocalCheckpoints(run_dir / "checkpoints", keep=config.train.keep_checkpoints)
    print(f"training {config.method.name} on a generated long-tailed dataset {counts} ...", flush=True)
    metrics = train_worker(config, feed, WorkerEnv(report=checkpoints, log_dir=run_dir / "tensorboard"))
    print(json.dumps({k: v for k, v in metrics.items() if k.startswith(("val/", "test/"))}, indent=2))
    print(f"checkpoints: {checkpoints.directory}  TensorBoard logs: {run_dir / 'tensorboard'}")
    return 0
