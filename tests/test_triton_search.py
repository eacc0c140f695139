"""The Triton search kernels (vqtok.kernels.triton.search) against the chunked torch path and a float64 reference.

On a machine without a GPU they run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set here
before triton is imported: tiny shapes, one small fixed block config). Where torch sees a GPU the variable is left
alone, so that the tests marked `cuda` run the compiled kernels; the interpreter tests then skip.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton (and the kernel module) is imported

pytest.importorskip("triton")

from vqtok import build_quantizer, kernels  # noqa: E402
from vqtok.kernels import registry  # noqa: E402
from vqtok.kernels.search import max_inner_product_chunked, nearest_code_chunked  # noqa: E402
from vqtok.kernels.triton import search as triton_search  # noqa: E402
from vqtok.kernels.triton.search import max_inner_product_triton, nearest_code_triton  # noqa: E402

interpreter = pytest.mark.skipif(not triton_search.INTERPRET, reason="runs the kernels on the CPU through the "
                                 "interpreter, which TRITON_INTERPRET=1 turns on (set where torch sees no GPU)")

SEARCH_OPS = ("nearest_code", "max_inner_product")
TRITON = {"nearest_code": nearest_code_triton, "max_inner_product": max_inner_product_triton}
CHUNKED = {"nearest_code": nearest_code_chunked, "max_inner_product": max_inner_product_chunked}


def scores64(op: str, z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(N, K) float64 scores, lower is better: squared distances, or minus the inner products."""
    z, codebook = z.double(), codebook.double()
    if op == "nearest_code":
        return (z[:, None, :] - codebook[None, :, :]).pow(2).sum(-1)
    return -(z @ codebook.T)


def reference64(op: str, z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 indices (first index on ties) and values of the search."""
    s = scores64(op, z, codebook)
    index = s.argmin(dim=1)
    best = s.gather(1, index[:, None]).squeeze(1)
    return index, best if op == "nearest_code" else -best


def assert_close_search(op: str, z, codebook, index, value, rel: float = 1e-5) -> int:
    """Indices equal the float64 reference's except where the picked code is as good to rounding (returns how
    many such near-ties there were); values match the picked code's float64 value."""
    s = scores64(op, z, codebook)
    ref_index, _ = reference64(op, z, codebook)
    scale = float(z.double().pow(2).sum(1).max() + codebook.double().pow(2).sum(1).max())
    picked = s.gather(1, index[:, None].cpu()).squeeze(1)
    gap = picked - s.min(dim=1).values
    assert float(gap.max()) <= rel * scale, "a pick is worse than the best code beyond rounding"
    expected = picked if op == "nearest_code" else -picked
    assert torch.allclose(value.double().cpu(), expected, rtol=0, atol=rel * scale)
    return int((index.cpu() != ref_index).sum())


# -- ragged shapes: triton == chunked == float64 --------------------------------------------------------------------
SHAPES = [(N, K, (3, 8, 17, 64)[i % 4]) for i, (N, K) in enumerate((N, K) for N in (1, 7, 33) for K in (1, 5, 100, 300))]
SHAPES += [(7, 100, D) for D in (3, 8, 17, 64)]


@interpreter
@pytest.mark.parametrize("N,K,D", SHAPES, ids=[f"N{N}-K{K}-D{D}" for N, K, D in SHAPES])
def test_ragged_shapes_equal_chunked_and_float64(N, K, D):
    g = torch.Generator().manual_seed(N * 1000 + K + D)
    z, codebook = torch.randn(N, D, generator=g), torch.randn(K, D, generator=g)
    for op in SEARCH_OPS:
        index, value = TRITON[op](z, codebook)
        chunked_index, chunked_value = CHUNKED[op](z, codebook)
        assert index.dtype == torch.int64 and index.shape == (N,) and value.dtype == torch.float32
        assert torch.equal(index, chunked_index), op
        assert torch.allclose(value, chunked_value, rtol=1e-5, atol=1e-5), op
        assert assert_close_search(op, z, codebook, index, value) == 0, op


@interpreter
def test_several_splits_and_token_blocks_equal_one():
    """The partial results of code splits merge to the single-split answer (N spans several token blocks)."""
    g = torch.Generator().manual_seed(3)
    z, codebook = torch.randn(40, 12, generator=g), torch.randn(300, 12, generator=g)
    for op in SEARCH_OPS:
        one = TRITON[op](z, codebook, splits=1)
        for splits in (2, 3, 7, 20):  # 20: more splits than tiles, some of them empty
            many = TRITON[op](z, codebook, splits=splits)
            assert torch.equal(many[0], one[0]) and torch.equal(many[1], one[1]), (op, splits)
        assert torch.equal(one[0], reference64(op, z, codebook)[0])


