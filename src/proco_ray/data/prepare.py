"""`proco-ray prepare`: a downloaded dataset -> resized, encoded Parquet shards + manifest.json in object storage.

The resize/encode step is a Ray Data `map_batches`, so it scales out on a
cluster. Nothing is written before the source has been fully validated and
every image decoded; manifest.json is written last and is the commit marker:
readers refuse a prefix without one, so a failed run never looks complete.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

import proco_ray
from proco_ray.data.decode import RAW
from proco_ray.data.manifest import COLUMNS, LOCATION_COLUMN, MANIFEST, Manifest, Shard, write_manifest
from proco_ray.data.sources import KINDS, Source, listing, read_source
from proco_ray.data.splits import MODES, make_split, split_counts
from proco_ray.errors import DataError, image_problem
from proco_ray.storage.s3 import claim_output, is_s3, join, list_files, resolve, storage_errors, write_bytes

MARKER = ".proco-ray-prepare"  # written before the shards: marks the folder as a prepare output, complete or not
ENCODINGS = {"jpeg": "JPEG", "png": "PNG", RAW: None}  # raw: the uint8 pixels, nothing to decode when training
AUTO = "auto"
RAW_UP_TO = 64  # auto: raw pixels up to this size (delivered about twice as fast as JPEG), JPEG above (raw would be
# read slower than JPEG is decoded); docs/benchmarks-ingest.md


def resolve_encoding(encoding: str, image_size: int) -> str:
    """'auto' -> raw up to RAW_UP_TO px, jpeg above; a named encoding as given."""
    if encoding == AUTO:
        return RAW if image_size <= RAW_UP_TO else "jpeg"
    if encoding not in ENCODINGS:
        raise DataError(f"unknown encoding '{encoding}'; choose one of {[AUTO, *ENCODINGS]}")
    return encoding


@dataclass(frozen=True)
class PrepareOptions:
    """How images are resized, encoded, split and sharded."""

    image_size: int = 64
    encoding: str = AUTO
    quality: int = 95
    split: str = "paper"
    seed: int = 0
    test_fraction: float = 0.3
    val_fraction: float = 0.1
    skip_corrupt: bool = False
    overwrite: bool = False
    shard_mb: float = 32.0


# --------------------------------------------------------------------------- image step (runs in Ray workers)


def encode_image(image: Any, size: int, encoding: str, quality: int) -> bytes:
    """A PIL image -> RGB, squashed to size x size (the aspect is not kept), encoded as JPEG or PNG, or its
    raw uint8 pixels (size x size x 3 bytes)."""
    from PIL import Image

    image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    if encoding == RAW:
        return np.asarray(image, dtype=np.uint8).tobytes()
    out = io.BytesIO()
    image.save(out, format=ENCODINGS[encoding], **({"quality": quality} if encoding == "jpeg" else {}))
    return out.getvalue()


def reencode(data: bytes, size: int, encoding: str, quality: int) -> bytes:
    """An image file's bytes as prepare stores them (decoded, squashed to size x size, encoded); raises on a bad image."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return encode_image(image, size, encoding, quality)


def encode_batch(
    batch: dict[str, np.ndarray], *, filesystem: pafs.FileSystem, size: int, encoding: str, quality: int
) -> pa.Table:
    """Read, decode, resize and encode a batch; an undecodable image gets an error text instead of failing the job.

    Read errors are not caught: storage trouble fails the task (and Ray retries it), it does not mark images corrupt.
    """
    from PIL import Image

    images, errors = [], []
    for i in range(len(batch["id"])):
        data = None
        if "pixels" not in batch:
            with filesystem.open_input_stream(batch["path"][i]) as stream:
                data = stream.read()
        try:
            if data is None:
                images.append(
                    encode_image(Image.fromarray(np.ascontiguousarray(batch["pixels"][i]).squeeze()), size, encoding, quality)
                )
            else:
                images.append(reencode(data, size, encoding, quality))
            errors.append("")
        except Exception as error:  # any failure to decode in-memory bytes means a bad image
            images.append(b"")
            errors.append(image_problem(error))
    return pa.table(
        {
            "image": pa.array(images, pa.binary()),
            "label": pa.array(batch["label"], pa.int64()),
            "id": pa.array(batch["id"].tolist(), pa.string()),
            "split": pa.array(batch["split"].tolist(), pa.string()),
            "source": pa.array(batch["path"].tolist() if "path" in batch else batch["id"].tolist(), pa.string()),
            "error": pa.array(errors, pa.string()),
            **({"location": pa.array(batch["location"], pa.int64())} if "location" in batch else {}),
        }
    )


# --------------------------------------------------------------------------- output location


