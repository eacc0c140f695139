"""Image decoding and cropping shared by every source: any file Pillow reads -> 8-bit RGB -> float (3, S, S) in [0, 1].

Odd images never stop a run: grayscale, palette, RGBA/LA (composited on white), CMYK and 16-bit images are converted;
images smaller than the crop are resized up; empty, truncated or unreadable files raise `UnreadableImage`, which the
sources catch, count and log.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
RESAMPLE = Image.Resampling.BICUBIC  # Pillow's bicubic is antialiased when it shrinks (its support widens)
RESAMPLE_NAME = "Pillow bicubic (antialiased when shrinking)"

log = logging.getLogger("vqtok.data")


class UnreadableImage(Exception):
    """An image file that cannot be decoded (empty, truncated, not an image); the message says why."""


def open_rgb(path: str | Path) -> Image.Image:
    """Decode `path` completely into an 8-bit RGB image (EXIF rotation applied), or raise UnreadableImage."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise UnreadableImage(f"{path}: empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns on odd metadata; a bad file raises below
            with Image.open(path) as image:
                image.load()  # truncated data raises here, not at open
                image = ImageOps.exif_transpose(image)
                return to_rgb(image)
    except UnreadableImage:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise UnreadableImage(f"{path}: {type(error).__name__}: {error}") from error


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. 16-bit and 32-bit integer images are scaled by 1/257 (65535 -> 255), float
    images are read as [0, 1]; transparent images are composited on white (how a viewer shows them)."""
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        scale = 255.0 if mode == "F" else 255.0 / 65535.0
        gray = np.clip(np.rint(np.asarray(image, dtype=np.float64) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")


def to_tensor(image: Image.Image) -> Tensor:
    """8-bit RGB (or L) Pillow image -> float32 (3, H, W) in [0, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)


def crop_box(image: Image.Image, box: tuple[float, float, float, float], size: int) -> Tensor:
    """The region `box` (left, top, right, bottom, source pixels) resized to (size, size): float (3, size, size)."""
    return to_tensor(image.resize((size, size), RESAMPLE, box=box))


def shorter_side_box(width: int, height: int, size: int, offset: int | None = None) -> tuple[float, ...]:
    """The source box of "resize the shorter side to `size`, then crop size x size" (the
    tokenizer papers' ImageNet preprocessing).

    offset=None gives the centre crop (eval); otherwise `offset` in [0, long_side_after_resize - size] positions a
    random crop (train). Done as one box so the image is resampled once."""
    side = min(width, height)
    long_side = max(width, height)
    resized_long = max(size, round(long_side * size / side))
    if offset is None:
        start = (long_side - side) / 2.0
    else:
        if not 0 <= offset <= resized_long - size:
            raise ValueError(f"crop offset {offset} outside [0, {resized_long - size}]")
        start = min(offset * side / size, float(long_side - side))  # rounding of resized_long never overshoots
    if width >= height:
        return (start, 0.0, start + side, float(side))
    return (0.0, start, float(side), start + side)


def max_offset(width: int, height: int, size: int) -> int:
    """Largest random-crop offset along the long side after the shorter side is resized to `size`."""
    side = min(width, height)
    return max(size, round(max(width, height) * size / side)) - size
