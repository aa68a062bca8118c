"""The label check every loss shares: shape and dtype always, the value range only on the host.

Reading a device tensor's range would stall the device every step; labels enter training through
`data.pipeline.load_split`, which range-checks them once.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_labels(labels: Tensor, length: int, num_classes: int | None = None, name: str = "labels") -> None:
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {getattr(labels, 'dtype', type(labels))}")
    if labels.ndim != 1 or labels.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {tuple(labels.shape)}")
    if num_classes is None or length == 0 or labels.device.type != "cpu":
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        raise ValueError(f"{name} must be in [0, {num_classes}), got min {lo}")
    if hi >= num_classes:
        raise ValueError(f"{name} must be in [0, {num_classes}), got max {hi}")
