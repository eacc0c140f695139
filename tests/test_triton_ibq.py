"""The Triton IBQ step (vqtok.kernels.triton.ibq) against the chunked path and the float64 dense reference.

Where torch sees no GPU the kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set here
before triton or vqtok is imported; tiny shapes, one fixed block config); on a GPU machine the same tests run
compiled on CUDA tensors, plus the `cuda` tests at the paper's scale.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

from vqtok.kernels import ibq_chunked, ibq_dense  # noqa: E402
from vqtok.kernels.triton import ibq as triton_ibq  # noqa: E402
from vqtok.kernels.triton.ibq import ibq_triton  # noqa: E402

DEVICE = torch.device("cpu" if triton_ibq.INTERPRET else "cuda")
# (N, K, D, scale, code_chunk): N = 1, ragged N / K / D against the 16 x 32 tiles, D below the 16-wide padding,
# several code splits (code_chunk) whose merge must equal one scan, a split shorter than a tile.
SHAPES = [
    (1, 3, 4, 1.0, None), (5, 50, 8, 0.5, None), (37, 130, 20, 0.5, None), (37, 130, 20, 1.0, 40),
    (5, 130, 8, 0.5, 16), (37, 50, 4, 1.0, 32),
]


def data(N: int, K: int, D: int, scale: float = 0.5, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """z (N, D), codebook (K, D), upstream gradient (N, D): float64 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, D, generator=g, dtype=torch.float64) * scale
    codebook = torch.randn(K, D, generator=g, dtype=torch.float64) * scale
    return z, codebook, torch.randn(N, D, generator=g, dtype=torch.float64)


def step(fn, z, codebook, grad, sample_weight: float, codebook_weight: float, device=DEVICE, dtype=torch.float32,
         **kw):
    """Values and gradients (float64, on the CPU) of sum(z_q * grad) + sum(hard * grad^2) + sample_weight * S -
    codebook_weight * C; the hard path gets its own upstream gradient so a mix-up with z_q's would show."""
    z = z.to(device, dtype).detach().clone().requires_grad_()
    codebook = codebook.to(device, dtype).detach().clone().requires_grad_()
    grad = grad.to(device, dtype)
    result = fn(z, codebook, **kw)
    loss = (result.z_q * grad).sum() + (result.hard * grad.square()).sum()
    if sample_weight:
        loss = loss + sample_weight * result.sample_entropy
    if codebook_weight:
        loss = loss - codebook_weight * result.codebook_entropy
    loss.backward()
    values = result._replace(**{name: getattr(result, name).detach().cpu() for name in result._fields})
    return values, z.grad.cpu().double(), codebook.grad.cpu().double()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def assert_same_step(out, dz, de, ref, ref_dz, ref_de, entropy: bool = True, tol: float = 1e-5) -> None:
    assert torch.equal(out.indices, ref.indices)
    codes = ref.z_q.to(out.z_q.dtype)  # exactly the codes e_k*, as stored in the computing dtype
    assert torch.equal(out.z_q, codes) and torch.equal(out.hard, codes)
    if entropy:
        for name in ("sample_entropy", "codebook_entropy"):
            value, expected = float(getattr(out, name)), float(getattr(ref, name))
            assert abs(value - expected) <= 1e-5 * (1 + abs(expected))
    assert relative_error(dz, ref_dz) <= tol and relative_error(de, ref_de) <= tol


@pytest.mark.parametrize("weights", [(0.0, 0.0), (0.05, 0.05), (0.3, 0.0), (0.0, 0.05)])
@pytest.mark.parametrize("N,K,D,scale,chunk", SHAPES)
def test_values_and_gradients_equal_the_float64_reference_and_the_chunked_path(N, K, D, scale, chunk, weights):
    """Each entropy term alone and both (the codebook term alone runs <q_n, c>'s kernel without the sample term).
    The bound 1e-5 against float64 is a few times what the dense path in fp32 measures here (<= 3e-6)."""
    z, codebook, grad = data(N, K, D, scale)
    ref = step(ibq_dense, z, codebook, grad, *weights, device="cpu", dtype=torch.float64)
    chunked = step(ibq_chunked, z, codebook, grad, *weights, device="cpu")
    out = step(ibq_triton, z, codebook, grad, *weights, code_chunk=chunk)
    assert_same_step(*out, *ref)
    assert_same_step(*out, *chunked)
    assert out[0].z_q.dtype == torch.float32 and out[0].indices.dtype == torch.int64


@pytest.mark.parametrize("temperature", [0.5, 0.003])
def test_other_temperatures(temperature):
    z, codebook, grad = data(37, 130, 20, scale=0.5, seed=1)
    ref = step(ibq_dense, z, codebook, grad, 0.1, 0.1, device="cpu", dtype=torch.float64, temperature=temperature)
    out = step(ibq_triton, z, codebook, grad, 0.1, 0.1, temperature=temperature, code_chunk=64)
    assert_same_step(*out, *ref)


def test_entropy_off_returns_nan_entropies_and_the_same_z_q_gradients():
    z, codebook, grad = data(37, 130, 20, seed=2)
    ref = step(ibq_dense, z, codebook, grad, 0.0, 0.0, device="cpu", dtype=torch.float64)
    out = step(ibq_triton, z, codebook, grad, 0.0, 0.0, entropy=False)
    assert torch.isnan(out[0].sample_entropy) and torch.isnan(out[0].codebook_entropy)
    assert_same_step(*out, *ref, entropy=False)


