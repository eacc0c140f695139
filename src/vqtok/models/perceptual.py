"""Perceptual losses: a frozen network compares two images in [0, 1] (VQGAN's recipe: LPIPS-VGG with weight 1).

- `LPIPS`: the real LPIPS (Zhang et al. 2018, "vgg" v0.1): VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3,
  relu5_3, each unit-normalised over channels, squared differences weighted by learned 1x1 linear layers, averaged
  over space and summed over layers. Needs two files no package ships: torchvision's VGG16 ImageNet state dict
  (`vgg16-397923af.pth`) and LPIPS's linear layers (`vgg.pth` from the lpips package or taming's `vgg_lpips`).
- `FeatureMatchingLoss`: the offline fallback. Any frozen ImageNet network (by default vqtok.backbones'
  efficientnet-lite0, whose weights ship in a package) is tapped at intermediate layers (by default the last
  module at each spatial resolution, the way LPIPS taps VGG before each pooling); the distance is the same
  channel-normalised squared difference, with uniform instead of learned weights (LPIPS's "baseline" variant),
  summed over channels, averaged over space and over layers. It is NOT LPIPS: its values are not comparable with
  published LPIPS numbers, and `describe()` says so for the run's protocol.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from ..backbones import VGG16_CHANNELS, FeatureEncoder, build_encoder, read_state_dict
from ..backbones import vgg16_feature_state, vgg16_features, vgg16_taps
from ..core import to_signed

# LPIPS's ScalingLayer: inputs in [-1, 1] are shifted and scaled to VGG's ImageNet statistics. These are
# torchvision's mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) carried over to [-1, 1] (shift = 2 mean - 1,
# scale = 2 std), written as LPIPS writes them.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_ENV = "VQTOK_LPIPS_DIR"


def unit_normalize(features: Tensor, eps: float = 1e-10) -> Tensor:
    """(B, C, H, W) -> each position's C-vector divided by its L2 norm (LPIPS's normalize_tensor)."""
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class PerceptualLoss(nn.Module):
    """Base class: a frozen network; `distance(x, y)` (B,) per image, `forward` its batch mean (the training loss).
    The network never trains and always runs in eval mode, whatever `.train()` is called with."""

    def distance(self, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        """One line for the run's protocol: which network and which weights."""
        raise NotImplementedError

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x, y (B, 3, H, W) in [0, 1] -> scalar mean distance."""
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected two image batches of equal shape (B, 3, H, W), got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        return self.distance(x, y).mean()

    def freeze(self) -> "PerceptualLoss":
        for p in self.parameters():
            p.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> "PerceptualLoss":
        return super().train(False)


# ---------------------------------------------------------------------------------------------------------------
# LPIPS-VGG16.


class LPIPS(PerceptualLoss):
    """LPIPS-VGG16 (v0.1). Built with random weights; `LPIPS.from_files` loads the real ones."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))
        self.features = vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in VGG16_CHANNELS)  # learned, >= 0
        self.sources = "random weights"
        self.freeze()

    @classmethod
    def from_files(cls, vgg16_path: str | Path, lin_path: str | Path) -> "LPIPS":
        """vgg16_path: torchvision's VGG16 state dict (.pth or .safetensors; "features.*" keys are used);
        lin_path: LPIPS's linear layers (keys like "lin0.model.1.weight", shapes (1, C, 1, 1))."""
        model = cls()
        model.features.load_state_dict(vgg16_feature_state(vgg16_path), strict=True)
        model.lins.load_state_dict(_lin_state(read_state_dict(lin_path), lin_path), strict=True)
        model.sources = f"VGG16 {vgg16_path}, linear layers {lin_path}"
        return model.freeze()

    def taps(self, x: Tensor) -> list[Tensor]:
        """x (B, 3, H, W) in [0, 1] -> the five relu outputs (relu1_2 .. relu5_3)."""
        return vgg16_taps(self.features, (to_signed(x) - self.shift) / self.scale)

    def distance(self, x: Tensor, y: Tensor) -> Tensor:
        total = x.new_zeros(x.shape[0])
        for lin, features in zip(self.lins, self.taps(torch.cat([x, y]))):
            a, b = unit_normalize(features).chunk(2)
            total = total + lin((a - b).pow(2)).mean(dim=(1, 2, 3))  # (B,)
        return total

    def describe(self) -> str:
        return f"LPIPS-VGG16 v0.1 (Zhang et al. 2018; {self.sources})"


