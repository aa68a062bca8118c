"""The training input pipeline: prepared shards -> Ray Data -> decoded uint8 images for the training device.

`build_dataset` reads a split's shards once, checking each against the
manifest's sha256, keeps the encoded rows in the Ray object store, and returns
a lazy `ray.data.Dataset`. Every iteration re-executes its plan, which is what
makes each epoch fresh:

* train, instance-balanced: a permutation of the rows seeded by (seed, epoch): a new
  order every epoch, the same orders for the same seed.
* train, class-balanced: each epoch draws as many rows as the split has, a class
  uniformly then an image of it uniformly (draws seeded by (seed, epoch) too).
* eval: every row once, in order.

The row orders are `sampling.epoch_rows`, the sampler the local feed uses too. The shuffle is in
the plan, not in the consumer: no `local_shuffle_buffer_size` is needed. Ray Data's CPU tasks only
decode (raw-stored images not even that) and deliver uint8 images at their stored size, a quarter of
the bytes of one float32 view; the training worker makes the views on its device
(`proco_ray.data.augment`). Consumers call `iter_torch_batches` on the dataset or on
`ray.train.get_dataset_shard(...)`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from proco_ray.config import INSTANCE_BALANCED
from proco_ray.data.decode import decode_batch
from proco_ray.data.manifest import MANIFEST, Shard, read_manifest
from proco_ray.data.sampling import epoch_rows
from proco_ray.data.sources import listing
from proco_ray.errors import DataError
from proco_ray.progress import progress
from proco_ray.storage.s3 import join, resolve, storage_errors

BLOCK_BYTES = 32 << 20
MIN_BLOCKS = 4
MAX_BLOCK_ROWS = 1024


def _load_shard(fs: pafs.FileSystem, root: str, shard: Shard) -> tuple[str | None, pa.Table | None]:
    """(sha256 of the bytes read, their table when it matches the manifest); (None, None) for a missing file."""
    try:
        with fs.open_input_stream(join(root, shard.path)) as stream:
            data = stream.read()
    except FileNotFoundError:
        return None, None
    digest = hashlib.sha256(data).hexdigest()
    if digest != shard.sha256:
        return digest, None
    parquet = pq.ParquetFile(pa.BufferReader(data))
    return digest, parquet.read(columns=[c for c in ("image", "label", "id", "location") if c in parquet.schema_arrow.names])


def load_split(uri: str, shards: Sequence[Shard], num_classes: int) -> list[pa.Table]:
    """Read every shard once (parallel threads), check its sha256 against the manifest, and parse it.

    Verifying the very bytes that are then used leaves no window between check and use, and a
    mismatch is a DataError naming each missing or altered shard. Labels are range-checked here, where
    they enter training, so that the training step need not check them on the device.
    """
    fs, root = resolve(uri)
    with storage_errors(uri), ThreadPoolExecutor(max_workers=8) as pool:
        loaded = list(pool.map(lambda s: _load_shard(fs, root, s), shards))
    bad = [
        f"{s.path}: missing" if digest is None else f"{s.path}: sha256 {digest} but the manifest says {s.sha256}"
        for s, (digest, table) in zip(shards, loaded)
        if table is None
    ]
    if bad:
        raise DataError(f"{uri}: {len(bad)} shard(s) do not match {MANIFEST} (re-run proco-ray prepare):\n{listing(bad)}")
    tables = [table for _, table in loaded]
    for shard, table in zip(shards, tables):
        labels = table.column("label").to_numpy()
        outside = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if outside.size:
            raise DataError(
                f"{uri}: {shard.path} row {int(outside[0])} has label {int(labels[outside[0]])}, "
                f"outside the manifest's {num_classes} classes (re-run proco-ray prepare)"
            )
    return tables


def execute_counted(dataset: ray.data.Dataset, what: str, total: int | None) -> list[Any]:  # noqa: F821
    """Run `dataset` and return its blocks' object refs, counting its rows on a progress bar as blocks finish."""
    blocks: list[Any] = []
    with progress(what, total) as shown:
        for bundle in dataset.iter_internal_ref_bundles():
            blocks += bundle.block_refs
            shown.update(bundle.num_rows())
    return blocks


