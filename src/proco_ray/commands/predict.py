"""`proco-ray predict`: class probabilities of new images with a checkpoint (Ray Data batch inference)."""

from __future__ import annotations

import argparse
import json

from proco_ray.commands import CHECKPOINT_HELP
from proco_ray.inference.predict import predict
from proco_ray.launch.cluster import connect_or_start_ray


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    parser.add_argument("--input", required=True, help="folder or s3:// prefix of images, or a prepared dataset with --split")
    parser.add_argument("--output", required=True, help="folder or s3:// prefix for predictions.parquet (and unreadable.csv)")
    parser.add_argument("--split", help="predict this split of the prepared dataset given as --input (default: input is images)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per model call (default: %(default)s)")
    parser.add_argument("--tta", action="store_true", help="average the probabilities over the image and its two flips")
    parser.add_argument("--csv", action="store_true", help="also write predictions.csv")
    parser.add_argument(
        "--calibrated", action="store_true", help="divide the logits by the temperature evaluate --calibrate saved"
    )
    parser.add_argument("--actors", type=int, help="model actors (default: one per GPU of the cluster, else 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace the predictions of an earlier predict in --output")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON instead of the summary")


def run(args: argparse.Namespace) -> int:
    connect_or_start_ray()
    summary = predict(
        args.checkpoint,
        args.input,
        args.output,
        split=args.split,
        batch_size=args.batch_size,
        tta=args.tta,
        overwrite=args.overwrite,
        csv=args.csv,
        actors=args.actors,
        calibrated=args.calibrated,
    )
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"predicted {summary['predicted']} images of {args.input}; {summary['unreadable']} unreadable")
    print(f"checkpoint: {summary['checkpoint']}")
    print("wrote " + ", ".join(summary["written"]))
    return 0