def _lin_state(state: dict[str, Tensor], path: str | Path) -> dict[str, Tensor]:
    """Map LPIPS's "lin{k}.model.1.weight" (also "lins.{k}..." or "lin{k}.weight") to this module's "{k}.weight"."""
    out = {}
    for key, value in state.items():
        match = re.match(r"lins?\.?(\d)\.", key)
        if match and key.endswith("weight"):
            out[f"{match.group(1)}.weight"] = value
    if sorted(out) != [f"{k}.weight" for k in range(5)]:
        raise ValueError(f"{path} does not look like LPIPS-VGG linear layers: expected lin0..lin4 weights, "
                         f"found keys {sorted(state)[:8]}")
    return out


def find_lpips_weights(directories: Sequence[str | Path] | None = None) -> tuple[Path, Path] | None:
    """(vgg16 file, lin file) from the first directory holding both, or None. Looks for `vgg16*.pth` /
    `vgg16*.safetensors` and `vgg.pth` / `*lpips*.pth`; default directories: $VQTOK_LPIPS_DIR, then torch hub's
    checkpoints folder (where torchvision caches vgg16-397923af.pth)."""
    if directories is None:
        directories = [d for d in (os.environ.get(LPIPS_ENV), Path(torch.hub.get_dir()) / "checkpoints") if d]
    for directory in map(Path, directories):
        vgg = _first(directory, ("vgg16*.pth", "vgg16*.safetensors"))
        lin = _first(directory, ("vgg.pth", "*lpips*.pth", "*lpips*.safetensors"))
        if vgg and lin:
            return vgg, lin
    return None


def _first(directory: Path, patterns: Sequence[str]) -> Path | None:
    for pattern in patterns:
        found = sorted(directory.glob(pattern)) if directory.is_dir() else []
        if found:
            return found[0]
    return None


# ---------------------------------------------------------------------------------------------------------------
# Feature matching on any frozen network.


class _StopForward(Exception):
    """Raised by the last tap's hook: the layers after it are not needed."""


CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def stage_outputs(network: nn.Module, probe_size: int = 64) -> list[str]:
    """Names of the last module to finish at each spatial resolution of a probe forward pass (the outputs just
    before each downsampling, as LPIPS taps VGG before each pooling), highest resolution first.

    Containers (Sequential, ...) are represented by their last child. The inside of a downsampling block is skipped:
    a module whose resolution equals the INPUT resolution of an enclosing non-container module that changes
    resolution (an inverted-residual block's expand conv) is not a stage output; the block before it is."""
    events: list[tuple[str, tuple[int, ...] | None, tuple[int, ...]]] = []  # (name, input size, output size)
    hooks = [module.register_forward_hook(_recorder(name, events))
             for name, module in network.named_modules() if name]
    try:
        with torch.no_grad():
            network(torch.rand(1, 3, probe_size, probe_size))
    finally:
        for hook in hooks:
            hook.remove()
    modules = dict(network.named_modules())
    sizes = {name: (size_in, size_out) for name, size_in, size_out in events}
    last_at: dict[tuple[int, ...], str] = {}
    for name, _, size in events:
        if isinstance(modules[name], CONTAINERS) or _inside_resampling_block(name, size, sizes, modules):
            continue  # a container's output is its last child's
        last_at.pop(size, None)  # re-insert: the dict's order follows the LAST completion at each resolution
        last_at[size] = name
    if not last_at:
        raise ValueError("found no intermediate 4-d feature maps in the network; pass layer names explicitly")
    return list(last_at.values())


def _recorder(name: str, events: list):
    def hook(module: nn.Module, inputs: tuple, output: object) -> None:
        if isinstance(output, Tensor) and output.dim() == 4:
            first = inputs[0] if inputs and isinstance(inputs[0], Tensor) and inputs[0].dim() == 4 else None
            events.append((name, None if first is None else tuple(first.shape[-2:]), tuple(output.shape[-2:])))

    return hook


def _inside_resampling_block(name: str, size: tuple[int, ...], sizes: dict, modules: dict[str, nn.Module]) -> bool:
    parts = name.split(".")
    for depth in range(1, len(parts)):
        ancestor = ".".join(parts[:depth])
        if ancestor in sizes and not isinstance(modules[ancestor], CONTAINERS):
            size_in, size_out = sizes[ancestor]
            if size_out != size and size_in == size:
                return True
    return False


