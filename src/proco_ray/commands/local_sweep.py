"""`proco-ray local-sweep`: an experiment's variants x seeds on one machine, without Ray."""

from __future__ import annotations

import argparse
from pathlib import Path

from proco_ray.experiments.spec import experiment_base, load_experiment
from proco_ray.launch.local_sweep import local_sweep, narrow


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--experiment",
        required=True,
        help="a shipped experiment by name (proco_ray/configs/tune/) or a YAML path (grid of variants x seeds)",
    )
    parser.add_argument("--data", required=True, help="prepared dataset URI (sets data.uri)")
    parser.add_argument("--out", required=True, help="folder for the trials and results/ (rerunning resumes unfinished trials)")
    parser.add_argument("--config", help="base config, a YAML file or a shipped name (default: the experiment's 'base')")
    parser.add_argument("--parallel", type=int, default=1, help="trials at once (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per trial (default 1)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="DataLoader processes per trial that decode the stored images; the views are made on --device (default 1)",
    )
    parser.add_argument("--only", help="comma-separated variants of the experiment to run (default: all)")
    parser.add_argument("--seeds", help="comma-separated seeds of the experiment to run (default: all)")
    parser.add_argument("--report-only", action="store_true", help="write results/ from the trials in --out, train nothing")
    parser.add_argument("--device", default="cpu", help="torch device of every trial, e.g. cuda (default cpu)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the base config, e.g. optim.epochs=15")


def run(args: argparse.Namespace) -> int:
    experiment = narrow(load_experiment(args.experiment), args.only, args.seeds)
    _, base = experiment_base(experiment, args.config, list(args.overrides) + [f"data.uri={args.data}"])
    records = local_sweep(
        experiment, base, Path(args.out).resolve(), args.parallel, args.device, args.threads, args.workers, args.report_only
    )
    print((Path(args.out) / "results" / "results.md").read_text())
    failed = [r for r in records if r.error and not args.report_only]
    for record in failed:
        print(f"failed: {record.trial_id}: {record.error}")
    return 1 if failed else 0
