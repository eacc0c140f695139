"""The quantizer contract, parametrized over every registered method, and each method's own behaviour."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import vqtok
from vqtok.quantize import QUANTIZERS, build_quantizer

K, D, F_LC = 48, 8, 12


def make(name: str, codebook_size: int = K, dim: int = D, seed: int = 0, **options) -> vqtok.Quantizer:
    torch.manual_seed(seed)
    if name == "lc" and "codebook" not in options and "codebook_dim" not in options:
        options["codebook"] = torch.randn(codebook_size, F_LC)
    return build_quantizer(name, codebook_size=codebook_size, dim=dim, **options)


def brute_force_nearest(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """argmin_k ||z_n - e_k||^2 in float64, from the definition."""
    return ((z.double()[:, None, :] - codebook.double()[None]) ** 2).sum(-1).argmin(1)


def flat(z: torch.Tensor) -> torch.Tensor:
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


ALL = sorted(QUANTIZERS)


def test_registry_holds_the_five_methods():
    assert ALL == ["ema", "fc", "ibq", "lc", "vq"]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_output_shapes_and_dtypes(name, dtype):
    q = make(name)
    z = torch.randn(3, D, 5, 7).to(dtype)
    out = q(z)
    assert out.z_q.shape == (3, D, 5, 7) and out.z_q.dtype == dtype
    assert out.indices.shape == (3, 5, 7) and out.indices.dtype == torch.int64
    assert out.loss.dim() == 0 and out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < K
    assert all(v.dim() == 0 for v in out.terms.values()) and out.terms


@pytest.mark.parametrize("name", ALL)
def test_bf16_autocast_input_returns_bf16_and_same_indices_as_fp32(name):
    q = make(name).eval()
    z = torch.randn(2, D, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf16 = q(z.bfloat16())
    out_fp32 = q(z.bfloat16().float())
    assert out_bf16.z_q.dtype == torch.bfloat16
    assert torch.equal(out_bf16.indices, out_fp32.indices)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("training", [True, False])
def test_embed_of_indices_equals_z_q(name, training):
    q = make(name).train(training)
    codebook = q.codebook_vectors().detach().clone()  # ema's training forward updates it after choosing codes
    z = torch.randn(2, D, 3, 4)
    out = q(z)
    expected = F.embedding(out.indices, codebook).permute(0, 3, 1, 2)
    assert torch.allclose(expected, out.z_q.float(), atol=1e-5, rtol=0)
    if not (name == "ema" and training):
        assert torch.allclose(q.embed(out.indices), out.z_q.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["vq", "fc", "ema", "lc"])
def test_indices_equal_brute_force_argmin(name):
    q = make(name).eval()
    z = torch.randn(4, D, 6, 6)
    out = q(z)
    codebook = q.codebook_vectors().detach()
    expected = brute_force_nearest(flat(z), codebook)
    assert torch.equal(out.indices.reshape(-1), expected)


@pytest.mark.parametrize("name", ALL)
def test_gradient_reaches_the_input(name):
    q = make(name).train()
    z = torch.randn(2, D, 4, 4, requires_grad=True)
    out = q(z)
    (out.z_q.square().mean() + out.loss).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert float(z.grad.abs().sum()) > 0


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip_rebuilds_identical_quantizer(name):
    source = make(name, seed=1).train()
    source(torch.randn(2, D, 4, 4))  # ema: move its buffers away from the initial values
    config = source.config()
    assert config["name"] == name
    options = {k: v for k, v in config.items() if k not in ("name", "codebook_size", "dim")}
    torch.manual_seed(2)
    target = build_quantizer(name, codebook_size=config["codebook_size"], dim=config["dim"], **options)
    target.load_state_dict(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key]), key
    z = torch.randn(2, D, 4, 4)
    a, b = source.eval()(z), target.eval()(z)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.z_q, b.z_q)


def test_build_quantizer_rejects_unknown_names_and_wrong_shapes():
    with pytest.raises(ValueError, match="unknown quantizer"):
        build_quantizer("vqq", codebook_size=8, dim=4)
    q = make("vq")
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\)"):
        q(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="indices must lie"):
        q.embed(torch.full((1, 2, 2), K))


# --- vq / fc -----------------------------------------------------------------------------------------------------
def test_vq_loss_weights_commitment_and_codebook_terms_separately():
    q = make("vq", commitment_weight=1.0, codebook_weight=0.33)
    z = torch.randn(2, D, 3, 3, requires_grad=True)
    out = q(z)
    codes = q.embed(out.indices)
    expected = 1.0 * F.mse_loss(codes.detach(), z) + 0.33 * F.mse_loss(codes, z.detach())
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert torch.allclose(out.terms["commitment"], F.mse_loss(codes, z).detach(), atol=1e-6)
    # straight-through: d z_q / d z is the identity
    grad = torch.randn_like(z)
    (zq_grad,) = torch.autograd.grad(out.z_q, z, grad)
    assert torch.allclose(zq_grad, grad)


def test_vq_codebook_is_initialised_uniform_in_one_over_k():
    q = make("vq", codebook_size=1000)
    codebook = q.codebook.detach()
    assert float(codebook.abs().max()) <= 1e-3 and float(codebook.std()) > 1e-4


def test_fc_l2_norm_uses_unit_codes_and_cosine_lookup():
    q = make("fc", l2_norm=True).eval()
    z = torch.randn(2, D, 4, 4) * 5
    out = q(z)
    codes = q.codebook_vectors()
    assert torch.allclose(codes.norm(dim=1), torch.ones(K), atol=1e-6)
    cosine = F.normalize(flat(z), dim=1) @ F.normalize(q.codebook.detach(), dim=1).T
    assert torch.equal(out.indices.reshape(-1), cosine.argmax(1))
    assert torch.allclose(out.z_q.norm(dim=1), torch.ones(2, 4, 4), atol=1e-5)


# --- ema ---------------------------------------------------------------------------------------------------------
def test_ema_update_equals_hand_computation():
    q = make("ema", codebook_size=6, dim=3, decay=0.9, eps=1e-5).train()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    z = torch.randn(1, 3, 4, 5)
    out = q(z)
    tokens, idx = flat(z), out.indices.reshape(-1)
    counts = torch.tensor([(idx == k).sum() for k in range(6)], dtype=torch.float32)
    sums = torch.stack([tokens[idx == k].sum(0) for k in range(6)])
    n = 0.9 * before["cluster_size"] + 0.1 * counts
    m = 0.9 * before["embed_sum"] + 0.1 * sums
    smoothed = (n + 1e-5) / (n.sum() + 6 * 1e-5) * n.sum()
    assert torch.allclose(q.cluster_size, n, atol=1e-6)
    assert torch.allclose(q.embed_sum, m, atol=1e-6)
    assert torch.allclose(q.codebook, m / smoothed[:, None], rtol=1e-5)
    # the codes chosen this step came from the codebook the step started with
    assert torch.equal(idx, brute_force_nearest(tokens, before["codebook"]))


def test_ema_does_not_update_in_eval_mode():
    q = make("ema").eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q(torch.randn(2, D, 4, 4))
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
    assert not any(p.requires_grad for p in q.parameters())


def test_ema_loss_is_commitment_only():
    q = make("ema", commitment_weight=0.5).eval()
    z = torch.randn(2, D, 4, 4, requires_grad=True)
    out = q(z)
    assert torch.allclose(out.loss, 0.5 * F.mse_loss(q.embed(out.indices), z), atol=1e-6)


# --- lc ----------------------------------------------------------------------------------------------------------
def test_lc_codebook_stays_frozen_and_projector_trains():
    q = make("lc").train()
    assert "codebook" in dict(q.named_buffers()) and "codebook" not in dict(q.named_parameters())
    frozen = q.codebook.clone()
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    z = torch.randn(2, D, 4, 4, requires_grad=True)
    out = q(z)
    (out.z_q.square().mean() + out.loss).backward()
    assert float(q.projector.weight.grad.abs().sum()) > 0 and float(q.projector.bias.grad.abs().sum()) > 0
    weight = q.projector.weight.clone()
    opt.step()
    assert torch.equal(q.codebook, frozen)
    assert not torch.equal(q.projector.weight, weight)


def test_lc_projector_init_std_is_dim_to_the_minus_half():
    torch.manual_seed(0)
    q = build_quantizer("lc", codebook_size=16, dim=64, codebook=torch.randn(16, 512))
    assert abs(float(q.projector.weight.detach().std()) - 64**-0.5) < 0.01


def test_lc_reads_a_safetensors_codebook(tmp_path):
    codebook = torch.randn(K, F_LC)
    path = tmp_path / "codebook.safetensors"
    save_file({"codebook": codebook}, str(path), metadata={"encoder": "test"})
    q = build_quantizer("lc", codebook_size=K, dim=D, codebook=str(path), standardize=False)
    assert torch.equal(q.codebook, codebook)
    with pytest.raises(ValueError, match="codebook_size"):
        build_quantizer("lc", codebook_size=K + 1, dim=D, codebook=path)
    with pytest.raises(FileNotFoundError, match="vqtok codebook build"):
        build_quantizer("lc", codebook_size=K, dim=D, codebook=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="codebook_dim"):
        build_quantizer("lc", codebook_size=K, dim=D)


# --- ibq ---------------------------------------------------------------------------------------------------------
def reference_ibq_loss(z: torch.Tensor, codebook: torch.Tensor, convention: str = "code") -> torch.Tensor:
    """SEED-Voken's IndexPropagationQuantize loss written with dense one-hots, plus 0.05 x its entropy loss."""
    logits = z @ codebook.T
    soft = logits.softmax(1)
    hard = F.one_hot(soft.argmax(1), codebook.shape[0]).to(z.dtype)
    z_q = (hard - soft.detach() + soft) @ codebook
    z_q_2 = hard @ codebook
    small, large = 0.25, 1.0
    w_commit, w_cb = (large, small) if convention == "code" else (small, large)
    loss = F.mse_loss(z_q, z) + w_commit * F.mse_loss(z_q_2.detach(), z) + w_cb * F.mse_loss(z_q_2, z.detach())
    probs = (logits / 0.01).softmax(1)
    log_probs = (logits / 0.01).log_softmax(1)
    avg = probs.mean(0)
    avg_entropy = -(avg * (avg + 1e-5).log()).sum()
    sample_entropy = -(probs * log_probs).sum(1).mean()
    return z_q, loss + 0.05 * (sample_entropy - avg_entropy)


