"""The sample queue Q: key features, labels and the key encoder's predictions, FIFO with wrap-around."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from proco_ray.distributed import all_gather_cat


class SampleQueue(nn.Module):
    """A ring buffer of M entries; every rank enqueues the same global batch, so all queues stay identical.

    `gather` collects a step's keys from every rank (all_gather in rank order);
    `enqueue` appends them. The two are separate because the contrast set of a
    step is the queue *before* its enqueue plus the gathered batch.
    """

    feats: Tensor
    labels: Tensor
    preds: Tensor
    ptr: Tensor
    filled: Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 0:
            raise ValueError(f"queue size must be >= 0, got {size}")
        if dim < 1:
            raise ValueError(f"queue feature dim must be >= 1, got {dim}")
        self.size = size
        self.register_buffer("feats", torch.zeros(size, dim))
        self.register_buffer("labels", torch.zeros(size, dtype=torch.long))
        self.register_buffer("preds", torch.zeros(size, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self._filled_on_host: int | None = 0
        self.register_load_state_dict_post_hook(lambda module, _: setattr(module, "_filled_on_host", None))

    def __len__(self) -> int:
        """The fill count, mirrored on the host so that a training step never reads it back from a device."""
        if self._filled_on_host is None:
            self._filled_on_host = int(self.filled)
        return self._filled_on_host

    def contents(self) -> tuple[Tensor, Tensor, Tensor]:
        """The valid entries (a copy-free view; clone before an enqueue if they must survive it)."""
        n = len(self)
        return self.feats[:n], self.labels[:n], self.preds[:n]

    @staticmethod
    def gather(feats: Tensor, labels: Tensor, preds: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """This step's entries of every rank, in rank order."""
        return all_gather_cat(feats.detach()), all_gather_cat(labels), all_gather_cat(preds)

    @torch.no_grad()
    def enqueue(self, feats: Tensor, labels: Tensor, preds: Tensor) -> None:
        n = feats.shape[0]
        if feats.dim() != 2 or feats.shape[1] != self.feats.shape[1]:
            raise ValueError(f"feats must have shape [n, {self.feats.shape[1]}], got {tuple(feats.shape)}")
        if labels.shape != (n,) or preds.shape != (n,):
            raise ValueError(f"labels and preds must have shape [{n}], got {tuple(labels.shape)}, {tuple(preds.shape)}")
        if self.size == 0 or n == 0:
            return
        if n > self.size:
            feats, labels, preds = feats[-self.size :], labels[-self.size :], preds[-self.size :]
            self.ptr.add_(n - self.size).remainder_(self.size)
            n = self.size
        index = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size
        self.feats.index_copy_(0, index, feats.to(self.feats.dtype))
        self.labels.index_copy_(0, index, labels.to(torch.long))
        self.preds.index_copy_(0, index, preds.to(torch.long))
        self.ptr.add_(n).remainder_(self.size)
        self.filled.add_(n).clamp_(max=self.size)
        self._filled_on_host = min(len(self) + n, self.size)
