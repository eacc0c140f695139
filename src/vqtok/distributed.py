"""The few torch.distributed helpers vqtok needs; all are no-ops in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum `tensor` over all ranks in place (every rank must call this the same number of times)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor
