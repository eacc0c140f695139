"""The chunked IBQ autograd Function (vqtok.kernels.chunked_ibq) against the dense autograd reference `ibq_dense`."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from vqtok.kernels import chunked_ibq, chunking, ibq_chunked, ibq_dense
from vqtok.kernels.chunking import ibq_code_chunk
from vqtok.quantize import build_quantizer

# (N, K, D, code_chunk): N = 1, K not a multiple of the chunk, chunk 1, one chunk, the automatic chunk.
SHAPES = [(1, 7, 4, 3), (37, 100, 16, 7), (64, 300, 8, 1), (50, 129, 32, 64), (200, 1000, 16, None), (20, 50, 8, 50)]


def data(N: int, K: int, D: int, scale: float = 0.5, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, D, generator=g, dtype=torch.float64) * scale
    codebook = torch.randn(K, D, generator=g, dtype=torch.float64) * scale
    grad = torch.randn(N, D, generator=g, dtype=torch.float64)
    return z.to(dtype), codebook.to(dtype), grad.to(dtype)


def step(fn, z, codebook, grad, entropy_weight: float, **kw):
    """Values and gradients of sum(z_q * grad) + sum(hard * grad^2) + w * (sample entropy - codebook entropy),
    IBQ's penalty; the hard path h E gets its own upstream gradient so a mix-up with z_q's would show."""
    z = z.clone().requires_grad_()
    codebook = codebook.clone().requires_grad_()
    result = fn(z, codebook, **kw)
    loss = (result.z_q * grad).sum() + (result.hard * grad.square()).sum()
    if entropy_weight:
        loss = loss + entropy_weight * (result.sample_entropy - result.codebook_entropy)
    loss.backward()
    return result, z.grad, codebook.grad


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    """Equal to `tol` relative to the reference's largest entry."""
    return bool((a - b).abs().max() <= tol * b.abs().max().clamp_min(1e-30))


@pytest.fixture(params=["near", "second_pass"])
def entropy_route(request, monkeypatch):
    """Both ways the codebook entropy is computed: entries near each token's max, or a second pass over codes."""
    monkeypatch.setattr(chunked_ibq, "NEAR_PER_TOKEN", 10**9 if request.param == "near" else 0)
    return request.param


@pytest.mark.parametrize("entropy_weight", [0.0, 0.05])
@pytest.mark.parametrize("N,K,D,chunk", SHAPES)
def test_values_and_gradients_equal_the_dense_reference(N, K, D, chunk, entropy_weight, entropy_route):
    z, codebook, grad = data(N, K, D)
    ref, ref_dz, ref_de = step(ibq_dense, z, codebook, grad, entropy_weight)
    out, dz, de = step(ibq_chunked, z, codebook, grad, entropy_weight, code_chunk=chunk)
    assert torch.equal(out.indices, ref.indices)
    assert torch.equal(out.z_q, ref.z_q)  # exactly e_k*
    assert torch.allclose(out.sample_entropy, ref.sample_entropy, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.codebook_entropy, ref.codebook_entropy, rtol=1e-5, atol=1e-6)
    assert close(dz, ref_dz) and close(de, ref_de)


def test_sharp_logits_at_the_real_scale_match_the_dense_reference(entropy_route):
    """D = 256 and N(0, 1) codes as IBQ initialises them: q = softmax(l / 0.01) is one-hot up to e^-64."""
    z, codebook, grad = data(64, 700, 256, scale=1.0, seed=4)
    ref, ref_dz, ref_de = step(ibq_dense, z, codebook, grad, 0.05)
    out, dz, de = step(ibq_chunked, z, codebook, grad, 0.05, code_chunk=128)
    assert torch.equal(out.indices, ref.indices)
    assert torch.allclose(out.sample_entropy, ref.sample_entropy, atol=1e-5)
    assert torch.allclose(out.codebook_entropy, ref.codebook_entropy, rtol=1e-5)
    assert close(dz, ref_dz) and close(de, ref_de)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_fp32_gradients_with_the_entropy_penalty_at_the_paper_scale_match_float64():
    """K = 2^16 codes and tokens of D = 256, both N(0, 1) (N = 1024 to fit a CPU test): every term of the backward,
    including the T = 0.01 entropy terms, which turn a logit error d into an error d / T in log q. The reference is
    the chunked path in float64 (it equals the dense reference to ~1e-11, test above); a dense float64 run would
    hold several (N, K) tensors of 512 MiB. fp32 measures ~1e-5 here."""
    z, codebook, grad = data(1024, 65536, 256, scale=1.0, seed=5, dtype=torch.float64)
    ref, ref_dz, ref_de = step(ibq_chunked, z, codebook, grad, 0.05)
    out, dz, de = step(ibq_chunked, z.float(), codebook.float(), grad.float(), 0.05)
    assert torch.equal(out.indices, ref.indices)
    assert relative_error(dz, ref_dz) < 1e-4 and relative_error(de, ref_de) < 1e-4


