"""What the four converters share: taming's encoder/decoder under a source's names, the architecture read from tensor
shapes, the check against a source's yaml, and the run directory written through Tokenizer.save_pretrained.

A converter names, for every tensor of vqtok's Tokenizer, the source tensor it takes (`Layout.source_name` for the
network, a small dict for the quantizer). `take` copies them over (same values; half precision is widened to fp32,
exactly), checks every shape, and refuses a checkpoint holding tensors that are neither taken nor a documented drop,
so a tensor never silently goes missing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from ..core.rundir import RunDir
from ..models import PRESETS, AutoencoderConfig, Tokenizer, TokenizerConfig

IMAGE_SIZE = 256  # every published tokenizer was trained and evaluated at 256 px


@dataclass(frozen=True)
class Layout:
    """How a source names taming's encoder and decoder (vqtok: `down.i.block.j`, `down.i.resample`, `mid.0/1/2`,
    `up.k` in execution order, k = 0 the lowest resolution)."""

    encoder_level: str  # "encoder.down.{}" (taming) / "encoder.conv_blocks.{}" (LlamaGen)
    decoder_level: str  # "decoder.up.{}" / "decoder.conv_blocks.{}"
    decoder_by_resolution: bool  # taming: up.i is resolution level i (run in reverse); LlamaGen: execution order
    block: str  # "block" / "res"
    downsample: str = "downsample"
    upsample: str = "upsample"
    mid: tuple[str, str, str] = ("block_1", "attn_1", "block_2")

    def source_name(self, name: str, levels: int) -> str:
        """The source's name for a vqtok encoder/decoder tensor name (other names pass through unchanged)."""
        parts = name.split(".")
        if parts[0] not in ("encoder", "decoder") or len(parts) < 3:
            return name
        encoder = parts[0] == "encoder"
        if parts[1] == "mid":
            return ".".join([parts[0], "mid", self.mid[int(parts[2])], *parts[3:]])
        if parts[1] not in ("down", "up"):
            return name
        level = int(parts[2])
        if not encoder and self.decoder_by_resolution:
            level = levels - 1 - level  # vqtok runs up.0 first (lowest resolution); taming's up.0 is the highest
        resample = self.downsample if encoder else self.upsample
        kind = {"block": self.block, "attn": "attn", "resample": resample}[parts[3]]
        prefix = (self.encoder_level if encoder else self.decoder_level).format(level)
        return ".".join([prefix, kind, *parts[4:]])

    def decoder_resolution_level(self, index: int, levels: int) -> int:
        """The resolution level (0 = full resolution) of the source's decoder entry `index`."""
        return index if self.decoder_by_resolution else levels - 1 - index


TAMING = Layout(encoder_level="encoder.down.{}", decoder_level="decoder.up.{}", decoder_by_resolution=True,
                block="block")


def require(state: dict[str, Tensor], key: str, source: str) -> Tensor:
    if key not in state:
        found = ", ".join(sorted(state)[:5])
        raise ValueError(f"this is not a {source} checkpoint: it has no {key} (its first keys: {found}); "
                         "check --from")
    return state[key]


def _count(state: dict[str, Tensor], pattern: str) -> int:
    """How many consecutive indices i from 0 have a key starting with pattern.format(i) + '.'."""
    i = 0
    while any(k.startswith(pattern.format(i) + ".") for k in state):
        i += 1
    return i