@pytest.mark.parametrize("convention", ["code", "paper"])
def test_ibq_gradients_match_dense_reference(convention):
    torch.manual_seed(0)
    q = build_quantizer("ibq", codebook_size=K, dim=D, loss_convention=convention).train()
    z = torch.randn(2, D, 3, 5) * 0.3
    head = torch.randn(2, D, 3, 5)  # a downstream "decoder" loss on z_q

    z1 = z.clone().requires_grad_()
    out = q(z1)
    ((out.z_q * head).sum() + out.loss).backward()

    z2 = flat(z).clone().requires_grad_()
    codebook = q.codebook.detach().clone().requires_grad_()
    z_q, loss = reference_ibq_loss(z2, codebook, convention)
    ((z_q * flat(head)).sum() + loss).backward()

    assert torch.allclose(out.loss, loss, atol=1e-6)
    assert torch.allclose(out.z_q, z_q.detach().reshape(2, 3, 5, D).permute(0, 3, 1, 2), atol=1e-6)
    assert torch.allclose(flat(z1.grad), z2.grad, atol=1e-5)
    assert torch.allclose(q.codebook.grad, codebook.grad, atol=1e-5)


def test_ibq_every_code_row_gets_gradient():
    torch.manual_seed(0)
    q = build_quantizer("ibq", codebook_size=256, dim=16).train()
    z = torch.randn(2, 16, 4, 4) * 0.1  # small logits: a soft softmax, as at the start of training
    out = q(z)
    (out.z_q.square().sum() + out.loss).backward()
    assert int((q.codebook.grad.abs().sum(1) > 0).sum()) == 256
    assert len(set(out.indices.reshape(-1).tolist())) < 256  # far fewer codes were selected than got gradient


