"""Which stored rows a training epoch visits, in which order: the one sampler of both feeds.

The Ray Data pipeline (`pipeline.RowOrder`) and the Ray-free local feed (`engine.feeds.local_feed`) call
`epoch_rows` with the same (seed, epoch), so they visit the same rows in the same order.
"""

from __future__ import annotations

import numpy as np

from proco_ray.config import CLASS_BALANCED, ConfigError, Sampling, check_choice


def class_balanced_rows(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` draws of a class uniformly among the present classes, then one of its rows uniformly."""
    classes, counts = np.unique(labels, return_counts=True)
    by_class = np.argsort(labels, kind="stable")  # rows grouped by class, in class order
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    picks = rng.integers(0, len(classes), size)
    within = np.floor(rng.random(size) * counts[picks]).astype(np.int64)
    return by_class[starts[picks] + within].astype(np.int64)


def epoch_rows(labels: np.ndarray, seed: int, epoch: int, sampling: str) -> np.ndarray:
    """The epoch's row indices (as many as there are rows): instance-balanced, a permutation seeded by
    (seed, epoch); class-balanced, draws seeded the same way."""
    check_choice(sampling, Sampling, "sampling")
    rng = np.random.default_rng([seed, epoch])
    if sampling == CLASS_BALANCED:
        return class_balanced_rows(np.asarray(labels), len(labels), rng)
    return rng.permutation(len(labels))


def check_batch_divides(global_batch: int, world_size: int) -> None:
    """Every rank takes an equal slice of each global batch (`rank_batches`)."""
    if global_batch % world_size:
        raise ConfigError(f"data.batch_size ({global_batch}) must be divisible by train.num_workers ({world_size})")


def rank_batches(order: np.ndarray, global_batch: int, rank: int, world_size: int) -> list[np.ndarray]:
    """This rank's slice of each whole global batch of `order`: W ranks together see what one rank would."""
    check_batch_divides(global_batch, world_size)
    local = global_batch // world_size
    return [
        order[step * global_batch : (step + 1) * global_batch][rank * local : (rank + 1) * local]
        for step in range(len(order) // global_batch)
    ]


def rank_share(rows: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's rows of an evaluation split: every world_size-th row, from its rank."""
    return np.arange(rank, rows, world_size)
