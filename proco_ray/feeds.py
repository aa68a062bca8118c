"""What the training loop eats: a `DataFeed` of per-rank batch iterators.

The loop sees only this interface, so the same loop trains from Ray Data shards
inside Ray Train workers (`proco_ray.trainer`) and from in-memory tensors in a
plain process (`tensor_feed`: tests, demos, GPU benchmarks without Ray).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor

Batch = dict[str, Tensor]


@dataclass
class DataFeed:
    class_names: list[str]
    class_counts: list[int]
    steps_per_epoch: int
    train_batches: Callable[[bool, int], Iterable[Batch]]
    """(resample, epoch) -> this rank's training batches: view_q, view_k, label."""
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
    """An in-memory feed from uint8 images [N, H, W, 3] and labels [N].

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

    def train_batches(resample: bool, epoch: int) -> Iterator[Batch]:
        rng = np.random.default_rng([seed, epoch])
        order = class_balanced_indices(np.asarray(labels), len(images), rng) if resample else rng.permutation(len(images))
        generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
        for step in range(steps):
            index = torch.from_numpy(order[step * global_batch_size : (step + 1) * global_batch_size])
            base = _normalise(images_t[index])
            view_q = _augment(base, generator) if augment else base
            view_k = _augment(base, generator) if augment else base.clone()
            mine = slice(rank * local, (rank + 1) * local)
            yield {"view_q": view_q[mine], "view_k": view_k[mine], "label": labels_t[index][mine]}

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
    """A picklable feed factory over `proco_ray.synthetic` data: `(config, rank, world_size) -> DataFeed`.

    Ray Train workers build it themselves, so tests and demos can run the real
    TorchTrainer path without object storage.
    """

    train_counts: tuple[int, ...]
    eval_counts: tuple[int, ...]
    image_size: int = 16
    seed: int = 0
    augment: bool = True

    def __call__(self, config: "Config", rank: int, world_size: int) -> DataFeed:  # noqa: F821
        from proco_ray.synthetic import generate_images

        train = generate_images(self.train_counts, self.image_size, self.seed)
        held_out = generate_images(self.eval_counts, self.image_size, self.seed + 1)
        names = [f"class_{c}" for c in range(len(self.train_counts))]
        splits = {config.data.val_split: held_out, config.data.test_split: held_out}
        return tensor_feed(train, splits, names, config.data.batch_size, rank, world_size, self.seed, self.augment)