def test_ibq_forward_value_is_exactly_the_selected_code():
    q = make("ibq").train()
    z = torch.randn(2, D, 4, 4)
    out = q(z)
    assert torch.equal(out.z_q, q.embed(out.indices))
    expected = (flat(z) @ q.codebook.detach().T).argmax(1)
    assert torch.equal(out.indices.reshape(-1), expected)


def test_ibq_eval_loss_equals_training_quantization_terms():
    q = make("ibq", entropy_weight=0.0)
    z = torch.randn(2, D, 4, 4)
    train_loss, eval_loss = q.train()(z).loss, q.eval()(z).loss
    assert torch.allclose(train_loss, eval_loss, atol=1e-6)


def test_lc_standardize_is_an_affine_map_the_projector_absorbs():
    torch.manual_seed(0)
    raw = torch.rand(K, F_LC) * 30 + 5  # positive, large: like ReLU features
    standard = build_quantizer("lc", codebook_size=K, dim=D, codebook=raw)
    assert torch.allclose(standard.codebook.mean(0), torch.zeros(F_LC), atol=1e-5)
    assert float(standard.codebook.norm(dim=1).mean()) == pytest.approx(1.0, rel=1e-5)
    # raw = a * standard + m: a projector W' = a W, b' = W m + b on the raw features gives the same codes
    m, a = raw.double().mean(0), (raw.double() - raw.double().mean(0)).norm(dim=1).mean()
    plain = build_quantizer("lc", codebook_size=K, dim=D, codebook=raw, standardize=False)
    with torch.no_grad():
        plain.projector.weight.copy_(standard.projector.weight / a)
        plain.projector.bias.copy_(standard.projector.bias - (standard.projector.weight.double() @ (m / a)).float())
    assert torch.allclose(plain.codebook_vectors(), standard.codebook_vectors(), atol=1e-4)
