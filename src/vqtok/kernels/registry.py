"""The one registry of kernel backends: which implementation computes each operation, and how to force one.

Operations, each on tokens z (N, D) and a codebook (K, D):
- "nearest_code":      argmin_k ||z_n - e_k||^2 -> (indices (N,) int64, squared distances (N,)), no gradient.
                       Options: frozen_key (see kernels/kdtree.py), token_chunk, code_chunk.
- "max_inner_product": argmax_k z_n . e_k -> (indices (N,) int64, values (N,)), no gradient.
                       Options: token_chunk, code_chunk.
- "ibq_step":          the differentiable IBQ step (kernels/ibq.py) -> IBQResult.
                       Options: temperature, entropy (False: the entropies may come back NaN), code_chunk.
- "cross_entropy":     a GPT output head's loss over K codes (kernels/cross_entropy.py), z the hidden states (N, d)
                       and codebook the head weight (K, d) -> per-token loss (N,), differentiable.
                       Options: bias (K,) or None, targets (N,) (required), ignore_index, code_chunk.
Every backend of an operation returns the same indices as its dense reference (ties go to the first index; on
near-ties fp32 rounding may pick another code, equally close to rounding) and the same values and gradients to
rounding.

BACKENDS lists, per operation, its backends in the order the automatic choice tries them. A `Backend` holds
- fn(z, codebook, **options): the implementation;
- applies(z, codebook, **options) -> bool: it can compute these inputs (device, dtype, the context it needs);
- worthwhile(z, codebook, **options) -> bool: where it applies, whether the automatic choice takes it (the size
  thresholds below which the next backend is faster);
- requires: what `applies` checks, in words, for error messages.
The automatic choice is the first backend that applies and is worthwhile. The last one is always "dense", the torch
reference with (N, K) tensors: it always applies. Adding a backend is one `Backend(...)` entry, placed where the
automatic choice should try it. Every operation lists "triton" first (kernels/triton/): it applies to float tensors
on CUDA (without float64) where triton is installed, and on CPU tensors under TRITON_INTERPRET=1 (its tests), but
the automatic choice takes it on CUDA only, so the CPU choice never depends on that variable.

Forcing a backend, for tests and benchmarks: `with use("nearest_code", "chunked"): ...` (a context variable: it
holds in this thread / asyncio task until the block exits, nested blocks restore the outer choice). A call's
`backend=` argument forces one for that call the same way (IBQuantizer passes its `kernel=` option there); a `use`
block overrides it, so a benchmark can pin a quantizer built with kernel="chunked" to the dense reference.
"auto" means the automatic choice (in `use`, it lifts an outer block's forcing). Forcing skips `worthwhile` only:
a forced backend that does not apply raises ValueError naming the operation, the backend, the inputs and what it
requires; an unknown name raises ValueError listing the registered ones.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor

from . import numba_search
from . import triton as triton_kernels
from .chunked_ibq import ibq_chunked
from .chunking import cross_entropy_code_chunk, search_chunks
from .cross_entropy import (
    REDUCTIONS, check_cross_entropy_inputs, cross_entropy_chunked, cross_entropy_dense, reduce_loss,
)
from .ibq import IBQResult, ibq_dense
from .kdtree import nearest_code_kdtree
from .search import (
    check_search_inputs, max_inner_product_chunked, max_inner_product_dense, nearest_code_chunked, nearest_code_dense,
    search_dtype,
)

AUTO = "auto"
# Where each backend pays (the `worthwhile` predicates below).
KDTREE_MAX_DIM = 16  # above this a k-d tree visits most leaves and the brute-force loops win
KDTREE_MIN_CODES = 4096  # below this building a tree costs more than scanning the codes
FUSED_MAX_DIM = 32  # above this the fused loop loses to a blocked matmul
IBQ_DENSE_MAX_ELEMENTS = 64 * 1024  # ibq_step stays dense while N x K is at most this: fewer passes win there
CE_DENSE_MAX_ELEMENTS = 1024 * 1024  # cross_entropy stays dense while its (N, K) logits are at most this (4 MiB fp32)


def always(z: Tensor, codebook: Tensor, **options: Any) -> bool:
    return True


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable[..., Any]
    applies: Callable[..., bool] = always
    worthwhile: Callable[..., bool] = always
    requires: str = "nothing: it always applies"


# -- predicates -------------------------------------------------------------------------------------------------------
def _on_cpu(z: Tensor, codebook: Tensor) -> bool:
    return z.device.type == "cpu" and codebook.device.type == "cpu"


def _kdtree_applies(z: Tensor, codebook: Tensor, frozen_key: Any = None, **_: Any) -> bool:
    return (frozen_key is not None and _on_cpu(z, codebook)
            and z.dtype.is_floating_point and codebook.dtype.is_floating_point)


def _kdtree_worthwhile(z: Tensor, codebook: Tensor, **_: Any) -> bool:
    return codebook.shape[1] <= KDTREE_MAX_DIM and codebook.shape[0] >= KDTREE_MIN_CODES


def _fused_applies(z: Tensor, codebook: Tensor, **_: Any) -> bool:
    # Read at call time, so that an install without numba (or a test that hides it) falls through to "chunked".
    return numba_search.numba is not None and _on_cpu(z, codebook) and search_dtype(z, codebook) == torch.float32


def _fused_worthwhile(z: Tensor, codebook: Tensor, **_: Any) -> bool:
    return codebook.shape[1] <= FUSED_MAX_DIM


def _triton_applies(z: Tensor, codebook: Tensor, **_: Any) -> bool:
    # CUDA tensors, or CPU tensors under the interpreter (tests); fp32 search (bf16/fp16 are upcast, fp64 is not
    # searched in Triton). triton is looked up without importing it: vqtok imports without triton.
    if not triton_kernels.available() or search_dtype(z, codebook) != torch.float32:
        return False
    if not (z.dtype.is_floating_point and codebook.dtype.is_floating_point):
        return False
    on_cuda = z.device.type == "cuda" and codebook.device.type == "cuda"
    return on_cuda or (_on_cpu(z, codebook) and triton_kernels.interpreting() and _kernels_interpreted())


def _kernels_interpreted() -> bool:
    # triton decides between compiler and interpreter when the kernel module is imported: if that happened without
    # TRITON_INTERPRET=1, its kernels cannot run on CPU tensors however the variable is set now.
    modules = [sys.modules.get(f"vqtok.kernels.triton.{name}") for name in ("search", "ibq", "cross_entropy")]
    return all(module is None or bool(module.INTERPRET) for module in modules)


def _triton_worthwhile(z: Tensor, codebook: Tensor, **_: Any) -> bool:
    return z.device.type == "cuda"  # the interpreter is for tests: the automatic choice on the CPU never takes it


def _nearest_code_triton(z: Tensor, codebook: Tensor, **_: Any) -> tuple[Tensor, Tensor]:
    from .triton.search import nearest_code_triton  # imports triton: only when this backend runs
    return nearest_code_triton(z, codebook)


def _max_inner_product_triton(z: Tensor, codebook: Tensor, **_: Any) -> tuple[Tensor, Tensor]:
    from .triton.search import max_inner_product_triton
    return max_inner_product_triton(z, codebook)


def _ibq_step_triton(z: Tensor, codebook: Tensor, temperature: float = 0.01, entropy: bool = True,
                     **_: Any) -> IBQResult:
    from .triton.ibq import ibq_triton  # imports triton: only when this backend runs

    # code_chunk is not passed: in the Triton kernel a split holds (N, D) partial sums, so small splits cost memory
    return ibq_triton(z, codebook, temperature, entropy=entropy)


TRITON_REQUIRES = ("triton, float tensors on CUDA (or on the CPU with TRITON_INTERPRET=1, for tests) and no float64 "
                   "input")


def _ibq_chunked_worthwhile(z: Tensor, codebook: Tensor, **_: Any) -> bool:
    return z.shape[0] * codebook.shape[0] > IBQ_DENSE_MAX_ELEMENTS


def _ce_chunked_worthwhile(hidden: Tensor, weight: Tensor, **_: Any) -> bool:
    return hidden.shape[0] * weight.shape[0] > CE_DENSE_MAX_ELEMENTS


def _ce_triton_applies(hidden: Tensor, weight: Tensor, bias: Tensor | None = None, **options: Any) -> bool:
    return _triton_applies(hidden, weight) and (bias is None or (bias.dtype.is_floating_point
                                                                 and bias.dtype != torch.float64))


def _ce_triton(hidden: Tensor, weight: Tensor, bias: Tensor | None = None, targets: Tensor | None = None,
               ignore_index: int = -100, code_chunk: int | None = None, **_: Any) -> Tensor:
    from .triton.cross_entropy import cross_entropy_triton  # imports triton: only when this backend runs
    return cross_entropy_triton(hidden, weight, bias, targets, ignore_index, code_chunk=code_chunk)


def _ce_chunked(hidden: Tensor, weight: Tensor, bias: Tensor | None = None, targets: Tensor | None = None,
                ignore_index: int = -100, code_chunk: int | None = None, **_: Any) -> Tensor:
    return cross_entropy_chunked(hidden, weight, bias, targets, ignore_index, code_chunk=code_chunk)


def _ce_dense(hidden: Tensor, weight: Tensor, bias: Tensor | None = None, targets: Tensor | None = None,
              ignore_index: int = -100, **_: Any) -> Tensor:
    return cross_entropy_dense(hidden, weight, bias, targets, ignore_index)


# -- the registry -----------------------------------------------------------------------------------------------------
BACKENDS: dict[str, tuple[Backend, ...]] = {
    "nearest_code": (
        Backend("triton", _nearest_code_triton, _triton_applies, _triton_worthwhile, TRITON_REQUIRES),
        Backend("kdtree", lambda z, codebook, frozen_key=None, **_: nearest_code_kdtree(z, codebook, frozen_key),
                _kdtree_applies, _kdtree_worthwhile,
                "a frozen_key (a codebook that stays fixed between calls) and float tensors on the CPU"),
        Backend("fused", lambda z, codebook, **_: numba_search.nearest_code_fused(z, codebook),
                _fused_applies, _fused_worthwhile, "numba, tensors on the CPU and no float64 input"),
        Backend("chunked", lambda z, codebook, token_chunk=None, code_chunk=None, **_: nearest_code_chunked(
            z, codebook, token_chunk, code_chunk)),
        Backend("dense", lambda z, codebook, **_: nearest_code_dense(z, codebook)),
    ),
    "max_inner_product": (
        Backend("triton", _max_inner_product_triton, _triton_applies, _triton_worthwhile, TRITON_REQUIRES),
        Backend("fused", lambda z, codebook, **_: numba_search.max_inner_product_fused(z, codebook),
                _fused_applies, _fused_worthwhile, "numba, tensors on the CPU and no float64 input"),
        Backend("chunked", lambda z, codebook, token_chunk=None, code_chunk=None, **_: max_inner_product_chunked(
            z, codebook, token_chunk, code_chunk)),
        Backend("dense", lambda z, codebook, **_: max_inner_product_dense(z, codebook)),
    ),
    "ibq_step": (
        Backend("triton", _ibq_step_triton, _triton_applies, _triton_worthwhile, TRITON_REQUIRES),
        Backend("chunked", lambda z, codebook, temperature=0.01, entropy=True, code_chunk=None, **_: ibq_chunked(
            z, codebook, temperature, entropy=entropy, code_chunk=code_chunk), worthwhile=_ibq_chunked_worthwhile),
        Backend("dense", lambda z, codebook, temperature=0.01, **_: ibq_dense(z, codebook, temperature)),
    ),
    "cross_entropy": (
        Backend("triton", _ce_triton, _ce_triton_applies, _triton_worthwhile, TRITON_REQUIRES),
        Backend("chunked", _ce_chunked, worthwhile=_ce_chunked_worthwhile),
        Backend("dense", _ce_dense),
    ),
}
OPS = tuple(BACKENDS)


# -- forcing ----------------------------------------------------------------------------------------------------------
_forced: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "vqtok_kernel_backends", default=MappingProxyType({}))


def backends(op: str) -> tuple[str, ...]:
    """The backend names of an operation, in the order the automatic choice tries them."""
    return tuple(backend.name for backend in _table(op))


def check_backend(op: str, name: str) -> None:
    """Raise ValueError unless `name` is "auto" or a backend registered for `op`."""
    if name != AUTO and name not in backends(op):
        choices = ", ".join(repr(n) for n in (AUTO, *backends(op)))
        raise ValueError(f"unknown {op} backend {name!r}; choose one of {choices}")


@contextlib.contextmanager
def use(op: str, backend: str) -> Iterator[None]:
    """Within the block, every `op` call uses `backend` ("auto": the automatic choice), whatever a call asks for."""
    check_backend(op, backend)
    token = _forced.set(MappingProxyType({**_forced.get(), op: backend}))
    try:
        yield
    finally:
        _forced.reset(token)


# -- choosing and calling ---------------------------------------------------------------------------------------------
def choose(op: str, z: Tensor, codebook: Tensor, *, backend: str | None = None, **options: Any) -> str:
    """The name of the backend that `op` on these inputs uses (see the module docstring for the rules)."""
    _validate(op, z, codebook, options)
    return _resolve(op, z, codebook, backend, options).name


def dispatch(op: str, z: Tensor, codebook: Tensor, *, backend: str | None = None, **options: Any) -> Any:
    """Compute `op` on these inputs with the backend `choose` names."""
    _validate(op, z, codebook, options)
    return _resolve(op, z, codebook, backend, options).fn(z, codebook, **options)


def nearest_code(z: Tensor, codebook: Tensor, *, frozen_key: Any = None, token_chunk: int | None = None,
                 code_chunk: int | None = None, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """z (N, D), codebook (K, D) -> (indices (N,) int64, squared distances (N,)) of argmin_k ||z_n - e_k||^2.

    frozen_key: pass one only when the codebook stays fixed between calls (evaluation): equal keys promise equal
    codebooks, which lets the k-d tree be built once (kernels/kdtree.py). token_chunk, code_chunk: block sizes of
    the chunked backend (default: from the shapes)."""
    return dispatch("nearest_code", z, codebook, backend=backend, frozen_key=frozen_key, token_chunk=token_chunk,
                    code_chunk=code_chunk)


def max_inner_product(z: Tensor, codebook: Tensor, *, token_chunk: int | None = None, code_chunk: int | None = None,
                      backend: str | None = None) -> tuple[Tensor, Tensor]:
    """z (N, D), codebook (K, D) -> (indices (N,) int64, values (N,)) of argmax_k z_n . e_k."""
    return dispatch("max_inner_product", z, codebook, backend=backend, token_chunk=token_chunk, code_chunk=code_chunk)


def ibq_step(z: Tensor, codebook: Tensor, *, temperature: float = 0.01, entropy: bool = True,
             code_chunk: int | None = None, backend: str | None = None) -> IBQResult:
    """The differentiable IBQ step (kernels/ibq.py) on z (N, D) and codebook (K, D). entropy=False: the caller
    never reads the entropies (a backend may skip them and return NaN)."""
    return dispatch("ibq_step", z, codebook, backend=backend, temperature=temperature, entropy=entropy,
                    code_chunk=code_chunk)


def cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, ignore_index: int = -100,
                  reduction: str = "mean", *, code_chunk: int | None = None, backend: str | None = None) -> Tensor:
    """The cross-entropy of the logits hidden (N, d) @ weight (K, d)^T + bias (K,) against targets (N,) int64, as
    F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction) computes it, in fp32 (fp64
    if an input is), without an (N, K) logits tensor where the chunked backend runs (kernels/cross_entropy.py).
    bias may be None. reduction "mean" (over the rows not ignored), "sum" or "none" (per token, (N,), 0 on ignored
    rows). code_chunk: codes per chunk of the chunked backend (default: from the shapes)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(map(repr, REDUCTIONS))}")
    loss = dispatch("cross_entropy", hidden, weight, backend=backend, bias=bias, targets=targets,
                    ignore_index=ignore_index, code_chunk=code_chunk)
    return reduce_loss(loss, targets, ignore_index, reduction)


