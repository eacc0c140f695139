"""vqtok.models.perceptual: LPIPS-VGG16 from weight files, feature matching on any frozen network, the fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vqtok.backbones import VGG16_CHANNELS, FeatureEncoder, build_encoder
from vqtok.models.perceptual import (
    LPIPS,
    EncoderNetwork,
    FeatureMatchingLoss,
    build_perceptual_loss,
    find_lpips_weights,
    stage_outputs,
    unit_normalize,
)


def write_lpips_files(directory, lin_scale: float = 1.0, seed: int = 0):
    """Random weights in the real files' formats: torchvision's vgg16 state dict and LPIPS's vgg.pth."""
    torch.manual_seed(seed)
    features = LPIPS().features.state_dict()
    for value in features.values():
        value.normal_(0.0, 0.05)
    vgg = {f"features.{k}": v for k, v in features.items()} | {"classifier.0.weight": torch.zeros(2, 2)}
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) * lin_scale for i, c in enumerate(VGG16_CHANNELS)}
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(vgg, directory / "vgg16-397923af.pth")
    torch.save(lin, directory / "vgg.pth")
    return directory / "vgg16-397923af.pth", directory / "vgg.pth", vgg


def test_lpips_from_random_weight_files_is_a_distance(tmp_path):
    vgg_path, lin_path, vgg = write_lpips_files(tmp_path)
    lpips = LPIPS.from_files(vgg_path, lin_path)
    assert torch.equal(lpips.features[28].weight, vgg["features.28.weight"])
    torch.manual_seed(1)
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    same = lpips.distance(x, x)
    assert same.shape == (2,) and float(same.abs().max()) == 0.0
    d_xy, d_yx = lpips.distance(x, y), lpips.distance(y, x)
    assert float(d_xy.detach().min()) > 0.0
    torch.testing.assert_close(d_xy, d_yx)
    # the learned linear layers weight each layer's differences: doubling them doubles the distance
    doubled = LPIPS.from_files(*write_lpips_files(tmp_path / "x2", lin_scale=2.0)[:2])
    torch.testing.assert_close(doubled.distance(x, y), 2 * d_xy, rtol=1e-5, atol=0)
    assert "LPIPS-VGG16" in lpips.describe() and str(lin_path) in lpips.describe()


def test_lpips_is_frozen_but_passes_gradient(tmp_path):
    lpips = LPIPS.from_files(*write_lpips_files(tmp_path)[:2])
    lpips.train()
    assert not lpips.training and not any(p.requires_grad for p in lpips.parameters())
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    lpips(x, torch.rand(1, 3, 32, 32)).backward()
    assert float(x.grad.abs().sum()) > 0.0


def test_lpips_weight_search_and_errors(tmp_path):
    vgg_path, lin_path, _ = write_lpips_files(tmp_path / "weights")
    assert find_lpips_weights([tmp_path / "empty", tmp_path / "weights"]) == (vgg_path, lin_path)
    assert isinstance(build_perceptual_loss(lpips_dir=tmp_path / "weights"), LPIPS)
    with pytest.raises(FileNotFoundError, match="vgg16"):
        build_perceptual_loss(lpips_dir=tmp_path / "empty")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="LPIPS-VGG linear layers"):
        LPIPS.from_files(vgg_path, tmp_path / "bad.pth")


