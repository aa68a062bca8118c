"""Stored image bytes -> uint8 arrays: all the per-image work left on the CPU.

Prepare stores every image at its training size, as JPEG, PNG or raw uint8 pixels (the manifest says
which). The pipeline and the local feed deliver these uint8 images; the training worker makes the
views on its device (`proco_ray.data.augment`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

RAW = "raw"


def decode_image(data: bytes, encoding: str, size: int) -> np.ndarray:
    """One stored image -> uint8 [size, size, 3]: raw pixels are only reshaped, JPEG and PNG decoded."""
    if encoding == RAW:
        pixels = np.frombuffer(data, dtype=np.uint8)
        if pixels.size != size * size * 3:
            raise ValueError(f"a raw image of {pixels.size} bytes is not {size} x {size} x 3")
        return pixels.reshape(size, size, 3)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def decode_images(encoded: Sequence[bytes], encoding: str, size: int) -> np.ndarray:
    """Stored images -> uint8 [B, size, size, 3]; raw ones in one join, with no per-image work."""
    if encoding == RAW:
        joined = b"".join(encoded)
        if len(joined) != len(encoded) * size * size * 3:
            raise ValueError(f"raw images of {len(joined)} bytes in all are not {len(encoded)} x {size} x {size} x 3")
        return np.frombuffer(joined, dtype=np.uint8).reshape(len(encoded), size, size, 3)
    return np.stack([decode_image(data, encoding, size) for data in encoded])


def decode_batch(batch: dict[str, np.ndarray], *, encoding: str, size: int, with_ids: bool = False) -> dict[str, np.ndarray]:
    """Encoded rows -> image (uint8 [B, H, W, 3]), label (int64) and location (MTL's body site) where the
    shards have it; with_ids keeps the string id column."""
    out = {"image": decode_images(batch["image"], encoding, size), "label": batch["label"].astype(np.int64)}
    if "location" in batch:
        out["location"] = batch["location"].astype(np.int64)
    if with_ids:
        out["id"] = batch["id"]
    return out
