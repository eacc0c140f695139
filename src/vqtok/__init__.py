"""vqtok: image tokenizers with huge, fully used codebooks (VQGAN-LC, IBQ and the baselines they beat)."""

from __future__ import annotations

from typing import Any

from .core.packages import vqtok_version
from .quantize import QUANTIZERS, CodeUsage, QuantizeOutput, Quantizer, build_quantizer

__version__ = vqtok_version()

__all__ = ["QUANTIZERS", "QuantizeOutput", "Quantizer", "build_quantizer", "CodeUsage", "Tokenizer", "__version__"]


def __getattr__(name: str) -> Any:
    # The models pull in more code than a quantizer user needs: import them on first use.
    if name == "Tokenizer":
        from .models import Tokenizer

        return Tokenizer
    raise AttributeError(f"module 'vqtok' has no attribute {name!r}")
