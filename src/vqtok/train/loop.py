"""The training loop every vqtok model runs in: tokenizers (train/trainer.py) and generators (generate/trainer.py).

One code path for a single process and for torchrun data parallelism (NCCL on GPUs, gloo on CPU). The loop owns what
does not depend on the model: devices and precision, seeding, the data order, the DataLoader, optimiser steps with
the gradient all-reduce, the weight EMA, checkpoints and exact resume, SIGINT/SIGTERM, logs and the progress bar. A
subclass builds its model, optimisers and dataset in `build()` and says what one step is in `train_step()`.

Data parallelism averages gradients with one flat all-reduce per optimiser step instead of wrapping modules in
DistributedDataParallel (the GAN recipe runs the discriminator several times per step and takes autograd.grad at the
decoder's last layer; quantizers hold codebooks as buffers; DDP's reducer fights all three). The arithmetic is the
same: every rank applies the mean gradient to the same weights.

Resuming is exact: the checkpoint holds the optimisers, schedules, weight EMA, the subclass's state, RNG states and
the position inside the epoch's shuffled order, so N steps + resume + N steps gives the weights of 2N steps.

What the loop reads from a config (TrainConfig and GenTrainConfig both have it): seed, device, tf32, bf16, steps,
log_every, checkpoint_every, keep_checkpoints, eval_every, ema_decay, data.batch_size, data.num_workers, optim.*,
and `to_dict()`.
"""

from __future__ import annotations

import copy
import math
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..core import distributed
from ..core.rundir import RunDir
from ..data import describe_dataset


def lr_lambda(config: Any):
    """The learning-rate multiplier at each step: linear warm-up, then constant, cosine or step decay."""
    o = config.optim

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        if o.schedule == "cosine":
            progress = (step - o.warmup_steps) / max(1, config.steps - o.warmup_steps)
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if o.schedule == "step":
            return o.gamma ** sum(step >= m for m in o.milestones)
        raise ValueError(f"unknown schedule {o.schedule!r}; choose constant, cosine or step")

    return factor


def default_num_workers(device: torch.device) -> int:
    """DataLoader workers when data.num_workers is unset: on CUDA, the CPUs this process may use (its share when
    torchrun starts several on the machine) less one for the training process itself, at most 8; on the CPU, none,
    as the step's own torch threads already use every core and a worker would take them away."""
    if device.type != "cuda":
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    per_process = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(0, min(8, per_process - 1))


class WeightEMA:
    """An exponential moving average of the parameters (IBQ evaluates with decay 0.999); buffers are taken from the
    live model when the averaged weights are exported."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = {n: p.detach().clone().float() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            self.params[name].mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)

    def state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        state = model.state_dict()
        return {k: (self.params[k].to(v.dtype) if k in self.params else v) for k, v in state.items()}

    def load(self, state: dict[str, Tensor]) -> None:
        for name in self.params:
            self.params[name].copy_(state[name].float())


@dataclass
class Position:
    """Where training is: optimiser steps done, the epoch, and the batches of that epoch already consumed."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


class _ItemsOfEpoch(Dataset):
    """The training set indexed by (epoch, index): one DataLoader serves the whole run (its workers persist across
    epochs) while each item is still drawn for its own epoch (sources draw random crops from it)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.set_epoch = getattr(dataset, "set_epoch", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        if self.set_epoch is not None:
            self.set_epoch(epoch)
        return self.dataset[index]


class _RunBatches:
    """This rank's (epoch, index) batches from a position up to step `stop`; each epoch's order is the sampler's
    shuffle for that epoch (a resumed run skips what it saw). Lazy: a long run's order is never held whole."""

    def __init__(self, sampler: DistributedSampler, batch_size: int, batches_per_epoch: int, position: Position,
                 stop: int) -> None:
        self.sampler, self.batch_size, self.batches_per_epoch = sampler, batch_size, batches_per_epoch
        self.epoch, self.first, self.count = position.epoch, position.batch_in_epoch, max(0, stop - position.step)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, first, remaining, size = self.epoch, self.first, self.count, self.batch_size
        while remaining > 0:
            self.sampler.set_epoch(epoch)
            order = list(self.sampler)
            for b in range(first, min(self.batches_per_epoch, first + remaining)):
                yield [(epoch, i) for i in order[b * size : (b + 1) * size]]
            remaining -= self.batches_per_epoch - first
            epoch, first = epoch + 1, 0


