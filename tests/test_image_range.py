"""The image-range contract: every network takes images in [0, 1] and converts once, at its own first layer.

Each test reads what a network's first layer actually receives (a forward hook) for inputs in [0, 1]; an image
converted twice (the trainer once fed the discriminator [-3, 1]) or not at all shows up as a wrong input there.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vqtok.core import from_signed, to_signed
from vqtok.models import NLayerDiscriminator, Tokenizer, TokenizerConfig
from vqtok.models.perceptual import LPIPS, LPIPS_SCALE, LPIPS_SHIFT


def record_inputs(module: nn.Module) -> list[Tensor]:
    """Every input `module` receives from now on, detached."""
    seen: list[Tensor] = []
    module.register_forward_hook(lambda m, inputs, output: seen.append(inputs[0].detach().clone()))
    return seen


def record_outputs(module: nn.Module) -> list[Tensor]:
    """Every output of `module` from now on, detached."""
    seen: list[Tensor] = []
    module.register_forward_hook(lambda m, inputs, output: seen.append(output.detach().clone()))
    return seen


def images(seed: int = 0, n: int = 2, size: int = 32) -> Tensor:
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    x[0, :, 0, 0], x[0, :, 0, 1] = 0.0, 1.0  # both ends of the range
    return x


def test_signed_range_round_trip():
    x = images()
    assert torch.equal(to_signed(x), x * 2 - 1)
    assert to_signed(x).min() == -1 and to_signed(x).max() == 1
    torch.testing.assert_close(from_signed(to_signed(x)), x, rtol=0, atol=1e-7)


def test_tokenizer_encoder_sees_signed_images_and_decoder_output_returns_to_unit_range():
    model = Tokenizer(TokenizerConfig(preset="tiny", image_size=32, quantizer="vq", codebook_size=16, dim=4)).eval()
    seen = record_inputs(model.encoder.conv_in)
    decoded = record_outputs(model.decoder)
    x = images()
    with torch.no_grad():
        out = model(x)
    assert len(seen) == 1 and torch.equal(seen[0], x * 2 - 1)
    assert torch.equal(out.x_hat, (decoded[0] + 1) / 2)


def test_discriminator_first_conv_sees_signed_images():
    disc = NLayerDiscriminator(n_layers=1)
    seen = record_inputs(disc.main[0])
    x = images()
    disc(x)
    assert torch.equal(seen[0], x * 2 - 1)


def test_lpips_vgg_sees_its_scaling_layer_applied_to_signed_images():
    lpips = LPIPS()  # random weights: the input pipeline is what is checked
    seen = record_inputs(lpips.features[0])
    x, y = images(0), images(1)
    lpips(x, y)
    shift, scale = torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[0], ((torch.cat([x, y]) * 2 - 1) - shift) / scale, rtol=0, atol=1e-6)


def test_feature_matching_network_sees_its_own_imagenet_normalisation():
    from vqtok.models import build_perceptual_loss

    loss = build_perceptual_loss(encoder="efficientnet-lite0")
    encoder = loss.network.encoder
    stem = next(m for m in encoder.modules() if isinstance(m, nn.Conv2d))
    seen = record_inputs(stem)
    x, y = images(0), images(1)
    loss(x, y)
    expected = (torch.cat([x, y]) - encoder.mean) / encoder.std  # efficientnet-lite0: mean 0.498, std 0.502
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=1e-6)
    assert seen[0].min() >= -1.0 and seen[0].max() <= 1.0


def test_trainer_feeds_the_discriminator_unit_range_images(tmp_path):
    """One training step with the GAN on: generator step D(x_hat), then discriminator step D(x), D(x_hat). The first
    conv must see 2x - 1 of the real crops, and the reconstruction on the same scale (about [-1, 1], never [-3, 1])."""
    from vqtok.train import load_config
    from vqtok.train.trainer import Trainer

    config = load_config(None, [
        "model.preset=tiny", "model.image_size=32", "model.quantizer=vq", "model.codebook_size=16", "model.dim=4",
        "data.size=32", "data.train_length=8", "data.batch_size=4", "loss.perceptual_weight=0",
        "loss.disc_weight=0.1", "loss.disc_start=0", "loss.disc_layers=1", "loss.gen_loss=non-saturating", "fid=false",
    ])
    trainer = Trainer(config, tmp_path / "run", progress=False)
    seen = record_inputs(trainer.disc.main[0])
    decoded = record_outputs(trainer.model.decoder)  # the decoder's [-1, 1]-scale output, before from_signed
    x = torch.stack([trainer.train_set[i][0] for i in range(4)])
    trainer.train_step(x)
    assert len(seen) == 3 and len(decoded) == 1  # generator step: fake; discriminator step: real, fake
    assert torch.equal(seen[1], x * 2 - 1)
    torch.testing.assert_close(seen[0], decoded[0], rtol=0, atol=1e-6)  # to_signed(from_signed(y)) = y
    assert torch.equal(seen[0], seen[2])  # the same reconstruction in both steps
