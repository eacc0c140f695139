"""RunDir: the one owner of a run directory's file names and of what its checkpoints hold.

    runs/NAME/
      config.json            the full resolved config ("model" rebuilds the network; the rest is the trainer's)
      model.safetensors      the latest weights (+ ema.safetensors: the weight EMA, when on)
      trainer.pt             optimisers, schedules, RNG, usage histograms, position: what resuming needs
      metrics.jsonl          the training log, one JSON object a line
      metrics.json           the last evaluation;  report.md, reconstructions.png, usage.png: its report
      checkpoints/step-XXXXXXXX/   model.safetensors, ema.safetensors, trainer.pt of one step

A checkpoint is written whole as `step-XXXXXXXX.tmp/`, flushed to disk and renamed, so a run killed at any moment
resumes from its last complete checkpoint; the top-level weight and trainer files are then replaced (atomically) by
hard links to the new checkpoint's files. trainer.pt holds only tensors and plain Python values (the RNG states are
stored as tensors), so it loads with `torch.load(weights_only=True)`: reading a run someone else made never
executes code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .io import load_state_dict, save_state_dict, write_json

_STEP_DIR = re.compile(r"^step-(\d{8})$")


class RunDir:
    """`run = RunDir("runs/demo")`: paths (`run.config`, `run.model`, ...), config and log IO, checkpoints."""

    CONFIG = "config.json"
    MODEL = "model.safetensors"
    EMA = "ema.safetensors"
    TRAINER = "trainer.pt"
    LOG = "metrics.jsonl"
    METRICS = "metrics.json"
    REPORT = "report.md"
    RECONSTRUCTIONS = "reconstructions.png"
    USAGE_PLOT = "usage.png"
    CHECKPOINTS = "checkpoints"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- file names -----------------------------------------------------------------------------------------------
    config = property(lambda self: self.path / self.CONFIG)
    model = property(lambda self: self.path / self.MODEL)
    ema = property(lambda self: self.path / self.EMA)
    trainer = property(lambda self: self.path / self.TRAINER)
    log = property(lambda self: self.path / self.LOG)
    metrics = property(lambda self: self.path / self.METRICS)
    report = property(lambda self: self.path / self.REPORT)
    reconstructions = property(lambda self: self.path / self.RECONSTRUCTIONS)
    usage_plot = property(lambda self: self.path / self.USAGE_PLOT)
    checkpoints = property(lambda self: self.path / self.CHECKPOINTS)

    def weights(self, ema: bool = False) -> Path:
        """model.safetensors, or ema.safetensors with ema=True; a clear error when it is missing."""
        path = self.ema if ema else self.model
        if not path.is_file():
            hint = "train with weight EMA on, or load the raw weights" if ema else "the run saved no weights yet"
            raise FileNotFoundError(f"{path} not found ({hint})")
        return path

    # -- config and log -------------------------------------------------------------------------------------------
    def read_config(self) -> dict[str, Any]:
        """config.json as a dict, or a clear error when this is not a run directory."""
        if not self.config.is_file():
            raise FileNotFoundError(f"{self.config} not found: is {self.path} a vqtok run directory "
                                    "(vqtok train --out)?")
        try:
            return json.loads(self.config.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{self.config} is not valid JSON ({error}); it was not written by vqtok") from None

    def write_config(self, config: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.config, config)

    def update_config(self, section: str, value: Any) -> None:
        """Replace one top-level key of config.json, keeping the others (the file is created when missing)."""
        config = self.read_config() if self.config.is_file() else {}
        config[section] = value
        self.write_config(config)

    def append_log(self, row: dict[str, Any]) -> None:
        """One JSON line in metrics.jsonl."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as f:
            f.write(json.dumps(row) + "\n")

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def save_checkpoint(self, step: int, model_state: dict[str, Tensor], ema_state: dict[str, Tensor] | None,
                        trainer_state: dict[str, Any], keep: int = 2) -> Path:
        """Write checkpoints/step-XXXXXXXX/ whole, link its files into the run directory, keep the `keep` newest."""
        root = self.checkpoints
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{step:08d}"
        tmp = root / f"step-{step:08d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_state_dict(model_state, tmp / self.MODEL)
        if ema_state is not None:
            save_state_dict(ema_state, tmp / self.EMA)
        with open(tmp / self.TRAINER, "wb") as f:
            torch.save(trainer_state, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # the same step saved again (e.g. a resumed run stopped where it started)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for name in (self.MODEL, self.EMA, self.TRAINER):
            if (final / name).exists():
                _link_into(final / name, self.path / name)
        for old in self.list_checkpoints()[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def list_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (`.tmp` directories are unfinished writes and never count)."""
        root = self.checkpoints
        if not root.is_dir():
            return []
        found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / self.TRAINER).is_file()]
        return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    def latest_checkpoint(self) -> Path | None:
        found = self.list_checkpoints()
        return found[-1] if found else None

    def load_checkpoint(self, checkpoint: Path, device: str | torch.device = "cpu"):
        """(model state, ema state or None, trainer state) of one checkpoint directory, all loaded weights-only."""
        model = load_state_dict(checkpoint / self.MODEL, str(device))
        ema = load_state_dict(checkpoint / self.EMA, str(device)) if (checkpoint / self.EMA).is_file() else None
        return model, ema, self.load_trainer_state(checkpoint / self.TRAINER, device)

    def load_trainer_state(self, path: Path | None = None, device: str | torch.device = "cpu") -> dict[str, Any]:
        """A trainer.pt (default: the run's latest), loaded weights-only: a file that would need arbitrary
        unpickling (written by vqtok before its RNG states were stored as tensors, or by anything else) is refused."""
        path = path or self.trainer
        try:
            return torch.load(path, map_location=device, weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as error:  # torch raises UnpicklingError / RuntimeError with a long explanation
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"{path} cannot be loaded weights-only ({first_line}); vqtok never unpickles "
                             "arbitrary objects: it was written by another program or an older vqtok") from None

    def training_usage_state(self) -> dict[str, Any] | None:
        """The training code histogram the trainer stored (a CodeUsage state dict): the last complete epoch, else
        the epoch in progress; None when the run has no trainer.pt or neither holds a token."""
        if not self.trainer.is_file():
            return None
        state = self.load_trainer_state()
        for key in ("usage_train", "usage_epoch"):
            usage = state.get(key)
            if usage is not None and int(usage["counts"].sum()) > 0:
                return usage
        return None


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
