"""Pre-trained vision encoders behind one interface: images in [0, 1] -> a spatial feature map.

Each `FeatureEncoder` does its own preprocessing (resize, normalisation), so callers hand it plain RGB crops. Names
in `ENCODERS`: "efficientnet-lite0" and "mobilenetv2" (ImageNet CNNs whose weights ship inside pip packages) and
"clip-vit-b-16", "clip-vit-l-14" (transformers' CLIP vision tower, the paper's choice, from local files only).

Default layers: the CNNs' last inverted-residual block (320 channels, stride 32), which is linear (no ReLU6) and a
quarter the width of the 1280-channel head: a 100,000-code codebook is 128 MB instead of 512 MB and k-means is 4x
cheaper. CLIP: every patch token (CLS dropped) after post_layernorm and the visual projection, the features VQGAN-LC
clusters into its codebook (OpenAI CLIP's ln_post and proj applied per token).

`forward` is plain autograd code (the weights are frozen), so the same encoder serves a loss that backpropagates to
its input (the perceptual fallback). Feature extraction runs it under `torch.inference_mode()`: no graph is recorded
even when the input requires grad, and the outputs skip autograd's bookkeeping.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .efficientnet_lite import INPUT_MEAN, INPUT_STD, load_efficientnet_lite0
from .mobilenetv2 import IMAGENET_MEAN, IMAGENET_STD, load_mobilenetv2

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_REPOS = {"clip-vit-b-16": "openai/clip-vit-base-patch16", "clip-vit-l-14": "openai/clip-vit-large-patch14"}


class FeatureEncoder(nn.Module):
    """images (B, 3, H, W) float in [0, 1] -> feature map (B, feature_dim, h, w). Frozen, eval mode.

    Subclasses implement `encode` on normalised images ((images - mean) / std per channel). `image_size`: the side
    images are resized to first (None: keep the input size, which CNNs accept; ViTs need their own).
    `default_crop_size`: the crop side a codebook builder asks its data source for when the caller does not say.
    `forward` keeps autograd: wrap it in `torch.inference_mode()` to extract features (see the module docstring).
    """

    def __init__(self, name: str, layer: str, feature_dim: int, mean: tuple[float, ...], std: tuple[float, ...],
                 image_size: int | None, default_crop_size: int) -> None:
        super().__init__()
        self.name, self.layer, self.feature_dim = name, layer, feature_dim
        self.image_size, self.default_crop_size = image_size, default_crop_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name} expects RGB images (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        x = images.to(self.mean.device, torch.float32)
        if self.image_size is not None and x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return self.encode((x - self.mean) / self.std)  # (B, F, h, w)


class CNNEncoder(FeatureEncoder):
    """An ImageNet CNN exposing `forward_to(x, layer)` and `layer_channels`."""

    def __init__(self, name: str, net: nn.Module, layer: str, mean: tuple[float, ...], std: tuple[float, ...],
                 image_size: int | None = None, default_crop_size: int = 128) -> None:
        if layer not in net.layer_channels:
            raise ValueError(f"unknown layer {layer!r} for {name}; choose one of {list(net.layer_channels)}")
        super().__init__(name, layer, net.layer_channels[layer], mean, std, image_size, default_crop_size)
        self.net = net.eval().requires_grad_(False).to(memory_format=torch.channels_last)

    def encode(self, x: Tensor) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)  # depthwise convs run 1.2-2.5x faster on CPU
        return self.net.forward_to(x, self.layer).contiguous()  # (B, F, H/stride, W/stride)


class CLIPEncoder(FeatureEncoder):
    """transformers' CLIPVisionModelWithProjection. Layers: "projection" (patch tokens -> post_layernorm ->
    visual_projection, as VQGAN-LC) or "hiddenN" (raw patch tokens after N transformer layers, N = 0..depth)."""

    def __init__(self, name: str, model: nn.Module, layer: str) -> None:
        config = model.config
        depth = config.num_hidden_layers
        valid = ["projection"] + [f"hidden{i}" for i in range(depth + 1)]
        if layer not in valid:
            raise ValueError(f"unknown layer {layer!r} for {name}; choose 'projection' or hidden0..hidden{depth}")
        dim = config.projection_dim if layer == "projection" else config.hidden_size
        super().__init__(name, layer, dim, CLIP_MEAN, CLIP_STD, config.image_size, config.image_size)
        self.model = model.eval().requires_grad_(False)
        self.grid_side = config.image_size // config.patch_size

    def encode(self, x: Tensor) -> Tensor:
        vision = self.model.vision_model
        if self.layer == "projection":
            tokens = vision(pixel_values=x).last_hidden_state[:, 1:]  # (B, P, hidden), CLS dropped
            tokens = self.model.visual_projection(vision.post_layernorm(tokens))  # (B, P, projection_dim)
        else:
            hidden = vision(pixel_values=x, output_hidden_states=True).hidden_states
            tokens = hidden[int(self.layer[len("hidden"):])][:, 1:]  # (B, P, hidden)
        b, p, f = tokens.shape
        return tokens.transpose(1, 2).reshape(b, f, self.grid_side, self.grid_side)  # (B, F, h, w)


def _efficientnet_lite0(layer: str | None, weights: str | None, image_size: int | None) -> FeatureEncoder:
    net = load_efficientnet_lite0(weights)
    return CNNEncoder("efficientnet-lite0", net, layer or "block15", (INPUT_MEAN,) * 3, (INPUT_STD,) * 3, image_size)


def _mobilenetv2(layer: str | None, weights: str | None, image_size: int | None) -> FeatureEncoder:
    net = load_mobilenetv2(weights)
    return CNNEncoder("mobilenetv2", net, layer or "block17", IMAGENET_MEAN, IMAGENET_STD, image_size)


def load_clip_vision(name: str, weights: str | Path | None) -> nn.Module:
    """CLIPVisionModelWithProjection from a local directory (`weights`) or the local Hugging Face cache; never the
    network. A full CLIPModel checkpoint works too (its vision half is read)."""
    try:
        from transformers import CLIPVisionModelWithProjection
    except ImportError as err:
        raise ImportError(f"{name} needs transformers: `pip install 'vqtok[clip]'`") from err
    source = str(weights) if weights is not None else CLIP_REPOS[name]
    try:
        return CLIPVisionModelWithProjection.from_pretrained(source, local_files_only=True)
    except OSError as err:
        raise FileNotFoundError(
            f"no local CLIP weights for {name} at {source!r} (vqtok never downloads at run time): fetch them once "
            f"with `huggingface-cli download {CLIP_REPOS[name]}` and pass that directory as weights=/--weights"
        ) from err


def _clip(name: str) -> Callable[[str | None, str | None, int | None], FeatureEncoder]:
    def build(layer: str | None, weights: str | None, image_size: int | None) -> FeatureEncoder:
        if image_size is not None:
            raise ValueError(f"{name} works at its own resolution; leave image_size unset")
        return CLIPEncoder(name, load_clip_vision(name, weights), layer or "projection")

    return build


ENCODERS: dict[str, Callable[[str | None, str | None, int | None], FeatureEncoder]] = {
    "efficientnet-lite0": _efficientnet_lite0,
    "mobilenetv2": _mobilenetv2,
    "clip-vit-b-16": _clip("clip-vit-b-16"),
    "clip-vit-l-14": _clip("clip-vit-l-14"),
}


def build_encoder(name: str, *, layer: str | None = None, weights: str | Path | None = None,
                  image_size: int | None = None) -> FeatureEncoder:
    """A frozen encoder by name. layer: None for the encoder's default; weights: a local file (CNNs) or directory
    (CLIP) replacing the packaged weights; image_size: resize inputs to this side first (CNNs only)."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {sorted(ENCODERS)}")
    return ENCODERS[name](layer, None if weights is None else str(weights), image_size)
