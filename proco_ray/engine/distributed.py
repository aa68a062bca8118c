"""Collective helpers that fall back to the identity in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


@torch.no_grad()
def all_gather_cat(tensor: Tensor) -> Tensor:
    """Concatenate equal-shaped tensors of all ranks in rank order (no gradient), like MoCo's concat_all_gather."""
    if not is_distributed():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


@torch.no_grad()
def batch_shuffle(x: Tensor) -> tuple[Tensor, Tensor]:
    """MoCo's shuffle-BN: permute the global batch across ranks; returns this rank's part and the undo index."""
    if not is_distributed():
        return x, torch.arange(x.shape[0], device=x.device)
    local = x.shape[0]
    x_all = all_gather_cat(x)
    shuffle = torch.randperm(x_all.shape[0], device=x.device)
    dist.broadcast(shuffle, src=0)
    unshuffle = torch.argsort(shuffle)
    mine = shuffle.view(dist.get_world_size(), local)[dist.get_rank()]
    return x_all[mine], unshuffle


@torch.no_grad()
def batch_unshuffle(x: Tensor, unshuffle: Tensor) -> Tensor:
    """Undo `batch_shuffle` for this rank's outputs."""
    if not is_distributed():
        return x[unshuffle]
    local = x.shape[0]
    x_all = all_gather_cat(x)
    mine = unshuffle.view(dist.get_world_size(), local)[dist.get_rank()]
    return x_all[mine]
