"""PSNR and SSIM, one documented way: RGB in [0, 1], per image, computed in float64.

Public tokenizer repos disagree here (VQGAN-LC: PSNR on the Y channel; LlamaGen: SSIM with data_range=2 on [0, 1]
images), so the same reconstructions score differently in each. vqtok: PSNR = 10 log10(1 / MSE) over all RGB values of an image; SSIM as Wang et al.
2004: Gaussian window 11 x 11 with sigma 1.5, K1 = 0.01, K2 = 0.03, data_range 1, computed where the window fits
inside the image ("valid"), averaged over positions and channels. Identical to scikit-image's
structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
PSNR_PROTOCOL = "RGB in [0, 1], 10*log10(1/MSE) per image over all pixels and channels, mean over images"
SSIM_PROTOCOL = (f"Wang et al. 2004: Gaussian window {SSIM_WINDOW} sigma {SSIM_SIGMA}, K1 {SSIM_K1} K2 {SSIM_K2}, "
                 "data_range 1, valid positions, RGB channels averaged; per image, mean over images")


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two image batches of the same shape (B, C, H, W), got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")


def psnr(x: Tensor, y: Tensor, mse_floor: float = 0.0) -> Tensor:
    """(B, C, H, W) images in [0, 1] -> (B,) float64 PSNR in dB (inf where the images are identical, unless the
    MSE is floored at `mse_floor`)."""
    _check_pair(x, y)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(dim=1).clamp(min=mse_floor)  # (B,)
    return 10.0 * torch.log10(1.0 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    """The normalised 1-D Gaussian (size,) float64 that SSIM convolves with along each axis."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    window = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return window / window.sum()


def _blur(x: Tensor, window: Tensor) -> Tensor:
    """Separable 'valid' Gaussian filter per channel: (B, C, H, W) -> (B, C, H - s + 1, W - s + 1)."""
    channels = x.shape[1]
    rows = window.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    cols = window.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    return F.conv2d(F.conv2d(x, rows, groups=channels), cols, groups=channels)


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """(B, C, H, W) images in [0, 1] -> (B,) float64 SSIM (Gaussian 11 / 1.5, data_range 1)."""
    _check_pair(x, y)
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {tuple(x.shape[-2:])}")
    x, y = x.double(), y.double()
    window = gaussian_window().to(x.device)
    mu_x, mu_y = _blur(x, window), _blur(y, window)
    var_x = _blur(x * x, window) - mu_x * mu_x
    var_y = _blur(y * y, window) - mu_y * mu_y
    cov = _blur(x * y, window) - mu_x * mu_y
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2  # (K * data_range)^2 with data_range 1
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(dim=1)  # (B,)

