"""Every collective of the training loop and the methods, each the identity in a single process.

GPU workers get a process group with a backend per device, `cpu:gloo,cuda:nccl` (`process_group_backend`):
NCCL carries CUDA tensors and has no CPU support, so a CPU tensor reduced under a plain NCCL group fails;
under this group each collective runs on the backend of its tensor's device, whichever that is. The
helpers below keep the tensors where the training step has them (on its device), so the step's state is
never copied to the host to be reduced.
"""

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


def process_group_backend(use_gpu: bool, requested: str = "auto") -> str:
    """The torch.distributed backend for the workers: 'auto' gives gloo on CPU workers and `cpu:gloo,cuda:nccl`
    on GPU workers (CPU tensors over gloo, CUDA tensors over NCCL); anything else is taken as given (e.g. gloo
    for workers that share one GPU, where NCCL refuses two ranks on a device)."""
    if requested != "auto":
        return requested
    return "cpu:gloo,cuda:nccl" if use_gpu else "gloo"


@torch.no_grad()
def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum `tensor` over ranks in place (on its own device) and return it."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


@torch.no_grad()
def mean_over_ranks(values: dict[str, Tensor]) -> dict[str, float]:
    """Scalars of this rank (0-d tensors on the training device) -> their means over ranks, read once."""
    if not values:
        return {}
    keys = sorted(values)
    packed = torch.stack([values[k].detach().float().reshape(()) for k in keys])
    all_reduce_sum(packed)
    return {k: float(v) / world_size() for k, v in zip(keys, packed.tolist())}


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