class EncoderNetwork(nn.Module):
    """A `vqtok.backbones.FeatureEncoder` as the network of a FeatureMatchingLoss: images in [0, 1] -> its feature
    map, with autograd, through the encoder's own preprocessing. It holds the encoder as `encoder`, so tap names
    read "encoder.net._blocks.15". It runs the encoder's `forward` rather than calling the module, so no hook fires
    on the encoder itself: `stage_outputs` would take it for a tap (its output only repeats its last layer's map)
    and, as a module that changes resolution, skip the layers at its input resolution."""

    def __init__(self, encoder: FeatureEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: Tensor) -> Tensor:
        return self.encoder.forward(images)


class FeatureMatchingLoss(PerceptualLoss):
    """Channel-normalised squared feature differences of a frozen network at several layers (uniform weights).

    network: maps (B, 3, H, W) in [0, 1] to features (it does its own input normalisation) with autograd, e.g.
    `EncoderNetwork(vqtok.backbones.build_encoder("efficientnet-lite0"))`; layers: names from `network.named_modules()`
    (default: `stage_outputs(network)`, at most `max_layers` of them, the deepest kept)."""

    def __init__(self, network: nn.Module, layers: Sequence[str] | None = None, name: str = "",
                 max_layers: int = 5) -> None:
        super().__init__()
        self.network = network
        self.name = name or type(network).__name__
        self.layers = list(layers) if layers is not None else stage_outputs(network.eval())[-max_layers:]
        modules = dict(network.named_modules())
        missing = [layer for layer in self.layers if layer not in modules]
        if missing or not self.layers:
            raise ValueError(f"layer(s) {missing or self.layers} not found in {self.name}; "
                             f"choose from {[n for n in modules if n][:40]}")
        self._captured: dict[str, Tensor] = {}
        for layer in self.layers:
            modules[layer].register_forward_hook(self._capture(layer))
        self.freeze()

    def _capture(self, layer: str):
        def hook(module: nn.Module, inputs: object, output: Tensor) -> None:
            self._captured[layer] = output
            if len(self._captured) == len(self.layers):
                raise _StopForward

        return hook

    def taps(self, x: Tensor) -> list[Tensor]:
        """x (B, 3, H, W) in [0, 1] -> the tapped feature maps, in self.layers' order."""
        self._captured = {}
        try:
            self.network(x)
        except _StopForward:
            pass
        taps, self._captured = [self._captured[layer] for layer in self.layers], {}
        if torch.is_grad_enabled() and x.requires_grad and not taps[0].requires_grad:
            raise RuntimeError(f"{self.name} returned features without gradient (does its forward run under "
                               "torch.no_grad()?); a perceptual loss must backpropagate to the reconstruction")
        return taps

    def distance(self, x: Tensor, y: Tensor) -> Tensor:
        total = x.new_zeros(x.shape[0])
        for features in self.taps(torch.cat([x, y])):
            a, b = unit_normalize(features.float()).chunk(2)
            total = total + (a - b).pow(2).sum(dim=1).mean(dim=(1, 2))  # (B,), each layer in [0, 4]
        return total / len(self.layers)

    def describe(self) -> str:
        return (f"feature matching on frozen {self.name} ImageNet features at layers {self.layers} (unit-normalised "
                "over channels, squared differences summed over channels, averaged over space and layers, uniform "
                "weights); NOT LPIPS (its weights are not installed)")


def build_perceptual_loss(lpips_dir: str | Path | None = None, encoder: str = "efficientnet-lite0",
                          layers: Sequence[str] | None = None) -> PerceptualLoss:
    """LPIPS-VGG16 when its two weight files are found (in lpips_dir if given, which must then hold them; else in
    $VQTOK_LPIPS_DIR or torch hub's checkpoints), otherwise feature matching on
    `vqtok.backbones.build_encoder(encoder)` ("efficientnet-lite0" or "mobilenetv2")."""
    found = find_lpips_weights([lpips_dir] if lpips_dir is not None else None)
    if found is not None:
        return LPIPS.from_files(*found)
    if lpips_dir is not None:
        raise FileNotFoundError(f"no LPIPS weights in {lpips_dir}: expected vgg16*.pth (torchvision's VGG16) and "
                                "vgg.pth (LPIPS's linear layers); leave lpips_dir unset to use the offline fallback")
    return FeatureMatchingLoss(EncoderNetwork(build_encoder(encoder)), layers=layers, name=encoder)
