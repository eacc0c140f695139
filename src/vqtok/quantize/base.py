"""The one contract every quantizer follows, and the registry that builds them by name.

A quantizer maps an encoder output z (B, D, H, W) of any float dtype to a `QuantizeOutput`. Subclasses implement
`quantize` on flat fp32 tokens (N, D) and `codebook_vectors` (the codebook in z's space); this base class does the
reshaping, the dtype round trip and `embed`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class QuantizeOutput:
    """What every quantizer returns. `loss` is already weighted; `terms` holds each unweighted term for logging."""

    z_q: Tensor  # (B, D, H, W), z's dtype, carries the method's gradient
    indices: Tensor  # (B, H, W) int64
    loss: Tensor  # scalar, fp32
    terms: dict[str, Tensor] = field(default_factory=dict)


QUANTIZERS: dict[str, type["Quantizer"]] = {}


def register(name: str) -> Callable[[type["Quantizer"]], type["Quantizer"]]:
    """Class decorator: make a quantizer buildable as `build_quantizer(name, ...)`."""

    def wrap(cls: type[Quantizer]) -> type[Quantizer]:
        if name in QUANTIZERS:
            raise ValueError(f"quantizer {name!r} is registered twice ({QUANTIZERS[name].__name__}, {cls.__name__})")
        cls.name = name
        QUANTIZERS[name] = cls
        return cls

    return wrap


def build_quantizer(name: str, codebook_size: int, dim: int, **options: Any) -> "Quantizer":
    """Build a registered quantizer: `build_quantizer("lc", codebook_size=100_000, dim=8, codebook="cb.safetensors")`."""
    if name not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r}; choose one of {sorted(QUANTIZERS)}")
    if int(codebook_size) < 1 or int(dim) < 1:
        raise ValueError(f"codebook_size and dim must be positive, got codebook_size={codebook_size}, dim={dim}")
    return QUANTIZERS[name](codebook_size=int(codebook_size), dim=int(dim), **options)


class Quantizer(nn.Module):
    """Base class. Subclasses set up their codebook and implement `quantize` and `codebook_vectors`."""

    name: ClassVar[str] = ""

    def __init__(self, codebook_size: int, dim: int) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.dim = dim

    # -- what a method implements -------------------------------------------------------------------------------
    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """z: (N, D) fp32 -> (z_q (N, D) fp32 with the method's gradient, indices (N,) int64, loss, terms)."""
        raise NotImplementedError

    def codebook_vectors(self) -> Tensor:
        """The (K, D) fp32 codebook in z's space, as used by the lookup and by `embed`."""
        raise NotImplementedError

    def extra_config(self) -> dict[str, Any]:
        """Constructor options beyond codebook_size and dim, JSON-serialisable, to rebuild this quantizer."""
        return {}

    # -- shared machinery ---------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"name": self.name, "codebook_size": self.codebook_size, "dim": self.dim, **self.extra_config()}

    def forward(self, z: Tensor) -> QuantizeOutput:
        if z.dim() != 4 or z.shape[1] != self.dim:
            raise ValueError(
                f"{type(self).__name__} expects z of shape (B, {self.dim}, H, W), got {tuple(z.shape)}; "
                "check the channels of the layer before the quantizer (quant_conv)"
            )
        if not z.is_floating_point():
            raise TypeError(f"z must be a float tensor, got {z.dtype}")
        B, D, H, W = z.shape
        # The quantizer computes in fp32 whatever the caller's dtype or autocast region.
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.float().permute(0, 2, 3, 1).reshape(-1, D)  # (N, D)
            z_q, indices, loss, terms = self.quantize(flat)
        z_q = z_q.view(B, H, W, D).permute(0, 3, 1, 2).to(z.dtype)  # (B, D, H, W)
        return QuantizeOutput(z_q=z_q, indices=indices.view(B, H, W), loss=loss, terms=terms)

    def embed(self, indices: Tensor) -> Tensor:
        """(B, H, W) int64 -> (B, D, H, W) fp32: the codes that decode uses."""
        if indices.dtype not in (torch.int64, torch.int32, torch.int16):
            raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(
                f"indices must lie in [0, {self.codebook_size}), got [{int(indices.min())}, {int(indices.max())}]"
            )
        codes = F.embedding(indices.long(), self.codebook_vectors())  # (B, H, W, D)
        return codes.permute(0, 3, 1, 2).contiguous()

    def extra_repr(self) -> str:
        return f"codebook_size={self.codebook_size}, dim={self.dim}"


def straight_through(z: Tensor, codes: Tensor) -> Tensor:
    """z + sg(codes - z): the value of codes, the gradient of the identity (VQ-VAE)."""
    return z + (codes - z).detach()


def two_sided_loss(
    z: Tensor, codes: Tensor, commitment_weight: float, codebook_weight: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """taming's VQ loss: commitment_weight * ||sg(e) - z||^2 + codebook_weight * ||e - sg(z)||^2 (means)."""
    commitment = F.mse_loss(codes.detach(), z)
    codebook = F.mse_loss(codes, z.detach())
    loss = commitment_weight * commitment + codebook_weight * codebook
    return loss, {"commitment": commitment.detach(), "codebook": codebook.detach()}
