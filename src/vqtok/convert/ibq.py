"""IBQ (SEED-Voken, HF `TencentARC/IBQ-Tokenizer-{1024,8192,16384,262144}`, `imagenet256_N.ckpt`, Apache-2.0).

A Lightning checkpoint whose `state_dict` holds taming's VQModel (4 residual blocks, embed_dim 256,
`quantize.embedding.weight` (K, 256)) AND LitEma's copy of every parameter under its dot-stripped name
(`model_ema.encoderconv_inweight`, with `model_ema.decay` / `model_ema.num_updates`). IBQ evaluates with the EMA
weights, so they are converted by default; `weights="raw"` takes the generator's. The token is the ARGMAX OF THE
INNER PRODUCT z . e (SEED-Voken's IndexPropagationQuantize), which is vqtok's `ibq` in eval mode.
Dropped: `loss.*` (discriminator, LPIPS), LitEma's counters and its copies of the loss's parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import Converted
from .load import state_dict_of
from .taming import convert_taming_state

NAME = "ibq"


def convert(checkpoint: dict[str, Any], path: Path, yaml_config: dict[str, Any] | None = None,
            yaml_path: Path | None = None, weights: str | None = None) -> Converted:
    state, container = state_dict_of(checkpoint, ("state_dict",), path)
    return convert_taming_state(state, container, "IBQ", "ibq", yaml_config, yaml_path, weights, {})