class TrainLoop:
    """Subclasses set, in build(): self.model (the trained nn.Module), self.train_set, and register each optimiser,
    schedule or other stateful part under a name with `self.stateful[name] = obj` (None for an absent part)."""

    def __init__(self, config: Any, run_dir: str | Path, resume: bool = False, progress: bool = True) -> None:
        self.config = config
        self.run = RunDir(run_dir)
        self.progress = progress
        self.device = distributed.init_from_env(config.device)
        set_precision(self.device, config.tf32)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        seed_everything(config.seed)
        self.stateful: dict[str, Any] = {}
        self.build()
        self.ema = WeightEMA(self.model, config.ema_decay) if config.ema_decay else None
        self.sampler = DistributedSampler(self.train_set, num_replicas=self.world, rank=self.rank, shuffle=True,
                                          seed=config.seed, drop_last=True)
        self.batches_per_epoch = len(self.sampler) // config.data.batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"the training set gives {len(self.sampler)} items per process, fewer than one batch of "
                             f"{config.data.batch_size}; lower data.batch_size or use more training data")
        self.num_workers = (config.data.num_workers if config.data.num_workers is not None
                            else default_num_workers(self.device))
        self.position = Position()
        self._not_finite = torch.zeros((), dtype=torch.bool, device=self.device)
        if resume:
            self._resume()
        elif self.is_main:
            self._start_run_dir()
        distributed.barrier()

    # -- what a subclass provides -----------------------------------------------------------------------------------
    def build(self) -> None:
        raise NotImplementedError

    def train_step(self, *batch: Tensor) -> dict[str, Tensor | float]:
        """One optimiser step on the loader's batch (its tensors already on the device); returns detached 0-dim
        tensors, read at log time. Must include "loss"."""
        raise NotImplementedError

    def evaluate(self, final: bool) -> dict[str, Any] | None:
        return None

    def model_state(self) -> dict[str, Tensor]:
        """The weights a checkpoint stores as model.safetensors."""
        return self.model.state_dict()

    def load_model_state(self, state: dict[str, Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)

    def extra_state(self) -> dict[str, Any]:
        """Subclass state for trainer.pt beyond optimisers and schedules (collective calls allowed: every rank runs
        it). Tensors and plain values only: trainer.pt loads weights-only."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def on_epoch_end(self) -> None:
        pass

    def log_extras(self) -> dict[str, Any]:
        """Entries added to each training log row (cheap: no collective)."""
        return {}

    def run_config(self) -> dict[str, Any]:
        """config.json of a new run."""
        return {**self.config.to_dict(), "data_description": describe_dataset(self.train_set),
                "world_size": self.world}

    # -- setup helpers ----------------------------------------------------------------------------------------------
    def sync_initial_weights(self, module: nn.Module) -> None:
        """Rank 0's initial weights everywhere (each rank seeded the same, but be sure)."""
        for tensor in list(module.parameters()) + list(module.buffers()):
            distributed.broadcast_(tensor.data)

    def schedule(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.config))

    def autocast(self):
        if not self.config.bf16:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _start_run_dir(self) -> None:
        if self.run.latest_checkpoint() is not None:
            raise FileExistsError(f"{self.run.path} already holds a run; continue it with --resume, or choose "
                                  "another --out")
        self.run.path.mkdir(parents=True, exist_ok=True)
        self.run.log.unlink(missing_ok=True)
        self.run.write_config(self.run_config())

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        return {
            "position": vars(self.position).copy(),
            **{name: (part.state_dict() if part is not None else None) for name, part in self.stateful.items()},
            **self.extra_state(),
            "rng": capture_rng_state(),
            "config": self.config.to_dict(),
        }

    def save(self) -> None:
        self._raise_if_not_finite()  # a checkpoint never holds weights a non-finite loss has stepped
        state = self.trainer_state()  # may be collective: every rank builds it
        if self.is_main:
            ema = self.ema.state_dict(self.model) if self.ema else None
            self.run.save_checkpoint(self.position.step, self.model_state(), ema, state,
                                     keep=self.config.keep_checkpoints)
        distributed.barrier()

    def _resume(self) -> None:
        checkpoint = self.run.latest_checkpoint()
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint in {self.run.checkpoints}; start a new run "
                                    "without --resume")
        model_state, ema_state, state = self.run.load_checkpoint(checkpoint, self.device)
        self.load_model_state(model_state)
        for name, part in self.stateful.items():
            if (part is None) != (state.get(name) is None):
                raise ValueError(f"--resume: the checkpoint {'has' if state.get(name) is not None else 'has no'} "
                                 f"{name} state but this config disagrees; resume with the run's own config")
            if part is not None:
                part.load_state_dict(state[name])
        if self.ema is not None:
            if ema_state is None:
                raise ValueError(f"--resume: {checkpoint} has no weight EMA but this config has ema_decay set; resume "
                                 "with the run's own config")
            self.ema.load(ema_state)
        self.position = Position(**state["position"])
        self.load_extra_state(state)
        restore_rng_state(state["rng"])
        self.log({"event": "resume", "step": self.position.step, "checkpoint": checkpoint.name})

    # -- data -------------------------------------------------------------------------------------------------------
    def loader(self, stop: int) -> DataLoader:
        """One DataLoader for the rest of the run, up to step `stop`: its workers live until training stops,
        prefetching across epoch boundaries. It gets a generator of its own, seeded by (seed, epoch, rank): creating
        its iterator draws the workers' base seed from that generator instead of the global torch RNG, so a resumed
        run still draws the same dropout masks afterwards. Items depend only on (seed, epoch, index), never on the
        worker that cut them."""
        entropy = np.random.SeedSequence([self.config.seed, self.position.epoch, self.rank]).generate_state(2)
        generator = torch.Generator().manual_seed(int(entropy[0]) << 32 | int(entropy[1]))
        batches = _RunBatches(self.sampler, self.config.data.batch_size, self.batches_per_epoch, self.position, stop)
        workers = self.num_workers
        return DataLoader(_ItemsOfEpoch(self.train_set), batch_sampler=batches, num_workers=workers,
                          generator=generator, prefetch_factor=4 if workers else None,
                          pin_memory=self.device.type == "cuda")  # pinned: the non_blocking copy overlaps

    def to_device(self, batch: Any) -> Any:
        if isinstance(batch, Tensor):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, (list, tuple)):
            return type(batch)(self.to_device(b) for b in batch)
        return batch

    # -- the loop ---------------------------------------------------------------------------------------------------
    def train(self, until: int | None = None) -> dict[str, Any]:
        """Train to config.steps (or stop after step `until`, checkpointed, to be resumed later)."""
        config = self.config
        stop = min(config.steps, until) if until is not None else config.steps
        bar = self._progress_bar(stop)
        interrupted = _InterruptFlag()
        last_log, images_since = time.perf_counter(), 0
        try:
            if self.position.step < stop:
                for batch in self.loader(stop):
                    logs = self.train_step(*self.to_device(batch))  # tensors: no host sync
                    self.position.step += 1
                    self.position.batch_in_epoch += 1
                    if self.position.batch_in_epoch == self.batches_per_epoch:
                        self.end_epoch()
                    images_since += config.data.batch_size * self.world
                    step = self.position.step
                    if step % config.log_every == 0 or step == stop:
                        self._raise_if_not_finite()  # the one read of the device per log interval
                        now = time.perf_counter()
                        row = {k: _item(v) for k, v in logs.items()}
                        row["images_per_s"] = images_since / max(now - last_log, 1e-9)  # a generator's item is an image too
                        last_log, images_since = now, 0
                        self._log_train(row, bar)
                    if bar is not None:
                        bar.update(1)
                    if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                        self.evaluate(final=False)
                    if step % config.checkpoint_every == 0 or step == stop:
                        self.save()
                    if step >= stop or interrupted:
                        break
        finally:
            if bar is not None:
                bar.close()
            interrupted.restore()
        if interrupted:
            self.save()
            self.log({"event": "interrupted", "step": self.position.step})
            raise KeyboardInterrupt(f"stopped at step {self.position.step}; a checkpoint was written, continue "
                                    f"with --resume")
        summary = {"step": self.position.step, "rank_checksums": self.rank_checksums(), **self.summary()}
        if self.position.step >= config.steps:
            summary["metrics"] = self.evaluate(final=True)
        self.log({"event": "end", **{k: v for k, v in summary.items() if k != "metrics"}})
        return summary

    def summary(self) -> dict[str, Any]:
        """Entries added to train()'s summary and the log's end event (collective calls allowed)."""
        return {}

    def end_epoch(self) -> None:
        self.on_epoch_end()
        self.position.epoch += 1
        self.position.batch_in_epoch = 0

    def optimizer_step(self, opt, sched, params: list[nn.Parameter], loss: Tensor) -> None:
        # Non-finite losses are flagged on the device and raised at the next log or checkpoint (at once on the CPU,
        # where reading a scalar costs nothing).
        self._not_finite |= ~torch.isfinite(loss.detach())
        if self.device.type == "cpu":
            self._raise_if_not_finite()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.all_reduce_mean_grads_(params)
        if self.config.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, self.config.optim.grad_clip)
        opt.step()
        sched.step()

    def _raise_if_not_finite(self) -> None:
        if bool(self._not_finite):
            raise FloatingPointError(f"a loss was not finite at or before step {self.position.step}; lower optim.lr "
                                     "(small batches need a smaller one) or set optim.grad_clip, and resume from the "
                                     "last checkpoint with --resume")

    def eval_model(self) -> nn.Module:
        """The weights used for evaluation: the weight EMA when it is on, else the live model."""
        if self.ema is None:
            return self.model
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.ema.state_dict(self.model))
        return model

    def rank_checksums(self) -> list[float]:
        """Each rank's sum of all weights in float64: equal on every rank when data parallelism is working."""
        total = sum(float(t.double().sum()) for t in self.model.state_dict().values() if t.is_floating_point())
        return distributed.all_gather_object(total)

    # -- logs -------------------------------------------------------------------------------------------------------
    def _progress_bar(self, stop: int):
        if not (self.progress and self.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=stop, initial=self.position.step, desc="train", unit="step", dynamic_ncols=True)

    def _log_train(self, logs: dict[str, float], bar) -> None:
        extras = self.log_extras()
        self.log({"event": "train", "step": self.position.step, "epoch": self.position.epoch, **logs, **extras})
        if bar is not None:
            postfix = {"loss": f"{logs['loss']:.4f}", "img_s": f"{logs['images_per_s']:.1f}"}
            postfix.update({k: f"{v:.3f}" for k, v in extras.items() if isinstance(v, float)})
            bar.set_postfix(postfix, refresh=False)

    def log(self, row: dict[str, Any]) -> None:
        if self.is_main:
            self.run.append_log({"time": time.time(), **row})


