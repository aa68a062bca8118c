"""What the training loop eats: a `DataFeed` of per-rank batch iterators.

The loop sees only this interface, so the same loop trains from Ray Data shards
inside Ray Train workers (`proco_ray.launch.trainer`) and from in-memory tensors in a
plain process (`tensor_feed`: tests, demos, GPU benchmarks without Ray).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

Batch = dict[str, Tensor]


@dataclass(frozen=True)
class TrainInput:
    """What a training stage reads: class-balanced or not, which augmentation, one view or two."""

    resample: bool = False
    augmentation: str = "moco_v2"
    views: int = 2

    @property
    def key(self) -> str:
        """A name per distinct input, e.g. the Ray Dataset name 'train_resampled_supervised_1v'."""
        return f"train{'_resampled' if self.resample else ''}_{self.augmentation}_{self.views}v"


@dataclass
class DataFeed:
    class_names: list[str]
    class_counts: list[int]
    steps_per_epoch: int
    train_batches: Callable[[TrainInput, int], Iterable[Batch]]
    """(input, epoch) -> this rank's training batches: view_q, view_k (two views only), label."""
    eval_batches: Callable[[str], Iterable[Batch]]
    """split -> this rank's share of the split: image, label."""
    eval_splits: set[str] = field(default_factory=set)


def _normalise(images: Tensor) -> Tensor:
    return (images.float() / 255.0 - 0.5) / 0.25


def _augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Cheap batched two-view stand-in for MoCo v2 augmentation: flips, shifts, brightness, noise."""
    n, _, h, w = images.shape
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(3), images)
    shift = torch.randint(-(h // 8), h // 8 + 1, (2,), generator=generator)
    images = images.roll((int(shift[0]), int(shift[1])), dims=(2, 3))
    brightness = 1 + 0.4 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5)
    return images * brightness + 0.1 * torch.randn(images.shape, generator=generator)


def class_balanced_indices(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Pick a class uniformly, then one of its samples uniformly, `size` times."""
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    picks = rng.integers(0, len(classes), size)
    return np.asarray([by_class[c][rng.integers(0, len(by_class[c]))] for c in picks], dtype=np.int64)


def tensor_feed(
    train: tuple[np.ndarray, np.ndarray],
    eval_sets: Mapping[str, tuple[np.ndarray, np.ndarray]],
    class_names: list[str],
    global_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    augment: bool = True,
) -> DataFeed:
    """An in-memory feed from uint8 images [N, H, W, 3] and labels [N], with a cheap batched stand-in
    for the augmentations (tests, demos); `local_feed` applies the real ones to a prepared dataset.

    Every rank draws the same global order and augmentations and keeps its slice
    of each global batch, so W ranks see exactly what one rank with the same
    global batch sees.
    """
    images, labels = train
    if global_batch_size % world_size:
        raise ValueError(f"data.batch_size ({global_batch_size}) must be divisible by the number of workers ({world_size})")
    if len(images) < global_batch_size:
        raise ValueError(f"the training split has {len(images)} images, fewer than one batch of {global_batch_size}")
    local = global_batch_size // world_size
    images_t = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    labels_t = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    steps = len(images) // global_batch_size
    counts = np.bincount(labels, minlength=len(class_names)).tolist()

    def train_batches(source: TrainInput, epoch: int) -> Iterator[Batch]:
        rng = np.random.default_rng([seed, epoch])
        order = class_balanced_indices(np.asarray(labels), len(images), rng) if source.resample else rng.permutation(len(images))
        generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
        augmented = augment and source.augmentation != "none"
        mine = slice(rank * local, (rank + 1) * local)
        for step in range(steps):
            index = torch.from_numpy(order[step * global_batch_size : (step + 1) * global_batch_size])
            base = _normalise(images_t[index])
            batch = {"view_q": (_augment(base, generator) if augmented else base)[mine]}
            if source.views == 2:
                batch["view_k"] = (_augment(base, generator) if augmented else base.clone())[mine]
            yield {**batch, "label": labels_t[index][mine]}

    def eval_batches(split: str) -> Iterator[Batch]:
        if split not in eval_sets:
            raise KeyError(f"no split '{split}' in this feed (have {sorted(eval_sets)})")
        split_images, split_labels = eval_sets[split]
        mine = np.arange(rank, len(split_images), world_size)
        for start in range(0, len(mine), global_batch_size):
            index = mine[start : start + global_batch_size]
            image = _normalise(torch.from_numpy(np.ascontiguousarray(split_images[index])).permute(0, 3, 1, 2))
            yield {"image": image, "label": torch.from_numpy(np.asarray(split_labels[index], dtype=np.int64))}

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
    augment: bool = True

    def __call__(self, config: Config, rank: int, world_size: int) -> DataFeed:  # noqa: F821
        from proco_ray.data.synthetic import generate_images

        train = generate_images(self.train_counts, self.image_size, self.seed)
        held_out = generate_images(self.eval_counts, self.image_size, self.seed + 1)
        names = [f"class_{c}" for c in range(len(self.train_counts))]
        splits = {config.data.val_split: held_out, config.data.test_split: held_out}
        return tensor_feed(train, splits, names, config.data.batch_size, rank, world_size, self.seed, self.augment)


