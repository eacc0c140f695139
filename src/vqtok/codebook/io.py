"""Codebook files: a .safetensors file with one (K, F) float32 tensor named "codebook" and string metadata.

The reader is `vqtok.quantize.lc.read_codebook_file` (what `build_quantizer("lc", codebook=path)` uses); this module
adds the writer, which fills in the metadata every codebook carries and writes atomically (temp name, then rename),
so a killed build never leaves a half-written file where the quantizer would read it.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..quantize.lc import CODEBOOK_KEY, read_codebook_file


def vqtok_version() -> str:
    try:
        return version("vqtok")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def save_codebook(path: str | Path, codebook: Tensor, metadata: dict[str, Any]) -> Path:
    """Write `codebook` (K, F) and `metadata` (values stored as strings) to `path`; returns the path.

    codebook_size, feature_dim and vqtok_version are filled in from the tensor and the installed package.
    """
    if not isinstance(codebook, Tensor) or codebook.dim() != 2 or codebook.shape[0] < 1:
        raise ValueError(f"a codebook is a (K, F) tensor with K >= 1, got {tuple(getattr(codebook, 'shape', ()))}")
    if not torch.isfinite(codebook).all():
        raise ValueError("refusing to save a codebook holding NaN or infinite values")
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta |= {"codebook_size": str(codebook.shape[0]), "feature_dim": str(codebook.shape[1]),
             "vqtok_version": vqtok_version()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({CODEBOOK_KEY: codebook.detach().float().cpu().contiguous()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_codebook(path: str | Path) -> tuple[Tensor, dict[str, str]]:
    """(codebook (K, F) float32, metadata) from a file written by `save_codebook` / `vqtok codebook build`."""
    return read_codebook_file(path)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a codebook file without reading its (up to hundreds of MB) tensor."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
