"""Kernel benchmarks behind `vqtok bench quantize`: the chunked kernels against the dense reference and baselines.

For each row (method, codebook size K, dim D) it times, interleaved in one loop so that a shared machine's load hits
every path alike, and takes the median of the repeats:
- chunked: the quantizer as shipped, on the kernel registry's automatic choice (vqtok.kernels: the chunked or
  fused search, the k-d tree where it applies); the ibq rows pin the IBQ step to its "chunked" backend, which the
  automatic choice leaves for the dense one at small N x K;
- dense: the same quantizer with every kernel operation forced to its dense reference (`kernels.use(op, "dense")`);
- vqp: vector-quantize-pytorch's VectorQuantize(dim=D, codebook_size=K), when installed (the `bench` extra);
- faiss: faiss-cpu's exact search (IndexFlatL2; IndexFlatIP for ibq, whose lookup is a maximum inner product), on
  the "search" rows (a bare search; faiss_everywhere=True adds it to the quantizer rows);
- cdist (the "search" rows): torch.cdist + argmin, the usual dense way to find nearest codes;
- matmul: the bare z @ E^T of the same shape, the floor any exact method pays.
"forward" is a training-mode forward (the graph is built), "forward_backward" adds loss.backward(); the search rows
time `nearest_code` alone. Peak extra memory is the resident-set high-water mark above the resident set before the
call (Linux: /proc/self/clear_refs resets VmHWM; malloc_trim first returns freed heap pages, so memory the allocator
kept from earlier calls is not silently reused); it sees every allocator (torch, numpy, numba, faiss).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from . import kernels
from .core.io import write_json
from .quantize import build_quantizer

CASES = ("search", "vq", "fc", "ema", "lc", "ibq")
EXTRA_CASES = ("ibq_step", "ce_head")  # not run by default: the IBQ step alone (chunked vs dense backend, with the
# penalty); a GPT output head's cross-entropy over K codes (kernels.cross_entropy, chunked vs dense backend)
SIZES = (1024, 16_384, 100_000, 262_144)  # the default grid
LARGE_SIZES = (1_048_576,)  # the full grid adds these for the chunked paths: --sizes ... 1048576
DIMS = (8, 256)
NATURAL_DIMS = {"search": (8, 256), "vq": (256,), "fc": (8,), "ema": (256,), "lc": (8,), "ibq": (256,),
                "ibq_step": (256,), "ce_head": (256,)}
QUICK = {"sizes": (512, 2048), "dims": (8, 32), "tokens": 64, "repeats": 1}
DENSE_MAX_CODES = 262_144  # larger sizes run the chunked paths (plus faiss and matmul) only
# Predicted peak of the dense paths, in units of one (N, K) fp32 matrix (ibq: 9.8 GiB at N = 4096, K = 100,000).
DENSE_FACTOR = {"search": 3, "cdist": 2, "vq": 3, "fc": 3, "ema": 3, "lc": 3, "ibq": 6.5, "ibq_step": 6.5, "vqp": 6.5,
                "ce_head": 4}
LC_FEATURES = 768  # VQGAN-LC's codebook: CLIP ViT-L/14 features
DENSE = {op: "dense" for op in kernels.OPS}  # the "dense" paths: every kernel operation on its dense reference
# --device cuda: the search rows and the IBQ step (forward + backward with the entropy penalty) on the GPU.
CUDA_METHODS = ("search", "ibq_step")
CUDA_CELLS = {  # (K, D) of the default CUDA grid, per method
    "search": ((16_384, 8), (16_384, 256), (100_000, 8), (262_144, 8), (262_144, 256), (1_048_576, 8),
               (1_048_576, 256)),
    "ibq_step": ((16_384, 256), (262_144, 8), (262_144, 256), (1_048_576, 256)),
}
CUDA_TOKENS = 8192  # search rows
CUDA_IBQ_TOKENS = 4096  # ibq_step rows (IBQ's batch of 16 images of 16 x 16 tokens x 16 GPUs' worth)
CUDA_MATMUL_BLOCK_BYTES = 4 * 2**30  # the bare matmul runs in code blocks whose (N, codes) output is at most this


@dataclass
class BenchConfig:
    """What `run_quantize_bench` measures. dims=None runs each method at its natural dims (NATURAL_DIMS)."""

    methods: tuple[str, ...] = CASES
    sizes: tuple[int, ...] = SIZES
    dims: tuple[int, ...] | None = None
    tokens: int = 4096
    repeats: int = 3
    slow_seconds: float = 2.0  # a call at least this slow keeps its warm-up run as a sample (saves one run)
    row_seconds: float = 30.0  # no new round of repeats starts once a row has run this long
    max_dense_gib: float = 12.0
    faiss_everywhere: bool = False  # faiss is a bare search: by default it is timed on the "search" rows only
    lc_features: int = LC_FEATURES
    seed: int = 0
    device: str = "cpu"  # "cuda": the GPU rows (run_cuda_search_bench), not the CPU grid
    ibq_tokens: int = CUDA_IBQ_TOKENS  # --device cuda: N of the ibq_step rows


    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in CASES + EXTRA_CASES]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {list(CASES + EXTRA_CASES)}")
        if self.slow_seconds < 0 or self.row_seconds < 0 or self.max_dense_gib < 0:
            raise ValueError("slow_seconds, row_seconds and max_dense_gib must not be negative")
        if self.tokens < 1 or self.repeats < 1 or not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"tokens, repeats and sizes must be positive, got tokens={self.tokens}, "
                             f"repeats={self.repeats}, sizes={self.sizes}")
        if self.dims is not None and (not self.dims or min(self.dims) < 1):
            raise ValueError(f"dims must be positive, got {self.dims}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and set(self.methods) - set(CUDA_METHODS):
            raise ValueError(f"on cuda only {list(CUDA_METHODS)} is benchmarked so far, got {list(self.methods)}")

    def cells(self) -> list[tuple[str, int, int]]:
        """(method, K, D) rows in run order: by size, then method, then dim."""
        return [(m, K, D) for K in self.sizes for m in self.methods
                for D in (self.dims if self.dims is not None else NATURAL_DIMS[m])]


# -- memory -----------------------------------------------------------------------------------------------------
def _status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


MEMORY_METHOD = ("RSS high-water mark (VmHWM reset via /proc/self/clear_refs after malloc_trim) minus RSS before "
                 "the call, in the benchmark process")


def measure(fn: Callable[[], Any], memory: bool) -> tuple[float, float | None]:
    """(seconds, peak extra MiB or None) of one call of fn."""
    peak_ok = False
    if memory:
        gc.collect()
        _malloc_trim()
        before = _status_kib("VmRSS")
        peak_ok = before is not None and _reset_peak()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    if not peak_ok:
        return seconds, None
    return seconds, max(0, (_status_kib("VmHWM") or 0) - before) / 1024


# -- the paths ----------------------------------------------------------------------------------------------------
@dataclass
class _Timed:
    """One thing timed in a row: `phases` maps "forward" / "forward_backward" to a call."""

    name: str
    phases: dict[str, Callable[[], Any]]
    forward_ms: list[float] = field(default_factory=list)
    forward_backward_ms: list[float] = field(default_factory=list)
    peak_mib: float | None = None
    error: str | None = None

    def summary(self) -> dict[str, Any]:
        med = lambda xs: round(statistics.median(xs), 3) if xs else None  # noqa: E731
        return {"forward_ms": med(self.forward_ms), "forward_backward_ms": med(self.forward_backward_ms),
                "peak_mib": None if self.peak_mib is None else round(self.peak_mib, 1),
                "samples": max(len(self.forward_ms), len(self.forward_backward_ms)), "error": self.error}


def _z_shape(tokens: int, dim: int) -> tuple[int, int, int, int]:
    """(B, D, H, W) holding `tokens` tokens: 16 x 16 maps where they divide, else a (N, D, 1, 1) batch."""
    return (tokens // 256, dim, 16, 16) if tokens % 256 == 0 else (tokens, dim, 1, 1)


@contextlib.contextmanager
def _forcing(backends: dict[str, str]) -> Iterator[None]:
    """Force a backend per kernel operation (kernels.use) for the duration of a call."""
    with contextlib.ExitStack() as stack:
        for op, backend in backends.items():
            stack.enter_context(kernels.use(op, backend))
        yield


def _quantizer_phases(q: torch.nn.Module, z: Tensor, grad: Tensor, backends: dict[str, str]) -> dict[str, Callable]:
    """A forward, and a forward+backward, of q with the given kernel backends forced ({}: the automatic choice)."""
    def forward() -> None:
        with _forcing(backends):
            q(z.detach().requires_grad_())

    def forward_backward() -> None:
        q.zero_grad(set_to_none=True)
        with _forcing(backends):
            out = q(z.detach().requires_grad_())
            (out.loss + (out.z_q * grad).sum()).backward()

    return {"forward": forward, "forward_backward": forward_backward}


def _build(method: str, K: int, D: int, config: BenchConfig) -> torch.nn.Module:
    options: dict[str, Any] = {}
    if method == "lc":
        options["codebook"] = torch.randn(K, config.lc_features)
    return build_quantizer(method, codebook_size=K, dim=D, **options).train()


def _vqp_phases(K: int, D: int, z: Tensor, grad: Tensor) -> dict[str, Callable] | str:
    try:
        from vector_quantize_pytorch import VectorQuantize
    except ImportError:
        return "vector-quantize-pytorch is not installed (pip install 'vqtok[bench]'): column skipped"
    layer = VectorQuantize(dim=D, codebook_size=K).train()
    x = z.flatten(2).transpose(1, 2).contiguous()  # (B, N, D)
    g = grad.flatten(2).transpose(1, 2).contiguous()

    def forward() -> None:
        layer(x.detach().requires_grad_())

    def forward_backward() -> None:
        layer.zero_grad(set_to_none=True)
        quantized, _, loss = layer(x.detach().requires_grad_())
        (loss.sum() + (quantized * g).sum()).backward()

    return {"forward": forward, "forward_backward": forward_backward}


def _faiss_phase(flat: Tensor, codebook: Tensor, inner_product: bool) -> dict[str, Callable] | str:
    try:
        import faiss
    except ImportError:
        return "faiss is not installed: column skipped"
    faiss.omp_set_num_threads(torch.get_num_threads())
    index = (faiss.IndexFlatIP if inner_product else faiss.IndexFlatL2)(codebook.shape[1])
    index.add(codebook.numpy())  # building the index is set-up, not timed
    queries = flat.numpy()
    return {"forward": lambda: index.search(queries, 1)}


def _available_bytes() -> int:
    kib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                kib = int(line.split()[1])
    except OSError:
        pass
    return (kib or 8 * 2**20) * 1024


def _matmul_phase(flat: Tensor, codebook: Tensor) -> tuple[dict[str, Callable], int]:
    """z @ E^T; when its (N, K) output would not fit in half the free memory, in column blocks that each get a fresh
    output (same flops and output traffic; the JSON records the block count)."""
    N, K = flat.shape[0], codebook.shape[0]
    blocks = max(1, -(-(N * K * 4) // (_available_bytes() // 2)))
    width = -(-K // blocks)

    def forward() -> None:
        for k0 in range(0, K, width):
            out = flat @ codebook[k0:k0 + width].T
            del out

    return {"forward": forward}, blocks


def _row_paths(method: str, K: int, D: int, config: BenchConfig, notes: list[str]) -> tuple[list[_Timed], dict]:
    """Everything timed in one row, and facts for the JSON (matmul blocks)."""
    torch.manual_seed(config.seed)
    fits = _dense_rule(K, config, notes)
    if method == "search":
        flat, codebook, paths = _search_paths(config.tokens, K, D, fits)
    elif method == "ibq_step":
        flat, codebook, grad = torch.randn(config.tokens, D), torch.randn(K, D), torch.randn(config.tokens, D)
        paths = [_Timed("chunked", _step_phases("chunked", flat, codebook, grad))]
        if fits("ibq_step"):
            paths.append(_Timed("dense", _step_phases("dense", flat, codebook, grad)))
    elif method == "ce_head":
        flat, codebook, bias = torch.randn(config.tokens, D), torch.randn(K, D) / D**0.5, torch.zeros(K)
        targets = torch.randint(0, K, (config.tokens,))
        paths = [_Timed(name, ce_head_phases(name, flat, codebook, bias, targets))
                 for name in ("chunked", "dense") if name == "chunked" or fits("ce_head")]
    else:
        flat, codebook, paths = _quantizer_paths(method, K, D, config, fits, notes)
    if method == "search" or config.faiss_everywhere:
        faiss_phase = _faiss_phase(flat.contiguous(), codebook.contiguous(), inner_product=method.startswith("ibq"))
        if isinstance(faiss_phase, str):
            notes.append(faiss_phase)
        else:
            paths.append(_Timed("faiss", faiss_phase))
    matmul, blocks = _matmul_phase(flat.contiguous(), codebook.contiguous())
    paths.append(_Timed("matmul", matmul))
    return paths, {"matmul_blocks": blocks}


def _dense_rule(K: int, config: BenchConfig, notes: list[str]) -> Callable[[str], bool]:
    """fits(kind): whether a dense path runs in this row: K within the dense grid and its predicted memory under
    --max-dense-gib and 80% of the free memory. Skips are noted."""
    dense_ok = K <= DENSE_MAX_CODES
    if not dense_ok:
        notes.append(f"K > {DENSE_MAX_CODES}: chunked paths, faiss and matmul only")
    free = torch.cuda.mem_get_info()[0] if config.device == "cuda" else _available_bytes()
    limit = min(config.max_dense_gib * 2**30, 0.8 * free)

    def fits(kind: str) -> bool:
        need = DENSE_FACTOR[kind] * config.tokens * K * 4
        if dense_ok and need > limit:
            notes.append(f"{kind} skipped: needs ~{need / 2**30:.1f} GiB > {limit / 2**30:.1f} GiB "
                         "(--max-dense-gib, or 80% of the free memory)")
        return dense_ok and need <= limit

    return fits


def _search_paths(N: int, K: int, D: int, fits: Callable[[str], bool]) -> tuple[Tensor, Tensor, list[_Timed]]:
    """nearest_code alone: the automatic choice without a frozen codebook ("chunked": the fused or chunked search),
    dense reference, cdist + argmin; and, where the registry would pick it for a frozen codebook (CPU, D <= 16,
    large K), the k-d tree that evaluation uses ("tree": built on the warm-up call, queries timed)."""
    flat, codebook = torch.randn(N, D), torch.randn(K, D)
    paths = [_Timed("chunked", {"forward": lambda: kernels.nearest_code(flat, codebook)})]
    frozen_key = ("bench", object())  # names this codebook alone (the registry's tree cache is process-wide)
    if kernels.choose("nearest_code", flat, codebook, frozen_key=frozen_key) == "kdtree":
        paths.append(_Timed("tree", {"forward": lambda: kernels.nearest_code(flat, codebook, frozen_key=frozen_key)}))
    if fits("search"):
        paths.append(_Timed("dense", {"forward": lambda: _dense_search(flat, codebook)}))
    if fits("cdist"):
        paths.append(_Timed("cdist", {"forward": lambda: torch.cdist(flat, codebook).argmin(dim=1)}))
    return flat, codebook, paths


def _quantizer_paths(
    method: str, K: int, D: int, config: BenchConfig, fits: Callable[[str], bool], notes: list[str]
) -> tuple[Tensor, Tensor, list[_Timed]]:
    """A registered quantizer as shipped, on its dense reference, and vector-quantize-pytorch's VectorQuantize."""
    q = _build(method, K, D, config)
    z, grad = torch.randn(_z_shape(config.tokens, D)), torch.randn(_z_shape(config.tokens, D))
    shipped = {"ibq_step": "chunked"} if method == "ibq" else {}
    paths = [_Timed("chunked", _quantizer_phases(q, z, grad, shipped))]
    if fits(method):
        paths.append(_Timed("dense", _quantizer_phases(q, z, grad, DENSE)))
    vqp = _vqp_phases(K, D, z, grad)
    if isinstance(vqp, str):
        notes.append(vqp)
    elif fits("vqp"):
        paths.append(_Timed("vqp", vqp))
    return z.permute(0, 2, 3, 1).reshape(-1, D), q.codebook_vectors().detach(), paths


