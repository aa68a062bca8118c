"""The training input pipeline: prepared shards -> Ray Data -> decoded, augmented float32 tensors.

`build_dataset` reads a split's shards once, checking each against the
manifest's sha256, keeps the encoded rows in the Ray object store, and returns
a lazy `ray.data.Dataset`. Every iteration re-executes its plan, which is what
makes each epoch fresh:

* train: a permutation of the rows seeded by (seed, epoch): a new order every
  epoch, the same orders for the same seed; then two independent MoCo v2 views.
* train + resample: each epoch draws as many rows as the split has, a class
  uniformly then an image of it uniformly (draws seeded by (seed, epoch) too).
* eval: deterministic resize/centre-crop, every row once.

The shuffle is in the plan, not in the consumer: no `local_shuffle_buffer_size`
is needed. Decoding and augmentation run in Ray Data's CPU workers
(`map_batches`), never in the training loop; consumers call
`iter_torch_batches` on the dataset or on `ray.train.get_dataset_shard(...)`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from proco_ray.config import Config, ConfigError
from proco_ray.errors import DataError
from proco_ray.prepare import FORMAT, MANIFEST
from proco_ray.sources import listing
from proco_ray.storage import join, read_bytes, resolve, storage_errors
from proco_ray.transforms import eval_batch, train_batch

BLOCK_BYTES = 32 << 20
MIN_BLOCKS = 4
BATCH_ROWS = 64


@dataclass(frozen=True)
class Shard:
    path: str
    split: str
    rows: int
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """What `proco-ray prepare` wrote: classes, per-split per-class counts, image size and the shard list."""

    uri: str
    classes: list[str]
    counts: dict[str, dict[str, int]]
    image_size: int
    encoding: str
    shards: list[Shard]
    split: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def splits(self) -> list[str]:
        return list(self.counts)

    def class_counts(self, split: str = "train") -> list[int]:
        """Images per class in a split, ordered like `classes` (for LDAM/DRW/logit adjustment weights)."""
        counts = self.counts.get(split)
        if counts is None:
            raise DataError(f"split '{split}' is not in the manifest at {self.uri} (it has {self.splits})")
        return [int(counts.get(name, 0)) for name in self.classes]

    def num_rows(self, split: str) -> int:
        return sum(self.class_counts(split))

    def shards_of(self, split: str) -> list[Shard]:
        self.class_counts(split)
        return [s for s in self.shards if s.split == split]

    @classmethod
    def from_dict(cls, uri: str, raw: dict[str, Any]) -> Manifest:
        try:
            return cls(
                uri=uri,
                classes=list(raw["classes"]),
                counts=raw["counts"],
                image_size=int(raw["image_size"]),
                encoding=raw["encoding"],
                shards=[Shard(**s) for s in raw["shards"]],
                split=raw.get("split", {}),
                source=raw.get("source", {}),
                skipped=raw.get("skipped", []),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"{MANIFEST} at {uri} is incomplete or malformed ({error!r})") from error


def read_manifest(uri: str) -> Manifest:
    """The manifest of a prepared dataset; its absence means the dataset is not (completely) prepared."""
    data = read_bytes(join(uri, MANIFEST))
    if data is None:
        raise DataError(f"no {MANIFEST} at {uri} (was it prepared with proco-ray prepare?)")
    try:
        raw = json.loads(data)
    except ValueError as error:
        raise DataError(f"{MANIFEST} at {uri} is not valid JSON ({error})") from error
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise DataError(f"{MANIFEST} at {uri} is not a proco-ray manifest (format {raw.get('format')!r})")
    return Manifest.from_dict(uri, raw)


def check_manifest(config: Config, manifest: Manifest) -> None:
    """The data must hold every split the run reads, with the classes the config expects (Ray path and local feed)."""
    expected = config.data.num_classes
    if expected is not None and expected != manifest.num_classes:
        raise ConfigError(
            f"data.num_classes is {expected} but the dataset at {manifest.uri} has {manifest.num_classes} classes "
            f"({manifest.classes})"
        )
    for split in (config.data.train_split, config.data.val_split):
        if split not in manifest.splits:
            raise ConfigError(f"the dataset at {manifest.uri} has no '{split}' split (it has {manifest.splits})")
    global_batch = config.data.batch_size
    if global_batch % config.train.num_workers:
        raise ConfigError(f"data.batch_size ({global_batch}) must be divisible by train.num_workers ({config.train.num_workers})")
    if manifest.num_rows(config.data.train_split) < global_batch:
        raise ConfigError(
            f"the '{config.data.train_split}' split has {manifest.num_rows(config.data.train_split)} images, "
            f"fewer than one batch of data.batch_size={global_batch}"
        )


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
    return digest, pq.read_table(pa.BufferReader(data), columns=["image", "label", "id"])


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


def num_blocks(rows: int, image_size: int) -> int:
    """Blocks of about BLOCK_BYTES of decoded views: all CPUs busy, a quick first batch, bounded memory."""
    rows_per_block = max(16, min(512, BLOCK_BYTES // (2 * 3 * 4 * image_size * image_size)))
    return max(MIN_BLOCKS, math.ceil(rows / rows_per_block))


@dataclass(frozen=True)
class RowOrder:
    """Which stored rows an epoch visits: 'sequential' (eval), 'shuffle' (a permutation), 'balanced' (resampling)."""

    mode: str
    rows: int
    num_classes: int
    seed_config: Any = None
    first_epoch: int = 0

    def epoch_key(self, data_context: Any) -> list[int]:
        """(seed, epoch): the same in every task of one epoch, different in the next epoch. The epoch is
        `first_epoch` plus the dataset's execution index (one execution per epoch), so a dataset built for a
        run resumed after `first_epoch` epochs visits the rows in the order the uninterrupted run would."""
        if self.seed_config is None:
            return [0, 0]
        seed = self.seed_config.get_seed_tuple(data_context=data_context)
        return [seed.seed, self.first_epoch + (seed.execution_idx or 0)]

    def pick(self, positions: np.ndarray, labels: np.ndarray, data_context: Any) -> np.ndarray:
        """Stored row indices for these positions of the epoch."""
        if self.mode == "sequential":
            return positions
        key = self.epoch_key(data_context)
        if self.mode == "shuffle":
            return np.random.default_rng(key).permutation(self.rows)[positions]
        members = [np.flatnonzero(labels == c) for c in range(self.num_classes)]
        present = np.array([c for c in range(self.num_classes) if len(members[c])])
        rng = np.random.default_rng([*key, int(positions[0]) if len(positions) else 0])
        classes = rng.choice(present, size=len(positions))
        return np.array([members[c][rng.integers(len(members[c]))] for c in classes], dtype=np.int64)


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


def store_split(uri: str, split: str) -> StoredSplit:
    """Read a split's shards (checked against the manifest's sha256 and class range) into the object store."""
    import ray

    manifest = read_manifest(uri)
    rows = manifest.num_rows(split)
    tables = load_split(uri, manifest.shards_of(split), manifest.num_classes)
    if sum(t.num_rows for t in tables) != rows:
        raise DataError(f"{uri}: the {split} shards hold {sum(t.num_rows for t in tables)} rows, the manifest says {rows}")
    return StoredSplit([ray.put(table) for table in tables], rows, manifest.num_classes)


def build_dataset(
    uri: str,
    split: str,
    *,
    image_size: int,
    train: bool,
    resample: bool = False,
    seed: int = 0,
    augmentation: str = "moco_v2",
    views: int = 2,
    with_ids: bool = False,
    first_epoch: int = 0,
    stored: StoredSplit | None = None,
) -> ray.data.Dataset:  # noqa: F821
    """A lazy Ray Dataset of one split.

    train=True: columns view_q (and view_k for views=2: an independent draw), float32 [3,H,W], augmented
    by `augmentation` ('moco_v2', 'supervised' or 'none', the eval view), and label (int64);
    train=False: image (float32 [3,H,W]) and label. with_ids adds the string column id (for iter_batches;
    iter_torch_batches cannot convert strings).

    The split's encoded rows are read once, checked against the manifest's sha256 and put in the Ray
    object store (a few MB to a few hundred MB for these datasets; Ray spills to disk beyond memory).
    Each epoch then streams positions 0..rows-1 through one fused map that picks the rows (a permutation
    seeded by (seed, epoch), or class-balanced draws), decodes and augments them. There is no all-to-all
    shuffle, so the first batch of every epoch comes as soon as one block is decoded. Its first execution is
    epoch `first_epoch` (the epochs a resumed run has done). `stored`: the split already in the object store.
    """
    import ray
    from ray.data import RandomSeedConfig

    stored = stored or store_split(uri, split)
    mode = "sequential" if not train else "balanced" if resample else "shuffle"
    seed_config = RandomSeedConfig(seed=seed, reseed_after_execution=True) if train else None
    order = RowOrder(mode, stored.rows, stored.num_classes, seed_config, first_epoch)
    positions = ray.data.range(stored.rows, override_num_blocks=num_blocks(stored.rows, image_size)).materialize()
    ds = positions.map_batches(select_rows, batch_size=None, fn_args=(stored.refs, order, positions.context))
    if not train:
        return ds.map_batches(eval_batch, batch_size=BATCH_ROWS, fn_kwargs=dict(size=image_size, with_ids=with_ids))
    return ds.map_batches(
        train_batch,
        batch_size=BATCH_ROWS,
        fn_kwargs=dict(size=image_size, augmentation=augmentation, views=views, with_ids=with_ids),
    )