def _item(value: Tensor | float) -> float:
    return float(value.detach()) if isinstance(value, Tensor) else float(value)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_precision(device: torch.device, tf32: bool) -> None:
    """On CUDA, fp32 matmuls and convolutions in TF32 (tf32=True: matmul precision "high", cuDNN TF32) or exact
    fp32 ("highest"). Process-wide, as torch's settings are; the CPU is left alone. The quantizers' kernels read the
    same setting (torch.get_float32_matmul_precision) for their logits."""
    if device.type != "cuda":
        return
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = bool(tf32)


def capture_rng_state() -> dict[str, Any]:
    """The torch, CUDA, numpy and Python RNG states as tensors and plain numbers (so trainer.pt loads weights-only)."""
    _, keys, position, has_gauss, cached_gauss = np.random.get_state()
    version, python_state, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gauss": float(cached_gauss)},
        "python": {"version": int(version), "state": torch.tensor(python_state, dtype=torch.int64),
                   "gauss": python_gauss},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """The inverse of capture_rng_state."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"],
                         n["cached_gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))


class _InterruptFlag:
    """Turns SIGINT / SIGTERM into a flag the loop checks, so a killed job writes a checkpoint before it stops."""

    def __init__(self) -> None:
        self.raised = False
        self.previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame) -> None:
        if self.raised:  # a second signal: stop now
            raise KeyboardInterrupt
        self.raised = True

    def __bool__(self) -> bool:
        return self.raised

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