class Down(nn.Module):
    """An inverted-residual-like downsampling block: expand (stride 1) then a stride-2 conv."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.expand = nn.Conv2d(c_in, 4 * c_in, 1)
        self.reduce = nn.Conv2d(4 * c_in, c_out, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(torch.relu(self.expand(x)))


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), Down(8, 16), nn.ReLU(), Down(16, 32), nn.ReLU())


def test_stage_outputs_are_the_last_layer_at_each_resolution():
    # "2.expand" runs at full resolution after "1" but sits inside a downsampling block: not a stage output
    assert stage_outputs(small_net()) == ["1", "3", "5"]


def test_feature_matching_is_a_distance_and_frozen():
    net = small_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    loss = FeatureMatchingLoss(net, name="random-cnn")
    assert loss.layers == ["1", "3", "5"]
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    y = torch.rand(2, 3, 32, 32)
    assert float(loss.distance(y, y).abs().max()) == 0.0
    d_xy = loss.distance(x, y)
    assert float(d_xy.detach().min()) > 0.0 and float(d_xy.detach().max()) <= 4.0
    torch.testing.assert_close(d_xy, loss.distance(y, x))
    loss(x, y).backward()
    assert float(x.grad.abs().sum()) > 0.0
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert "random-cnn" in loss.describe() and "NOT LPIPS" in loss.describe()


def test_feature_matching_value_by_hand():
    """Tapping the image itself: a red and a green image have orthogonal unit colour vectors, so the squared
    difference summed over channels is |r - g|^2 = 2 at every pixel."""
    loss = FeatureMatchingLoss(nn.Sequential(nn.Identity()), layers=["0"])
    red, green = torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8)
    red[:, 0], green[:, 1] = 0.7, 0.2
    assert loss.distance(red, green).item() == pytest.approx(2.0, rel=1e-6)
    assert loss.distance(red, 0.5 * red).item() == pytest.approx(0.0, abs=1e-12)  # scale-invariant per pixel


class InferenceOnly(nn.Module):
    """A network whose forward runs under torch.inference_mode(): its features carry no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_net()

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallEncoder(FeatureEncoder):
    """small_net as a vqtok.backbones FeatureEncoder (identity normalisation)."""

    def __init__(self) -> None:
        super().__init__("small", "5", 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), None, 16)
        self.net = small_net().requires_grad_(False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_feature_encoders_backpropagate_and_inference_mode_networks_are_refused():
    with pytest.raises(RuntimeError, match="without gradient"):
        FeatureMatchingLoss(InferenceOnly()).distance(torch.rand(1, 3, 16, 16, requires_grad=True),
                                                      torch.rand(1, 3, 16, 16))
    loss = FeatureMatchingLoss(EncoderNetwork(SmallEncoder()))
    assert loss.layers == ["encoder.net.1", "encoder.net.3", "encoder.net.5"]
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    loss(x, torch.rand(1, 3, 16, 16)).backward()
    assert float(x.grad.abs().sum()) > 0.0


def test_fallback_value_and_gradient_equal_the_network_layers_run_by_hand(tmp_path, monkeypatch):
    """The fallback's loss and its gradient with respect to the reconstruction equal efficientnet-lite0's layers
    called one by one: (x - mean) / std in channels_last, stem, blocks 0..15, the five tapped block outputs
    unit-normalised over channels, squared differences summed over channels, averaged over space, layers, batch."""
    monkeypatch.setenv("VQTOK_LPIPS_DIR", str(tmp_path))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    loss = build_perceptual_loss(encoder="efficientnet-lite0")
    tapped = (0, 2, 4, 10, 15)
    assert loss.layers == [f"encoder.net._blocks.{i}" for i in tapped]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=g, requires_grad=True)
    y = torch.rand(2, 3, 64, 64, generator=g)
    value = loss(x, y)
    value.backward()

    reference = build_encoder("efficientnet-lite0")  # the same weights, not hooked by the loss
    net, x_ref = reference.net, x.detach().clone().requires_grad_(True)
    h = ((torch.cat([x_ref, y]) - reference.mean) / reference.std).contiguous(memory_format=torch.channels_last)
    h = F.relu6(net._bn0(net._conv_stem(h)))
    taps = []
    for i, block in enumerate(net._blocks[: tapped[-1] + 1]):
        h = block(h)
        if i in tapped:
            taps.append(h)
    total = torch.zeros(2)
    for features in taps:  # after the forward pass, as the loss does: the same order of gradient accumulation
        a, b = unit_normalize(features.float()).chunk(2)
        total = total + (a - b).pow(2).sum(dim=1).mean(dim=(1, 2))
    expected = (total / len(tapped)).mean()
    expected.backward()
    assert torch.equal(value.detach(), expected.detach())
    assert float(x.grad.abs().sum()) > 0.0
    assert torch.equal(x.grad, x_ref.grad)


def test_fallback_is_feature_matching_on_efficientnet_lite0(tmp_path, monkeypatch):
    monkeypatch.setenv("VQTOK_LPIPS_DIR", str(tmp_path))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    loss = build_perceptual_loss()
    assert isinstance(loss, FeatureMatchingLoss)
    assert "efficientnet-lite0" in loss.describe() and len(loss.layers) == 5
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    y = torch.rand(2, 3, 64, 64)
    assert float(loss.distance(y, y).abs().max()) == 0.0
    loss(x, y).backward()
    assert float(x.grad.abs().sum()) > 0.0
