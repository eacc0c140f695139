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

import torch


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


PROGRAMS_PER_SM = 4  # programs to aim for per SM in the (token block x code split) grids
MIN_SPLIT_CODES = 2048  # on a GPU, the fewest codes a split scans (fewer make the merges dominate)
MIN_SPLIT_CODES_CPU = 64  # under the interpreter (CPU tensors): small test shapes still get several splits


def split_count(n_tokens: int, n_codes: int, device: torch.device, block_n: int = 64) -> int:
    """Code splits of a (token block x code split) grid: about PROGRAMS_PER_SM programs per SM with token blocks of
    block_n (N = 4096 alone gives too few programs), each split scanning at least MIN_SPLIT_CODES codes."""
    if device.type == "cuda":
        target, min_codes = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count, \
            MIN_SPLIT_CODES
    else:
        target, min_codes = PROGRAMS_PER_SM, MIN_SPLIT_CODES_CPU
    token_blocks = -(-max(n_tokens, 1) // block_n)
    return max(1, min(-(-target // token_blocks), -(-n_codes // min_codes)))
