"""A generated long-tailed image dataset: a source for demos and tests that needs no download.

Each class has its own colour and stripe orientation under per-image noise, so a
small network can learn it in a few epochs while the tail classes stay rare. The
orientations lie in [0, 90] degrees so that a horizontal flip (one of MoCo v2's
augmentations) never turns one class's stripes into another's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def long_tailed_counts(num_classes: int, head: int, imbalance: float) -> list[int]:
    """Exponentially decaying class sizes from `head` down to head / imbalance (Cui et al. 2019)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if imbalance < 1:
        raise ValueError(f"imbalance must be >= 1, got {imbalance}")
    return [max(1, int(round(head * imbalance ** (-c / (num_classes - 1))))) for c in range(num_classes)]


def generate_images(counts: Sequence[int], image_size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, H, W, 3] and int64 labels [N], class c drawn counts[c] times."""
    rng = np.random.default_rng(seed)
    num_classes = len(counts)
    yy, xx = np.mgrid[0:image_size, 0:image_size] / image_size
    images, labels = [], []
    for c, count in enumerate(counts):
        angle = 0.5 * np.pi * c / max(num_classes - 1, 1)
        colour = 0.5 + 0.4 * np.cos(2 * np.pi * (c / num_classes + np.array([0.0, 1 / 3, 2 / 3])))
        for _ in range(count):
            phase = rng.uniform(0, 2 * np.pi)
            stripes = 0.5 + 0.5 * np.sin(12 * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
            image = stripes[..., None] * colour + rng.normal(0, 0.15, (image_size, image_size, 3))
            images.append(np.clip(image * 255, 0, 255).astype(np.uint8))
            labels.append(c)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def write_image_folder(root: str | Path, counts: Sequence[int], image_size: int = 32, seed: int = 0) -> list[str]:
    """Write the dataset as an ImageFolder tree (root/class_<c>/<i>.png); returns the class names."""
    root = Path(root)
    images, labels = generate_images(counts, image_size, seed)
    names = [f"class_{c}" for c in range(len(counts))]
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(root / names[label] / f"img_{i:05d}.png")
    return names
