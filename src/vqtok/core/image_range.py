"""The image-range contract, written once.

Every image that crosses a vqtok interface (datasets, Tokenizer.encode / decode / forward, the discriminator, the
perceptual losses, the metrics) is float RGB in [0, 1]. Networks trained the taming way compute on [-1, 1]: each
such network converts at its own first layer with `to_signed`, and a network that returns images converts back with
`from_signed`, so a caller never converts and an image is never converted twice.
"""

from __future__ import annotations

from torch import Tensor


def to_signed(x: Tensor) -> Tensor:
    """[0, 1] -> [-1, 1]: 2 x - 1."""
    return x * 2.0 - 1.0


def from_signed(y: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1]: (y + 1) / 2 (not clamped: losses see the raw output)."""
    return (y + 1.0) / 2.0
