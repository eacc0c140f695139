"""vqtok: image tokenizers with huge, fully used codebooks (VQGAN-LC, IBQ and the baselines they beat)."""

from __future__ import annotations

from typing import Any

from .quantize import QUANTIZERS, QuantizeOutput, Quantizer, build_quantizer
from .quantize import CodeUsage

__version__ = "0.1.0"

__all__ = ["QUANTIZERS", "QuantizeOutput", "Quantizer", "build_quantizer", "CodeUsage", "Tokenizer", "__version__"]


def __getattr__(name: str) -> Any:
    # The models pull in more code than a quantizer user needs: import them on first use.
    if name == "Tokenizer":
        from .models import Tokenizer

        return Tokenizer
    raise AttributeError(f"module 'vqtok' has no attribute {name!r}")
