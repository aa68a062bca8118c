"""`proco-ray prepare`: a downloaded dataset -> resized, encoded Parquet shards + manifest.json in object storage.

The resize/encode step is a Ray Data `map_batches`, so it scales out on a
cluster. Nothing is written before the source has been fully validated and
every image decoded; manifest.json is written last and is the commit marker:
readers refuse a prefix without one, so a failed run never looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
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
from proco_ray.data.pipeline import execute_counted
from proco_ray.data.sources import Source, listing, read_source
from proco_ray.data.splits import make_split, split_counts
from proco_ray.errors import DataError, image_problem
from proco_ray.storage.s3 import ClaimedOutput, claim_output, is_s3, join, list_files, resolve, storage_errors

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


def claim_prepare_output(uri: str, overwrite: bool) -> ClaimedOutput:
    """Refuse an output that holds data unless overwriting a previous prepare's own output (its manifest or
    its marker is there)."""
    _, path = resolve(uri)

    def describe(names: set[str]) -> str:
        return (
            "a prepared dataset"
            if join(path, MANIFEST) in names
            else "files from an incomplete or foreign run (no manifest.json)"
        )

    return claim_output(uri, overwrite, "prepare", describe, also_own=[MANIFEST])


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
    """Every image read, resized and encoded by Ray Data workers, held in the object store until written; a
    progress bar counts the images as their blocks complete."""
    import ray

    encoded = _input_dataset(source, splits, options.seed).map_batches(
        encode_batch,
        batch_size=64,
        batch_format="numpy",
        fn_kwargs=dict(filesystem=source.filesystem, size=options.image_size, encoding=options.encoding, quality=options.quality),
    )
    return ray.data.from_arrow_refs(execute_counted(encoded, "encoding images", len(source.records)))


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
    check_disjoint(output_uri, resolve(output_uri)[1], source_uri, groups)
    output = claim_prepare_output(output_uri, options.overwrite)
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

    output.replace_earlier(delete_first=MANIFEST)  # never a manifest over partial shards
    shards: list[dict[str, Any]] = []
    with storage_errors(output_uri):
        for split, per_class in counts.items():
            entries = write_split(processed, split, output.fs, output.path, options.shard_mb)
            if sum(e["rows"] for e in entries) != sum(per_class.values()):
                raise DataError(
                    f"{output_uri}: wrote {sum(e['rows'] for e in entries)} {split} rows, expected {sum(per_class.values())}"
                )
            shards += entries
        manifest = build_manifest(source, output_uri, options, counts, group_ids is not None, failed, shards)
        write_manifest(output_uri, manifest)
    return manifest.to_dict()
