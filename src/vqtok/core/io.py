"""Files that are never half-written: every write goes to a temporary name, is flushed to disk, then renamed."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to path.tmp-PID, flush it to disk, then rename over `path` (atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(Path(path), text.encode())


def write_json(path: str | Path, data: Any, indent: int = 2) -> None:
    """Indented JSON with a final newline."""
    write_text(path, json.dumps(data, indent=indent) + "\n")


def write_npy(path: str | Path, array: Any) -> None:
    """A numpy array in .npy format (read back with np.load(path), which never unpickles by default)."""
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    atomic_write_bytes(Path(path), buffer.getvalue())


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
