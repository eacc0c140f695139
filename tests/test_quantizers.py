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
@pytest.mark.parametrize("name", ["vq", "fc", "lc"])
def test_default_loss_sends_commitment_1_0_to_z_and_codebook_0_33_to_the_codebook(name):
    """loss = 1.0 ||sg(e) - z||^2 + 0.33 ||e - sg(z)||^2 (means). Both terms have the same VALUE, so only gradients
    tell the weights apart: d loss / dz = 1.0 * 2 (z - e) / numel (the commitment term alone reaches z) and
    d loss / de_n = 0.33 * 2 (e_n - z_n) / numel (the codebook term alone reaches the codes)."""
    q = make(name).train()  # default weights
    z = torch.randn(2, D, 3, 3, requires_grad=True)
    out = q(z)
    codes = q.embed(out.indices).detach()  # (B, D, H, W) the e each token was assigned
    numel = z.numel()
    d_codes = 0.33 * 2 * flat(codes - z.detach()).double() / numel  # (N, D) d loss / d e_n

    value = (1.0 + 0.33) * F.mse_loss(codes, z.detach()).double()  # the two terms' values are equal
    torch.testing.assert_close(out.loss.double(), value, rtol=1e-6, atol=0)
    # only out.loss: z_q's straight-through path would add the identity on top
    if name == "lc":  # the codes are P(C) = C W^T + b: the gradient reaches the frozen codebook's projector
        grad_z, grad_w, grad_b = torch.autograd.grad(out.loss, [z, q.projector.weight, q.projector.bias])
        features = q.codebook[out.indices.reshape(-1)].double()  # (N, F) the (standardised) features used
        torch.testing.assert_close(grad_w.double(), d_codes.T @ features, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(grad_b.double(), d_codes.sum(0), rtol=1e-5, atol=1e-9)
    else:  # the codebook rows used collect their tokens' gradients
        grad_z, grad_e = torch.autograd.grad(out.loss, [z, q.codebook])
        expected = torch.zeros(K, D, dtype=torch.float64).index_add_(0, out.indices.reshape(-1), d_codes)
        torch.testing.assert_close(grad_e.double(), expected, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(grad_z.double(), 1.0 * 2 * (z - codes).detach().double() / numel, rtol=1e-5, atol=1e-9)
    # straight-through: d z_q / d z is the identity
    grad = torch.randn_like(z)
    (zq_grad,) = torch.autograd.grad(out.z_q, z, grad)
    assert torch.allclose(zq_grad, grad)


def test_vq_codebook_is_initialised_uniform_in_minus_to_plus_one_over_k():
    """uniform(-1/K, 1/K): min and max at -+1/K, mean 0, std (2/K) / sqrt(12) = 0.577/K. 65,536 draws put the
    extremes within ~3e-5/K (2/65,537) of the bounds, the mean within 4 standard errors (4 x 0.577/256 = 0.009)
    of 0 and the std within 1% (its relative standard error is sqrt(0.8 / (4 x 65,536)) = 0.2%)."""
    K_init = 4096
    q = make("vq", codebook_size=K_init, dim=16)
    codebook = q.codebook.detach().double() * K_init  # in units of 1/K: uniform(-1, 1)
    assert -1.0 <= float(codebook.min()) < -0.999 and 0.999 < float(codebook.max()) <= 1.0
    assert abs(float(codebook.mean())) < 0.009
    assert float(codebook.std()) == pytest.approx(2 / 12**0.5, rel=0.01)


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
def test_ema_updates_over_three_steps_equal_hand_computation():
    """n_k <- d n_k + (1-d) count_k, m_k <- d m_k + (1-d) sum_{z -> k} z, n_k' = (n_k + eps) / (sum n + K eps) sum n,
    e_k = m_k / n_k', in float64 with the defaults d = 0.99, eps = 1e-5. The first step starts from n = 0, where
    the decay of n is invisible; the later steps see it (0.99 n vs n differs by 1% of n)."""
    decay, eps, K_ema, D_ema = 0.99, 1e-5, 6, 3
    q = make("ema", codebook_size=K_ema, dim=D_ema).train()
    assert torch.equal(q.cluster_size, torch.zeros(K_ema)) and torch.equal(q.embed_sum, q.codebook)  # taming's init
    n, m, e = q.cluster_size.double(), q.embed_sum.double(), q.codebook.double()
    for step in range(3):
        z = torch.randn(1, D_ema, 4, 5)
        out = q(z)
        tokens, idx = flat(z).double(), out.indices.reshape(-1)
        # the codes chosen this step came from the codebook the step started with
        assert torch.equal(idx, brute_force_nearest(tokens, e)), step
        counts = torch.bincount(idx, minlength=K_ema).double()
        sums = torch.zeros(K_ema, D_ema, dtype=torch.float64).index_add_(0, idx, tokens)
        n = decay * n + (1 - decay) * counts
        m = decay * m + (1 - decay) * sums
        smoothed = (n + eps) / (n.sum() + K_ema * eps) * n.sum()
        e = m / smoothed[:, None]  # unused codes: m / ~eps, huge (taming's behaviour): they stay unused
        for what, actual, expected, rtol in (("n", q.cluster_size, n, 1e-5), ("m", q.embed_sum, m, 1e-5),
                                             ("e", q.codebook, e, 1e-4)):
            torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=1e-7,
                                       msg=lambda text: f"{what} after step {step}: {text}")
    assert int((n > 0).sum()) >= 2  # several codes were used, so the smoothing's sum and the decay both matter


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


@pytest.mark.parametrize("kernel", ["dense", "chunked"])
def test_ibq_index_backpropagation_gives_every_code_row_the_softmax_gradient(kernel):
    """With the entropy penalty off (it alone reaches every row, with ~1e-27), a downstream loss <z_q, G> reaches the
    codebook only through Ind = h - sg(p) + p: dl = p (g - <p, g>), g = G E^T, dE = dl^T z + h^T G (docstring)."""
    torch.manual_seed(0)
    q = build_quantizer("ibq", codebook_size=256, dim=16, entropy_weight=0.0, kernel=kernel).train()
    z = torch.randn(2, 16, 4, 4) * 0.1  # small logits: a soft softmax, as at the start of training
    head = torch.randn(2, 16, 4, 4)  # G: a downstream "decoder" loss on z_q
    out = q(z)
    (out.z_q * head).sum().backward()

    tokens, G, E = flat(z).double(), flat(head).double(), q.codebook.detach().double()
    p = (tokens @ E.T).softmax(1)  # (N, K)
    g = G @ E.T
    dl = p * (g - (p * g).sum(1, keepdim=True))
    hard = F.one_hot(out.indices.reshape(-1), 256).double()
    torch.testing.assert_close(q.codebook.grad.double(), dl.T @ tokens + hard.T @ G, rtol=1e-4, atol=1e-6)
    # |l| <= 1.7 here, so every p_nk >= e^-3.4 / 256 = 1.3e-4 (measured min 6.8e-4) and each row's softmax term,
    # ~ p |g| |z| over 32 tokens, is ~1e-2 (measured min 0.013): 1e-3 is far above rounding, far below that
    assert float(p.min()) > 1.3e-4
    assert float(q.codebook.grad.norm(dim=1).min()) > 1e-3
    assert len(set(out.indices.reshape(-1).tolist())) < 64  # far fewer codes were selected than got gradient


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
