"""`proco-ray evaluate`: a checkpoint on any prepared dataset with the same classes."""

from __future__ import annotations

import argparse
import json

from proco_ray.commands import CHECKPOINT_HELP
from proco_ray.evaluation.evaluate import claim_evaluation_output, evaluate_checkpoint, write_evaluation
from proco_ray.evaluation.report import markdown_table, per_class_rows
from proco_ray.launch.cluster import connect_or_start_ray
from proco_ray.metric_keys import HEADLINE
from proco_ray.runs import TEMPERATURE_FILE, save_temperature


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    parser.add_argument("--data", required=True, help="prepared dataset URI (local or s3://)")
    parser.add_argument("--split", default="test", help="split to evaluate (default: %(default)s)")
    parser.add_argument(
        "--out", default="eval", help="folder or s3:// prefix for metrics.json, the per-class tables and the plots"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --out")
    parser.add_argument("--batch-size", type=int, default=256, help="images per model call (default: %(default)s)")
    parser.add_argument(
        "--calibrate",
        nargs="?",
        const="val",
        metavar="SPLIT",
        help="fit temperature scaling on SPLIT (default val), report ECE after it and save it beside the checkpoint "
        f"({TEMPERATURE_FILE}, used by predict --calibrated)",
    )
    parser.add_argument("--json", action="store_true", help="print the full result as JSON instead of the summary")


def run(args: argparse.Namespace) -> int:
    output = claim_evaluation_output(args.out, args.overwrite)  # an occupied --out fails before the evaluation
    connect_or_start_ray()
    metrics = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.batch_size, args.calibrate)
    written = write_evaluation(metrics, output, f"{args.split} split")
    if args.calibrate:
        written.append(save_temperature(metrics["checkpoint"], metrics["temperature"], f"{args.data} {args.calibrate}"))
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    print(f"checkpoint: {metrics['checkpoint']} (epoch {metrics['epoch']})")
    print(markdown_table(per_class_rows(metrics)))
    headline = [*HEADLINE, "macro_roc_auc", "ece", "temperature", "ece_calibrated"]
    print(" | ".join(f"{k} {metrics[k]:.4f}" for k in headline if k in metrics))
    print("wrote " + ", ".join(written))
    return 0
