"""VGG16's convolutional stack (Simonyan & Zisserman 2015) as torchvision builds it, the network LPIPS-VGG taps.

`vgg16_features()` has torchvision's `vgg16().features` layout and indices (13 3x3 convs with ReLU, max-pooling after
each of the five stages), so the "features.*" entries of torchvision's ImageNet state dict (`vgg16-397923af.pth`)
load unchanged (`vgg16_feature_state`). `vgg16_taps` returns the five stage outputs relu1_2, relu2_2, relu3_3,
relu4_3 and relu5_3 (the last ReLU before each pooling). The stack takes inputs already normalised by its caller.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from .weights import read_state_dict

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VGG16_TAPS = (3, 8, 15, 22, 29)  # indices in vgg16.features of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
VGG16_CHANNELS = (64, 128, 256, 512, 512)  # channels of those five outputs


def vgg16_features() -> nn.Sequential:
    """torchvision's `vgg16().features` (random weights), with the same indices, so its state dict keys load
    unchanged."""
    layers: list[nn.Module] = []
    width = 3
    for item in VGG16_CFG:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(width, int(item), 3, padding=1), nn.ReLU()]
            width = int(item)
    return nn.Sequential(*layers)


def vgg16_feature_state(path: str | Path) -> dict[str, Tensor]:
    """The state dict of `vgg16_features()` from a torchvision VGG16 file (.pth or .safetensors): its "features.*"
    entries with the prefix removed; a file holding no such key is taken as the feature stack's own state dict."""
    state = read_state_dict(path)
    return {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")} or state


def vgg16_taps(features: nn.Sequential, x: Tensor) -> list[Tensor]:
    """x (B, 3, H, W), normalised for VGG -> the five outputs at VGG16_TAPS (relu1_2 .. relu5_3), highest
    resolution first; the layers after relu5_3 are not run."""
    outputs = []
    for i, layer in enumerate(features[: VGG16_TAPS[-1] + 1]):
        x = layer(x)
        if i in VGG16_TAPS:
            outputs.append(x)
    return outputs