def _step_phases(backend: str, flat: Tensor, codebook: Tensor, grad: Tensor) -> dict[str, Callable]:
    """An IBQ step on its own, on the given backend: sum(z_q * G) + 0.05 (sample entropy - codebook entropy),
    IBQ's penalty."""
    def forward() -> Any:
        with kernels.use("ibq_step", backend):
            return kernels.ibq_step(flat.detach().requires_grad_(), codebook.detach().requires_grad_())

    def forward_backward() -> None:
        result = forward()
        ((result.z_q * grad).sum() + 0.05 * (result.sample_entropy - result.codebook_entropy)).backward()

    return {"forward": forward, "forward_backward": forward_backward}


def ce_head_phases(backend: str, hidden: Tensor, weight: Tensor, bias: Tensor, targets: Tensor
                   ) -> dict[str, Callable]:
    """A GPT output head's mean cross-entropy over K codes (kernels.cross_entropy) on the given backend, and its
    backward to the hidden states, the head weight and the bias."""
    def forward() -> Tensor:
        leaves = (hidden.detach().requires_grad_(), weight.detach().requires_grad_(), bias.detach().requires_grad_())
        return kernels.cross_entropy(*leaves, targets, backend=backend)

    return {"forward": forward, "forward_backward": lambda: forward().backward()}


