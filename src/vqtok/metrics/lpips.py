"""LPIPS for evaluation: the LPIPS-VGG16 network of vqtok.models.perceptual (written once, used by the training loss
and here), loaded only when its weight files are present. Nothing is ever downloaded."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..models.perceptual import LPIPS

log = logging.getLogger("vqtok.metrics")

_notified: list[bool] = []
NOT_FOUND = ("LPIPS-VGG weights not found (torchvision's vgg16-397923af.pth and LPIPS's vgg.pth in $VQTOK_LPIPS_DIR "
             "or torch hub's checkpoints folder): lpips is reported as null")


def load_lpips(weights: str | Path | None = None, device: str | torch.device = "cpu") -> "LPIPS | None":
    """LPIPS-VGG16 from `weights` (a folder holding vgg16*.pth and vgg.pth, or one of those files), or from the
    default folders when None; None (and a one-line notice) when the files are not there."""
    from ..models.perceptual import LPIPS, find_lpips_weights

    folders = None
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"LPIPS weights {path} not found; pass the folder holding vgg16-397923af.pth "
                                    "and LPIPS's vgg.pth, or leave it unset to report lpips as null")
        folders = [path if path.is_dir() else path.parent]
    found = find_lpips_weights(folders)
    if found is None:
        if weights is not None:
            raise FileNotFoundError(f"{weights}: expected vgg16*.pth (torchvision VGG16) and vgg.pth (LPIPS linear "
                                    "layers) side by side")
        if not _notified:
            log.warning(NOT_FOUND)  # once per process: periodic evaluations would repeat it
            _notified.append(True)
        return None
    return LPIPS.from_files(*found).to(device)
