"""LC codebook files: a .safetensors file with one (K, F) float32 tensor named "codebook" and string metadata.

`vqtok codebook build` writes them (`save_codebook`), `build_quantizer("lc", codebook=path)` reads them
(`read_codebook_file`). The write is atomic, so a killed build never leaves a half-written file where the quantizer
would read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .io import atomic_write_bytes
from .packages import vqtok_version

CODEBOOK_KEY = "codebook"  # the tensor name inside a codebook .safetensors file


def save_codebook(path: str | Path, codebook: Tensor, metadata: dict[str, Any]) -> Path:
    """Write `codebook` (K, F) and `metadata` (values stored as strings) to `path`; returns the path.

    codebook_size, feature_dim and vqtok_version are filled in from the tensor and the installed package.
    """
    if not isinstance(codebook, Tensor) or codebook.dim() != 2 or codebook.shape[0] < 1:
        raise ValueError(f"a codebook is a (K, F) tensor with K >= 1, got {tuple(getattr(codebook, 'shape', ()))}")
    if not torch.isfinite(codebook).all():
        raise ValueError("refusing to save a codebook holding NaN or infinite values")
    from safetensors.torch import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta |= {"codebook_size": str(codebook.shape[0]), "feature_dim": str(codebook.shape[1]),
             "vqtok_version": vqtok_version()}
    atomic_write_bytes(path, save({CODEBOOK_KEY: codebook.detach().float().cpu().contiguous()}, metadata=meta))
    return path


def read_codebook_file(path: str | Path) -> tuple[Tensor, dict[str, str]]:
    """(codebook (K, F) float32, metadata) from a file written by `save_codebook` / `vqtok codebook build`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"codebook file {path} does not exist; build one with `vqtok codebook build --out {path}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            if CODEBOOK_KEY not in f.keys():
                raise ValueError(f"{path} holds no tensor named {CODEBOOK_KEY!r} (found {list(f.keys())}); "
                                 "is it a codebook written by `vqtok codebook build`?")
            return f.get_tensor(CODEBOOK_KEY), dict(f.metadata() or {})
    except ValueError:
        raise
    except Exception as error:  # safetensors' SafetensorError: not a safetensors file, or a truncated one
        raise ValueError(f"{path} is not a readable .safetensors codebook ({error}); rebuild it with "
                         "`vqtok codebook build`") from None


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a codebook file without reading its (up to hundreds of MB) tensor."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
