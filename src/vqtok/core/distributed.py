"""The few torch.distributed helpers vqtok needs; all are no-ops in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .device import resolve_device


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


def init_from_env(device: str = "auto") -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK) and pick this process's device
    (`resolve_device`). NCCL on GPUs, gloo on CPU; a plain `python` run (no WORLD_SIZE) stays single-process."""
    import os

    chosen = resolve_device(device)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not is_distributed():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return chosen


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_object(obj: object) -> list[object]:
    """Every rank's `obj`, in rank order (a one-element list when not distributed)."""
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean_grads_(parameters: list[torch.nn.Parameter]) -> None:
    """Average the gradients of `parameters` over ranks with one flat all-reduce (data parallelism).
    A parameter without a gradient on this rank contributes zeros, so every rank calls the same collective."""
    if not is_distributed() or not parameters:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_sum_(flat).div_(world_size())
    offset = 0
    for p in parameters:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n
