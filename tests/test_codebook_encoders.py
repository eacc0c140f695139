"""The encoders behind `vqtok.backbones.build_encoder`: packaged ImageNet weights load strictly and behave like
ImageNet networks; a tiny random CLIP extracts patch features from local files without the network."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vqtok.backbones import ENCODERS, build_encoder
from vqtok.backbones.efficientnet_lite import load_efficientnet_lite0
from vqtok.backbones.mobilenetv2 import MobileNetV2, load_mobilenetv2, mobilenetv2_weights_path
from vqtok.data import list_photos
from vqtok.data.images import open_rgb

CNNS = ["efficientnet-lite0", "mobilenetv2"]


@pytest.fixture(scope="module")
def imagenet_samples() -> tuple[torch.Tensor, torch.Tensor]:
    """foolbox's 20 ImageNet validation samples (224 px, label in the file name): images (20, 3, 224, 224) in [0, 1]
    and labels (20,)."""
    photos = [p for p in list_photos() if p.name.startswith("foolbox/imagenet_")]
    if len(photos) < 20:
        pytest.skip("foolbox's ImageNet samples are not installed (pip install --no-deps foolbox==3.3.4)")
    images = [torch.from_numpy(np.array(open_rgb(p.path).resize((224, 224)))).permute(2, 0, 1) for p in photos]
    labels = [int(p.path.stem.split("_")[-1]) for p in photos]
    return torch.stack(images).float() / 255, torch.tensor(labels)


@pytest.fixture(scope="module", params=CNNS)
def cnn(request: pytest.FixtureRequest):
    return build_encoder(request.param, layer="head")


def test_registry_names_the_four_encoders() -> None:
    assert sorted(ENCODERS) == ["clip-vit-b-16", "clip-vit-l-14", "efficientnet-lite0", "mobilenetv2"]


def test_efficientnet_lite0_classifies_imagenet_samples(imagenet_samples) -> None:
    """The hand-written architecture + packaged weights reproduce ImageNet classification (Lite0: 75% top-1)."""
    images, labels = imagenet_samples
    encoder = build_encoder("efficientnet-lite0")
    with torch.no_grad():
        x = ((images - encoder.mean) / encoder.std).contiguous(memory_format=torch.channels_last)
        logits = encoder.net(x)  # (20, 1000)
    assert (logits.argmax(1) == labels).float().mean().item() >= 0.75


def _batchnorm_log_variance_gap(net: nn.Module, x: torch.Tensor) -> float:
    """Mean over BatchNorm layers of median |log(batch variance / running variance)| of their inputs: near 0 when
    real photos, preprocessed right, reach every layer with the statistics the network was trained on."""
    gaps = []

    def hook(module: nn.BatchNorm2d, inputs: tuple[torch.Tensor], _) -> None:
        variance = inputs[0].var((0, 2, 3))
        gaps.append(((variance + module.eps) / (module.running_var + module.eps)).log().abs().median().item())

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():  # channels_last like the encoders (the trained nets' weights already are)
        net.to(memory_format=torch.channels_last).forward_to(x.contiguous(memory_format=torch.channels_last), "head")
    for handle in handles:
        handle.remove()
    return float(np.mean(gaps))


def test_cnn_activations_match_their_imagenet_batchnorm_statistics(cnn, imagenet_samples) -> None:
    images = imagenet_samples[0][:10]
    trained = _batchnorm_log_variance_gap(cnn.net, (images - cnn.mean) / cnn.std)
    untrained = _batchnorm_log_variance_gap(type(cnn.net)().eval(), (images[:2] - cnn.mean) / cnn.std)
    assert trained < 0.2, trained  # measured 0.12 (0.35 with the wrong input normalisation); random init ~20
    assert untrained > 1.0


def test_cnn_features_recognise_a_photo_from_a_different_crop(cnn, imagenet_samples) -> None:
    """Top-left and bottom-right crops (a third overlap) of 20 photos: each crop's nearest neighbour among the
    other crops (cosine of pooled features) is its own photo. Raw pixels score 15%, a random network 30%."""
    images = imagenet_samples[0]
    a = F.interpolate(images[:, :, :150, :150], size=(160, 160), mode="bilinear")
    b = F.interpolate(images[:, :, 74:, 74:], size=(160, 160), mode="bilinear")
    fa, fb = (F.normalize(cnn(x).mean((2, 3)), dim=1) for x in (a, b))  # (20, F)
    assert (fa @ fb.T).argmax(1).eq(torch.arange(20)).float().mean().item() >= 0.9


def test_mobilenetv2_checkpoint_is_a_state_dict_that_loads_strictly(tmp_path) -> None:
    state = torch.load(mobilenetv2_weights_path(), map_location="cpu", weights_only=True)
    assert isinstance(state, dict) and len(state) == len(MobileNetV2().state_dict())
    state.pop("features.17.conv.7.running_var")
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(RuntimeError, match="running_var"):
        load_mobilenetv2(tmp_path / "partial.pt")


def test_efficientnet_lite0_loading_is_strict(tmp_path) -> None:
    state = load_efficientnet_lite0().state_dict() | {"_blocks.99.extra": torch.zeros(1)}
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_efficientnet_lite0(tmp_path / "extra.pth")


@pytest.mark.parametrize(("name", "layer", "channels", "stride"), [
    ("efficientnet-lite0", None, 320, 32), ("efficientnet-lite0", "head", 1280, 32),
    ("efficientnet-lite0", "block10", 112, 16), ("mobilenetv2", None, 320, 32), ("mobilenetv2", "block13", 96, 16),
])
def test_cnn_feature_map_shape(name: str, layer: str | None, channels: int, stride: int) -> None:
    encoder = build_encoder(name, layer=layer)
    out = encoder(torch.rand(2, 3, 96, 128))
    assert encoder.feature_dim == channels
    assert out.shape == (2, channels, 96 // stride, 128 // stride)


def test_image_size_resizes_inputs_first() -> None:
    encoder = build_encoder("mobilenetv2", image_size=64)
    assert encoder(torch.rand(1, 3, 200, 100)).shape == (1, 320, 2, 2)


def test_bad_encoder_requests_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="choose one of"):
        build_encoder("resnet-50")
    with pytest.raises(ValueError, match="block17"):
        build_encoder("mobilenetv2", layer="block99")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        build_encoder("mobilenetv2")(torch.rand(3, 32, 32))


def _tiny_clip_dir(path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=24)
    model = CLIPVisionModelWithProjection(config).eval()
    model.save_pretrained(path)
    return model


def test_tiny_clip_extracts_projected_patch_tokens_without_network(tmp_path, monkeypatch) -> None:
    pytest.importorskip("transformers")
    model = _tiny_clip_dir(tmp_path / "clip")

    def no_network(*args, **kwargs):
        raise AssertionError("the CLIP encoder tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    encoder = build_encoder("clip-vit-b-16", weights=str(tmp_path / "clip"))
    images = torch.rand(2, 3, 48, 40)  # resized to the config's 32 px -> 4 x 4 patches
    features = encoder(images)
    assert features.shape == (2, 24, 4, 4) and encoder.feature_dim == 24
    # reference: OpenAI CLIP's ln_post + proj on every patch token (CLS dropped), the features VQGAN-LC clusters
    x = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True)
    with torch.no_grad():
        tokens = model.vision_model(pixel_values=(x - encoder.mean) / encoder.std).last_hidden_state[:, 1:]
        expected = model.visual_projection(model.vision_model.post_layernorm(tokens))  # (2, 16, 24)
    torch.testing.assert_close(features.flatten(2).transpose(1, 2), expected, atol=1e-5, rtol=1e-5)
    hidden = build_encoder("clip-vit-b-16", weights=str(tmp_path / "clip"), layer="hidden1")(images)
    assert hidden.shape == (2, 32, 4, 4)


def test_clip_without_local_weights_explains_how_to_get_them(tmp_path) -> None:
    pytest.importorskip("transformers")
    with pytest.raises(FileNotFoundError, match="huggingface-cli download openai/clip-vit-large-patch14"):
        build_encoder("clip-vit-l-14", weights=str(tmp_path / "missing"))