class _EncodedBatches(torch.utils.data.Dataset):
    """Item i: batch i of encoded rows, decoded and transformed by `transform` (in a DataLoader worker)."""

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
    """A feed over a prepared dataset without Ray: the same shards, sha256 checks, row orders and
    augmentations (`transforms.train_batch` / `eval_batch`) as the Ray Data pipeline, decoded and
    augmented by `workers` DataLoader processes a few batches ahead of the training step.

    For a single machine (one GPU, or the CPU) where a Ray cluster buys nothing; each rank reads
    the whole split and keeps its slice of every global batch, as `tensor_feed` does. The row
    orders are seeded by (train.seed, epoch), the augmentations by the DataLoader workers' seeds,
    which torch draws from the training process's generator (reseeded every epoch by the loop).
    """
    from functools import partial

    import pyarrow as pa

    from proco_ray.data.manifest import check_manifest, read_manifest
    from proco_ray.data.pipeline import load_split
    from proco_ray.data.transforms import eval_batch, train_batch

    data = config.data
    if data.batch_size % world_size:
        raise ValueError(f"data.batch_size ({data.batch_size}) must be divisible by the number of workers ({world_size})")
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
    local = data.batch_size // world_size
    steps = len(labels) // data.batch_size

    def loader(dataset: torch.utils.data.Dataset) -> Iterable[Batch]:
        return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None)

    def train_batches(source: TrainInput, epoch: int) -> Iterable[Batch]:
        rng = np.random.default_rng([config.train.seed, epoch])
        order = class_balanced_indices(labels, len(labels), rng) if source.resample else rng.permutation(len(labels))
        rows = [
            order[step * data.batch_size : (step + 1) * data.batch_size][rank * local : (rank + 1) * local]
            for step in range(steps)
        ]
        transform = partial(train_batch, size=data.image_size, augmentation=source.augmentation, views=source.views)
        return loader(_EncodedBatches(columns[data.train_split], rows, transform))

    def eval_batches(split: str) -> Iterable[Batch]:
        if split not in columns:
            raise KeyError(f"no split '{split}' in {uri} (have {sorted(columns)})")
        mine = np.arange(rank, len(columns[split]["label"]), world_size)
        rows = [mine[i : i + data.eval_batch_size] for i in range(0, len(mine), data.eval_batch_size)]
        return loader(_EncodedBatches(columns[split], rows, partial(eval_batch, size=data.image_size)))

    return DataFeed(manifest.classes, manifest.class_counts(data.train_split), steps, train_batches, eval_batches, set(columns))