def infer_autoencoder(state: dict[str, Tensor], layout: Layout, source: str) -> AutoencoderConfig:
    """ch, ch_mult, num_res_blocks, z_channels and the attention placement, read from the tensors' shapes."""
    ch = int(require(state, "encoder.conv_in.weight", source).shape[0])
    in_channels = int(state["encoder.conv_in.weight"].shape[1])
    levels = _count(state, layout.encoder_level)
    if levels == 0:
        raise ValueError(f"this is not a {source} checkpoint: no {layout.encoder_level.format(0)}.* tensors; "
                         "check --from")
    blocks = _count(state, layout.encoder_level.format(0) + "." + layout.block + ".{}")
    ch_mult = []
    for level in range(levels):
        key = f"{layout.encoder_level.format(level)}.{layout.block}.0.conv2.weight"
        width = int(require(state, key, source).shape[0])
        if width % ch:
            raise ValueError(f"encoder level {level} has {width} channels, not a multiple of ch={ch}")
        ch_mult.append(width // ch)
    decoder_blocks = _count(state, layout.decoder_level.format(0) + "." + layout.block + ".{}")
    if decoder_blocks != blocks + 1:
        raise ValueError(f"the decoder has {decoder_blocks} residual blocks per level and the encoder {blocks}; "
                         "vqtok's (taming's) decoder has num_res_blocks + 1")
    encoder_attn = {i for i in range(levels) if f"{layout.encoder_level.format(i)}.attn.0.q.weight" in state}
    decoder_attn = {layout.decoder_resolution_level(i, levels) for i in range(levels)
                    if f"{layout.decoder_level.format(i)}.attn.0.q.weight" in state}
    if encoder_attn != decoder_attn or encoder_attn not in (set(), {levels - 1}):
        raise ValueError(f"attention at encoder levels {sorted(encoder_attn)} and decoder levels "
                         f"{sorted(decoder_attn)}: vqtok places it at the lowest resolution (level {levels - 1}) "
                         "of both, or nowhere")
    z_channels = int(require(state, "decoder.conv_in.weight", source).shape[1])
    if int(require(state, "encoder.conv_out.weight", source).shape[0]) != z_channels:
        raise ValueError("the encoder's output channels differ from the decoder's input (taming's double_z): "
                         "that is a KL autoencoder, not a VQ tokenizer")
    out_channels = int(require(state, "decoder.conv_out.weight", source).shape[0])
    if in_channels != 3 or out_channels != 3:
        raise ValueError(f"the network maps {in_channels} to {out_channels} channels; vqtok tokenizers are RGB")
    return AutoencoderConfig(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=blocks, z_channels=z_channels,
                             attn_lowest=bool(encoder_attn))


def tokenizer_config(autoencoder: AutoencoderConfig, image_size: int, **quantizer: Any) -> TokenizerConfig:
    """A TokenizerConfig naming the preset the architecture equals (f16, f16-ibq, f8), else f16 with overrides."""
    for name, preset in PRESETS.items():
        if preset == autoencoder:
            return TokenizerConfig(preset=name, image_size=image_size, **quantizer)
    base = PRESETS["f16"]
    overrides = {f.name: getattr(autoencoder, f.name) for f in fields(autoencoder)
                 if getattr(autoencoder, f.name) != getattr(base, f.name)}
    return TokenizerConfig(preset="f16", overrides=overrides, image_size=image_size, **quantizer)


def target_shapes(config: TokenizerConfig) -> dict[str, torch.Size]:
    """Every tensor of the Tokenizer `config` describes, with its shape (built on the meta device: no memory)."""
    with torch.device("meta"):
        return {name: t.shape for name, t in Tokenizer(config).state_dict().items()}


def take(state: dict[str, Tensor], names: dict[str, str], shapes: dict[str, torch.Size],
         consumed_too: Iterable[str], is_dropped: Callable[[str], bool], source: str) -> dict[str, Tensor]:
    """{vqtok name: the source tensor names[vqtok name]}, shape-checked. A 1x1 conv may come as its squeezed (out, in)
    Linear weight. `consumed_too`: source keys accounted for otherwise (e.g. the other copy of the weights);
    `is_dropped`: the documented drops. Any other leftover source tensor is an error."""
    out: dict[str, Tensor] = {}
    for name, shape in shapes.items():
        key = names[name]
        tensor = require(state, key, source)
        if tensor.shape != shape:
            if tuple(shape[2:]) == (1, 1) and tensor.shape == shape[:2]:
                tensor = tensor.reshape(shape)
            else:
                raise ValueError(f"{key} has shape {tuple(tensor.shape)} where vqtok's {name} needs {tuple(shape)}: "
                                 f"the checkpoint's network is not the one its other tensors describe")
        out[name] = tensor.float() if tensor.is_floating_point() else tensor
    used = set(names[n] for n in shapes) | set(consumed_too)
    leftover = sorted(k for k in state if k not in used and not is_dropped(k))
    if leftover:
        shown = ", ".join(leftover[:4]) + (f" and {len(leftover) - 4} more" if len(leftover) > 4 else "")
        raise ValueError(f"{len(leftover)} tensor(s) of this {source} checkpoint have no place in vqtok's tokenizer "
                         f"({shown}); is it a {source} VQ tokenizer?")
    return out


def prefix_dropper(*prefixes: str) -> Callable[[str], bool]:
    return lambda key: key.startswith(prefixes)


def network_names(shapes: dict[str, torch.Size], layout: Layout, levels: int, **quantizer: str) -> dict[str, str]:
    """{vqtok name: source name} for every tensor: the network through `layout`, the quantizer's from `quantizer`
    (keyword = the vqtok name after "quantizer.", value = the source's name)."""
    names = {name: layout.source_name(name, levels) for name in shapes}
    for name, source_name in quantizer.items():
        names[f"quantizer.{name}"] = source_name
    return names


def choose_copy(state: dict[str, Tensor], names: dict[str, str], weights: str | None,
                source: str) -> tuple[dict[str, str], list[str], str]:
    """LitEma checkpoints (IBQ, taming/LDM with use_ema) hold each parameter twice: as `name` and as the EMA buffer
    `model_ema.<name without dots>`. Returns (the names to take, the other copy's names, "ema" or "raw"); the EMA
    copy is the default when there is one (IBQ evaluates with it)."""
    ema = {target: "model_ema." + dotless(name) for target, name in names.items()}
    has_ema = any(key.startswith("model_ema.") for key in state)
    chosen = weights or ("ema" if has_ema else "raw")
    if chosen == "raw":
        return names, list(ema.values()), chosen
    if not has_ema:
        raise ValueError(f"this {source} checkpoint holds no EMA copy (model_ema.*); convert it with --weights raw")
    missing = [key for key in ema.values() if key not in state]
    if missing:
        raise ValueError(f"the EMA copy lacks {len(missing)} tensor(s) (e.g. {missing[0]}); convert the raw weights "
                         "with --weights raw")
    return ema, list(names.values()), chosen


# LitEma's own counters, and its copies of the loss's parameters (the discriminator is a parameter of the model).
EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates", "model_ema.loss")


@dataclass
class Converted:
    """A converter's result: the Tokenizer's config, its complete state dict, and notes for config.json."""

    config: TokenizerConfig
    state: dict[str, Tensor]
    info: dict[str, Any]


# -- a source's yaml ----------------------------------------------------------------------------------------------


def find_section(data: Any, key: str) -> dict[str, Any] | None:
    """The mapping that holds `key` (depth first), e.g. model.params for taming's ddconfig."""
    if isinstance(data, dict):
        if key in data:
            return data
        for value in data.values():
            found = find_section(value, key)
            if found is not None:
                return found
    return None


def check_ddconfig(yaml_config: dict[str, Any], autoencoder: AutoencoderConfig, codebook: dict[str, int],
                   path: str | Path) -> int:
    """Compare a taming-style yaml (ddconfig + n_embed/embed_dim beside it) with what the tensors say; a one-line
    ValueError at the first disagreement. Returns the yaml's image resolution (IMAGE_SIZE when absent)."""
    section = find_section(yaml_config, "ddconfig")
    if section is None or not isinstance(section["ddconfig"], dict):
        raise ValueError(f"{path} has no ddconfig (taming's model.params.ddconfig); pass the model yaml of the "
                         "checkpoint, or no --config")
    dd = section["ddconfig"]
    resolution = int(dd.get("resolution", IMAGE_SIZE))
    levels = len(autoencoder.ch_mult)
    expected: dict[str, Any] = {
        "ch": autoencoder.ch, "ch_mult": list(autoencoder.ch_mult), "num_res_blocks": autoencoder.num_res_blocks,
        "z_channels": autoencoder.z_channels, "in_channels": 3, "out_ch": 3, "double_z": False,
    }
    said: dict[str, Any] = {k: dd[k] for k in expected if k in dd}
    if "ch_mult" in said:
        said["ch_mult"] = list(said["ch_mult"])
    if "attn_resolutions" in dd:
        attention = [i for i in range(levels) if resolution // 2**i in set(dd["attn_resolutions"] or [])]
        said["attention levels"] = attention
        expected["attention levels"] = [levels - 1] if autoencoder.attn_lowest else []
    for key, value in codebook.items():
        if key in section:
            said[key] = section[key]
            expected[key] = value
    for key, value in said.items():
        if value != expected[key]:
            raise ValueError(f"{path} says {key}={value} but the checkpoint's tensors give {expected[key]}; "
                             "pass the yaml that belongs to this checkpoint")
    return resolution


# -- writing the run ------------------------------------------------------------------------------------------------


def write_run(out: str | Path, config: TokenizerConfig, state: dict[str, Tensor], info: dict[str, Any]) -> Tokenizer:
    """Build the Tokenizer around the converted tensors (no copy: they are assigned) and save it with
    Tokenizer.save_pretrained; config.json also records the conversion and the data size for `vqtok eval`."""
    run = RunDir(out)
    if run.config.exists() or run.model.exists():
        raise FileExistsError(f"{run.path} already holds a run; choose another --out or delete it first")
    with torch.device("meta"):
        model = Tokenizer(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    model.save_pretrained(run.path)
    run.update_config("data", {"size": config.image_size})
    run.update_config("convert", info)
    return model


def dotless(name: str) -> str:
    """LitEma's buffer name for a parameter: the dots removed (IBQ's and taming's EMA copies)."""
    return re.sub(r"\.", "", name)
