"""`proco-ray export`: a checkpoint's classifier as a torch.export program that loads without this package."""

from __future__ import annotations

import argparse
import json

from proco_ray.commands import CHECKPOINT_HELP
from proco_ray.inference.export import export


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    parser.add_argument("--out", required=True, help="folder or s3:// prefix for model.pt2 and model.json")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON instead of the summary")


def run(args: argparse.Namespace) -> int:
    exported = export(args.checkpoint, args.out, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(exported, indent=2))
        return 0
    calibrated = f", temperature {exported['temperature']:.3f}" if exported["temperature"] is not None else ""
    print(f"exported {exported['checkpoint']}: {len(exported['classes'])} classes, input {exported['input']}{calibrated}")
    print("wrote " + ", ".join(exported["written"]))
    return 0
