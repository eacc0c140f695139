"""Training configuration: dataclasses, read from YAML, overridden with `--set key=value`, saved resolved in config.json."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..models import TokenizerConfig


@dataclass
class DataConfig:
    source: str = "photos"  # "photos" | "fashion-mnist" | a folder path
    size: int = 64  # crop side in pixels
    train_length: int | None = None  # crops per epoch for the photos source (None: the source's default)
    val_length: int | None = None  # validation crops for the photos source
    batch_size: int = 16  # per process
    num_workers: int | None = None  # DataLoader workers; None: none on the CPU, on CUDA the process's CPUs - 1 (<= 8)


@dataclass
class CodebookConfig:
    """How lc's frozen codebook is made when model.quantizer_options has no `codebook` file (`vqtok codebook build`)."""

    encoder: str = "efficientnet-lite0"
    source: str | None = None  # None: the training data source
    method: str = "two-level"
    crops: int | None = None  # crops to extract features from (None: the builder's default for the size)
    seed: int = 0
    cache_dir: str = ".cache/codebooks"  # relative to the working directory


@dataclass
class LossConfig:
    # Pixel losses on the papers' [-1, 1] image scale (taming, VQGAN-LC and IBQ feed x / 127.5 - 1): twice the L1
    # and four times the MSE of [0, 1] images, so that l1_weight 1.0 weighs L1 against LPIPS, L_Q and the GAN term
    # as the papers' recipes do
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    perceptual_weight: float = 1.0  # 0 disables; LPIPS-VGG when its weights are found, else feature matching
    perceptual_encoder: str = "efficientnet-lite0"  # the offline fallback network
    lpips_dir: str | None = None
    disc_weight: float = 0.0  # 0 disables the GAN (no discriminator is built)
    disc_start: int = 0  # step at which the GAN losses and the discriminator updates start
    disc_layers: int = 2  # PatchGAN n_layers (LC 2, IBQ 3)
    disc_loss: str = "hinge"  # "hinge" | "vanilla"
    gen_loss: str = "hinge"  # "hinge" (-mean D, LC) | "non-saturating" (IBQ)
    adaptive_weight: bool = True  # VQGAN's ||grad rec|| / ||grad G|| balance (LC); IBQ uses a fixed weight
    lecam_weight: float = 0.0  # IBQ: 0.05
    lecam_decay: float = 0.999


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    schedule: str = "constant"  # "constant" | "cosine" (LC: warm-up then cosine) | "step" (IBQ)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine ends at lr * min_lr_ratio
    milestones: tuple[int, ...] = ()  # "step": multiply by gamma at each
    gamma: float = 0.1
    grad_clip: float | None = None  # max global gradient norm; None: no clipping
    # The quantizer's parameters (lc's projector, a learned codebook) train at lr * this. 1.0 is every paper's
    # recipe; a short schedule can raise it so lc's projector keeps up with the encoder (configs/demo.yaml).
    quantizer_lr_scale: float = 1.0


@dataclass
class TrainConfig:
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 1000  # total optimiser steps
    seed: int = 0
    bf16: bool = False  # bf16 autocast for the networks (the quantizer always computes in fp32)
    tf32: bool = True  # on CUDA: fp32 matmuls/convolutions in TF32 (precision "high"); false: exact fp32
    compile: bool = False  # torch.compile the encoder and decoder (in place: weights keep their names)
    ema_decay: float | None = None  # weight EMA used for evaluation (IBQ: 0.999); None: off
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: only at the end
    eval_images: int | None = 256  # images for the periodic and final evaluation (None: the whole validation set)
    fid: bool = True  # rFID/rKID in the final evaluation
    fid_images: int | None = None  # rFID/rKID on the first N evaluated images (None: all); usage/PSNR cover all
    # PSNR/SSIM/LPIPS (and rFID) on the first N evaluated images, code usage on all of them (None: all). Usage needs
    # only the encoder and many tokens per code; the image metrics settle on far fewer images.
    recon_images: int | None = None
    device: str = "auto"  # "auto" | "cpu" | "cuda"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["model"] = self.model.to_dict()
        return json.loads(json.dumps(out))  # tuples -> lists

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return build_config(cls, data, "")


def build_config(cls: type, data: dict[str, Any], where: str) -> Any:
    """cls from a dict: unknown keys and values of the wrong type are errors that name the key and what it takes."""
    if not isinstance(data, dict):
        raise ValueError(f"config section {where.rstrip('.') or 'top level'} must be a mapping, got "
                         f"{type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown config key(s) {[where + k for k in unknown]}; valid keys here: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        if dataclasses.is_dataclass(hints[name]):
            values[name] = build_config(hints[name], value, f"{where}{name}.")
        else:
            values[name] = checked_value(value, hints[name], where + name)
    return cls(**values)


def checked_value(value: Any, annotation: Any, key: str) -> Any:
    """`value` as the annotation's type (an int for a float, a list for a tuple, 1000.0 for an int are converted),
    or a ValueError naming the key, the value and the type it takes."""
    try:
        return _convert(value, annotation)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        raise ValueError(f"config value {key}={value!r} is not {_describe_type(annotation)}; set it with "
                         f"--set {key}=VALUE") from None


def _convert(value: Any, annotation: Any) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option)
            except (TypeError, ValueError):
                continue
        raise TypeError
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise TypeError
        return int(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise TypeError
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0]) for v in value)
        if len(value) != len(args):
            raise TypeError
        return tuple(_convert(v, a) for v, a in zip(value, args))
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise TypeError
        return value
    raise TypeError(f"no check for {annotation!r}")


def _describe_type(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe_type(a) for a in args)
    if annotation is type(None):
        return "null"
    if origin is tuple:
        return ("a list of " + _describe_type(args[0]) + "s") if args[1:] == (Ellipsis,) else \
            f"a list of {len(args)} values ({', '.join(_describe_type(a) for a in args)})"
    if origin is dict or annotation is dict:
        return "a mapping"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(annotation, str(annotation))


def parse_override(text: str) -> tuple[list[str], Any]:
    """"optim.lr=1e-4" -> (["optim", "lr"], 0.0001); the value is read as YAML (numbers, booleans, lists, null)."""
    if "=" not in text:
        raise ValueError(f"--set expects key=value (e.g. optim.lr=1e-4), got {text!r}")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML 1.1 reads "1e-4" as a string
    return key.strip().split("."), value


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None,
                config_class: type = None) -> Any:
    """A config (TrainConfig, or `config_class`: any dataclass with from_dict, e.g. the generators') from a YAML file
    (or `base`, a saved config dict), with `key=value` overrides applied."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found (the shipped ones are in configs/)")
        data = yaml.safe_load(path.read_text()) or {}
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {text}: {key} is not a section")
        node[keys[-1]] = value
    return (config_class or TrainConfig).from_dict(data)
