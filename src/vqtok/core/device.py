"""Device choice, written once: "auto" is this process's GPU when torch sees one (cuda:LOCAL_RANK under torchrun),
else the CPU; an explicit name is taken as given, and asking for CUDA without a GPU is a clear error."""

from __future__ import annotations

import os

import torch


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """"auto" | "cpu" | "cuda" | "cuda:N" -> a torch.device ("cuda" alone means this rank's GPU)."""
    name = str(name)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name} was asked for but torch sees no GPU; use cpu or auto")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device
