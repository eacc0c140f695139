"""Triton kernels of the registry's operations, for CUDA (and, for tests, the CPU through TRITON_INTERPRET=1).

Files: search.py (nearest code by squared L2, maximum inner product), ibq.py (the IBQ step: row pass, column pass
for the codebook entropy, backward recomputing the logits tile by tile). Importing this package imports nothing
from triton: the kernel modules import triton themselves, and the registry imports them only when a triton backend
runs, so that vqtok imports without triton. `available()` says whether triton can be imported; `interpreting()`
whether its kernels would run on CPU tensors through the interpreter (TRITON_INTERPRET=1, which triton reads when
a kernel module is imported: set it before that).
"""

from __future__ import annotations

import functools
import importlib.util
import os


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the triton package can be imported (looked up once, without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def interpreting() -> bool:
    """Whether triton kernels run through the interpreter (the environment variable TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
