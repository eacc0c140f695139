"""VQGAN-LC (Zhu et al. 2024; `vqgan-lc-100K-f16-dim8.pth` / f8-dim4 from the authors' Google Drive).

Those weights carry no licence: vqtok converts a file the user supplies and never downloads or bundles one.
The `.pth` holds `state_dict` or `model` (or is a bare state dict): taming's encoder/decoder under taming's names,
the frozen codebook `tok_embeddings.weight` (100000, 768) and the projector `codebook_projection` Linear(768, E),
E = 8 (f16) or 4 (f8: ch_mult (1, 2, 2, 4), no per-level attention). A checkpoint without `tok_embeddings.weight`
takes the codebook file the original code loads (`codebook-100K.pth`, a (K, 768) tensor) as `codebook=`.
The lookup is nearest L2 to the projected codebook tok @ W^T + b, and decoding uses that projected codebook too (the
released decode_code is broken): vqtok's `lc` with `standardize=False`, which keeps the raw features and projector.
Dropped: `discriminator.*`, `perceptual_loss.*`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .common import (IMAGE_SIZE, TAMING, Converted, check_ddconfig, infer_autoencoder, network_names, prefix_dropper,
                     require, take, target_shapes, tokenizer_config)
from .load import read_weights, state_dict_of

NAME = "vqgan-lc"
CODEBOOK = "tok_embeddings.weight"


def convert(checkpoint: dict[str, Any], path: Path, yaml_config: dict[str, Any] | None = None,
            yaml_path: Path | None = None, weights: str | None = None, codebook: Path | None = None) -> Converted:
    if weights == "ema":
        raise ValueError("VQGAN-LC checkpoints hold no EMA copy; drop --weights ema")
    state, container = state_dict_of(checkpoint, ("state_dict", "model"), path)
    state = with_codebook(state, codebook)
    if "codebook_projection.0.weight" in state:
        raise ValueError("this VQGAN-LC checkpoint projects its codebook with an MLP (use_cblinear 2); vqtok's lc "
                         "has the released Linear projector only")
    projector = require(state, "codebook_projection.weight", "VQGAN-LC")
    features = require(state, CODEBOOK, "VQGAN-LC")
    autoencoder = infer_autoencoder(state, TAMING, "VQGAN-LC")
    image_size = IMAGE_SIZE
    if yaml_config is not None:  # its yaml's embed_dim is overridden on the command line (--embed_dim): not checked
        image_size = check_ddconfig(yaml_config, autoencoder, {}, yaml_path)
    config = tokenizer_config(
        autoencoder, image_size, quantizer="lc", codebook_size=int(features.shape[0]), dim=int(projector.shape[0]),
        quantizer_options={"codebook_dim": int(features.shape[1]), "standardize": False}, quantizer_weight=0.1)
    shapes = target_shapes(config)
    projector_names = {"projector.weight": "codebook_projection.weight", "projector.bias": "codebook_projection.bias"}
    names = network_names(shapes, TAMING, len(autoencoder.ch_mult), codebook=CODEBOOK, **projector_names)
    tensors = take(state, names, shapes, (), prefix_dropper("discriminator.", "perceptual_loss."), "VQGAN-LC")
    return Converted(config, tensors, {"container": container, "weights": "raw", "source_tensors": len(state),
                                       "codebook": str(codebook) if codebook else CODEBOOK})


def with_codebook(state: dict[str, Tensor], codebook: Path | None) -> dict[str, Tensor]:
    """The state dict with `tok_embeddings.weight` from the separate codebook file when one is given."""
    if codebook is None:
        return state
    data = read_weights(codebook)  # the original code's file is a bare tensor; vqtok's codebook files hold one
    tensors = [data] if isinstance(data, Tensor) else [v for v in data.values() if isinstance(v, Tensor)]
    if len(tensors) != 1 or tensors[0].dim() != 2:
        raise ValueError(f"{codebook} should hold one (K, F) codebook tensor; it holds {len(tensors)} tensor(s)")
    features = tensors[0]
    if CODEBOOK in state and not torch.equal(state[CODEBOOK].float(), features.float()):
        raise ValueError(f"{codebook} differs from the checkpoint's own {CODEBOOK}; drop --codebook")
    return {**state, CODEBOOK: features}