# -- exact ties: the lowest index wins, within a tile, across tiles and across splits -------------------------------------
def tie_inputs(K: int = 300, D: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Small integer vectors: every score is exact in fp32, so equal scores are exact ties in any summation order.
    Code 10 repeats at 20 (same tile), 100 and 290 (other splits); tokens 0..2 are copies of code 10."""
    g = torch.Generator().manual_seed(7)
    codebook = torch.randint(-3, 4, (K, D), generator=g).float()
    codebook[[20, 100, 290]] = codebook[10].clone()
    z = torch.cat([codebook[[10, 10, 10]], torch.randint(-3, 4, (30, D), generator=g).float()])
    return z, codebook


@interpreter
@pytest.mark.parametrize("op", SEARCH_OPS)
@pytest.mark.parametrize("splits", [1, 4, None])
def test_exact_ties_go_to_the_lowest_index(op, splits):
    z, codebook = tie_inputs()
    index, value = TRITON[op](z, codebook, splits=splits)
    ref_index, ref_value = reference64(op, z, codebook)
    assert torch.equal(index, ref_index) and torch.equal(value.double(), ref_value)
    if op == "nearest_code":
        assert index[:3].tolist() == [10, 10, 10] and value[:3].tolist() == [0.0, 0.0, 0.0]
    # the inputs do hold ties across splits: some token's best score is shared by codes 96 or more apart
    s = scores64(op, z, codebook)
    holders = s == s.min(dim=1, keepdim=True).values
    spread = [int(row.nonzero().max() - row.nonzero().min()) for row in holders]
    assert max(spread) >= 96 and sum(int(row.sum()) > 1 for row in holders) >= 5


@interpreter
@pytest.mark.parametrize("op", SEARCH_OPS)
def test_a_single_token_against_duplicates_in_every_split(op):
    z, codebook = tie_inputs()
    codebook[::7] = codebook[3].clone()  # code 3 repeats every 7 codes, in every tile and split (3 itself is one of them)
    token = codebook[3:4] * (1.0 if op == "nearest_code" else 100.0)
    index, _ = TRITON[op](token, codebook, splits=5)
    assert index.tolist() == reference64(op, token, codebook)[0].tolist()
    if op == "nearest_code":
        assert index.tolist() == [0]  # code 0 is a copy too (0 = 0 * 7), and it comes first


# -- inputs and precision ---------------------------------------------------------------------------------------------
@interpreter
def test_low_precision_inputs_are_upcast_and_float64_is_refused():
    g = torch.Generator().manual_seed(5)
    z, codebook = torch.randn(9, 16, generator=g), torch.randn(50, 16, generator=g)
    for op in SEARCH_OPS:
        half = TRITON[op](z.half(), codebook.half())
        assert torch.equal(half[0], CHUNKED[op](z.half(), codebook.half())[0]) and half[1].dtype == torch.float32
        with pytest.raises(ValueError, match="float64"):
            TRITON[op](z.double(), codebook)
    assert len(nearest_code_triton(z[:0], codebook)[0]) == 0


def test_input_precision_follows_torch(monkeypatch):
    previous = torch.get_float32_matmul_precision()
    try:
        for setting, expected in (("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")):
            torch.set_float32_matmul_precision(setting)
            assert triton_search.input_precision() == expected
    finally:
        torch.set_float32_matmul_precision(previous)


# -- the registry ---------------------------------------------------------------------------------------------------
@interpreter
@pytest.mark.parametrize("op,shape,options,expected", [
    ("nearest_code", (64, 4096, 8), {"frozen_key": ("triton-test", 1)}, "kdtree"),
    ("nearest_code", (64, 100, 8), {}, "fused"),
    ("nearest_code", (64, 100, 33), {}, "chunked"),
    ("nearest_code", (64, 100, 8, torch.float64), {}, "chunked"),
    ("max_inner_product", (64, 100, 8), {}, "fused"),
    ("max_inner_product", (64, 100, 33), {}, "chunked"),
    ("nearest_code", (64, 100, 8, torch.float32, "meta"), {}, "chunked"),
])
def test_the_cpu_choice_ignores_the_interpreter(op, shape, options, expected):
    N, K, D, *rest = shape
    dtype, device = (rest + [torch.float32, "cpu"][len(rest):])[:2]
    z, codebook = torch.empty(N, D, dtype=dtype, device=device), torch.empty(K, D, dtype=dtype, device=device)
    assert os.environ["TRITON_INTERPRET"] == "1"
    assert kernels.choose(op, z, codebook, **options) == expected
    if device == "cpu" and dtype == torch.float32:  # forcing it works on the CPU under the interpreter
        assert kernels.choose(op, z, codebook, backend="triton") == "triton"


@interpreter
def test_triton_is_first_and_forcing_it_without_the_interpreter_says_why(monkeypatch):
    assert kernels.backends("nearest_code")[0] == "triton" and kernels.backends("max_inner_product")[0] == "triton"
    z, codebook = torch.randn(4, 8), torch.randn(10, 8)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for op in SEARCH_OPS:
        with pytest.raises(ValueError, match=f"{op} backend 'triton'.*TRITON_INTERPRET"):
            kernels.choose(op, z, codebook, backend="triton")
    monkeypatch.setattr(registry.triton_kernels, "available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="requires triton"):
        kernels.nearest_code(z, codebook, backend="triton")


def test_importing_vqtok_without_triton_never_needs_it():
    code = ("import sys; sys.modules['triton'] = None\n"  # `import triton` now fails, as if it were not installed
            "import torch, vqtok\nfrom vqtok import kernels\nfrom vqtok.kernels import registry\n"
            "z, e = torch.randn(4, 8), torch.randn(10, 8)\n"
            "assert not registry._triton_applies(z, e)\n"
            "assert kernels.choose('nearest_code', z, e) == 'fused'\n"
            "assert kernels.nearest_code(z, e)[0].shape == (4,)\n")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    check = "import sys, vqtok, vqtok.kernels; assert 'triton' not in sys.modules, 'vqtok imported triton'"
    subprocess.run([sys.executable, "-c", check], check=True, env=env, timeout=120)


# -- the quantizers ---------------------------------------------------------------------------------------------------
def quantizer(name: str, K: int, D: int) -> torch.nn.Module:
    torch.manual_seed(11)
    options = {"codebook": torch.randn(K, 12)} if name == "lc" else {}
    return build_quantizer(name, codebook_size=K, dim=D, **options)


def forced(backend: str):
    import contextlib

    stack = contextlib.ExitStack()
    for op in SEARCH_OPS:
        stack.enter_context(kernels.use(op, backend))
    return stack


@interpreter
@pytest.mark.parametrize("name", ["vq", "fc", "ema", "lc", "ibq"])
def test_every_quantizer_picks_the_same_codes_as_dense(name):
    K, D = 70, 8
    q = quantizer(name, K, D)
    z = torch.randn(1, D, 4, 5, generator=torch.Generator().manual_seed(2))  # N = 20 tokens
    for mode in ("eval", "train"):
        out = {}
        for backend in ("triton", "dense"):
            model = copy.deepcopy(q).train(mode == "train")
            with forced(backend), torch.no_grad():
                out[backend] = model(z).indices
        assert torch.equal(out["triton"], out["dense"]), (name, mode)


# -- CUDA -------------------------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("op", SEARCH_OPS)
@pytest.mark.parametrize("precision,rel,max_near_ties", [("highest", 1e-5, 40), ("high", 1e-3, 400)])
def test_cuda_search_against_float64(op, precision, rel, max_near_ties):
    """D = 256, K = 65,536, N = 4096: indices equal float64's except near-ties, which are few and within rounding."""
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(4096, 256, device="cuda", generator=g)
    codebook = torch.randn(65_536, 256, device="cuda", generator=g)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        assert kernels.choose(op, z, codebook) == "triton"
        index, value = getattr(kernels, op)(z, codebook)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert index.device.type == "cuda" and index.dtype == torch.int64 and value.dtype == torch.float32
    z64, e64 = z.double(), codebook.double()
    e_sq = e64.pow(2).sum(1)
    scale = float(z64.pow(2).sum(1).max() + e_sq.max())
    near = 0
    for n0 in range(0, 4096, 512):  # float64 scores a block of tokens at a time
        zb = z64[n0:n0 + 512]
        s = (zb.pow(2).sum(1, keepdim=True) - 2 * zb @ e64.T + e_sq) if op == "nearest_code" else -(zb @ e64.T)
        best, ref = s.min(dim=1)
        picked = s.gather(1, index[n0:n0 + 512, None]).squeeze(1)
        assert float((picked - best).max()) <= rel * scale
        expected = picked if op == "nearest_code" else -picked
        assert float((value[n0:n0 + 512].double() - expected).abs().max()) <= rel * scale
        near += int((index[n0:n0 + 512] != ref).sum())
    assert near <= max_near_ties, f"{near} picks differ from float64"


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("name", ["vq", "fc", "ema", "lc", "ibq"])
@pytest.mark.parametrize("D", [8, 256])
def test_cuda_quantizers_equal_the_cpu(name, D):
    q = quantizer(name, 4096, D).eval()
    z = torch.randn(2, D, 16, 16, generator=torch.Generator().manual_seed(4))
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.no_grad():
            cpu = q(z).indices
            gpu_model = copy.deepcopy(q).cuda()
            op = "max_inner_product" if name == "ibq" else "nearest_code"
            flat = z.permute(0, 2, 3, 1).reshape(-1, D).cuda()
            assert kernels.choose(op, flat, flat[:1]) == "triton"
            gpu = gpu_model(z.cuda()).indices.cpu()
    finally:
        torch.set_float32_matmul_precision(previous)
    assert (gpu != cpu).sum() <= 1, f"{int((gpu != cpu).sum())} of {cpu.numel()} codes differ"