def num_blocks(rows: int, image_size: int) -> int:
    """Blocks of about BLOCK_BYTES of decoded images and at most MAX_BLOCK_ROWS rows, at least MIN_BLOCKS of them:
    all CPUs busy and bounded memory, with few enough tasks that their overhead stays small (blocks of 128 rows
    halved the images/s of blocks of 512 at 64 px)."""
    rows_per_block = max(16, min(MAX_BLOCK_ROWS, BLOCK_BYTES // (3 * image_size * image_size)))
    return max(MIN_BLOCKS, math.ceil(rows / rows_per_block))


SEQUENTIAL = "sequential"  # an evaluation pass: every row once, in stored order


@dataclass(frozen=True)
class RowOrder:
    """Which stored rows an epoch visits: SEQUENTIAL (eval), or a training epoch's sampling (`sampling.epoch_rows`)."""

    mode: str
    seed_config: Any = None
    first_epoch: int = 0

    def epoch_key(self, data_context: Any) -> list[int]:
        """(seed, epoch): the same in every task of one epoch, different in the next epoch. The epoch is
        `first_epoch` plus the dataset's executions before this one (one execution per epoch; Ray counts them
        from 1), so a dataset built for a run resumed after `first_epoch` epochs visits the rows in the order
        the uninterrupted run would, and epoch e is `sampling.epoch_rows(..., e)` as in the local feed."""
        if self.seed_config is None:
            return [0, 0]
        seed = self.seed_config.get_seed_tuple(data_context=data_context)
        return [seed.seed, self.first_epoch + max((seed.execution_idx or 1) - 1, 0)]

    def pick(self, positions: np.ndarray, labels: np.ndarray, data_context: Any) -> np.ndarray:
        """Stored row indices for these positions of the epoch."""
        if self.mode == SEQUENTIAL:
            return positions
        seed, epoch = self.epoch_key(data_context)
        return epoch_rows(labels, seed, epoch, self.mode)[positions]


def select_rows(batch: dict[str, np.ndarray], refs: Sequence[Any], order: RowOrder, data_context: Any) -> pa.Table:
    """Positions of the epoch (from ray.data.range) -> the encoded rows they map to, from the cached split."""
    import ray

    table = pa.concat_tables(ray.get(list(refs)))
    rows = order.pick(batch["id"], table.column("label").to_numpy(), data_context)
    return table.take(pa.array(rows, pa.int64()))


@dataclass(frozen=True)
class StoredSplit:
    """A split's encoded rows in the Ray object store, read and checked once."""

    refs: list[Any]
    rows: int
    num_classes: int
    encoding: str
    image_size: int


def store_split(uri: str, split: str) -> StoredSplit:
    """Read a split's shards (checked against the manifest's sha256 and class range) into the object store."""
    import ray

    manifest = read_manifest(uri)
    rows = manifest.num_rows(split)
    tables = load_split(uri, manifest.shards_of(split), manifest.num_classes)
    if sum(t.num_rows for t in tables) != rows:
        raise DataError(f"{uri}: the {split} shards hold {sum(t.num_rows for t in tables)} rows, the manifest says {rows}")
    return StoredSplit([ray.put(table) for table in tables], rows, manifest.num_classes, manifest.encoding, manifest.image_size)


def build_dataset(
    uri: str,
    split: str,
    *,
    train: bool,
    sampling: str = INSTANCE_BALANCED,
    seed: int = 0,
    with_ids: bool = False,
    first_epoch: int = 0,
    stored: StoredSplit | None = None,
) -> ray.data.Dataset:  # noqa: F821
    """A lazy Ray Dataset of one split: image (uint8 [H, W, 3] at the stored size), label (int64), and location
    where the shards have it. with_ids adds the string column id (for iter_batches; iter_torch_batches
    cannot convert strings).

    The split's encoded rows are read once, checked against the manifest's sha256 and put in the Ray
    object store (a few MB to a few hundred MB for these datasets; Ray spills to disk beyond memory).
    Each epoch then streams positions 0..rows-1 through one fused map that picks the rows (train: a
    permutation seeded by (seed, epoch), or class-balanced draws; eval: in order) and decodes them. There
    is no all-to-all shuffle, so the first batch of every epoch comes as soon as one block is decoded. Its
    first execution is epoch `first_epoch` (the epochs a resumed run has done). `stored`: the split already
    in the object store.
    """
    import ray
    from ray.data import RandomSeedConfig

    stored = stored or store_split(uri, split)
    mode = sampling if train else SEQUENTIAL
    seed_config = RandomSeedConfig(seed=seed, reseed_after_execution=True) if train else None
    order = RowOrder(mode, seed_config, first_epoch)
    positions = ray.data.range(stored.rows, override_num_blocks=num_blocks(stored.rows, stored.image_size)).materialize()
    ds = positions.map_batches(select_rows, batch_size=None, fn_args=(stored.refs, order, positions.context))
    return ds.map_batches(
        decode_batch, batch_size=None, fn_kwargs=dict(encoding=stored.encoding, size=stored.image_size, with_ids=with_ids)
    )
