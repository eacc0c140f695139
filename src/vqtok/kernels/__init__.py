"""Kernels: every implementation of the operations the quantizers compute, behind one registry.

    from vqtok import kernels
    indices, distances = kernels.nearest_code(z, codebook)          # argmin_k ||z_n - e_k||^2
    indices, values = kernels.max_inner_product(z, codebook)        # argmax_k z_n . e_k
    result = kernels.ibq_step(z, codebook, temperature=0.01)        # IBQ's differentiable step (an IBQResult)
    loss = kernels.cross_entropy(hidden, weight, bias, targets)     # a GPT head's loss over K codes, no (N, K) logits
    with kernels.use("nearest_code", "dense"):                      # force a backend (tests, benchmarks)
        ...
    kernels.choose("ibq_step", z, codebook)                         # which backend a call would use

Each operation has an ordered list of backends (registry.py): the automatic choice takes the first that applies to
the inputs (device, dtype, shapes, context such as a frozen codebook's key) and pays at their size; the dense torch
reference is last and always applies. Files: registry.py (the registry, forcing, dispatch), search.py (dense and
chunked torch search), numba_search.py (fused CPU search loop), kdtree.py (exact k-d tree for a frozen codebook),
ibq.py (the IBQ step's result type and dense reference), chunked_ibq.py (the IBQ step over code chunks),
cross_entropy.py (a GPT output head's cross-entropy over K codes: dense reference and code chunks), chunking.py
(chunk sizes and worker threads), triton/ (Triton kernels for CUDA, imported only when a triton backend runs:
triton/search.py the nearest code and maximum inner product, triton/ibq.py the IBQ step, triton/cross_entropy.py
the head's cross-entropy). Layering: this package may import vqtok.core only (today it imports nothing from vqtok);
the quantizers, benchmarks and everything above import it.
"""

from .chunked_ibq import ibq_chunked
from .chunking import run_workers, worker_count
from .cross_entropy import cross_entropy_chunked, cross_entropy_dense
from .ibq import CODEBOOK_ENTROPY_EPS, IBQResult, ibq_dense
from .registry import (
    AUTO, BACKENDS, OPS, Backend, backends, check_backend, choose, cross_entropy, dispatch, ibq_step, max_inner_product,
    nearest_code, use,
)
from .search import max_inner_product_dense, nearest_code_dense

__all__ = [
    "AUTO", "BACKENDS", "Backend", "CODEBOOK_ENTROPY_EPS", "IBQResult", "OPS", "backends", "check_backend", "choose",
    "cross_entropy", "cross_entropy_chunked", "cross_entropy_dense", "dispatch", "ibq_chunked", "ibq_dense",
    "ibq_step", "max_inner_product", "max_inner_product_dense", "nearest_code", "nearest_code_dense", "run_workers",
    "use", "worker_count",
]
