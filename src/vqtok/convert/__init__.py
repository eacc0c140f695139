"""Published tokenizer checkpoints -> vqtok run directories, one file per source.

    vqtok.convert.convert("ibq", "imagenet256_262144.ckpt", "runs/ibq-262144")

Each converter reads the file weights-only (load.py), infers the architecture from the tensors' shapes, maps every
tensor to vqtok's name (common.py) and writes config.json + model.safetensors through Tokenizer.save_pretrained, so
`Tokenizer.from_pretrained`, `vqtok eval`, `encode` and `decode` work on the result. The tokens do not change: each
source keeps its own lookup (taming: nearest L2; IBQ: argmax z . e; LlamaGen: cosine with the l2-normalised
codebook; VQGAN-LC: nearest L2 to the projected frozen codebook).
"""

from __future__ import annotations

from pathlib import Path

from ..models import Tokenizer
from . import ibq, llamagen, taming, vqgan_lc
from .common import Converted, write_run
from .load import read_checkpoint, read_yaml

SOURCES = {module.NAME: module for module in (vqgan_lc, ibq, taming, llamagen)}
WEIGHTS = ("ema", "raw")


def convert(source: str, checkpoint: str | Path, out: str | Path, config: str | Path | None = None,
            weights: str | None = None, codebook: str | Path | None = None) -> Tokenizer:
    """Convert `checkpoint` of `source` (a key of SOURCES) into the run directory `out` and return the Tokenizer.
    config: the source's model yaml, checked against the tensors; weights: "ema" or "raw" (default: the EMA copy
    where the checkpoint has one); codebook: VQGAN-LC's separate codebook file, for a checkpoint without it."""
    converted = convert_checkpoint(source, checkpoint, config, weights, codebook)
    info = {"source": source, "checkpoint": str(checkpoint), **converted.info}
    return write_run(out, converted.config, converted.state, info)


def convert_checkpoint(source: str, checkpoint: str | Path, config: str | Path | None = None,
                       weights: str | None = None, codebook: str | Path | None = None) -> Converted:
    """The conversion without writing anything: config, state dict and notes."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r} for --from; choose one of {', '.join(SOURCES)}")
    if weights is not None and weights not in WEIGHTS:
        raise ValueError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if codebook is not None and source != vqgan_lc.NAME:
        raise ValueError(f"--codebook is VQGAN-LC's separate codebook file; {source} checkpoints hold their codebook")
    checkpoint = Path(checkpoint)
    data = read_checkpoint(checkpoint)
    yaml_config = read_yaml(config) if config is not None else None
    yaml_path = Path(config) if config is not None else None
    extra = {"codebook": Path(codebook) if codebook is not None else None} if source == vqgan_lc.NAME else {}
    return SOURCES[source].convert(data, checkpoint, yaml_config, yaml_path, weights, **extra)


__all__ = ["SOURCES", "Converted", "convert", "convert_checkpoint"]
