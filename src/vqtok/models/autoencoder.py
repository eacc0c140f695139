"""taming's convolutional VQGAN encoder and decoder (Esser et al. 2021), as VQGAN-LC and IBQ use them unchanged.

Encoder: conv_in -> per level [ResnetBlock x num_res_blocks (+ AttnBlock at the lowest level), Downsample] ->
middle [ResnetBlock, AttnBlock, ResnetBlock] -> GroupNorm, swish, conv_out (z_channels). The decoder mirrors it
with num_res_blocks + 1 blocks per level ("decoder 3" in VQGAN-LC's f16) and nearest Upsample + conv.

Attention sits at the LOWEST resolution (taming's `attn_resolutions=[16]` at 256 px for f16, [32] for f8) and in the
middle block, so its resolution follows from the image size: image_size / 2**(len(ch_mult) - 1). Presets are
named as in DiT: `PRESETS["f16"]` (ch 128, ch_mult (1, 1, 2, 2, 4): 16x16 tokens at 256 px), `PRESETS["f8"]`
(ch_mult (1, 2, 2, 4): 32x32 tokens), and small CPU presets for 32-64 px images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class AutoencoderConfig:
    """The architecture of the encoder/decoder pair (the quantizer is configured by the Tokenizer)."""

    ch: int = 128  # channels of the first level
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # channel multiplier per level; len - 1 = number of downsamplings
    num_res_blocks: int = 2  # per encoder level; the decoder uses num_res_blocks + 1
    z_channels: int = 256  # encoder output / decoder input channels (before quant_conv / after post_quant_conv)
    attn_lowest: bool = True  # self-attention at the lowest resolution (the middle block always has one)
    dropout: float = 0.0
    in_channels: int = 3
    out_channels: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        if self.ch < 1 or not self.ch_mult or min(self.ch_mult) < 1 or self.num_res_blocks < 1 or self.z_channels < 1:
            raise ValueError(f"invalid autoencoder config {self}: ch, ch_mult, num_res_blocks, z_channels must be positive")

    @property
    def downsample_factor(self) -> int:
        """Image pixels per token side: 2 ** (levels - 1) (16 for f16, 8 for f8)."""
        return 2 ** (len(self.ch_mult) - 1)

    def attn_resolutions(self, image_size: int) -> tuple[int, ...]:
        """taming's `attn_resolutions` for this image size: the lowest resolution, or none."""
        return (self.latent_size(image_size),) if self.attn_lowest else ()

    def latent_size(self, image_size: int) -> int:
        """Token grid side for a square image; raises when the image does not divide evenly."""
        if image_size < 1 or image_size % self.downsample_factor:
            raise ValueError(
                f"image size {image_size} is not a multiple of the downsample factor {self.downsample_factor} "
                f"(ch_mult {self.ch_mult}); crop or resize images to a multiple of {self.downsample_factor}"
            )
        return image_size // self.downsample_factor

    def updated(self, **overrides: Any) -> "AutoencoderConfig":
        """A copy with some fields replaced; unknown names are an error that lists the valid ones."""
        valid = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ValueError(f"unknown autoencoder option(s) {unknown}; valid options are {sorted(valid)}")
        return replace(self, **overrides)


PRESETS: dict[str, AutoencoderConfig] = {
    # VQGAN-LC's f16 (taming's ImageNet f16): 16x16 tokens at 256 px, attention at 16x16.
    "f16": AutoencoderConfig(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256),
    # IBQ's f16: the same network with 4 residual blocks per level (decoder 5).
    "f16-ibq": AutoencoderConfig(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=4, z_channels=256),
    # f8: 32x32 tokens at 256 px.
    "f8": AutoencoderConfig(ch=128, ch_mult=(1, 2, 2, 4), num_res_blocks=2, z_channels=256),
    # CPU presets for 32-64 px crops (16x16 / 8x8 tokens at 64 px).
    "tiny": AutoencoderConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=64, attn_lowest=False),
    "small": AutoencoderConfig(ch=64, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=128, attn_lowest=False),
}