@pytest.mark.parametrize("chunk", [None, 32])
def test_ties_go_to_the_lowest_index_within_a_tile_across_tiles_and_across_splits(chunk):
    """Integer-valued codes and z / 8, so every logit is exact: code 3's row is repeated at 5 (same tile), 40 and 100
    (later tiles; later splits with chunk=32) and is the best of tokens 0, 3, 4, 5; tokens 1 and 2 tie among 70,
    71 (the same tile) and 120 (a later tile and split)."""
    g = torch.Generator().manual_seed(3)
    codebook = torch.randint(-1, 2, (130, 8), generator=g).double()
    best = torch.tensor([3.0, -3, 3, 3, -3, 3, -3, 3], dtype=torch.float64)
    codebook[[3, 5, 40, 100]] = best
    z = best.repeat(6, 1)  # (6, 8)
    codebook[[70, 71, 120]] = torch.tensor([0.0, 3, 3, -3, 3, 3, 3, 3], dtype=torch.float64)
    z[1] = z[2] = codebook[70]
    codebook[120] = codebook[71] = codebook[70]
    z = z / 8  # p is not one-hot (best's logit 9, any other at most 3), q is
    grad = data(6, 130, 8, seed=3)[2]
    ref = step(ibq_dense, z, codebook, grad, 0.05, 0.05, device="cpu", dtype=torch.float64)
    out = step(ibq_triton, z, codebook, grad, 0.05, 0.05, code_chunk=chunk)
    assert out[0].indices.tolist() == [3, 70, 70, 3, 3, 3]
    # q is split evenly among the tied codes: the entropy terms cancel more than elsewhere (fp32 dense: 2e-5).
    assert_same_step(*out, *ref, tol=1e-4)


def test_only_the_needed_gradients_and_low_precision_inputs():
    z, codebook, grad = data(37, 50, 8, seed=4)
    # z alone requires grad: no dE kernel; the codebook's rows k* still carry z_q's value.
    zz = z.float().to(DEVICE).requires_grad_()
    out = ibq_triton(zz, codebook.float().to(DEVICE))
    (out.z_q * grad.float().to(DEVICE)).sum().add(out.sample_entropy).backward()
    zr = z.clone().requires_grad_()
    ref = ibq_dense(zr, codebook)
    (ref.z_q * grad).sum().add(ref.sample_entropy).backward()
    assert relative_error(zz.grad.cpu(), zr.grad) <= 1e-5
    # bf16 inputs are computed in fp32 and come back in bf16, gradients too.
    zb = z.to(DEVICE, torch.bfloat16).requires_grad_()
    cb = codebook.to(DEVICE, torch.bfloat16).requires_grad_()
    out = ibq_triton(zb, cb)
    assert out.z_q.dtype == torch.bfloat16
    assert torch.equal(out.indices.cpu(), ibq_dense(zb.detach().float().cpu(), cb.detach().float().cpu()).indices)
    (out.z_q.float().sum() + out.codebook_entropy).backward()
    assert zb.grad.dtype == torch.bfloat16 and cb.grad.dtype == torch.bfloat16


def test_bad_input_is_refused():
    z, codebook, _ = data(4, 6, 3)
    with pytest.raises(ValueError, match="float64"):
        ibq_triton(z.to(DEVICE), codebook.to(DEVICE))
    z, codebook = z.float().to(DEVICE), codebook.float().to(DEVICE)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        ibq_triton(z, codebook[:, :2])
    with pytest.raises(ValueError, match="temperature"):
        ibq_triton(z, codebook, temperature=0.0)
    with pytest.raises(ValueError, match="positive"):
        ibq_triton(z, codebook, code_chunk=0)
    with pytest.raises(ValueError, match="at least one"):
        ibq_triton(z[:0], codebook)


# -- on a GPU, at the paper's scale -----------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def paper_scale_errors(precision: str) -> tuple[float, float, bool]:
    """(dz, dE relative errors against float64, indices equal) at N = 2048, K = 2^16, D = 256, z and E ~ N(0, 1),
    the entropy penalty on, fp32 matmuls at the given torch float32 matmul precision."""
    z, codebook, grad = (t.cuda() for t in data(2048, 65536, 256, scale=1.0, seed=5))
    ref = step(ibq_chunked, z, codebook, grad, 0.05, 0.05, device="cuda", dtype=torch.float64)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        out = step(ibq_triton, z, codebook, grad, 0.05, 0.05, device="cuda")
    finally:
        torch.set_float32_matmul_precision(previous)
    return relative_error(out[1], ref[1]), relative_error(out[2], ref[2]), torch.equal(out[0].indices, ref[0].indices)


@pytest.mark.cuda
@cuda
def test_paper_scale_fp32_gradients_match_float64():
    dz_error, de_error, same_indices = paper_scale_errors("highest")
    print(f"ieee: dz {dz_error:.2e} dE {de_error:.2e}")
    assert same_indices and dz_error <= 1e-3 and de_error <= 1e-3


@pytest.mark.cuda
@cuda
def test_paper_scale_tf32_report_only():
    dz_error, de_error, same_indices = paper_scale_errors("high")
    print(f"tf32: dz {dz_error:.2e} dE {de_error:.2e} same indices {same_indices}")
