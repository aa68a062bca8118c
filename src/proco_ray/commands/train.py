"""`proco-ray train`: train on a prepared dataset with Ray Train, joining a running cluster or starting a local Ray."""

from __future__ import annotations

import argparse
import json
from typing import Any

from proco_ray.config import ConfigError, load_config
from proco_ray.data.manifest import check_manifest, read_manifest
from proco_ray.launch.cluster import connect_or_start_ray
from proco_ray.launch.run_claim import claimed
from proco_ray.launch.trainer import fit_or_explain, summarise
from proco_ray.method.registry import resolved
from proco_ray.metric_keys import BEST_EPOCH, BEST_VAL_MACRO_F1, EPOCH, HEADLINE, TEST
from proco_ray.runs import SUMMARY_FILE, RunFolder

ON_INTERRUPT = "rerun the same command to resume from the run's latest checkpoint"  # printed by the CLI on Ctrl-C


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default="isic2018.yaml",
        help="YAML file, or a shipped config's name (proco_ray/configs; default isic2018.yaml)",
    )
    parser.add_argument("--data", help="prepared dataset URI (sets data.uri)")
    parser.add_argument("--json", action="store_true", help="print the run's summary.json instead of the summary lines")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.num_workers=4")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"data.uri={args.data}"] if args.data else [])
    config = resolved(load_config(args.config, overrides))
    if not config.data.uri:
        raise ConfigError("no dataset: pass --data URI or set data.uri (prepare one with proco-ray prepare)")
    check_manifest(config, read_manifest(config.data.uri))  # before Ray starts: a bad --data fails in a second
    with claimed(config):  # before Ray starts too: a second live run of this name is refused at once
        connect_or_start_ray(min_cpus=config.run_resources()["CPU"])
        summary = summarise(fit_or_explain(config), config)
    text = json.dumps(summary, indent=2, default=str)
    written = RunFolder.of_config(config).write_file(SUMMARY_FILE, text.encode())
    print(text if args.json else "\n".join([*summary_lines(summary), f"summary: {written}"]))
    return 0


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The model selected on validation, its test metrics, and where the run is."""
    metrics = summary["metrics"]
    selected = f"best epoch {metrics.get(BEST_EPOCH, '?')} of {metrics.get(EPOCH, '?')}"
    if BEST_VAL_MACRO_F1 in metrics:
        selected += f": validation macro-F1 {metrics[BEST_VAL_MACRO_F1]:.4f}"
    test = [f"{name} {metrics[f'{TEST}/{name}']:.4f}" for name in HEADLINE if f"{TEST}/{name}" in metrics]
    return [
        selected + (f"; test {', '.join(test)}" if test else ""),
        f"best checkpoint: {summary['best_checkpoint']}",
        f"run: {summary['run']}  (TensorBoard: tensorboard --logdir {summary['tensorboard']})",
    ]
