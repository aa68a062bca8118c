"""What the training loop eats: a `DataFeed` of per-rank batch iterators of uint8 images.

The loop sees only this interface, so the same loop trains from Ray Data shards
inside Ray Train workers (`proco_ray.launch.train_worker`), from a prepared dataset in a
plain process (`local_feed`) and from in-memory tensors (`tensor_feed`: tests, demos).
Every feed delivers the stored uint8 images; the loop makes the views on its device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from proco_ray.data.sampling import check_batch_divides, epoch_rows, rank_batches, rank_share
from proco_ray.data.train_input import TrainInput
from proco_ray.method.base import Batch


@dataclass
class DataFeed:
    class_names: list[str]
    class_counts: list[int]
    steps_per_epoch: int
    train_batches: Callable[[TrainInput, int], Iterable[Batch]]
    """(input, epoch) -> this rank's training batches: image (uint8 [B, H, W, 3]), label, location where known."""
    eval_batches: Callable[[str], Iterable[Batch]]
    """split -> this rank's share of the split: image (uint8 [B, H, W, 3]), label."""
    eval_splits: set[str] = field(default_factory=set)


def tensor_feed(
    train: tuple[np.ndarray, np.ndarray],
    eval_sets: Mapping[str, tuple[np.ndarray, np.ndarray]],
    class_names: list[str],
    global_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> DataFeed:
    """An in-memory feed from uint8 images [N, H, W, 3] and labels [N] (tests, demos); `local_feed` reads a
    prepared dataset.

    Every rank draws the same global order (`sampling.epoch_rows`) and keeps its slice of each global
    batch, so W ranks see exactly what one rank with the same global batch sees.
    """
    images, labels = train
    check_batch_divides(global_batch_size, world_size)
    if len(images) < global_batch_size:
        raise ValueError(f"the training split has {len(images)} images, fewer than one batch of {global_batch_size}")
    images_t = torch.from_numpy(np.ascontiguousarray(images))
    labels_t = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    steps = len(images) // global_batch_size
    counts = np.bincount(labels, minlength=len(class_names)).tolist()

    def train_batches(source: TrainInput, epoch: int) -> Iterator[Batch]:
        order = epoch_rows(np.asarray(labels), seed, epoch, source.sampling)
        for rows in rank_batches(order, global_batch_size, rank, world_size):
            index = torch.from_numpy(rows)
            yield {"image": images_t[index], "label": labels_t[index]}

    def eval_batches(split: str) -> Iterator[Batch]:
        if split not in eval_sets:
            raise KeyError(f"no split '{split}' in this feed (have {sorted(eval_sets)})")
        split_images, split_labels = eval_sets[split]
        mine = rank_share(len(split_images), rank, world_size)
        for start in range(0, len(mine), global_batch_size):
            index = mine[start : start + global_batch_size]
            yield {
                "image": torch.from_numpy(np.ascontiguousarray(split_images[index])),
                "label": torch.from_numpy(np.asarray(split_labels[index], dtype=np.int64)),
            }

    return DataFeed(class_names, counts, steps, train_batches, eval_batches, set(eval_sets))


@dataclass(frozen=True)
class GeneratedFeed:
    """A picklable feed factory over `proco_ray.data.synthetic` data: `(config, rank, world_size) -> DataFeed`.

    Ray Train workers build it themselves, so tests and demos can run the real
    TorchTrainer path without object storage.
    """

    train_counts: tuple[int, ...]
    eval_counts: tuple[int, ...]
    image_size: int = 16
    seed: int = 0

    def __call__(self, config: Config, rank: int, world_size: int) -> DataFeed:  # noqa: F821
        from proco_ray.data.synthetic import generate_images

        train = generate_images(self.train_counts, self.image_size, self.seed)
        held_out = generate_images(self.eval_counts, self.image_size, self.seed + 1)
        names = [f"class_{c}" for c in range(len(self.train_counts))]
        splits = {config.data.val_split: held_out, config.data.test_split: held_out}
        return tensor_feed(train, splits, names, config.data.batch_size, rank, world_size, self.seed)


class _EncodedBatches(torch.utils.data.Dataset):
    """Item i: batch i of encoded rows, decoded by `transform` (in a DataLoader worker)."""

    def __init__(self, columns: dict[str, np.ndarray], rows: list[np.ndarray], transform: Callable) -> None:
        self.columns, self.rows, self.transform = columns, rows, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Batch:
        rows = self.rows[index]
        out = self.transform({name: values[rows] for name, values in self.columns.items()})
        return {k: torch.from_numpy(v) for k, v in out.items()}


def local_feed(
    uri: str,
    config: Config,  # noqa: F821
    rank: int = 0,
    world_size: int = 1,
    workers: int = 2,
) -> DataFeed:
    """A feed over a prepared dataset without Ray: the same shards, sha256 checks, row orders
    (`sampling.epoch_rows`) and uint8 images as the Ray Data pipeline, decoded by `workers` DataLoader
    processes a few batches ahead of the training step (0: in this process).

    For a single machine (one GPU, or the CPU) where a Ray cluster buys nothing; each rank reads
    the whole split and keeps its slice of every global batch, as `tensor_feed` does.
    """
    from functools import partial

    import pyarrow as pa

    from proco_ray.data.decode import decode_batch
    from proco_ray.data.manifest import check_manifest, read_manifest
    from proco_ray.data.pipeline import load_split

    data = config.data
    check_batch_divides(data.batch_size, world_size)
    manifest = read_manifest(uri)
    check_manifest(config, manifest)
    splits = [data.train_split, data.val_split] + [s for s in [data.test_split] if s in manifest.splits]
    columns: dict[str, dict[str, np.ndarray]] = {}
    for split in dict.fromkeys(splits):
        table = pa.concat_tables(load_split(uri, manifest.shards_of(split), manifest.num_classes))
        columns[split] = {"image": table.column("image").to_numpy(zero_copy_only=False)}
        for name in ("label", "location"):
            if name in table.column_names:
                columns[split][name] = table.column(name).to_numpy().astype(np.int64)
    labels = columns[data.train_split]["label"]
    steps = len(labels) // data.batch_size
    decode = partial(decode_batch, encoding=manifest.encoding, size=manifest.image_size)

    def loader(dataset: torch.utils.data.Dataset) -> Iterable[Batch]:
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=4 if workers else None,
            pin_memory=workers > 0 and torch.cuda.is_available(),  # pinned pages only speed a copy to a GPU
        )

    def train_batches(source: TrainInput, epoch: int) -> Iterable[Batch]:
        order = epoch_rows(labels, config.train.seed, epoch, source.sampling)
        rows = rank_batches(order, data.batch_size, rank, world_size)
        return loader(_EncodedBatches(columns[data.train_split], rows, decode))

    def eval_batches(split: str) -> Iterable[Batch]:
        if split not in columns:
            raise KeyError(f"no split '{split}' in {uri} (have {sorted(columns)})")
        mine = rank_share(len(columns[split]["label"]), rank, world_size)
        rows = [mine[i : i + data.eval_batch_size] for i in range(0, len(mine), data.eval_batch_size)]
        return loader(_EncodedBatches(columns[split], rows, decode))

    return DataFeed(manifest.classes, manifest.class_counts(data.train_split), steps, train_batches, eval_batches, set(columns))
