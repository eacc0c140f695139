"""vqtok.models: GAN losses, LeCAM, the adaptive generator weight and the PatchGAN discriminator, on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from vqtok.models import (
    LeCAM,
    NLayerDiscriminator,
    adaptive_generator_weight,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_g_loss,
    vanilla_d_loss,
)

REAL = torch.tensor([2.0, 0.5])
FAKE = torch.tensor([-2.0, 0.5])


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def test_hinge_losses_by_hand():
    # real: relu(1 - [2, 0.5]) = [0, 0.5] -> 0.25; fake: relu(1 + [-2, 0.5]) = [0, 1.5] -> 0.75; 0.5 * (0.25 + 0.75)
    assert hinge_d_loss(REAL, FAKE).item() == pytest.approx(0.5)
    assert hinge_g_loss(FAKE).item() == pytest.approx(0.75)  # -mean([-2, 0.5])


def test_vanilla_losses_by_hand():
    expected_d = 0.5 * ((softplus(-2.0) + softplus(-0.5)) / 2 + (softplus(-2.0) + softplus(0.5)) / 2)
    assert vanilla_d_loss(REAL, FAKE).item() == pytest.approx(expected_d, rel=1e-6)
    assert non_saturating_g_loss(FAKE).item() == pytest.approx((softplus(2.0) + softplus(-0.5)) / 2, rel=1e-6)


def test_lecam_updates_ema_then_regularises():
    lecam = LeCAM(decay=0.5)
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 1.0])
    # update: ema_real = 0.5 * 0 + 0.5 * 2 = 1, ema_fake = 0.5 * 0 + 0.5 * 0 = 0
    # R = mean(relu([1, 3] - 0)^2) + mean(relu(1 - [-1, 1])^2) = 5 + 2
    assert lecam(real, fake).item() == pytest.approx(7.0)
    # ema_real = 0.5 * 1 + 0.5 * 2 = 1.5: R = 5 + mean([2.5^2, 0.5^2]) = 8.25
    assert lecam(real, fake).item() == pytest.approx(8.25)
    assert lecam.ema_real.item() == pytest.approx(1.5) and lecam.ema_fake.item() == pytest.approx(0.0)
    resumed = LeCAM(decay=0.5)
    resumed.load_state_dict(lecam.state_dict())
    assert resumed(real, fake, update=False).item() == pytest.approx(8.25)
    assert LeCAM().decay == 0.999


def test_lecam_gradient_reaches_logits_only():
    lecam = LeCAM(decay=0.0)
    real = torch.tensor([0.5, 2.0], requires_grad=True)
    fake = torch.tensor([0.0, 0.0], requires_grad=True)
    lecam(real, fake).backward()  # ema_real = 1.25, ema_fake = 0
    torch.testing.assert_close(real.grad, torch.tensor([0.5, 2.0]))  # d/dr mean(r^2) = r
    torch.testing.assert_close(fake.grad, torch.tensor([-1.25, -1.25]))  # d/df mean((1.25 - f)^2)


def test_adaptive_generator_weight_by_hand():
    w = torch.nn.Parameter(torch.ones(3))
    a, b = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.0, 0.0, 2.0])
    weight = adaptive_generator_weight((w * a).sum(), (w * b).sum(), w)  # ||a|| / (||b|| + 1e-4)
    assert weight.item() == pytest.approx(5.0 / (2.0 + 1e-4), rel=1e-6)
    assert not weight.requires_grad
    clamped = adaptive_generator_weight((w * a).sum(), (w * b * 1e-9).sum(), w)  # 5 / ~1e-4 -> clamp
    assert clamped.item() == pytest.approx(1e4)
    with torch.no_grad():
        rec, g = (w * a).sum(), (w * b).sum()
    with pytest.raises(RuntimeError, match="training step"):
        adaptive_generator_weight(rec, g, w)


@pytest.mark.parametrize("n_layers,size,expected", [(2, 64, 14), (3, 64, 6), (2, 256, 62), (3, 256, 30)])
def test_discriminator_patch_grid(n_layers, size, expected):
    torch.manual_seed(0)
    d = NLayerDiscriminator(n_layers=n_layers)
    out = d(torch.rand(2, 3, size, size))
    assert out.shape == (2, 1, expected, expected)
    batchnorms = [m for m in d.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(batchnorms) == n_layers
    assert all(float(bn.bias.detach().abs().max()) == 0.0 for bn in batchnorms)


def test_discriminator_init_and_size():
    torch.manual_seed(0)
    d = NLayerDiscriminator(n_layers=3, ndf=64)
    conv = torch.cat([m.weight.detach().flatten() for m in d.modules() if isinstance(m, torch.nn.Conv2d)])
    assert conv.std().item() == pytest.approx(0.02, rel=0.02)  # taming's weights_init: N(0, 0.02)
    # by hand: 3*64*16+64 + 64*128*16 + 2*128 + 128*256*16 + 2*256 + 256*512*16 + 2*512 + 512*16+1
    assert sum(p.numel() for p in d.parameters()) == 2_765_633
    assert sum(p.numel() for p in NLayerDiscriminator(n_layers=2).parameters()) == 663_361
