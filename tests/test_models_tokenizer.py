"""vqtok.models: presets, Tokenizer encode/decode, save_pretrained/from_pretrained, a tiny model that learns."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from vqtok import QUANTIZERS
from vqtok.models import PRESETS, Tokenizer, TokenizerConfig
from vqtok.models.autoencoder import AttnBlock, normalize
from vqtok.core.io import load_state_dict, save_state_dict
from vqtok.core.rundir import RunDir


def tiny_config(quantizer: str = "vq", tmp_path=None, **kw) -> TokenizerConfig:
    """A tiny tokenizer at 32 px; lc gets a random (K, 12) codebook file written to tmp_path."""
    options = {}
    if quantizer == "lc":
        path = tmp_path / "codebook.safetensors"
        save_file({"codebook": torch.randn(64, 12)}, str(path), metadata={"encoder": "random"})
        options = {"codebook": str(path)}
    return TokenizerConfig(preset="tiny", image_size=32, quantizer=quantizer, codebook_size=64, dim=8,
                           quantizer_options=options, **kw)


def smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) in [0, 1]: random low-frequency colour fields (learnable within a few dozen steps)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_shapes_and_attention_at_lowest_resolution(preset):
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig(preset=preset, image_size=64, quantizer="vq", codebook_size=32, dim=8)).eval()
    ae = tok.config.autoencoder
    f = ae.downsample_factor
    assert f == {"f16": 16, "f16-ibq": 16, "f8": 8, "tiny": 4, "small": 8}[preset]
    assert tok.grid == (64 // f, 64 // f)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = tok(x)
    assert out.x_hat.shape == (2, 3, 64, 64)
    assert out.quant.indices.shape == (2, 64 // f, 64 // f)
    assert out.quant.z_q.shape == (2, 8, 64 // f, 64 // f)
    # Attention: one per residual block at the lowest level (when enabled) plus one in each middle block.
    enc_attn = sum(isinstance(m, AttnBlock) for m in tok.encoder.modules())
    dec_attn = sum(isinstance(m, AttnBlock) for m in tok.decoder.modules())
    assert enc_attn == 1 + (ae.num_res_blocks if ae.attn_lowest else 0)
    assert dec_attn == 1 + (ae.num_res_blocks + 1 if ae.attn_lowest else 0)
    assert ae.attn_resolutions(256) == ((256 // f,) if ae.attn_lowest else ())


def test_group_norm_groups_stay_valid_for_narrow_presets():
    assert [normalize(c).num_groups for c in (16, 24, 32, 48, 256)] == [16, 8, 32, 16, 32]
    tok = Tokenizer(TokenizerConfig(preset="tiny", overrides={"ch": 24}, image_size=32))  # widths 24, 48
    assert tok(torch.rand(1, 3, 32, 32)).x_hat.shape == (1, 3, 32, 32)


def test_f16_lc_parameter_count_matches_vqgan_lc():
    """VQGAN-LC reports 71.7M parameters: encoder + decoder + quant convs + projector, without the discriminator and
    without the frozen codebook (which is a buffer)."""
    tok = Tokenizer(TokenizerConfig(preset="f16", image_size=256, quantizer="lc", codebook_size=16, dim=8,
                                    quantizer_options={"codebook": torch.randn(16, 768)}))
    trainable = sum(p.numel() for p in tok.parameters() if p.requires_grad)
    assert tok.grid == (16, 16)
    assert abs(trainable / 71.7e6 - 1) < 1e-3, trainable
    assert tok.config.autoencoder.attn_resolutions(256) == (16,)


def test_encode_decode_round_trip_shapes_dtypes_and_values():
    torch.manual_seed(0)
    tok = Tokenizer(tiny_config()).train()
    x = torch.rand(3, 3, 32, 32)
    ids = tok.encode(x)
    assert ids.shape == (3, 8, 8) and ids.dtype == torch.int64
    assert 0 <= int(ids.min()) and int(ids.max()) < tok.codebook_size
    assert tok.training, "encode must restore the training flag"
    images = tok.decode(ids)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    tok.eval()
    with torch.no_grad():
        out = tok(x)
    assert torch.equal(out.quant.indices, ids)
    torch.testing.assert_close(images, out.x_hat.clamp(0, 1), atol=1e-5, rtol=0)
    # int32 ids (how token shards are stored) decode to the same images
    torch.testing.assert_close(tok.decode(ids.int()), images, atol=0, rtol=0)


def test_bad_inputs_get_clear_errors():
    tok = Tokenizer(tiny_config())
    with pytest.raises(ValueError, match="multiple of the downsample factor 4"):
        tok.encode(torch.rand(1, 3, 30, 32))
    with pytest.raises(TypeError, match="float images"):
        tok.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        tok.decode(torch.full((1, 8, 8), 64))
    with pytest.raises(ValueError, match="unknown autoencoder preset"):
        Tokenizer(TokenizerConfig(preset="f32"))
    with pytest.raises(ValueError, match="unknown autoencoder option"):
        Tokenizer(TokenizerConfig(overrides={"channels": 8}))


@pytest.mark.parametrize("quantizer", sorted(QUANTIZERS))
def test_from_pretrained_rebuilds_identical_outputs(quantizer, tmp_path):
    torch.manual_seed(0)
    tok = Tokenizer(tiny_config(quantizer, tmp_path, quantizer_weight=0.1))
    x = torch.rand(2, 3, 32, 32)
    tok.train()(x)  # one training forward: ema updates its codebook, so the saved state is not the initial one
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"trainer": {"steps": 7}}))
    tok.save_pretrained(run)
    if quantizer == "lc":
        os.remove(tmp_path / "codebook.safetensors")  # rebuilt from model.safetensors alone
    loaded = Tokenizer.from_pretrained(run)
    config = json.loads((run / "config.json").read_text())
    assert config["trainer"] == {"steps": 7}, "the trainer's keys must survive save_pretrained"
    assert config["model"]["quantizer"] == quantizer and config["model"]["quantizer_weight"] == 0.1
    tok.eval(), loaded.eval()
    with torch.no_grad():
        a, b = tok(x), loaded(x)
    assert torch.equal(a.x_hat, b.x_hat)
    assert torch.equal(a.quant.indices, b.quant.indices)
    assert torch.equal(tok.decode(a.quant.indices), loaded.decode(b.quant.indices))
    assert sorted(p.name for p in run.iterdir()) == ["config.json", RunDir.MODEL]  # no temporary files left


def test_lc_codebook_is_saved_and_frozen(tmp_path):
    tok = Tokenizer(tiny_config("lc", tmp_path))
    codebook = tok.quantizer.codebook.clone()
    tok.save_pretrained(tmp_path / "run")
    os.remove(tmp_path / "codebook.safetensors")
    loaded = Tokenizer.from_pretrained(tmp_path / "run")
    assert torch.equal(loaded.quantizer.codebook, codebook)
    assert not any(p is loaded.quantizer.codebook for p in loaded.parameters())


def test_ema_weights_saved_beside_model(tmp_path):
    torch.manual_seed(0)
    tok = Tokenizer(tiny_config())
    ema = {k: v + 0.5 if v.is_floating_point() else v for k, v in tok.state_dict().items()}
    tok.save_pretrained(tmp_path, ema_state_dict=ema)
    assert (tmp_path / RunDir.EMA).is_file()
    loaded = Tokenizer.from_pretrained(tmp_path, ema=True)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, ema[key]), key
    Tokenizer(tiny_config()).save_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="ema.safetensors"):
        Tokenizer.from_pretrained(tmp_path / "plain", ema=True)


def test_interrupted_save_keeps_previous_complete_files(tmp_path, monkeypatch):
    torch.manual_seed(0)
    first = Tokenizer(tiny_config())
    first.save_pretrained(tmp_path)
    second = Tokenizer(tiny_config())  # different random weights

    def crash(src, dst):
        raise KeyboardInterrupt("killed while renaming")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        second.save_pretrained(tmp_path)
    monkeypatch.undo()
    loaded = Tokenizer.from_pretrained(tmp_path)
    for key, value in first.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_tiny_tokenizer_reconstruction_loss_falls():
    torch.manual_seed(0)
    tok = Tokenizer(tiny_config()).train()
    x = smooth_images(4, 32)
    opt = torch.optim.Adam(tok.parameters(), lr=1e-3, betas=(0.5, 0.9))
    losses = []
    for _ in range(30):
        out = tok(x)
        rec = (out.x_hat - x).abs().mean()
        opt.zero_grad()
        (rec + out.quant_loss).backward()
        opt.step()
        losses.append(rec.item())
    final = sum(losses[-5:]) / 5
    mean_colour = (x - x.mean(dim=(0, 2, 3), keepdim=True)).abs().mean().item()  # L1 of predicting the mean colour
    assert final < 0.7 * losses[0], losses
    assert final < 0.9 * mean_colour, (final, mean_colour)  # it encodes the images, not just their mean


def test_state_dict_files_accept_shared_and_non_contiguous_tensors(tmp_path):
    base = torch.arange(12.0).view(3, 4)
    state = {"transposed": base.T, "shared": base, "row": base[1]}  # safetensors alone refuses all three
    save_state_dict(state, tmp_path / "x.safetensors")
    loaded = load_state_dict(tmp_path / "x.safetensors")
    assert sorted(loaded) == sorted(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
