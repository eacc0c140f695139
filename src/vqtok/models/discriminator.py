"""PatchGAN discriminator (pix2pix, Isola et al. 2017) as taming's NLayerDiscriminator.

Conv(4, stride 2) + LeakyReLU(0.2), then (n_layers - 1) x [Conv(4, stride 2), BatchNorm, LeakyReLU], one
[Conv(4, stride 1), BatchNorm, LeakyReLU] and a Conv(4, stride 1) to one logit per patch. Channels ndf * min(2^n, 8).
VQGAN-LC uses n_layers 2, IBQ n_layers 3, both ndf 64. Like the tokenizer, it takes images in [0, 1] and its first
layer sees them in [-1, 1], as taming's discriminator did (`vqtok.core.to_signed`; callers never convert).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..core import to_signed


def weights_init(module: nn.Module) -> None:
    """taming's init: conv weights ~ N(0, 0.02); BatchNorm weight ~ N(1, 0.02), bias 0. Use with `net.apply`."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator(nn.Module):
    """(B, 3, H, W) in [0, 1] -> patch logits (B, 1, H', W'); 256 px gives 30x30 (n_layers 3) or 62x62 (n_layers 2)."""

    def __init__(self, n_layers: int = 3, ndf: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {n_layers}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden conv keeps the resolution
            layers += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(to_signed(x))
