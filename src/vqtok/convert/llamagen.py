"""LlamaGen VQ-16 / VQ-8 (HF `FoundationVision/LlamaGen` `vq_ds16_c2i.pt`, MIT; tokenizer/tokenizer_image/vq_model.py).

Weights under `model` and, when trained with EMA, `ema` (LlamaGen's own loaders prefer `ema`: so does vqtok; `raw`
takes `model`). taming's network under other names: encoder `conv_blocks.i.res.j` / `.attn.j` / `.downsample`,
`mid.0/1/2`; decoder `conv_blocks.k` in EXECUTION order (k = 0 the lowest resolution, taming's up.(L-1-k)), which
is vqtok's own order. The codebook `quantize.embedding.weight` (16384, 8) is L2-normalised for the lookup (z too:
nearest = highest cosine) AND for decoding: vqtok's `fc` with `l2_norm=True`. `quantize.codebook_used` (a training
statistic) is dropped. A `codebook_l2_norm: false` model (config yaml or the checkpoint's saved args) looks up by
plain L2 instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import (IMAGE_SIZE, Converted, Layout, find_section, infer_autoencoder, network_names, prefix_dropper,
                     require, take, target_shapes, tokenizer_config)
from .load import state_dict_of

NAME = "llamagen"
CODEBOOK = "quantize.embedding.weight"
LLAMAGEN = Layout(encoder_level="encoder.conv_blocks.{}", decoder_level="decoder.conv_blocks.{}",
                  decoder_by_resolution=False, block="res", mid=("0", "1", "2"))


def convert(checkpoint: dict[str, Any], path: Path, yaml_config: dict[str, Any] | None = None,
            yaml_path: Path | None = None, weights: str | None = None) -> Converted:
    if weights == "ema" and not isinstance(checkpoint.get("ema"), dict):
        found = ", ".join(sorted(map(str, checkpoint))[:8])
        raise ValueError(f"{path} holds no 'ema' weights (top-level keys: {found}); convert with --weights raw")
    containers = ("model", "state_dict") if weights == "raw" else ("ema", "model", "state_dict")
    state, container = state_dict_of(checkpoint, containers, path)
    autoencoder = infer_autoencoder(state, LLAMAGEN, "LlamaGen")
    codebook_size, dim = require(state, CODEBOOK, "LlamaGen").shape
    l2_norm = bool(getattr(checkpoint.get("args"), "codebook_l2_norm", True))
    if yaml_config is not None:
        l2_norm = check_model_args(yaml_config, autoencoder.ch_mult, autoencoder.z_channels, int(codebook_size),
                                   int(dim), yaml_path, l2_norm)
    # LlamaGen's loss: codebook term weight 1, commitment beta 0.25
    options = {"l2_norm": l2_norm, "commitment_weight": 0.25, "codebook_weight": 1.0}
    config = tokenizer_config(autoencoder, IMAGE_SIZE, quantizer="fc", codebook_size=int(codebook_size), dim=int(dim),
                              quantizer_options=options)
    shapes = target_shapes(config)
    names = network_names(shapes, LLAMAGEN, len(autoencoder.ch_mult), codebook=CODEBOOK)
    tensors = take(state, names, shapes, (), prefix_dropper("quantize.codebook_used"), "LlamaGen")
    chosen = "ema" if container == "ema" else "raw"
    return Converted(config, tensors, {"container": container, "weights": chosen, "source_tensors": len(state)})


def check_model_args(yaml_config: dict[str, Any], ch_mult: tuple[int, ...], z_channels: int, codebook_size: int,
                     dim: int, path: Path | None, l2_norm: bool) -> bool:
    """Compare a yaml of LlamaGen's ModelArgs fields with the tensors; returns its codebook_l2_norm (else `l2_norm`)."""
    section = find_section(yaml_config, "codebook_size") or find_section(yaml_config, "encoder_ch_mult")
    if section is None:
        raise ValueError(f"{path} holds none of LlamaGen's ModelArgs fields (codebook_size, codebook_embed_dim, "
                         "encoder_ch_mult, decoder_ch_mult, z_channels, codebook_l2_norm)")
    expected = {"codebook_size": codebook_size, "codebook_embed_dim": dim, "encoder_ch_mult": list(ch_mult),
                "decoder_ch_mult": list(ch_mult), "z_channels": z_channels}
    for key, value in expected.items():
        said = section.get(key)
        if said is not None and (list(said) if isinstance(said, (list, tuple)) else said) != value:
            raise ValueError(f"{path} says {key}={said} but the checkpoint's tensors give {value}; pass the config "
                             "that belongs to this checkpoint")
    return bool(section.get("codebook_l2_norm", l2_norm))