def check_disjoint(output_uri: str, out: str, *inputs: str | None) -> None:
    """Refuse an output (`out`: its resolved path) that is, contains or lies inside an input: clearing it
    would delete the input."""
    for uri in filter(None, inputs):
        if is_s3(uri) != is_s3(output_uri):
            continue
        _, path = resolve(uri)
        if out == path or out.startswith(path.rstrip("/") + "/") or path.startswith(out.rstrip("/") + "/"):
            raise DataError(
                f"output {output_uri} overlaps the input {uri}: the output must be a folder or prefix outside "
                f"the source, and must not contain it (nothing was touched)"
            )


def check_output(fs: pafs.FileSystem, path: str, uri: str, overwrite: bool) -> bool:
    """Refuse an output that holds data unless overwriting a previous prepare's own output (its manifest or
    its marker is there); returns whether there is something to clear."""

    def describe(names: set[str]) -> str:
        return (
            "a prepared dataset"
            if join(path, MANIFEST) in names
            else "files from an incomplete or foreign run (no manifest.json)"
        )

    return claim_output(fs, path, uri, overwrite, "prepare", [MANIFEST, MARKER], describe)


def clear_output(fs: pafs.FileSystem, path: str, uri: str) -> None:
    """Delete the manifest first, so that an interrupted clear never leaves a manifest over partial shards."""
    with storage_errors(uri):
        if fs.get_file_info(join(path, MANIFEST)).type == pafs.FileType.File:
            fs.delete_file(join(path, MANIFEST))
        fs.delete_dir_contents(path, missing_dir_ok=True)


def _shard_entry(fs: pafs.FileSystem, root: str, path: str, split: str) -> dict[str, Any]:
    with fs.open_input_stream(path) as stream:
        data = stream.read()
    rows = pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
    return {
        "path": path[len(root) + 1 :],
        "split": split,
        "rows": rows,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


# --------------------------------------------------------------------------- the job


def _ensure_ray() -> None:
    from proco_ray.launch.cluster import connect_or_start_ray

    connect_or_start_ray()


def _input_dataset(source: Source, splits: Sequence[str], seed: int):
    """One row per image, in a seeded random order so that every shard mixes the classes."""
    import ray

    order = np.random.default_rng([seed, 2]).permutation(len(source.records))
    rows = []
    for i in order:
        record, split = source.records[i], splits[i]
        row: dict[str, Any] = {"id": record.id, "label": record.label, "split": split}
        if source.locations:
            row["location"] = record.location
        if record.array_split:
            row["pixels"] = source.arrays[record.array_split][record.index]
        else:
            row["path"] = record.path
        rows.append(row)
    return ray.data.from_items(rows, override_num_blocks=max(1, min(64, math.ceil(len(rows) / 128))))


def encode_all(source: Source, splits: Sequence[str], options: PrepareOptions):
    """Every image read, resized and encoded by Ray Data workers, held in the object store until written."""
    _ensure_ray()
    return (
        _input_dataset(source, splits, options.seed)
        .map_batches(
            encode_batch,
            batch_size=64,
            batch_format="numpy",
            fn_kwargs=dict(
                filesystem=source.filesystem, size=options.image_size, encoding=options.encoding, quality=options.quality
            ),
        )
        .materialize()
    )


def failures(processed) -> list[dict[str, str]]:
    """{id, source, error} of every image that could not be decoded."""
    from ray.data.expressions import col

    bad = processed.filter(expr=col("error") != "").select_columns(["id", "source", "error"])
    return [row for batch in bad.iter_batches(batch_format="pyarrow") for row in batch.to_pylist()]


@contextlib.contextmanager
def _no_ray_data_io_retries() -> Iterator[None]:
    """Let the S3 filesystem's own bounded retries (storage.s3_filesystem) be the only ones.

    Ray Data retries writes that fail with network errors 10 times with backoff up to 32 s on top of
    them, so a vanished server made prepare wait about 5 minutes in silence.
    """
    from ray.data import DataContext

    context = DataContext.get_current()
    saved = context.retried_io_errors
    context.retried_io_errors = []
    try:
        yield
    finally:
        context.retried_io_errors = saved


def write_split(processed, split: str, fs: pafs.FileSystem, root: str, shard_mb: float) -> list[dict[str, Any]]:
    """Write one split as Parquet shards of about shard_mb each, then list them with row counts and sha256."""
    import pyarrow.compute as pc
    from ray.data.expressions import col

    stored = [c for c in (*COLUMNS, *LOCATION_COLUMN) if c in processed.schema().names]
    part = processed.filter(expr=(col("split") == split) & (col("error") == "")).select_columns(stored)
    nbytes = sum(
        pc.sum(pc.binary_length(batch.column("image"))).as_py() or 0
        for batch in part.select_columns(["image"]).iter_batches(batch_format="pyarrow")
    )
    split_dir = join(root, split)
    with _no_ray_data_io_retries():
        part.repartition(max(1, math.ceil(nbytes / (shard_mb * 2**20)))).write_parquet(split_dir, filesystem=fs)
    files = sorted(f.path for f in list_files(fs, split_dir) if f.path.endswith(".parquet"))
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda path: _shard_entry(fs, root, path, split), files))