def test_backward_computes_the_logits_exactly_as_the_forward_under_shape_dependent_rounding(monkeypatch):
    """The backward's log q = (l - m) / T - log q_sum mixes its recomputed logits with the forward's m and q_sum, so
    it must compute l exactly as the forward did. A matmul library may round a product differently for operands of
    another shape (cuBLAS picks its kernel by shape; this CPU's BLAS rounds every row alike, so without the fake
    below no CPU test could tell). Here torch.mm is exact for the tokens' row count N and adds rounding-sized noise
    (4e-6 relative) for any other: a backward that computed l in a product of another shape (say rows of a stacked
    [z; G] E^T) would be ~50x further from float64 than fp32 rounding (measured: 5e-4 against 8e-6)."""
    N = 64
    z, codebook, grad = data(N, 1024, 256, scale=1.0, seed=6, dtype=torch.float64)
    ref, ref_dz, ref_de = step(ibq_chunked, z, codebook, grad, 0.05, code_chunk=256)
    mm = torch.mm

    def shape_dependent_mm(a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        result = mm(a, b, out=out)
        if a.shape[0] == N:
            return result
        noise = torch.randn(result.shape, dtype=result.dtype,
                            generator=torch.Generator().manual_seed(a.shape[0] * 1_000_003 + b.shape[1]))
        return result.add_(noise.mul_(result.abs()).mul_(4e-6))

    monkeypatch.setattr(torch, "mm", shape_dependent_mm)
    out, dz, de = step(ibq_chunked, z.float(), codebook.float(), grad.float(), 0.05, code_chunk=256)
    assert torch.equal(out.indices, ref.indices)
    assert relative_error(dz, ref_dz) < 3e-5 and relative_error(de, ref_de) < 3e-5


def test_float64_matches_the_reference_to_rounding_and_passes_gradcheck():
    z, codebook, grad = data(9, 13, 3, scale=1.0, dtype=torch.float64)
    ref, ref_dz, ref_de = step(ibq_dense, z, codebook, grad, 0.7)
    out, dz, de = step(ibq_chunked, z, codebook, grad, 0.7, code_chunk=4)
    assert close(dz, ref_dz, 1e-11) and close(de, ref_de, 1e-11)
    assert abs(float((out.codebook_entropy - ref.codebook_entropy).detach())) < 1e-12
    # The entropies are smooth in z and E (z_q's straight-through gradient is not a derivative of its value).
    z_small, codebook_small = z[:4].clone().requires_grad_(), codebook[:5].clone().requires_grad_()
    entropies = lambda a, b: tuple(ibq_chunked(a, b, 0.5, code_chunk=2)[2:4])  # noqa: E731
    assert torch.autograd.gradcheck(entropies, (z_small, codebook_small), eps=1e-6, atol=1e-7)


def test_entropy_off_returns_nan_entropies_and_the_same_z_q_gradients():
    z, codebook, grad = data(30, 90, 8)
    ref, ref_dz, ref_de = step(ibq_dense, z, codebook, grad, 0.0)
    out, dz, de = step(ibq_chunked, z, codebook, grad, 0.0, entropy=False, code_chunk=16)
    assert torch.isnan(out.sample_entropy) and torch.isnan(out.codebook_entropy)
    assert close(dz, ref_dz) and close(de, ref_de)


def test_bf16_inputs_compute_in_fp32_and_return_bf16():
    z, codebook, grad = data(40, 200, 16)
    zb, cb = z.bfloat16().requires_grad_(), codebook.bfloat16().requires_grad_()
    out = ibq_chunked(zb, cb, code_chunk=32)
    ref = ibq_dense(zb.detach().float(), cb.detach().float())
    assert out.z_q.dtype == torch.bfloat16 and torch.equal(out.indices, ref.indices)
    assert torch.allclose(out.codebook_entropy, ref.codebook_entropy, rtol=1e-5)
    ((out.z_q.float() * grad).sum() + out.sample_entropy).backward()
    assert zb.grad.dtype == torch.bfloat16 and cb.grad.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = ibq_chunked(z, codebook, code_chunk=32)
    assert auto.z_q.dtype == torch.float32 and torch.equal(auto.indices, ibq_dense(z, codebook).indices)


@pytest.mark.parametrize("entropy_weight,convention", [(0.05, "code"), (0.0, "paper")])
def test_quantizer_loss_backward_equals_the_dense_kernel(entropy_weight, convention):
    torch.manual_seed(0)
    z = torch.randn(2, 16, 6, 6) * 0.5
    grads = {}
    for kernel in ("chunked", "dense"):
        torch.manual_seed(1)
        q = build_quantizer("ibq", codebook_size=777, dim=16, kernel=kernel, entropy_weight=entropy_weight,
                            loss_convention=convention).train()
        x = z.clone().requires_grad_()
        out = q(x)
        (out.loss + out.z_q.square().sum()).backward()
        grads[kernel] = (out.loss.detach(), out.indices, x.grad, q.codebook.grad, out.terms)
    (loss_c, idx_c, dz_c, de_c, terms_c), (loss_d, idx_d, dz_d, de_d, terms_d) = grads["chunked"], grads["dense"]
    assert torch.equal(idx_c, idx_d)
    assert torch.allclose(loss_c, loss_d, rtol=1e-5)
    assert terms_c.keys() == terms_d.keys()
    assert close(dz_c, dz_d) and close(de_c, de_d)


def test_kernel_option_is_validated_and_saved_in_the_config():
    q = build_quantizer("ibq", codebook_size=10, dim=4, kernel="chunked")
    assert q.config()["kernel"] == "chunked"
    assert build_quantizer("ibq", codebook_size=10, dim=4).config()["kernel"] == "auto"
    with pytest.raises(ValueError, match="kernel"):
        build_quantizer("ibq", codebook_size=10, dim=4, kernel="fastest")


def test_automatic_chunk_bounds_the_buffers_and_bad_input_is_refused():
    assert ibq_code_chunk(4096, 1_000_000) * 4096 <= chunking.CHUNK_ELEMENTS
    assert ibq_code_chunk(1, 500) == 500 and ibq_code_chunk(10**7, 10**6) == chunking.MIN_CODE_CHUNK
    assert ibq_code_chunk(10, 100, code_chunk=7) == 7
    # on an accelerator the chunk is sized by a memory budget, not the CPU's cache-sized 4 MiB
    assert ibq_code_chunk(4096, 1_000_000, device="cuda") * 4096 == chunking.DEVICE_CHUNK_ELEMENTS
    assert ibq_code_chunk(4096, 1_000_000, device="cpu") == ibq_code_chunk(4096, 1_000_000)
    z, codebook, _ = data(4, 6, 3)
    with pytest.raises(ValueError, match="positive"):
        ibq_chunked(z, codebook, code_chunk=0)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        ibq_chunked(z, codebook[:, :2])
    with pytest.raises(ValueError, match="temperature"):
        ibq_chunked(z, codebook, temperature=0.0)


# -- DDP: the codebook gradient is an ordinary parameter gradient, averaged across ranks --------------------------
WORLD, K, D = 2, 300, 8


def rank_batch(rank: int) -> torch.Tensor:
    return torch.randn(2, D, 4, 4, generator=torch.Generator().manual_seed(10 + rank)) * 0.5


def ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(build_quantizer("ibq", codebook_size=K, dim=D, kernel="chunked").train())
        out = model(rank_batch(rank))
        (out.loss + out.z_q.square().mean()).backward()
        torch.save(model.module.codebook.grad, f"{out_dir}/grad{rank}.pt")
        dist.barrier()  # no rank tears its gloo context down while the other may still be talking to it
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_ddp_averages_the_chunked_codebook_gradient_over_ranks(tmp_path):
    mp.spawn(ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    grads = [torch.load(tmp_path / f"grad{r}.pt") for r in range(WORLD)]
    assert torch.equal(grads[0], grads[1])
    expected = []
    for rank in range(WORLD):  # each rank's gradient from the dense reference, then DDP's mean
        torch.manual_seed(0)
        q = build_quantizer("ibq", codebook_size=K, dim=D, kernel="dense").train()
        out = q(rank_batch(rank))
        (out.loss + out.z_q.square().mean()).backward()
        expected.append(q.codebook.grad)
    assert close(grads[0], (expected[0] + expected[1]) / 2)
