"""`proco-ray tune`: Ray Tune sweeps (ASHA hyperparameter search, the paper's ablations and baselines)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from proco_ray.config import Config
from proco_ray.experiments.spec import experiment_base, load_experiment, trial_resources
from proco_ray.launch.cluster import connect_or_start_ray
from proco_ray.launch.train_worker import FeedFactory
from proco_ray.launch.tune import experiment_folder, report, sweep
from proco_ray.storage.s3 import is_s3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--experiment",
        required=True,
        help="a shipped experiment's name (proco_ray/configs/tune: hparams, ablation, baselines, ...) or a YAML path",
    )
    parser.add_argument("--config", help="base config, a YAML file or a shipped config's name (default: the experiment's 'base')")
    parser.add_argument("--data", help="prepared dataset URI (sets data.uri)")
    parser.add_argument("--name", help="experiment folder name (default: <train.name>-<experiment name>)")
    parser.add_argument("--storage", help="where experiments live (default: train.storage_path)")
    parser.add_argument("--num-samples", type=int, help="override the experiment's num_samples")
    parser.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the cluster holds)")
    parser.add_argument(
        "--resume", action="store_true", help="insist on resuming an existing sweep (it resumes anyway when found)"
    )
    parser.add_argument("--report-only", action="store_true", help="rewrite results/ of an existing sweep, train nothing")
    parser.add_argument("--generated", action="store_true", help="train on generated long-tailed images (smoke tests; no --data)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the base config, e.g. optim.epochs=50")


def generated_feed(config: Config) -> FeedFactory:
    from proco_ray.data.synthetic import long_tailed_counts
    from proco_ray.engine.feeds import GeneratedFeed

    classes = config.data.num_classes or 5
    return GeneratedFeed(tuple(long_tailed_counts(classes, head=160, imbalance=16)), (40,) * classes, config.data.image_size)


def run(args: argparse.Namespace) -> int:
    experiment = load_experiment(args.experiment)
    if args.num_samples is not None:
        experiment = dataclasses.replace(experiment, num_samples=args.num_samples)
    overrides = list(args.overrides) + ([f"data.uri={args.data}"] if args.data else [])
    base_config, base = experiment_base(experiment, args.config, overrides)
    name = args.name or f"{base_config.train.name}-{experiment.name}"
    storage = args.storage or base_config.train.storage_path
    connect_or_start_ray(min_cpus=trial_resources(base_config, streams_data=not args.generated)["CPU"])
    if args.report_only:
        print(json.dumps(report(experiment_folder(storage, name), experiment), indent=2))
        return 0
    feed = generated_feed(base_config) if args.generated else None
    result = sweep(
        experiment,
        base,
        name=name,
        storage_path=storage,
        feed_factory=feed,
        resume=args.resume or None,
        max_concurrent=args.max_concurrent,
    )
    failed = [r for r in result.records if r.error]
    print(Path(result.outputs["markdown"]).read_text() if not is_s3(result.experiment_uri) else "")
    print(
        json.dumps(
            {
                "experiment": result.experiment_uri,
                "resumed": result.resumed,
                "outputs": result.outputs,
                "failed_trials": [f"{r.trial_id}: {r.error}" for r in failed],
            },
            indent=2,
        )
    )
    return 1 if failed else 0