def _table(op: str) -> tuple[Backend, ...]:
    if op not in BACKENDS:
        raise ValueError(f"unknown kernel operation {op!r}; choose one of {', '.join(map(repr, BACKENDS))}")
    return BACKENDS[op]


def _validate(op: str, z: Tensor, codebook: Tensor, options: dict[str, Any]) -> None:
    """Refuse bad inputs before any predicate looks at them, whichever backend would run."""
    _table(op)
    if op in ("nearest_code", "max_inner_product"):
        check_search_inputs(z, codebook)
        search_chunks(z.shape[0], codebook.shape[0], options.get("token_chunk"), options.get("code_chunk"))
    elif op == "cross_entropy":
        check_cross_entropy_inputs(z, codebook, options.get("bias"), options.get("targets"),
                                   options.get("ignore_index", -100))
        cross_entropy_code_chunk(z.shape[0], codebook.shape[0], options.get("code_chunk"))
    elif z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"expected z (N, D) and codebook (K, D), got {tuple(z.shape)} and {tuple(codebook.shape)}")


def _resolve(op: str, z: Tensor, codebook: Tensor, backend: str | None, options: dict[str, Any]) -> Backend:
    forced = _forced.get().get(op, AUTO)
    name = forced if forced != AUTO else (backend or AUTO)
    if name == AUTO:
        for candidate in _table(op):
            if candidate.applies(z, codebook, **options) and candidate.worthwhile(z, codebook, **options):
                return candidate
        raise RuntimeError(f"no {op} backend applies to {_describe(z, codebook, options)}: the registry must end "
                           "with one that always applies")
    check_backend(op, name)
    chosen = next(candidate for candidate in _table(op) if candidate.name == name)
    if not chosen.applies(z, codebook, **options):
        raise ValueError(f"{op} backend {name!r} was forced but does not apply to {_describe(z, codebook, options)}: "
                         f"it requires {chosen.requires}")
    return chosen


def _describe(z: Tensor, codebook: Tensor, options: dict[str, Any]) -> str:
    tensors = (f"z {str(z.dtype).removeprefix('torch.')} {tuple(z.shape)} on {z.device}, codebook "
               f"{str(codebook.dtype).removeprefix('torch.')} {tuple(codebook.shape)} on {codebook.device}")
    if "frozen_key" in options:
        tensors += ", with a frozen_key" if options["frozen_key"] is not None else ", without a frozen_key"
    return tensors
