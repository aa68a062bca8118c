"""The `proco-ray` command: one subcommand per step, each a module of `proco_ray.commands`.

Each provides `add_arguments(parser)` and `run(args) -> int`; it is imported only when its subcommand runs,
so `proco-ray storage` does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from proco_ray.errors import ProcoError
from proco_ray.progress import VERBOSE

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("proco_ray.commands.demo", "run the main job end to end on embedded defaults"),
    "storage": ("proco_ray.commands.storage", "start, stop or inspect the local S3 server (SeaweedFS)"),
    "prepare": ("proco_ray.commands.prepare", "ingest a dataset into Parquet shards in object storage"),
    "train": ("proco_ray.commands.train", "train on a prepared dataset with Ray Train (joins a running cluster)"),
    "evaluate": ("proco_ray.commands.evaluate", "evaluate a checkpoint on a prepared dataset"),
    "predict": ("proco_ray.commands.predict", "class probabilities of new images with a checkpoint (Ray Data batch inference)"),
    "export": (
        "proco_ray.commands.export",
        "a checkpoint's classifier as a torch.export program that loads without this package",
    ),
    "tune": ("proco_ray.commands.tune", "Ray Tune sweeps: ASHA hyperparameter search, the paper's ablations and baselines"),
    "local-sweep": ("proco_ray.commands.local_sweep", "an experiment's variants x seeds on one machine without Ray (a GPU box)"),
    "length-curve": (
        "proco_ray.commands.length_curve",
        "one comparison at several training lengths: paired differences and the curve",
    ),
    "paper-table": ("proco_ray.commands.paper_table", "the paper's Table 2 beside finished sweeps: ranks, rank correlation"),
}


INTERRUPTED = 128 + 2  # the exit status of a command stopped by Ctrl-C (SIGINT), as shells report it


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: proco-ray COMMAND [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'proco-ray COMMAND --help' for the options of a command."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"proco-ray: unknown command '{command}'\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"proco-ray {command}", description=help_)
    module.add_arguments(parser)
    parser.add_argument("--verbose", action="store_true", help=f"show Ray's own logging and progress bars (also: {VERBOSE}=1)")
    args = parser.parse_args(argv[1:])
    # Progress lines (this process's and the Ray workers' it forwards) as they come, also into a pipe or a file:
    # `proco-ray train ... | tee train.log` otherwise showed every epoch line only when the run ended.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    if args.verbose:
        os.environ[VERBOSE] = "1"  # read by quiet_ray_process here and in the workers of a local Ray
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        hint = getattr(module, "ON_INTERRUPT", "")
        print(f"proco-ray {command}: interrupted{f'; {hint}' if hint else ''}", file=sys.stderr)
        return INTERRUPTED
    except ProcoError as error:
        cause = f"\n  caused by: {error.__cause__!r}" if error.__cause__ is not None else ""
        print(f"proco-ray {command}: error: {error}{cause}", file=sys.stderr)
        return 1
