"""Image transforms, and the batch functions that apply them inside Ray Data workers.

Two-view methods train on MoCo v2's augmentation, single-view methods on a
standard supervised one (`data.augmentation`); evaluation uses a deterministic
resize + centre crop. Both end in ImageNet normalisation and produce float32
[3, H, W] arrays, so the training loop only moves tensors to its device.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GaussianBlur:
    """MoCo v2's blur: PIL's Gaussian filter, sigma uniform in [0.1, 2.0].

    Kept instead of torchvision's GaussianBlur because on PIL images it is about
    1.5x faster for the whole augmentation, and it is what MoCo v2 used.
    """

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def moco_v2_view(size: int) -> Callable[[Image.Image], Image.Image]:
    """The random part of one MoCo v2 view: RandomResizedCrop(0.2-1), ColorJitter p=0.8, grayscale p=0.2, blur p=0.5, flip."""
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.2, 1.0)),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([GaussianBlur()], p=0.5),
            T.RandomHorizontalFlip(),
        ]
    )


def supervised_view(size: int) -> Callable[[Image.Image], Image.Image]:
    """The standard single-view augmentation for dermoscopy and fundus images, which have no up or left:
    RandomResizedCrop(0.5-1), horizontal and vertical flips, mild colour jitter."""
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.5, 1.0)),
            T.RandomHorizontalFlip(),
            T.RandomVerticalFlip(),
            T.ColorJitter(0.2, 0.2, 0.2, 0.02),
        ]
    )


def eval_view(size: int) -> Callable[[Image.Image], Image.Image]:
    """Deterministic: resize the short side, centre-crop to size x size."""
    return T.Compose([T.Resize(size), T.CenterCrop(size)])


AUGMENTATIONS = {"moco_v2": moco_v2_view, "supervised": supervised_view, "none": eval_view}


def train_view(augmentation: str, size: int) -> Callable[[Image.Image], Image.Image]:
    """A training view by name: 'moco_v2' (two-view methods), 'supervised' (single-view methods) or 'none'."""
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {sorted(AUGMENTATIONS)}, got '{augmentation}'")
    return AUGMENTATIONS[augmentation](size)


def moco_v2_augmentation(size: int) -> Callable[[Image.Image], torch.Tensor]:
    """One MoCo v2 view as a normalised tensor (per image, for torchvision datasets)."""
    return T.Compose([moco_v2_view(size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(size: int) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation view as a normalised tensor (per image, for torchvision datasets)."""
    return T.Compose([eval_view(size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def normalize_batch(images: Sequence[Image.Image]) -> np.ndarray:
    """Same-size RGB images -> float32 [B,3,H,W], ToTensor + Normalize done once for the batch (several times faster)."""
    pixels = np.stack([np.asarray(image, dtype=np.uint8) for image in images]).astype(np.float32)
    pixels *= 1 / 255
    pixels -= np.asarray(IMAGENET_MEAN, dtype=np.float32)
    pixels /= np.asarray(IMAGENET_STD, dtype=np.float32)
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))


class TwoViews:
    """Two independent draws of the same transform: the query and key views of one image."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [self.transform(image), self.transform(image)]


def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def train_batch(
    batch: dict[str, np.ndarray], *, size: int, augmentation: str = "moco_v2", views: int = 2, with_ids: bool = False
) -> dict[str, np.ndarray]:
    """Encoded images -> view_q (and view_k when views=2: an independent draw), float32 [B,3,H,W], label, and
    location (MTL's body site) where the shards have it."""
    if views not in (1, 2):
        raise ValueError(f"views must be 1 or 2, got {views}")
    view = train_view(augmentation, size)
    images = [decode(data) for data in batch["image"]]
    out = {"view_q": normalize_batch([view(image) for image in images])}
    if views == 2:
        out["view_k"] = normalize_batch([view(image) for image in images])
    out["label"] = batch["label"].astype(np.int64)
    if "location" in batch:
        out["location"] = batch["location"].astype(np.int64)
    if with_ids:
        out["id"] = batch["id"]
    return out


def eval_batch(batch: dict[str, np.ndarray], *, size: int, with_ids: bool = False) -> dict[str, np.ndarray]:
    """Encoded images -> image (float32 [B,3,H,W]) and label."""
    view = eval_view(size)
    out = {
        "image": normalize_batch([view(decode(data)) for data in batch["image"]]),
        "label": batch["label"].astype(np.int64),
    }
    if with_ids:
        out["id"] = batch["id"]
    return out
