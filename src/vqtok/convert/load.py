"""Reading a published checkpoint without running code.

Every file goes through `torch.load(weights_only=True)` (or safetensors): tensors, containers and plain values only.
The allow-list holds what the formats need and nothing that can act when it is unpickled:
- `argparse.Namespace` (LlamaGen's training checkpoints keep their `args`): unpickling only sets attributes;
- Lightning 1.x's `ModelCheckpoint` class, which taming-era `last.ckpt` files use as a KEY of their `callbacks`
  dict: it is read as an inert stand-in class (no Lightning import, no Lightning code).
Anything else (a callback object, an `AttributeDict` of hyper-parameters, a payload) is refused with one line that
names the global and says how to re-save the weights alone.
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# Keys under which the sources keep their weights, in the order tried when no preference applies.
CONTAINERS = ("state_dict", "model", "ema")


class LightningStandIn:
    """What a Lightning callback CLASS reads back as: an inert placeholder (it only ever appears as a dict key)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass


_STAND_INS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
)


def _safe_globals() -> contextlib.AbstractContextManager:
    """The allow-list as a context (torch 2.5 has no (object, name) entries, 2.4 no context: less is allowed there)."""
    serialization = torch.serialization
    if not hasattr(serialization, "safe_globals"):
        return contextlib.nullcontext()
    allowed: list[Any] = [argparse.Namespace]
    if tuple(int(p) for p in re.findall(r"\d+", torch.__version__)[:2]) >= (2, 6):
        allowed += [(LightningStandIn, name) for name in _STAND_INS]
    return serialization.safe_globals(allowed)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at `path` as a dict, read weights-only (or from safetensors). Errors are one line each:
    FileNotFoundError for a missing file, ValueError for a file that is not a checkpoint or would need unpickling."""
    data = read_weights(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a dict of weights; pass the checkpoint file "
                         "that holds the model's state_dict")
    return data


def read_weights(path: str | Path) -> Any:
    """Whatever the file holds (a dict, or a bare tensor such as VQGAN-LC's codebook file), read weights-only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    if _is_safetensors(path):
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    try:
        with _safe_globals():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        raise ValueError(_refusal(path, str(error))) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path} is not a PyTorch checkpoint ({first[:160]})") from None


def _is_safetensors(path: Path) -> bool:
    """safetensors files start with an 8-byte little-endian header length, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and not zipfile.is_zipfile(path)


def _refusal(path: Path, message: str) -> str:
    match = re.search(r"GLOBAL ([\w.]+)", message) or re.search(r"Unsupported class ([\w.]+)", message)
    if match is None:  # not a forbidden global: garbage, or a pickle torch cannot read weights-only
        detail = message.split("WeightsUnpickler error:")[-1].strip().splitlines()
        detail = detail[0][:160] if detail and "WeightsUnpickler" in message else "unreadable"
        if not zipfile.is_zipfile(path):  # torch.save has written zip files since torch 1.6
            return f"{path} is not a PyTorch checkpoint ({detail})"
        return f"{path} cannot be read weights-only ({detail}); vqtok never unpickles arbitrary objects"
    return (f"{path} holds the pickled global {match.group(1)}, which vqtok will not unpickle (unpickling can run "
            "code); where you trust the file, re-save only the weights (its state_dict) with the project that made "
            "it, e.g. as .safetensors, and convert that file")


def state_dict_of(checkpoint: dict[str, Any], containers: tuple[str, ...],
                  path: str | Path) -> tuple[dict[str, Tensor], str]:
    """(the state dict, where it was found): the first of `containers` present, else the checkpoint itself when it is
    a bare dict of tensors. A ValueError names the keys found when neither applies."""
    for key in containers:
        value = checkpoint.get(key)
        if isinstance(value, dict) and value and all(isinstance(v, Tensor) for v in value.values()):
            return value, key
    if checkpoint and all(isinstance(v, Tensor) for v in checkpoint.values()):
        return checkpoint, "bare"
    found = ", ".join(sorted(map(str, checkpoint))[:8]) or "nothing"
    raise ValueError(f"{path} holds no state dict of tensors under {' / '.join(containers)} and is not a bare state "
                     f"dict (top-level keys: {found})")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A source's model config (taming's model.yaml, IBQ's LightningCLI yaml, ...) as a dict."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a YAML mapping")
    return data
