"""The output head's cross-entropy over K codes (vqtok.kernels.cross_entropy, issue 15): the chunked autograd
Function against the dense F.cross_entropy reference and float64, ignore_index, reductions, the registry's choice and
forcing, and that the chunked path never holds an (N, K) tensor."""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from vqtok import kernels
from vqtok.kernels.chunking import cross_entropy_code_chunk
from vqtok.kernels.cross_entropy import cross_entropy_chunked, cross_entropy_dense

ce = importlib.import_module("vqtok.kernels.cross_entropy")  # the module: the attribute kernels.cross_entropy is the op

# (N, K, D, code_chunk): N = 1, chunks that do not divide K (a short last chunk), chunk 1, one chunk (= K, > K), the
# automatic chunk.
SHAPES = [(1, 7, 4, 3), (37, 131, 16, 10), (20, 50, 8, 1), (33, 64, 8, 64), (16, 40, 8, 1000), (50, 300, 32, None)]


def data(N: int, K: int, D: int, seed: int = 0, scale: float = 1.0, ignored: int = 0):
    """hidden (N, D), weight (K, D), bias (K,), upstream gradient (N,): float64; targets (N,) int64 with the first and
    last code among them where N allows, and `ignored` rows set to -100."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64) * scale
    weight = torch.randn(K, D, generator=g, dtype=torch.float64) * scale
    bias = torch.randn(K, generator=g, dtype=torch.float64)
    targets = torch.randint(0, K, (N,), generator=g)
    targets[: min(N, 2)] = torch.tensor([0, K - 1])[: min(N, 2)]
    targets[torch.randperm(N, generator=g)[:ignored]] = -100
    return hidden, weight, bias, targets, torch.randn(N, generator=g, dtype=torch.float64)


def run(fn, hidden, weight, bias, targets, upstream, dtype=torch.float32, **kw):
    """The per-token loss and the gradients of sum(loss * upstream) w.r.t. hidden, weight, bias (None: no bias)."""
    leaves = [None if t is None else t.to(dtype).clone().requires_grad_() for t in (hidden, weight, bias)]
    loss = fn(leaves[0], leaves[1], leaves[2], targets, **kw)
    (loss * upstream.to(loss.dtype)).sum().backward()
    return [loss.detach()] + [None if t is None else t.grad for t in leaves]


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the reference's largest entry."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def assert_close(out, ref, loss_tol: float = 1e-6, grad_tol: float = 1e-5) -> None:
    assert max_error(out[0], ref[0]) <= loss_tol
    for grad, ref_grad in zip(out[1:], ref[1:]):
        assert (grad is None) == (ref_grad is None)
        if grad is not None:
            assert max_error(grad, ref_grad) <= grad_tol


class OpOutputs(TorchDispatchMode):
    """Records the shape of every float tensor an aten op returns, and the largest element count (this thread only;
    Triton's interpreter moves kernel arguments as byte tensors, which are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(value, torch.Tensor) and value.dtype.is_floating_point:
                self.largest = max(self.largest, value.numel())
                self.shapes.add(tuple(value.shape))
        return out


@contextlib.contextmanager
def one_thread():
    """One worker: the chunks run in this thread, where the dispatch mode sees every op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# -- values and gradients ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("N,K,D,chunk", SHAPES)
def test_chunked_equals_the_dense_reference_in_fp32(N, K, D, chunk, with_bias):
    hidden, weight, bias, targets, upstream = data(N, K, D, ignored=N // 5)
    bias = bias if with_bias else None
    ref = run(cross_entropy_dense, hidden, weight, bias, targets, upstream)
    out = run(cross_entropy_chunked, hidden, weight, bias, targets, upstream, code_chunk=chunk)
    assert out[0].dtype == torch.float32 and all(g is None or g.dtype == torch.float32 for g in out[1:])
    assert_close(out, ref)


@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])
def test_both_paths_equal_the_float64_reference(scale):
    """scale 30: logits in the thousands (the log-sum-exp must not overflow), p one-hot up to e^-64 per chunk."""
    hidden, weight, bias, targets, upstream = data(29, 203, 16, seed=1, scale=scale, ignored=4)
    ref = run(cross_entropy_dense, hidden, weight, bias, targets, upstream, dtype=torch.float64)
    for fn, kw in ((cross_entropy_chunked, {"code_chunk": 50}), (cross_entropy_dense, {})):
        out = run(fn, hidden, weight, bias, targets, upstream, **kw)
        assert_close(out, ref, loss_tol=1e-6, grad_tol=1e-5)
    out64 = run(cross_entropy_chunked, hidden, weight, bias, targets, upstream, dtype=torch.float64, code_chunk=50)
    assert out64[0].dtype == torch.float64
    assert_close(out64, ref, loss_tol=1e-13, grad_tol=1e-12)


def test_several_workers_merge_to_the_same_result():
    """Three worker threads (each a strided share of the chunks) merge their log-sum-exps and target logits."""
    hidden, weight, bias, targets, upstream = data(40, 257, 8, seed=2, ignored=3)
    ref = run(cross_entropy_dense, hidden, weight, bias, targets, upstream)
    threads = torch.get_num_threads()
    try:
        for workers in (1, 3):
            torch.set_num_threads(workers)
            assert_close(run(cross_entropy_chunked, hidden, weight, bias, targets, upstream, code_chunk=16), ref)
    finally:
        torch.set_num_threads(threads)


def test_ignored_rows_have_zero_loss_and_no_gradient():
    hidden, weight, bias, targets, upstream = data(30, 90, 8, seed=3)
    targets[[4, 5, 17]] = -100
    targets[9] = 7  # ignore_index below is 7: a valid code id, ignored like any other
    for fn, kw in ((cross_entropy_chunked, {"code_chunk": 16}), (cross_entropy_dense, {})):
        out = run(fn, hidden, weight, bias, targets, upstream, ignore_index=-100, **kw)
        assert torch.all(out[0][[4, 5, 17]] == 0) and torch.all(out[1][[4, 5, 17]] == 0)
        assert torch.all(out[0][[0, 1, 9]] > 0)
        # dropping the ignored rows changes no gradient of the weight and bias
        keep = targets != -100
        kept = run(fn, hidden[keep], weight, bias, targets[keep], upstream[keep], **kw)
        assert_close([out[0][keep], out[1][keep], out[2], out[3]], kept)
    other = targets.clone()
    other[[4, 5, 17]] = 3
    ref = run(cross_entropy_dense, hidden, weight, bias, other, upstream, ignore_index=7)
    out = run(cross_entropy_chunked, hidden, weight, bias, other, upstream, ignore_index=7, code_chunk=16)
    assert out[0][9] == 0 and torch.all(out[1][9] == 0)
    assert_close(out, ref)


@pytest.mark.parametrize("backend", ["chunked", "dense"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_equal_torch_cross_entropy(backend, reduction):
    hidden, weight, bias, targets, _ = data(25, 70, 8, seed=4, ignored=6)
    h, w, b = (t.float().requires_grad_() for t in (hidden, weight, bias))
    loss = kernels.cross_entropy(h, w, b, targets, reduction=reduction, code_chunk=16, backend=backend)
    hr, wr, br = (t.float().requires_grad_() for t in (hidden, weight, bias))
    ref = F.cross_entropy(hr @ wr.T + br, targets, reduction=reduction)
    assert loss.shape == ref.shape and max_error(loss.detach(), ref.detach()) <= 1e-6
    (loss.sum() if reduction == "none" else loss).backward()
    (ref.sum() if reduction == "none" else ref).backward()
    for grad, ref_grad in ((h.grad, hr.grad), (w.grad, wr.grad), (b.grad, br.grad)):
        assert max_error(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("backend", ["chunked", "dense"])
def test_every_row_ignored_gives_torchs_nan_mean_zero_sum_and_zero_gradients(backend):
    hidden, weight, bias, targets, _ = data(6, 20, 4, seed=5)
    targets[:] = -100
    h = hidden.float().requires_grad_()
    assert torch.isnan(kernels.cross_entropy(h, weight.float(), bias.float(), targets, backend=backend))
    assert torch.isnan(F.cross_entropy(h.detach() @ weight.float().T, targets))
    total = kernels.cross_entropy(h, weight.float(), bias.float(), targets, reduction="sum", backend=backend)
    total.backward()
    assert total == 0 and torch.all(h.grad == 0)


def test_bf16_hidden_under_autocast_is_computed_in_fp32_and_gradients_keep_their_dtypes():
    hidden, weight, bias, targets, upstream = data(24, 100, 16, seed=6, ignored=2)
    hb = hidden.to(torch.bfloat16)
    ref = run(cross_entropy_dense, hb.float(), weight, bias, targets, upstream)  # the bf16 values, in fp32
    for fn in (cross_entropy_chunked, cross_entropy_dense):
        h = hb.clone().requires_grad_()
        w, b = weight.float().requires_grad_(), bias.float().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            kw = {"code_chunk": 32} if fn is cross_entropy_chunked else {}
            loss = fn(h, w, b, targets, **kw)
        (loss * upstream.float()).sum().backward()
        assert loss.dtype == torch.float32 and h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
        assert max_error(loss.detach(), ref[0]) <= 1e-6
        assert max_error(w.grad, ref[2]) <= 1e-5 and max_error(b.grad, ref[3]) <= 1e-5
        assert max_error(h.grad.float(), ref[1]) <= 1e-2  # rounded to bf16 on the way out


def test_only_the_gradients_asked_for_are_computed():
    """A frozen head: the backward computes dh alone, no (K, D) or (K,) gradient buffer."""
    hidden, weight, bias, targets, upstream = data(20, 60, 8, seed=7)
    ref = run(cross_entropy_dense, hidden, weight, bias, targets, upstream)
    h = hidden.float().requires_grad_()
    w, b = weight.float(), bias.float()  # a frozen head
    loss = cross_entropy_chunked(h, w, b, targets, code_chunk=16)
    with one_thread(), OpOutputs() as probe:
        (loss * upstream.float()).sum().backward()
    assert max_error(h.grad, ref[1]) <= 1e-5 and w.grad is None and b.grad is None
    assert probe.shapes and not {(60, 8), (60,)} & probe.shapes
    w = weight.float().requires_grad_()
    (cross_entropy_chunked(hidden.float(), w, b, targets, code_chunk=16) * upstream.float()).sum().backward()
    assert max_error(w.grad, ref[2]) <= 1e-5


def test_bad_inputs_are_refused():
    hidden, weight, bias, targets, _ = (t.float() if t.is_floating_point() else t for t in data(5, 9, 4))
    for fn in (cross_entropy_chunked, cross_entropy_dense, kernels.cross_entropy):
        with pytest.raises(ValueError, match=r"\(N, d\)"):
            fn(hidden, weight[:, :3], bias, targets)
        with pytest.raises(ValueError, match="bias"):
            fn(hidden, weight, bias[:4], targets)
        with pytest.raises(ValueError, match="targets"):
            fn(hidden, weight, bias, targets[:4])
        with pytest.raises(ValueError, match="integer"):
            fn(hidden, weight, bias, targets.float())
        with pytest.raises(ValueError, match="target 9 is outside"):
            fn(hidden, weight, bias, torch.tensor([0, 1, 9, 2, -100]))
        with pytest.raises(ValueError, match="K = 0"):
            fn(hidden, weight[:0], None, torch.full((5,), -100))
    with pytest.raises(ValueError, match="positive"):
        cross_entropy_chunked(hidden, weight, bias, targets, code_chunk=0)
    with pytest.raises(ValueError, match="positive"):
        kernels.cross_entropy(hidden, weight, bias, targets, code_chunk=0, backend="dense")
    with pytest.raises(ValueError, match="reduction 'avg'"):
        kernels.cross_entropy(hidden, weight, bias, targets, reduction="avg")


# -- no (N, K) tensor -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,holds_logits", [("chunked", False), ("triton", False), ("dense", True)])
def test_the_chunked_path_never_holds_an_n_by_k_tensor(backend, holds_logits, request):
    """Every op output in the forward and backward, and everything autograd saves, stays below N x K elements in
    the chunked path: at most one (N, chunk) logits block or the (K, D) weight gradient (the Triton backend: its
    torch side, (splits, N) statistics and (splits, N, D) partial sums). The dense path shows that both probes see
    the (N, K) logits."""
    N, K, D, chunk = 64, 4096, 16, 128
    if backend == "triton":
        request.getfixturevalue("triton_ce")
        if torch.cuda.is_available():
            pytest.skip("the probes run on CPU tensors")
        N, K = 40, 1000  # the interpreter is slow; chunk 128 still gives 8 splits
    hidden, weight, bias, targets, upstream = (t.float() if t.is_floating_point() else t for t in data(N, K, D))
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    saved: list[int] = []
    with one_thread(), OpOutputs() as probe:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = kernels.cross_entropy(h, w, b, targets, code_chunk=chunk, backend=backend)
        loss.backward()
    assert h.grad is not None and w.grad is not None and b.grad is not None
    if holds_logits:
        assert probe.largest >= N * K and max(saved) >= N * K
    else:
        assert probe.largest <= max(N * chunk, K * D) < N * K
        assert max(saved) <= K * D


def test_the_default_chunk_keeps_the_logits_block_small_at_the_gpt_scale():
    chunk = cross_entropy_code_chunk(8192, 100_000)
    assert 64 <= chunk < 100_000 and 8192 * chunk <= 4 * 1024 * 1024
    assert cross_entropy_code_chunk(10, 50) == 50  # never more than K
    assert cross_entropy_code_chunk(8192, 100_000, code_chunk=300) == 300


# -- the registry -----------------------------------------------------------------------------------------------------
def meta_inputs(N: int, K: int, D: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.empty(N, D, device="meta"), torch.empty(K, D, device="meta"),
            torch.empty(N, dtype=torch.long, device="meta"))


@pytest.mark.parametrize("N,K,expected", [(64, 16_384, "dense"), (64, 16_385, "chunked"), (1, 5, "dense"),
                                          (8192, 100_000, "chunked")])
def test_the_automatic_choice_is_dense_while_the_logits_are_small(N, K, expected):
    hidden, weight, targets = meta_inputs(N, K)
    assert kernels.choose("cross_entropy", hidden, weight, targets=targets) == expected
    assert kernels.backends("cross_entropy")[-1] == "dense"


def test_use_and_backend_force_a_cross_entropy_backend(monkeypatch):
    hidden, weight, bias, targets, _ = (t.float() if t.is_floating_point() else t for t in data(12, 40, 4, seed=8))
    calls = []
    for name, fn in (("chunked", "cross_entropy_chunked"), ("dense", "cross_entropy_dense")):
        real = getattr(ce, fn)
        monkeypatch.setattr(kernels.registry, fn, lambda *a, _real=real, _name=name, **kw: calls.append(_name)
                            or _real(*a, **kw))
    ref = kernels.cross_entropy(hidden, weight, bias, targets, reduction="none")
    with kernels.use("cross_entropy", "chunked"):
        assert kernels.choose("cross_entropy", hidden, weight, targets=targets) == "chunked"
        forced = kernels.cross_entropy(hidden, weight, bias, targets, reduction="none", backend="dense")
    by_call = kernels.cross_entropy(hidden, weight, bias, targets, reduction="none", backend="chunked")
    assert calls == ["dense", "chunked", "chunked"]  # use() overrides a call's backend=
    assert max_error(forced, ref) <= 1e-6 and max_error(by_call, ref) <= 1e-6
    with pytest.raises(ValueError, match="'auto', 'triton', 'chunked', 'dense'"):
        kernels.cross_entropy(hidden, weight, bias, targets, backend="fused")


# -- the Triton kernel (kernels/triton/cross_entropy.py) ----------------------------------------------------------------
# Where torch sees no GPU the kernels run on CPU tensors through Triton's interpreter (tests/conftest.py sets
# TRITON_INTERPRET=1; tiny shapes, the fixed 16 x 32 tiles); on a GPU machine the same tests run compiled.
@pytest.fixture
def triton_ce():
    pytest.importorskip("triton")
    from vqtok.kernels import triton as triton_kernels
    if not torch.cuda.is_available() and not triton_kernels.interpreting():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    module = importlib.import_module("vqtok.kernels.triton.cross_entropy")
    if not torch.cuda.is_available() and not module.INTERPRET:
        pytest.skip("triton's kernels were imported without the interpreter")
    return module


def triton_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def on_device(fn, device: str):
    """fn on `device` tensors, results back on the CPU."""
    def call(hidden, weight, bias, targets, **kw):
        moved = [None if t is None else t.to(device) for t in (hidden, weight, bias, targets)]
        return fn(*moved, **kw).cpu()
    return call


def run_on(fn, device, hidden, weight, bias, targets, upstream, dtype=torch.float32, **kw):
    leaves = [None if t is None else t.to(device, dtype).clone().requires_grad_() for t in (hidden, weight, bias)]
    loss = fn(leaves[0], leaves[1], leaves[2], targets.to(device), **kw)
    (loss * upstream.to(device, loss.dtype)).sum().backward()
    return [loss.detach().cpu()] + [None if t is None else t.grad.cpu() for t in leaves]


# (N, K, D, code_chunk): N = 1, ragged N / K / D against the 16 x 32 tiles, D below the 16-wide padding, several code
# splits whose merge must equal one scan, a split shorter than a tile, the automatic split count.
TRITON_SHAPES = [(1, 3, 4, None), (5, 50, 8, None), (37, 130, 20, 40), (37, 130, 20, None), (5, 130, 8, 16),
                 (40, 64, 16, 32)]


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("N,K,D,chunk", TRITON_SHAPES)
def test_triton_equals_the_dense_reference_and_float64(triton_ce, N, K, D, chunk, with_bias):
    hidden, weight, bias, targets, upstream = data(N, K, D, seed=9, ignored=N // 5)
    bias = bias if with_bias else None
    ref64 = run(cross_entropy_dense, hidden, weight, bias, targets, upstream, dtype=torch.float64)
    ref = run(cross_entropy_dense, hidden, weight, bias, targets, upstream)
    out = run_on(triton_ce.cross_entropy_triton, triton_device(), hidden, weight, bias, targets, upstream,
                 code_chunk=chunk)
    assert out[0].dtype == torch.float32
    assert_close(out, ref)
    assert_close(out, ref64)


def test_triton_ignore_index_large_logits_and_a_frozen_head(triton_ce):
    device = triton_device()
    hidden, weight, bias, targets, upstream = data(30, 90, 8, seed=10, scale=4.0)  # logits in the hundreds
    targets[[4, 5, 17]] = 7  # ignore_index below: a valid code id, ignored like any other
    ref = run(cross_entropy_dense, hidden, weight, bias, targets, upstream, dtype=torch.float64, ignore_index=7)
    out = run_on(triton_ce.cross_entropy_triton, device, hidden, weight, bias, targets, upstream, ignore_index=7,
                 code_chunk=32)
    assert torch.all(out[0][[4, 5, 17]] == 0) and torch.all(out[1][[4, 5, 17]] == 0)
    assert_close(out, ref)
    h = hidden.to(device, torch.float32).requires_grad_()
    loss = triton_ce.cross_entropy_triton(h, weight.to(device, torch.float32), bias.to(device, torch.float32),
                                          targets.to(device), 7)
    (loss * upstream.to(device, torch.float32)).sum().backward()
    assert max_error(h.grad.cpu(), ref[1]) <= 1e-5


def test_triton_bf16_under_autocast_and_refusals(triton_ce):
    device = triton_device()
    hidden, weight, bias, targets, upstream = data(24, 100, 16, seed=11, ignored=2)
    hb = hidden.to(torch.bfloat16)
    ref = run(cross_entropy_dense, hb.float(), weight, bias, targets, upstream)
    h = hb.to(device).requires_grad_()
    w = weight.to(device, torch.float32).requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = triton_ce.cross_entropy_triton(h, w, bias.to(device, torch.float32), targets.to(device))
    (loss * upstream.to(device, torch.float32)).sum().backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    assert max_error(loss.detach().cpu(), ref[0]) <= 1e-6 and max_error(w.grad.cpu(), ref[2]) <= 1e-5
    with pytest.raises(ValueError, match="float64"):
        triton_ce.cross_entropy_triton(hidden.to(device), weight.to(device), None, targets.to(device))
    with pytest.raises(ValueError, match="positive"):
        triton_ce.cross_entropy_triton(h, w, None, targets.to(device), code_chunk=0)


def test_triton_is_registered_first_but_chosen_on_cuda_only(triton_ce):
    hidden, weight, bias, targets, _ = (t.float() if t.is_floating_point() else t for t in data(12, 40, 8, seed=12))
    assert kernels.backends("cross_entropy") == ("triton", "chunked", "dense")
    device = triton_device()
    hidden, weight, bias, targets = (t.to(device) for t in (hidden, weight, bias, targets))
    with kernels.use("cross_entropy", "triton"):
        assert kernels.choose("cross_entropy", hidden, weight, bias=bias, targets=targets) == "triton"
        loss = kernels.cross_entropy(hidden, weight, bias, targets)
    ref = kernels.cross_entropy(hidden, weight, bias, targets, backend="dense")
    assert max_error(loss.cpu(), ref.cpu()) <= 1e-6
    expected = "triton" if device == "cuda" else "dense"
    assert kernels.choose("cross_entropy", hidden, weight, bias=bias, targets=targets) == expected
    with pytest.raises(ValueError, match="backend 'triton' was forced but does not apply"):
        kernels.cross_entropy(hidden.double(), weight.double(), None, targets, backend="triton")


def test_vqtok_bench_times_the_head_on_both_backends():
    from vqtok import bench

    config = bench.BenchConfig(methods=("ce_head",), sizes=(300,), dims=(8,), tokens=32, repeats=1)
    row = bench.bench_row("ce_head", 300, 8, config)
    for path in ("chunked", "dense", "matmul"):
        assert row[path]["forward_ms"] > 0 and row[path]["error"] is None
    assert row["chunked"]["forward_backward_ms"] > 0 and row["dense"]["forward_backward_ms"] > 0
    assert "ce_head" in bench.EXTRA_CASES and "ce_head" not in bench.CASES  # timed on request only
