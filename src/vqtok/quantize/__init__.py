"""Quantizers: one file per method, one contract (base.py), and CodeUsage (usage.py). Importing this package
registers all five."""

from .base import QUANTIZERS, QuantizeOutput, Quantizer, build_quantizer, register
from . import vq, fc, ema, lc, ibq  # noqa: F401,E401  (registration side effects)
from .vq import VectorQuantizer
from .fc import FactorizedQuantizer
from .ema import EMAQuantizer
from .lc import LCQuantizer
from .ibq import IBQuantizer
from .usage import CodeUsage

__all__ = [
    "CodeUsage", "QUANTIZERS", "QuantizeOutput", "Quantizer", "build_quantizer", "register",
    "VectorQuantizer", "FactorizedQuantizer", "EMAQuantizer", "LCQuantizer", "IBQuantizer",
]