def build_manifest(
    source: Source,
    output_uri: str,
    options: PrepareOptions,
    counts: dict[str, dict[str, int]],
    grouped: bool,
    skipped: list[dict[str, str]],
    shards: list[dict[str, Any]],
) -> Manifest:
    return Manifest(
        uri=output_uri,
        classes=source.classes,
        locations=source.locations,
        counts=counts,
        image_size=options.image_size,
        encoding=options.encoding,
        shards=[Shard(**shard) for shard in shards],
        split={
            "mode": options.split,
            "seed": options.seed,
            "test_fraction": options.test_fraction,
            "val_fraction": options.val_fraction,
            "grouped_by": source.group_source if grouped else None,
        },
        source={"uri": source.uri, "format": source.kind, "fingerprint": source.fingerprint, "images": len(source.records)},
        skipped=skipped,
        dataset=source.kind,
        options=asdict(options),
        created_by=f"proco-ray {proco_ray.__version__}",
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def prepare(
    source_uri: str,
    output_uri: str,
    options: PrepareOptions = PrepareOptions(),
    *,
    kind: str = "auto",
    groups: str | None = None,
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Validate, split, resize and encode a source, write shards and then the manifest; returns the manifest
    document as written."""
    options = replace(options, encoding=resolve_encoding(options.encoding, options.image_size))
    if options.image_size < 8:
        raise DataError(f"--image-size {options.image_size} is too small (at least 8)")
    started = time.time()
    out_fs, out_path = resolve(output_uri)
    check_disjoint(output_uri, out_path, source_uri, groups)
    occupied = check_output(out_fs, out_path, output_uri, options.overwrite)
    source = read_source(source_uri, kind, groups=groups, classes=classes)
    records = source.records
    group_ids = [r.group or f"image:{r.id}" for r in records] if any(r.group for r in records) else None
    splits = make_split(
        options.split,
        [r.label for r in records],
        group_ids,
        [r.official_split for r in records],
        seed=options.seed,
        test_fraction=options.test_fraction,
        val_fraction=options.val_fraction,
        where=source_uri,
    )

    processed = encode_all(source, splits, options)
    failed = failures(processed)
    if failed and not options.skip_corrupt:
        raise DataError(
            f"{source_uri}: {len(failed)} corrupt or unreadable image(s); nothing was written. Fix or remove them, "
            f"or pass --skip-corrupt to leave them out (each is then recorded in {MANIFEST}):\n"
            + listing([f"{f['source']}: {f['error']}" for f in failed], limit=10_000)
        )
    skipped_ids = {f["id"] for f in failed}
    kept = [(s, r.label) for s, r in zip(splits, records) if r.id not in skipped_ids]
    counts = split_counts([s for s, _ in kept], [label for _, label in kept], source.classes)
    empty = [name for i, name in enumerate(source.classes) if not any(label == i for _, label in kept)]
    if empty:
        raise DataError(f"{source_uri}: class(es) with no image left after skipping corrupt files: {empty}")

    if occupied:
        clear_output(out_fs, out_path, output_uri)
    shards: list[dict[str, Any]] = []
    with storage_errors(output_uri):
        write_bytes(join(output_uri, MARKER), b"written by proco-ray prepare; --overwrite may replace this folder\n")
        for split, per_class in counts.items():
            entries = write_split(processed, split, out_fs, out_path, options.shard_mb)
            if sum(e["rows"] for e in entries) != sum(per_class.values()):
                raise DataError(
                    f"{output_uri}: wrote {sum(e['rows'] for e in entries)} {split} rows, expected {sum(per_class.values())}"
                )
            shards += entries
        manifest = build_manifest(source, output_uri, options, counts, group_ids is not None, failed, shards)
        write_manifest(output_uri, manifest)
    print(
        f"prepared {len(kept)} images ({', '.join(f'{s} {sum(c.values())}' for s, c in counts.items())}) "
        f"into {len(shards)} shards at {output_uri} in {time.time() - started:.1f} s",
        file=sys.stderr,
    )
    return manifest.to_dict()


# --------------------------------------------------------------------------- CLI


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
    manifest = prepare(args.source, args.output, options, kind=args.kind, groups=args.groups, classes=classes)
    print(json.dumps({"output": args.output, "counts": manifest["counts"], "shards": len(manifest["shards"])}, indent=2))
    return 0
