"""Weight files, written once for every backbone: locating a file shipped inside an installed package, reading a
state dict from .pth / .pt / .safetensors, loading it strictly, and a cached sha256 for the protocol of a run."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor, nn

from ..core.packages import package_dir

Module = TypeVar("Module", bound=nn.Module)


def packaged_file(package: str, pattern: str) -> Path | None:
    """The first file (in sorted order) matching `pattern`, a path relative to the installed directory of `package`
    (glob wildcards allowed), or None when the package is not installed or holds no such file. The package is
    never imported: some import dependencies vqtok does not install (deep-sort's opencv, foolbox's eagerpy)."""
    root = package_dir(package)
    files = [path for path in sorted(root.glob(pattern)) if path.is_file()] if root is not None else []
    return files[0] if files else None


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file: a .safetensors file, or a torch.save'd state dict (loaded on the CPU with
    weights_only=True, so no code in the file runs; a checkpoint that wraps it under "state_dict" is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return state


def load_weights(net: Module, path: str | Path) -> Module:
    """`net` with the state dict of `path` loaded with strict=True (a missing or unexpected key is an error, so a
    file made for another architecture never loads half-way), in eval mode."""
    net.load_state_dict(read_state_dict(path), strict=True)
    return net.eval()


@functools.lru_cache(maxsize=None)
def _sha256_cached(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, computed once per (resolved path, mtime, size) in this process: a file rewritten in place
    gets a new mtime and is hashed again."""
    path = Path(path).resolve()
    stat = path.stat()
    return _sha256_cached(str(path), stat.st_mtime_ns, stat.st_size)
