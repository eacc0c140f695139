"""taming-transformers VQGAN (Esser et al. 2021; heiBOX `last.ckpt` + `model.yaml`, MIT) -> a vqtok run.

The keys are taming's own, which vqtok's encoder/decoder mirror except for three renames (`Layout.source_name`):
`down.i.downsample` / `up.i.upsample` are vqtok's `resample`, `mid.block_1/attn_1/block_2` are `mid.0/1/2`, and
taming's `up.i` is indexed by resolution level (run from the last) where vqtok's `up.k` is in execution order.
The codebook `quantize.embedding.weight` becomes vq's; the lookup is nearest L2, as taming's. `loss.*` (discriminator,
LPIPS) is dropped. A checkpoint with an EMA copy (LDM-style `model_ema.*`) converts its EMA weights by default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from .common import (EMA_BOOKKEEPING, IMAGE_SIZE, TAMING, Converted, check_ddconfig, choose_copy, infer_autoencoder,
                     network_names, prefix_dropper, require, take, target_shapes, tokenizer_config)
from .load import state_dict_of

NAME = "taming"
CODEBOOK = "quantize.embedding.weight"


def convert(checkpoint: dict[str, Any], path: Path, yaml_config: dict[str, Any] | None = None,
            yaml_path: Path | None = None, weights: str | None = None) -> Converted:
    state, container = state_dict_of(checkpoint, ("state_dict",), path)
    return convert_taming_state(state, container, NAME, "vq", yaml_config, yaml_path, weights,
                                {"commitment_weight": 1.0, "codebook_weight": 0.25})  # taming's legacy beta = 0.25


def convert_taming_state(state: dict[str, Tensor], container: str, source: str, quantizer: str,
                         yaml_config: dict[str, Any] | None, yaml_path: Path | None, weights: str | None,
                         quantizer_options: dict[str, Any]) -> Converted:
    """A state dict in taming's VQModel layout (taming, IBQ) with the codebook at quantize.embedding.weight."""
    autoencoder = infer_autoencoder(state, TAMING, source)
    codebook_size, dim = require(state, CODEBOOK, source).shape
    image_size = IMAGE_SIZE
    if yaml_config is not None:
        image_size = check_ddconfig(yaml_config, autoencoder, {"n_embed": codebook_size, "embed_dim": dim}, yaml_path)
    config = tokenizer_config(autoencoder, image_size, quantizer=quantizer, codebook_size=int(codebook_size),
                              dim=int(dim), quantizer_options=quantizer_options)
    shapes = target_shapes(config)
    names = network_names(shapes, TAMING, len(autoencoder.ch_mult), codebook=CODEBOOK)
    names, other_copy, chosen = choose_copy(state, names, weights, source)
    tensors = take(state, names, shapes, other_copy, prefix_dropper("loss.", *EMA_BOOKKEEPING), source)
    return Converted(config, tensors, {"container": container, "weights": chosen, "source_tensors": len(state)})
