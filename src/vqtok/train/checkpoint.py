"""Checkpoints that survive a kill at any moment.

Each checkpoint is a directory `checkpoints/step-XXXXXXXX/` (model.safetensors, ema.safetensors when weight EMA is
on, trainer.pt with the optimisers, schedules, RNG and usage). It is written as `step-XXXXXXXX.tmp/` and renamed
once complete, so resuming always finds a whole one; the run directory's model.safetensors / ema.safetensors /
trainer.pt are then replaced by hard links to the new checkpoint's files (`Tokenizer.from_pretrained(run_dir)`
reads those). The `keep` newest checkpoints are kept.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.io import save_state_dict
from ..models.tokenizer import EMA_FILE, MODEL_FILE

TRAINER_FILE = "trainer.pt"
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def save_checkpoint(
    run_dir: Path,
    step: int,
    model_state: dict[str, Tensor],
    ema_state: dict[str, Tensor] | None,
    trainer_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_state_dict(model_state, tmp / MODEL_FILE)
    if ema_state is not None:
        save_state_dict(ema_state, tmp / EMA_FILE)
    with open(tmp / TRAINER_FILE, "wb") as f:
        torch.save(trainer_state, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # the same step saved again (e.g. a resumed run stopped where it started)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for name in (MODEL_FILE, EMA_FILE, TRAINER_FILE):
        if (final / name).exists():
            _link_into(final / name, run_dir / name)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (`.tmp` directories are unfinished writes and never count)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / TRAINER_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _link_into(source: Path, target: Path) -> None:
    """Replace `target` by a hard link to `source` (a copy where links are not supported), atomically."""
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
