"""Which stored rows a training epoch visits, in which order: the one sampler of both feeds.

The Ray Data pipeline (`pipeline.RowOrder`) and the Ray-free local feed (`engine.feeds.local_feed`) call
`epoch_rows` with the same (seed, epoch), so they visit the same rows in the same order.
"""

from __future__ import annotations

import numpy as np


def class_balanced_rows(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` draws of a class uniformly among the present classes, then one of its rows uniformly."""
    classes, counts = np.unique(labels, return_counts=True)
    by_class = np.argsort(labels, kind="stable")  # rows grouped by class, in class order
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    picks = rng.integers(0, len(classes), size)
    within = np.floor(rng.random(size) * counts[picks]).astype(np.int64)
    return by_class[starts[picks] + within].astype(np.int64)


def epoch_rows(labels: np.ndarray, seed: int, epoch: int, class_balanced: bool) -> np.ndarray:
    """The epoch's row indices (as many as there are rows): a permutation seeded by (seed, epoch), or
    class-balanced draws seeded the same way."""
    rng = np.random.default_rng([seed, epoch])
    if class_balanced:
        return class_balanced_rows(np.asarray(labels), len(labels), rng)
    return rng.permutation(len(labels))