def _dense_search(flat: Tensor, codebook: Tensor) -> None:
    with kernels.use("nearest_code", "dense"):
        kernels.nearest_code(flat, codebook)


# -- one row --------------------------------------------------------------------------------------------------------
def _time_row(paths: list[_Timed], config: BenchConfig) -> None:
    """Run 0 warms up and measures memory; later runs are timed, all paths interleaved in each run, until every
    path has `repeats` samples or the row has run `row_seconds`. A call slower than `slow_seconds` keeps its
    warm-up run as a sample (its page faults after malloc_trim are then a negligible part of it)."""
    started = time.perf_counter()
    sampled = lambda: all(getattr(p, f"{phase}_ms") for p in paths if not p.error for phase in p.phases)  # noqa: E731
    for run in range(config.repeats + 1):
        if run > 0 and time.perf_counter() - started > config.row_seconds and sampled():
            break
        for path in paths:
            if path.error:
                continue
            for phase, call in path.phases.items():
                samples = getattr(path, f"{phase}_ms")
                if len(samples) >= config.repeats:
                    continue
                try:
                    seconds, peak = measure(call, memory=run == 0)
                except (RuntimeError, MemoryError) as error:  # e.g. an allocation the machine cannot serve
                    path.error = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                    break
                if peak is not None:
                    path.peak_mib = max(path.peak_mib or 0.0, peak)
                if run > 0 or seconds >= config.slow_seconds:
                    samples.append(seconds * 1000)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _ratios(s: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Speed-ups are other / chunked (> 1: chunked is faster); the rest say what they divide."""
    chunked = s.get("chunked", {})
    get = lambda path, key: s.get(path, {}).get(key)  # noqa: E731
    return {
        "dense_over_chunked_forward": _ratio(get("dense", "forward_ms"), chunked.get("forward_ms")),
        "dense_over_chunked_forward_backward": _ratio(get("dense", "forward_backward_ms"),
                                                      chunked.get("forward_backward_ms")),
        "chunked_over_dense_peak": _ratio(chunked.get("peak_mib"), get("dense", "peak_mib")),
        "cdist_over_chunked": _ratio(get("cdist", "forward_ms"), chunked.get("forward_ms")),
        "faiss_over_chunked": _ratio(get("faiss", "forward_ms"), chunked.get("forward_ms")),
        "chunked_over_tree": _ratio(chunked.get("forward_ms"), get("tree", "forward_ms")),
        "vqp_over_chunked_forward_backward": _ratio(get("vqp", "forward_backward_ms"),
                                                    chunked.get("forward_backward_ms")),
        "chunked_forward_over_matmul": _ratio(chunked.get("forward_ms"), get("matmul", "forward_ms")),
        "chunked_forward_backward_over_matmul": _ratio(chunked.get("forward_backward_ms"),
                                                       get("matmul", "forward_ms")),
    }


def bench_row(method: str, K: int, D: int, config: BenchConfig) -> dict[str, Any]:
    """Measure one (method, K, D) row: every path's medians and peak memory, their ratios, and notes."""
    notes: list[str] = []
    paths, facts = _row_paths(method, K, D, config, notes)
    started = time.perf_counter()
    _time_row(paths, config)
    summaries = {p.name: p.summary() for p in paths}
    for p in paths:
        if p.error:
            notes.append(f"{p.name} failed: {p.error}")
    del paths
    gc.collect()
    return {"method": method, "codebook_size": K, "dim": D, "tokens": config.tokens, **summaries,
            "ratios": _ratios(summaries), **facts, "seconds": round(time.perf_counter() - started, 1),
            "notes": notes}


def warm_up() -> None:
    """First calls load numba's cached kernels, faiss and torch's lazy state: keep that out of the first row."""
    for dim in (8, 16, 64):
        kernels.nearest_code(torch.randn(300, dim), torch.randn(500, dim))
    q = build_quantizer("ibq", codebook_size=600, dim=16, kernel="chunked").train()
    out = q(torch.randn(2, 16, 16, 16))
    (out.loss + out.z_q.sum()).backward()
    phase = _faiss_phase(torch.randn(10, 8), torch.randn(20, 8), inner_product=False)
    if not isinstance(phase, str):
        phase["forward"]()


def run_quantize_bench(config: BenchConfig | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Run every row of `config` (see BenchConfig) and return one dict per row (see bench_row)."""
    from tqdm import tqdm

    config = config or BenchConfig()
    warm_up()
    rows = []
    cells = config.cells()
    bar = tqdm(cells, desc="bench quantize", unit="row", disable=not progress)
    for method, K, D in bar:
        bar.set_postfix_str(f"{method} K={K} D={D}")
        rows.append(bench_row(method, K, D, config))
    return rows


# -- output ---------------------------------------------------------------------------------------------------------
def environment() -> dict[str, Any]:
    """Facts a reader needs to compare runs: versions, threads, CPU, load, how memory was measured."""
    try:
        import faiss
        faiss_version = faiss.__version__
    except ImportError:
        faiss_version = None
    try:
        import numba
        numba_version = numba.__version__
    except ImportError:
        numba_version = None
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or
            platform.machine(), "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
            "faiss": faiss_version, "numba": numba_version, "memory_method": MEMORY_METHOD,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_results(rows: list[dict[str, Any]], path: str | Path, config: BenchConfig) -> None:
    """rows plus the config and environment, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    facts = environment() if config.device == "cpu" else {**environment(), **cuda_environment()}
    payload = {"config": {k: v for k, v in config.__dict__.items()}, "environment": facts, "rows": rows}
    write_json(path, payload, indent=1)


def _fmt(value: float | None, digits: int | None = None) -> str:
    """Ratios with the digits asked for; times and MiB with 3 significant digits below 100."""
    if value is None:
        return "-"
    if digits is None:
        digits = 0 if value >= 100 else 1 if value >= 10 else 2
    return f"{value:,.{digits}f}"


def format_bench_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table: times in ms, memory in MiB, ratios as x (speed-ups: > 1 means chunked is faster)."""
    header = ["method", "K", "D", "fwd", "fwd+bwd", "MiB", "dense fwd", "dense f+b", "dense MiB", "faiss",
              "cdist", "tree", "vqp f+b", "matmul", "xdense f+b", "mem/dense", "xfaiss", "f+b/matmul"]
    lines = [header]
    for r in rows:
        c, d = r.get("chunked", {}), r.get("dense", {})
        ratios = r["ratios"]
        speedup = ratios["dense_over_chunked_forward_backward"] or ratios["dense_over_chunked_forward"]
        over_mm = ratios["chunked_forward_backward_over_matmul"] or ratios["chunked_forward_over_matmul"]
        lines.append([
            r["method"], f"{r['codebook_size']:,}", str(r["dim"]), _fmt(c.get("forward_ms")),
            _fmt(c.get("forward_backward_ms")), _fmt(c.get("peak_mib")), _fmt(d.get("forward_ms")),
            _fmt(d.get("forward_backward_ms")), _fmt(d.get("peak_mib")), _fmt(r.get("faiss", {}).get("forward_ms")),
            _fmt(r.get("cdist", {}).get("forward_ms")), _fmt(r.get("tree", {}).get("forward_ms")),
            _fmt(r.get("vqp", {}).get("forward_backward_ms")),
            _fmt(r.get("matmul", {}).get("forward_ms")), _fmt(speedup, 2), _fmt(ratios["chunked_over_dense_peak"], 3),
            _fmt(ratios["faiss_over_chunked"], 2), _fmt(over_mm, 2),
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines]
    notes = sorted({n for r in rows for n in r["notes"]})
    footer = ["", "times: median ms; MiB: peak extra resident memory; xdense/xfaiss: their time / chunked time "
              "(> 1: chunked faster); f+b/matmul: chunked forward+backward (forward for search) / bare z @ E^T; "
              "tree: a fixed codebook's k-d tree (evaluation's search at D <= 16), queries only"]
    return "\n".join(text + footer + [f"note: {n}" for n in notes])


# -- the GPU: `vqtok bench quantize --device cuda` -----------------------------------------------------------------
# Each search row (K, D) times nearest_code on N tokens of fp32 on the GPU, each path forced through the registry:
# - triton: the Triton kernel at the default precision ("highest": exact fp32 products); triton_tf32: the same
#   with torch.set_float32_matmul_precision("high") (TF32 products);
# - chunked: the torch chunked path (blocks sized for the GPU); dense: the (N, K) reference;
# - cdist: torch.cdist + argmin; matmul / matmul_tf32: the bare z @ E^T in fp32 and in TF32 (in code blocks of at
#   most CUDA_MATMUL_BLOCK_BYTES of output, the floor any exact method pays).
# Times: CUDA events around each call, median of the repeats after a warm-up call (compiles and autotunes the
# Triton kernel). Memory: torch.cuda.max_memory_allocated above the allocation before the call, after
# reset_peak_memory_stats. Dense and cdist run only where their predicted memory fits (_dense_rule).
# Each ibq_step row times one IBQ step forward + backward (ibq_step_paths) on N = ibq_tokens tokens, per backend.
CUDA_PATHS = ("triton", "triton_tf32", "chunked", "dense", "cdist", "matmul", "matmul_tf32")


@contextlib.contextmanager
def _matmul_precision(precision: str) -> Iterator[None]:
    """torch.set_float32_matmul_precision within the block (it sets torch.backends.cuda.matmul.allow_tf32 too)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def cuda_cells(config: BenchConfig) -> list[tuple[str, int, int]]:
    """(method, K, D) rows of the CUDA benchmark: CUDA_CELLS unless sizes or dims are given (then their grid)."""
    if config.sizes == SIZES and config.dims is None:
        return [(m, K, D) for m in config.methods for K, D in CUDA_CELLS[m]]
    return [(m, K, D) for m in config.methods for K in config.sizes for D in (config.dims or DIMS)]


def ibq_step_paths(z: Tensor, codebook: Tensor, backends: tuple[str, ...]) -> dict[str, Callable[[], None]]:
    """{backend or backend_tf32: call}: one IBQ step forward + backward through the registry, the loss IBQ trains
    with downstream (<z_q, G> + <h E, G> + 0.05 (mean H(q_n) - H(mean q))), gradients to z and the codebook (freed
    after each call). "<name>_tf32" runs under matmul precision "high"."""
    z = z.detach().clone().requires_grad_(True)
    codebook = codebook.detach().clone().requires_grad_(True)
    head = torch.randn_like(z)

    def step(backend: str, precision: str) -> Callable[[], None]:
        def call() -> None:
            with kernels.use("ibq_step", backend), _matmul_precision(precision):
                out = kernels.ibq_step(z, codebook, temperature=0.01)
                loss = ((out.z_q + out.hard) * head).sum() + 0.05 * (out.sample_entropy - out.codebook_entropy)
                loss.backward()
            z.grad = codebook.grad = None
        return call

    return {name: step(name.removesuffix("_tf32"), "high" if name.endswith("_tf32") else "highest")
            for name in backends}


def _cuda_row_paths(method: str, K: int, D: int, config: BenchConfig,
                    notes: list[str]) -> tuple[dict[str, Callable], int, int]:
    """{path name: call} for one row on the GPU, how many blocks the bare matmul runs in, and N."""
    torch.manual_seed(config.seed)
    N = config.ibq_tokens if method == "ibq_step" else config.tokens
    z, codebook = torch.randn(N, D, device="cuda"), torch.randn(K, D, device="cuda")
    fits = _dense_rule(K, config, notes)

    def search(backend: str, precision: str = "highest") -> Callable[[], Any]:
        def call() -> Any:
            with kernels.use("nearest_code", backend), _matmul_precision(precision):
                return kernels.nearest_code(z, codebook)
        return call

    block = max(1, min(K, CUDA_MATMUL_BLOCK_BYTES // (4 * N)))
    out = torch.empty(N, block, device="cuda")

    def matmul(precision: str) -> Callable[[], Any]:
        def call() -> None:
            with _matmul_precision(precision):
                for k0 in range(0, K, block):
                    e = codebook[k0:k0 + block]
                    torch.mm(z, e.T, out=out[:, :e.shape[0]])  # (N, codes)
        return call

    op = "ibq_step" if method == "ibq_step" else "nearest_code"
    triton = kernels.backends(op)[0] == "triton" and kernels.BACKENDS[op][0].applies(z, codebook)
    if not triton:
        notes.append("triton is not installed: no triton columns")
    if method == "ibq_step":
        names = (("triton", "triton_tf32") if triton else ()) + ("chunked",) + (("dense",) if fits("ibq_step") else ())
        paths: dict[str, Callable] = dict(ibq_step_paths(z, codebook, names))
    else:
        paths = {}
        if triton:
            paths["triton"], paths["triton_tf32"] = search("triton"), search("triton", "high")
        paths["chunked"] = search("chunked")
        if fits("search"):
            paths["dense"] = search("dense")
        if fits("cdist"):
            paths["cdist"] = lambda: torch.cdist(z, codebook).argmin(dim=1)
    paths["matmul"], paths["matmul_tf32"] = matmul("highest"), matmul("high")
    return paths, -(-K // block), N


def _cuda_time(call: Callable[[], Any], repeats: int) -> tuple[list[float], float]:
    """(times in ms of `repeats` calls after a warm-up call, peak extra MiB of the warm-up call)."""
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times, peak


def cuda_bench_row(method: str, K: int, D: int, config: BenchConfig) -> dict[str, Any]:
    """One search row on the GPU: each path's median ms and peak extra MiB, and ratios over the triton path."""
    notes: list[str] = []
    started = time.perf_counter()
    paths, blocks, N = _cuda_row_paths(method, K, D, config, notes)
    row: dict[str, Any] = {"method": method, "codebook_size": K, "dim": D, "tokens": N,
                           "timed": "forward + backward" if method == "ibq_step" else "forward"}
    for name, call in paths.items():
        try:
            times, peak = _cuda_time(call, config.repeats)
            row[name] = {"forward_ms": round(statistics.median(times), 3), "peak_mib": round(peak, 1),
                         "samples": len(times), "error": None}
        except (RuntimeError, MemoryError) as error:  # e.g. out of GPU memory
            row[name] = {"forward_ms": None, "peak_mib": None, "samples": 0,
                         "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
            notes.append(f"{name} failed: {row[name]['error']}")
    del paths
    gc.collect()
    torch.cuda.empty_cache()
    ms = lambda name: row.get(name, {}).get("forward_ms")  # noqa: E731
    row["ratios"] = {f"{name}_over_triton": _ratio(ms(name), ms("triton")) for name in CUDA_PATHS[1:]}
    row.update(matmul_blocks=blocks, seconds=round(time.perf_counter() - started, 1), notes=notes)
    return row


def run_cuda_search_bench(config: BenchConfig, progress: bool = True) -> list[dict[str, Any]]:
    """Every row of `cuda_cells(config)` on the GPU (see cuda_bench_row)."""
    from tqdm import tqdm

    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no CUDA GPU")
    rows = []
    bar = tqdm(cuda_cells(config), desc="bench quantize (cuda)", unit="row", disable=not progress)
    for method, K, D in bar:
        bar.set_postfix_str(f"{method} K={K} D={D}")
        rows.append(cuda_bench_row(method, K, D, config))
    return rows


def cuda_environment() -> dict[str, Any]:
    """The GPU facts a reader needs besides `environment()`."""
    if not torch.cuda.is_available():
        return {"cuda": None}
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    props = torch.cuda.get_device_properties(0)
    return {"cuda": torch.version.cuda, "gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "sms": props.multi_processor_count, "triton": triton_version,
            "memory_method_cuda": "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus "
                                  "memory_allocated before the call",
            "timing_cuda": "CUDA events, median of the repeats after one warm-up call"}


def format_cuda_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table of the GPU rows: each path's median ms and peak extra MiB; x: path time / triton time."""
    header = ["method", "K", "D", "N"] + [f"{name}{unit}" for name in CUDA_PATHS for unit in (" ms", " MiB")]
    header += ["xchunked", "xcdist", "xmatmul"]
    lines = [header]
    for r in rows:
        cells = [r["method"], f"{r['codebook_size']:,}", str(r["dim"]), str(r["tokens"])]
        for name in CUDA_PATHS:
            cells += [_fmt(r.get(name, {}).get("forward_ms")), _fmt(r.get(name, {}).get("peak_mib"))]
        ratios = r["ratios"]
        cells += [_fmt(ratios["chunked_over_triton"], 2), _fmt(ratios["cdist_over_triton"], 2),
                  _fmt(ratios["matmul_over_triton"], 2)]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines]
    notes = sorted({n for r in rows for n in r["notes"]})
    footer = ["", "times: median ms (CUDA events); MiB: peak extra GPU memory; x<path>: its time / triton's "
              "(> 1: triton faster); *_tf32: torch.set_float32_matmul_precision('high')",
              "search rows: nearest_code forward; ibq_step rows: forward + backward with the entropy penalty (MiB "
              "includes dz and dE); matmul: one bare z @ E^T (the floor of any exact method)"]
    return "\n".join(text + footer + [f"note: {n}" for n in notes])
