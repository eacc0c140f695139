"""Quantizers: one file per method, one contract (base.py). Importing this package registers all five."""

from .base import QUANTIZERS, QuantizeOutput, Quantizer, build_quantizer, register
from . import vq, fc, ema, lc, ibq  # noqa: F401,E401  (registration side effects)
from .vq import VectorQuantizer
from .fc import FactorizedQuantizer
from .ema import EMAQuantizer
from .lc import LCQuantizer
from .ibq import IBQuantizer

__all__ = [
    "QUANTIZERS", "QuantizeOutput", "Quantizer", "build_quantizer", "register",
    "VectorQuantizer", "FactorizedQuantizer", "EMAQuantizer", "LCQuantizer", "IBQuantizer",
]
