"""`proco-ray prepare`: a dataset as downloaded into Parquet shards and a manifest in object storage."""

from __future__ import annotations

import argparse
import json
import time

from proco_ray.data.manifest import MANIFEST
from proco_ray.data.prepare import AUTO, ENCODINGS, RAW_UP_TO, PrepareOptions, prepare
from proco_ray.data.sources import KINDS
from proco_ray.data.splits import MODES
from proco_ray.evaluation.report import markdown_table
from proco_ray.launch.cluster import connect_or_start_ray
from proco_ray.storage.s3 import join


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="dataset as downloaded: a folder, an .npz file, or s3://bucket/prefix")
    parser.add_argument("output", help="where shards and manifest.json go: a folder or s3://bucket/prefix")
    parser.add_argument(
        "--format", dest="kind", default="auto", choices=["auto", *KINDS], help="source layout (default: detected)"
    )
    defaults = PrepareOptions()
    parser.add_argument(
        "--image-size", type=int, default=defaults.image_size, help="square side in pixels (default: %(default)s)"
    )
    parser.add_argument(
        "--encoding",
        choices=[AUTO, *ENCODINGS],
        default=defaults.encoding,
        help=f"how images are stored: jpeg, png, or raw uint8 pixels (nothing to decode, 3 bytes a pixel); "
        f"auto (default): raw up to {RAW_UP_TO} px, jpeg above",
    )
    parser.add_argument("--quality", type=int, default=defaults.quality, help="JPEG quality (default: %(default)s)")
    parser.add_argument(
        "--split",
        choices=MODES,
        default=defaults.split,
        help="paper: stratified 7:3 train/test with val carved from train; official: the source's "
        "own splits; official-val-as-test: the source's val as test and --val-fraction of its train as val "
        "(MedMNIST files without their test split); test: everything as an external test set (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--test-fraction", type=float, default=defaults.test_fraction)
    parser.add_argument(
        "--val-fraction", type=float, default=defaults.val_fraction, help="share of train held out for validation"
    )
    parser.add_argument(
        "--groups", help="CSV of image id -> lesion/patient id (e.g. HAM10000_metadata.csv) for group-aware splits"
    )
    parser.add_argument("--classes", help="comma-separated class names (ImageFolder, MedMNIST)")
    parser.add_argument("--skip-corrupt", action="store_true", help="leave out undecodable images, listing them in the manifest")
    parser.add_argument("--overwrite", action="store_true", help="replace what the output already holds")
    parser.add_argument(
        "--shard-mb", type=float, default=defaults.shard_mb, help="target shard size in MiB (default: %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="print the full result as JSON instead of the summary")


def run(args: argparse.Namespace) -> int:
    options = PrepareOptions(
        image_size=args.image_size,
        encoding=args.encoding,
        quality=args.quality,
        split=args.split,
        seed=args.seed,
        test_fraction=args.test_fraction,
        val_fraction=args.val_fraction,
        skip_corrupt=args.skip_corrupt,
        overwrite=args.overwrite,
        shard_mb=args.shard_mb,
    )
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    connect_or_start_ray()
    started = time.monotonic()
    manifest = prepare(args.source, args.output, options, kind=args.kind, groups=args.groups, classes=classes)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    counts = manifest["counts"]
    total = sum(sum(per_class.values()) for per_class in counts.values())
    print(f"prepared {total} images into {len(manifest['shards'])} shards in {time.monotonic() - started:.0f} s")
    if manifest["skipped"]:
        print(f"left out {len(manifest['skipped'])} corrupt image(s), listed in manifest.json")
    print(markdown_table([{"split": split, "images": sum(c.values()), **c} for split, c in counts.items()]), end="")
    print(f"dataset: {args.output} (manifest: {join(args.output, MANIFEST)})")
    return 0
