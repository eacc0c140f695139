"""GAN losses of the tokenizer recipe: hinge (taming, VQGAN-LC) and non-saturating (vanilla; IBQ) losses, LeCAM
regularisation with its EMA of discriminator outputs (IBQ), and VQGAN's adaptive generator weight (VQGAN-LC).

The reconstruction and perceptual terms live in the trainer and in perceptual.py; the discriminator start step is a
trainer setting (the generator loss and the discriminator update are simply skipped before it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.distributed import all_reduce_sum_, world_size


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))) (taming, VQGAN-LC and IBQ's discriminator loss)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 * (mean softplus(-D(x)) + mean softplus(D(x_hat))): the non-saturating GAN's discriminator loss."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """-mean D(x_hat): VQGAN-LC's generator loss."""
    return -logits_fake.mean()


def non_saturating_g_loss(logits_fake: Tensor) -> Tensor:
    """mean softplus(-D(x_hat)) = BCE(D(x_hat), real): IBQ's generator loss."""
    return F.softplus(-logits_fake).mean()


class LeCAM(nn.Module):
    """LeCAM regulariser (Tseng et al. 2021) as IBQ uses it (weight 0.05):
    R = mean relu(D(x) - ema_fake)^2 + mean relu(ema_real - D(x_hat))^2, with ema_* exponential moving averages
    (decay 0.999, start 0) of the mean discriminator outputs. As in IBQ, each call first updates the averages with this
    batch, then computes R. The averages are buffers (saved and resumed with the module's state_dict); under
    torch.distributed the batch means are averaged over ranks first, so every rank holds the same state."""

    def __init__(self, decay: float = 0.999, init: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"LeCAM decay must lie in [0, 1), got {decay}")
        self.decay = float(decay)
        self.register_buffer("ema_real", torch.tensor(float(init), dtype=torch.float64))
        self.register_buffer("ema_fake", torch.tensor(float(init), dtype=torch.float64))

    @torch.no_grad()
    def update(self, logits_real: Tensor, logits_fake: Tensor) -> None:
        means = torch.stack([logits_real.detach().double().mean(), logits_fake.detach().double().mean()])
        means = all_reduce_sum_(means.to(self.ema_real.device)) / world_size()
        self.ema_real.mul_(self.decay).add_(means[0], alpha=1.0 - self.decay)
        self.ema_fake.mul_(self.decay).add_(means[1], alpha=1.0 - self.decay)

    def forward(self, logits_real: Tensor, logits_fake: Tensor, update: bool = True) -> Tensor:
        if update:
            self.update(logits_real, logits_fake)
        ema_real = self.ema_real.to(logits_real.dtype)
        ema_fake = self.ema_fake.to(logits_real.dtype)
        return F.relu(logits_real - ema_fake).pow(2).mean() + F.relu(ema_real - logits_fake).pow(2).mean()


def adaptive_generator_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """VQGAN's balance: ||d rec / d W|| / (||d G / d W|| + 1e-4) at the decoder's last layer W, clamped to
    [0, 1e4] and detached. The caller multiplies by its discriminator weight (VQGAN-LC: 0.1)."""
    if not (rec_loss.requires_grad and g_loss.requires_grad):
        raise RuntimeError("adaptive_generator_weight needs rec_loss and g_loss with gradients to the last layer; "
                           "call it inside the training step, not under torch.no_grad()")
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
