"""Files that are never half-written: every write goes to a temporary name, is flushed to disk, then renamed."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to path.tmp-PID, flush it to disk, then rename over `path` (atomic on POSIX)."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_state_dict(state: dict[str, Tensor], path: str | Path) -> None:
    """Save a state dict as safetensors atomically. safetensors refuses shared or non-contiguous tensors, so each
    tensor is written as its own contiguous CPU copy (tied weights are stored twice and load back correctly)."""
    from safetensors.torch import save

    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in state.items()}
    atomic_write_bytes(Path(path), save(tensors))


def load_state_dict(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """A state dict saved by `save_state_dict`, its tensors placed on `device`."""
    from safetensors.torch import load_file

    return load_file(str(path), device=str(device))
