"""Tokenizer = encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder, with its config saved beside the weights.

Images enter and leave in [0, 1]; inside, the network works on [-1, 1] as taming's does. The quantizer is any
registered one (`vqtok.build_quantizer`); quant_conv (1x1, z_channels -> dim) is the factorisation that takes the
encoder's 256 channels down to lc's and fc's 8. A run directory holds `config.json` (the "model" key is this
module's; other keys belong to the trainer and are kept) and `model.safetensors` (+ `ema.safetensors`), so
`Tokenizer.from_pretrained(run_dir)` rebuilds the exact model, lc's frozen codebook included, without the original
codebook file.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ..core import from_signed, to_signed
from ..core.io import load_state_dict, save_state_dict
from ..core.rundir import RunDir
from ..quantize import QuantizeOutput, build_quantizer
from .autoencoder import AutoencoderConfig, Decoder, Encoder, get_preset

# Quantizer options that only say where initial weights come from; the weights themselves are in the state dict.
WEIGHT_SOURCE_OPTIONS = ("codebook",)


@dataclass
class TokenizerConfig:
    """Everything needed to rebuild a Tokenizer; saved as config.json["model"]."""

    preset: str = "tiny"  # a key of autoencoder.PRESETS
    overrides: dict[str, Any] = field(default_factory=dict)  # AutoencoderConfig fields replacing the preset's
    image_size: int = 64  # training/eval crop side; fixes the attention resolution and the token grid
    quantizer: str = "vq"  # a registered quantizer name
    codebook_size: int = 1024
    dim: int = 8  # the quantizer's dimension = quant_conv's output channels
    quantizer_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"codebook": "cb.safetensors"} for lc
    quantizer_weight: float = 1.0  # weight of the quantizer's loss in the tokenizer's (LC: 0.1, IBQ: 1.0)

    @property
    def autoencoder(self) -> AutoencoderConfig:
        return get_preset(self.preset, **self.overrides)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; a tensor passed as lc's codebook is recorded by shape (its values are saved
        with the weights)."""
        out = asdict(self)
        out["quantizer_options"] = {k: _jsonable(k, v) for k, v in self.quantizer_options.items()}
        out["overrides"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.overrides.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TokenizerConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown tokenizer config key(s) {unknown}; valid keys are {sorted(known)}")
        return cls(**data)


def _jsonable(key: str, value: Any) -> Any:
    if isinstance(value, Tensor):
        return f"<tensor {tuple(value.shape)}: values saved in {RunDir.MODEL}>"
    if isinstance(value, Path):
        return str(value)
    try:
        json.dumps(value)
    except TypeError as err:
        raise TypeError(f"quantizer option {key}={value!r} cannot be saved in {RunDir.CONFIG}: use numbers, strings, "
                        "lists or dicts") from err
    return value


@dataclass
class TokenizerOutput:
    """What `Tokenizer.forward` returns."""

    x_hat: Tensor  # (B, 3, H, W) reconstruction on the [0, 1] scale, NOT clamped (losses see the raw output)
    quant: QuantizeOutput  # the quantizer's output: z_q, indices (B, h, w), loss (the quantizer's own), terms
    quant_loss: Tensor  # config.quantizer_weight * quant.loss: what the training loss adds


class Tokenizer(nn.Module):
    """An image tokenizer: `encode` (B, 3, H, W) in [0, 1] -> (B, h, w) int64 ids, `decode` back to [0, 1]."""

    def __init__(self, config: TokenizerConfig, **quantizer_overrides: Any) -> None:
        """quantizer_overrides replace quantizer_options for construction only (used by from_pretrained)."""
        super().__init__()
        self.config = config
        ae = config.autoencoder
        self.grid = (ae.latent_size(config.image_size),) * 2  # (h, w) for the configured image size
        self.downsample_factor = ae.downsample_factor
        self.encoder = Encoder(ae)
        self.quant_conv = nn.Conv2d(ae.z_channels, config.dim, 1)
        options = {**config.quantizer_options, **quantizer_overrides}
        self.quantizer = build_quantizer(config.quantizer, codebook_size=config.codebook_size, dim=config.dim, **options)
        self.post_quant_conv = nn.Conv2d(config.dim, ae.z_channels, 1)
        self.decoder = Decoder(ae)

    # -- properties the trainer uses ------------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's last conv weight (VQGAN's adaptive generator weight compares gradients there)."""
        return self.decoder.last_layer

    # -- the network ----------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> TokenizerOutput:
        """x (B, 3, H, W) in [0, 1] -> reconstruction and quantizer output; training semantics follow self.training."""
        self._check_images(x)
        quant = self.quantize(x)
        x_hat = self.decode_latent(quant.z_q)
        return TokenizerOutput(x_hat=x_hat, quant=quant, quant_loss=self.config.quantizer_weight * quant.loss)

    def quantize(self, x: Tensor) -> QuantizeOutput:
        """x (B, 3, H, W) in [0, 1] -> the quantizer's output on the (B, dim, h, w) latent."""
        z = self.quant_conv(self.encoder(to_signed(x)))  # (B, dim, h, w)
        return self.quantizer(z)

    def decode_latent(self, z_q: Tensor) -> Tensor:
        """z_q (B, dim, h, w) -> (B, 3, H, W) on the [0, 1] scale, not clamped."""
        return from_signed(self.decoder(self.post_quant_conv(z_q)))

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """x (B, 3, H, W) float in [0, 1] -> token ids (B, h, w) int64, in eval mode (no codebook updates)."""
        self._check_images(x)
        with _eval_mode(self):
            return self.quantize(x).indices

    @torch.no_grad()
    def decode(self, ids: Tensor) -> Tensor:
        """ids (B, h, w) integer -> images (B, 3, h*f, w*f) float in [0, 1] (clamped), in eval mode."""
        if ids.dim() != 3:
            raise ValueError(f"decode expects token ids of shape (B, h, w), got {tuple(ids.shape)}")
        with _eval_mode(self):
            z_q = self.quantizer.embed(ids.to(self.post_quant_conv.weight.device))  # (B, dim, h, w)
            return self.decode_latent(z_q.to(self.post_quant_conv.weight.dtype)).clamp_(0.0, 1.0)

    def _check_images(self, x: Tensor) -> None:
        f = self.downsample_factor
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected float images in [0, 1], got {x.dtype}; convert with x.float() / 255")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"image size {tuple(x.shape[2:])} is not a multiple of the downsample factor {f}; "
                             f"crop or resize to a multiple of {f}")

    # -- persistence ---------------------------------------------------------------------------------------------
    def save_pretrained(self, run_dir: str | Path, ema_state_dict: dict[str, Tensor] | None = None) -> None:
        """Write config.json["model"] (other keys kept), model.safetensors and, if given, ema.safetensors; each file
        goes to a temporary name first and is renamed, so a crash never leaves a half-written file."""
        run = RunDir(run_dir)
        run.path.mkdir(parents=True, exist_ok=True)
        save_state_dict(self.state_dict(), run.model)
        if ema_state_dict is not None:
            save_state_dict(ema_state_dict, run.ema)
        run.update_config("model", self.resolved_config())

    def resolved_config(self) -> dict[str, Any]:
        """config.json's "model" section: the TokenizerConfig plus the quantizer's resolved options (its defaults,
        lc's codebook_dim), so that a later vqtok with other defaults still rebuilds this exact model."""
        model = self.config.to_dict()
        resolved = {k: _jsonable(k, v) for k, v in self.quantizer.extra_config().items()}
        model["quantizer_options"] = {**model["quantizer_options"], **resolved}
        return model

    @classmethod
    def from_pretrained(cls, run_dir: str | Path, ema: bool = False, device: str | torch.device = "cpu") -> "Tokenizer":
        """Rebuild from config.json["model"], load model.safetensors (ema.safetensors when ema=True) strictly, and
        move the model to `device`."""
        run = RunDir(run_dir)
        data = run.read_config()
        if "model" not in data:
            raise ValueError(f"{run.config} has no 'model' section; it was not written by Tokenizer.save_pretrained")
        config = TokenizerConfig.from_dict(data["model"])
        weights = run.weights(ema)
        state = load_state_dict(weights)
        model = cls(config, **_rebuild_overrides(config, state))
        model.load_state_dict(state, strict=True)
        return model.to(device)


def _rebuild_overrides(config: TokenizerConfig, state: dict[str, Tensor]) -> dict[str, Any]:
    """Quantizer options that rebuild from saved weights: a codebook SOURCE (lc's file) is dropped, since its values
    are a buffer in the state dict; lc then needs codebook_dim, read from the saved tensor's shape."""
    overrides: dict[str, Any] = {}
    for name in WEIGHT_SOURCE_OPTIONS:
        if name in config.quantizer_options:
            overrides[name] = None
            saved = state.get(f"quantizer.{name}")
            if saved is not None and saved.dim() == 2 and "codebook_dim" not in config.quantizer_options:
                overrides["codebook_dim"] = int(saved.shape[1])
    return overrides


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """module.eval() inside the block; the previous training flag is restored after."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