def get_preset(name: str, **overrides: Any) -> AutoencoderConfig:
    """The named preset with optional field overrides: `get_preset("tiny", ch=48)`."""
    if name not in PRESETS:
        raise ValueError(f"unknown autoencoder preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].updated(**overrides)


# ---------------------------------------------------------------------------------------------------------------
# Building blocks (taming/modules/diffusionmodules/model.py, without the timestep embedding).


def normalize(channels: int) -> nn.GroupNorm:
    """taming's GroupNorm(32, eps 1e-6); gcd(32, channels) groups so the narrow CPU presets stay valid."""
    return nn.GroupNorm(num_groups=math.gcd(32, channels), num_channels=channels, eps=1e-6, affine=True)



class ResnetBlock(nn.Module):
    """x + conv(swish(norm(conv(swish(norm(x)))))), with a 1x1 shortcut when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with a residual (taming's AttnBlock)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).reshape(B, 1, C, H * W).transpose(2, 3) for conv in (self.q, self.k, self.v))  # (B,1,HW,C)
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, (B, 1, HW, C)
        h = h.transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with taming's asymmetric (0, 1, 0, 1) padding: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: residual blocks, each followed by attention when the level has it, then a resampler."""

    def __init__(self, channels: list[int], attention: bool, resample: nn.Module | None, dropout: float) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(a, b, dropout) for a, b in zip(channels[:-1], channels[1:]))
        self.attn = nn.ModuleList(AttnBlock(c) for c in channels[1:]) if attention else nn.ModuleList()
        self.resample = resample if resample is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return self.resample(x)


class MiddleBlock(nn.Sequential):
    """ResnetBlock -> AttnBlock -> ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__(ResnetBlock(channels, channels, dropout), AttnBlock(channels), ResnetBlock(channels, channels, dropout))


# ---------------------------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> (B, z_channels, H/f, W/f), f = config.downsample_factor."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        c = config
        widths = [c.ch * m for m in (1, *c.ch_mult)]  # input width of each level, then its output width
        last = len(c.ch_mult) - 1
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down = nn.ModuleList()
        for level in range(len(c.ch_mult)):
            channels = [widths[level]] + [widths[level + 1]] * c.num_res_blocks
            resample = Downsample(widths[level + 1]) if level != last else None
            self.down.append(Level(channels, c.attn_lowest and level == last, resample, c.dropout))
        self.mid = MiddleBlock(widths[-1], c.dropout)
        self.norm_out = normalize(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], c.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)  # halves H, W except at the last level
        h = self.mid(h)  # (B, ch * ch_mult[-1], H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, z_channels, H/f, W/f)


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, 3, h*f, w*f) in about [-1, 1] (not clamped)."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        c = config
        widths = [c.ch * m for m in c.ch_mult]
        self.conv_in = nn.Conv2d(c.z_channels, widths[-1], 3, padding=1)
        self.mid = MiddleBlock(widths[-1], c.dropout)
        self.up = nn.ModuleList()  # run from the lowest resolution (last level) up to the first
        width = widths[-1]
        for level in reversed(range(len(c.ch_mult))):
            channels = [width] + [widths[level]] * (c.num_res_blocks + 1)
            resample = Upsample(widths[level]) if level != 0 else None
            self.up.append(Level(channels, c.attn_lowest and level == len(c.ch_mult) - 1, resample, c.dropout))
            width = widths[level]
        self.norm_out = normalize(width)
        self.conv_out = nn.Conv2d(width, c.out_channels, 3, padding=1)

    @property
    def last_layer(self) -> nn.Parameter:
        """The final conv's weight: where VQGAN's adaptive GAN weight compares gradient norms."""
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch * ch_mult[-1], h, w)
        for level in self.up:
            h = level(h)  # doubles H, W except at the first level
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, H, W)
