"""`vqtok bench train`: the time of one training step (`Trainer.train_step`) for a config at several codebook sizes.

One trainer per K is built from the same config (the K-specific parts aside: model.codebook_size and, for lc, a random
(K, 320) codebook file, efficientnet-lite0's feature width: the search's cost does not depend on what the features
are). Every timed call is one `train_step` on the same batch of training crops, already on the device: forward, loss,
backward, gradient all-reduce (a no-op in one process), Adam, usage counting, and the discriminator step when the
GAN runs (`gan=True` moves each trainer to loss.disc_start). The trainers alternate call by call, so a shared
machine's load hits all sizes alike; round 0 is a warm-up. On CUDA each call is bracketed by
`torch.cuda.synchronize()`.

Memory per K. CUDA: `held` is what the trainer keeps allocated (weights, codebook, optimiser state after the warm-up
step), `step` the largest `torch.cuda.max_memory_allocated()` (reset before each call) above the allocation before
the call; `peak` = held + step, what a run with this K alone needs besides the CUDA context. CPU: `step` (= `peak`) is
the peak resident set above the one before the call (`bench.measure`); `held` is not reported there: the resident set
a trainer adds mixes in one-time costs (the first trainer decodes the photos, loads libraries) and freed memory the
allocator keeps.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from .bench import MEMORY_METHOD, _fmt, cuda_environment, environment, measure
from .core.io import write_json
from .quantize import QUANTIZERS
from .train.config import TrainConfig, load_config
from .train.trainer import Trainer

LC_FEATURES = 320  # efficientnet-lite0's feature width: what the demo's lc codebook holds
CUDA_MEMORY_METHOD = ("torch.cuda.max_memory_allocated (reset before each call) above the allocation before the "
                      "call; held: allocated by building the trainer and its warm-up step")


@dataclass
class TrainBenchConfig:
    """What `vqtok bench train` times; None keeps the config file's value."""

    config: str = "configs/demo.yaml"
    sizes: tuple[int, ...] = (1024, 100_000)
    preset: str | None = None
    quantizer: str | None = None
    batch_size: int | None = None
    image_size: int | None = None  # model.image_size and data.size
    device: str = "cpu"  # "cpu" | "cuda"
    repeats: int = 10  # timed calls per K after the warm-up, median taken
    bf16: bool | None = None
    gan: bool = False  # time the steady state after loss.disc_start (discriminator step included)
    threads: int | None = None  # torch's CPU threads (None: torch's default; on a busy shared CPU 1 is steadier)
    overrides: tuple[str, ...] = ()  # --set key=value, applied before the options above

    def __post_init__(self) -> None:
        self.sizes = tuple(sorted(set(self.sizes)))
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"--sizes needs codebook sizes of at least 1, got {self.sizes or 'none'}")
        if self.quantizer is not None and self.quantizer not in QUANTIZERS:
            raise ValueError(f"unknown quantizer {self.quantizer!r}; choose one of {' '.join(sorted(QUANTIZERS))}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but torch sees no GPU; use --device cpu")
        if self.repeats < 1 or any(v is not None and v < 1 for v in (self.batch_size, self.image_size, self.threads)):
            raise ValueError(f"--repeats, --batch-size, --image-size and --threads must be positive, got "
                             f"{self.repeats}, {self.batch_size}, {self.image_size}, {self.threads}")

    def option_overrides(self) -> list[str]:
        """The config overrides every trainer gets: --set first, then the options (they win), fid off."""
        out = list(self.overrides) + [f"device={self.device}", "fid=false"]
        for key, value in (("model.preset", self.preset), ("model.quantizer", self.quantizer),
                           ("data.batch_size", self.batch_size), ("model.image_size", self.image_size),
                           ("data.size", self.image_size), ("bf16", self.bf16)):
            if value is not None:
                out.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
        return out


def trainer_config(bench: TrainBenchConfig, size: int, workdir: Path) -> TrainConfig:
    """The config of the trainer for codebook size K; lc gets a random (K, 320) codebook file in `workdir`."""
    overrides = bench.option_overrides() + [f"model.codebook_size={size}"]
    config = load_config(bench.config, overrides)
    if config.model.quantizer == "lc":
        path = workdir / f"codebook-{size}.safetensors"
        codebook = torch.randn(size, LC_FEATURES, generator=torch.Generator().manual_seed(size))
        save_file({"codebook": codebook}, str(path))
        config.model.quantizer_options["codebook"] = str(path)
    return config


class _Sizes:
    """Per K: the trainer, its timed calls (ms) and memory (MiB)."""

    def __init__(self, trainer: Trainer, held_mib: float | None) -> None:
        self.trainer, self.held_mib = trainer, held_mib
        self.step_ms: list[float] = []
        self.step_mib: float | None = None

    def add_memory(self, mib: float | None) -> None:
        if mib is not None:
            self.step_mib = mib if self.step_mib is None else max(self.step_mib, mib)


def _held_now(cuda: bool) -> float | None:
    """MiB allocated on the GPU now (after a synchronize), None on the CPU (see the module docstring)."""
    if not cuda:
        return None
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() / 2**20


def _cuda_call(step: Callable[[], Any]) -> tuple[float, float]:
    """(ms, MiB allocated at the peak above the allocation before) of one synchronised call."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1e3
    return ms, (torch.cuda.max_memory_allocated() - before) / 2**20


def run_train_bench(bench: TrainBenchConfig, progress: bool = True,
                    report: Callable[[str], None] = print) -> dict[str, Any]:
    """Time `Trainer.train_step` at each K of `bench.sizes`; returns the result `write_json` stores (see
    `format_train_table`). `report` gets one line per round when `progress`."""
    cuda = bench.device == "cuda"
    threads = torch.get_num_threads()
    if bench.threads is not None:
        torch.set_num_threads(bench.threads)
    try:
        return _run(bench, cuda, progress, report)
    finally:
        torch.set_num_threads(threads)


def _run(bench: TrainBenchConfig, cuda: bool, progress: bool, report: Callable[[str], None]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vqtok-bench-train-") as tmp:
        workdir = Path(tmp)
        sizes: dict[int, _Sizes] = {}
        batch = None
        for size in bench.sizes:
            before = _held_now(cuda)
            trainer = Trainer(trainer_config(bench, size, workdir), workdir / f"run-{size}", progress=False)
            if bench.gan:
                trainer.position.step = trainer.config.loss.disc_start
            if batch is None:  # the same crops for every K: the first trainer's first training crops
                images = [trainer.train_set[i][0] for i in range(trainer.config.data.batch_size)]
                batch = torch.stack(images).to(trainer.device)  # (B, 3, H, W) in [0, 1]
            trainer.train_step(batch)  # warm-up: allocates Adam's state, autotunes, fills caches
            after = _held_now(cuda)
            sizes[size] = _Sizes(trainer, None if before is None or after is None else max(0.0, after - before))
        for round_ in range(1, bench.repeats + 1):
            for size, entry in sizes.items():
                call = lambda t=entry.trainer: t.train_step(batch)  # noqa: E731
                if cuda:
                    ms, mib = _cuda_call(call)
                else:
                    seconds, mib = measure(call, memory=True)
                    ms = seconds * 1e3
                entry.step_ms.append(ms)
                entry.add_memory(mib)
            if progress:
                report(f"round {round_}/{bench.repeats}: "
                       + "  ".join(f"K={size:,}: {entry.step_ms[-1]:.1f} ms" for size, entry in sizes.items()))
        first = next(iter(sizes.values())).trainer
        gan = first.disc is not None and first.position.step >= first.config.loss.disc_start
        tokens = batch.shape[0] * first.model.grid[0] * first.model.grid[1]
        setup = {"quantizer": first.config.model.quantizer, "preset": first.config.model.preset,
                 "batch_size": batch.shape[0], "image_size": batch.shape[-1], "tokens_per_step": tokens,
                 "bf16": first.config.bf16, "gan": gan, "device": str(first.device)}
    smallest = statistics.median(sizes[bench.sizes[0]].step_ms)
    rows = []
    for size, entry in sizes.items():
        median = statistics.median(entry.step_ms)
        peak = entry.step_mib if entry.held_mib is None or entry.step_mib is None else entry.held_mib + entry.step_mib
        rows.append({"codebook_size": size, "step_ms_median": median, "step_ms_all": entry.step_ms,
                     "images_per_s": batch.shape[0] / (median / 1e3), "ratio_to_smallest": median / smallest,
                     "held_mib": entry.held_mib, "step_mib": entry.step_mib, "peak_mib": peak})
    facts = {**environment(), **cuda_environment()} if cuda else environment()
    facts["memory_method"] = CUDA_MEMORY_METHOD if cuda else MEMORY_METHOD
    return {"bench": {**asdict(bench), "sizes": list(bench.sizes), "overrides": list(bench.overrides)},
            "setup": setup, "environment": facts, "rows": rows}


def format_train_table(result: dict[str, Any]) -> str:
    """A fixed-width table: one row per K; times in ms, memory in MiB, ratio = median step / the smallest K's."""
    s = result["setup"]
    header = ["K", "step ms", "images/s", "x smallest K", "held MiB", "step MiB", "peak MiB"]
    lines = [header] + [[f"{r['codebook_size']:,}", _fmt(r["step_ms_median"]), _fmt(r["images_per_s"]),
                         _fmt(r["ratio_to_smallest"], 3), _fmt(r["held_mib"]), _fmt(r["step_mib"]),
                         _fmt(r["peak_mib"])] for r in result["rows"]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines]
    repeats = result["bench"]["repeats"]
    return "\n".join([
        f"{result['bench']['config']}: {s['quantizer']}, preset {s['preset']}, batch {s['batch_size']} x "
        f"{s['image_size']} px ({s['tokens_per_step']:,} tokens), {s['device']}, bf16 {s['bf16']}, GAN {s['gan']}",
        *text, "",
        f"step ms: median of {repeats} Trainer.train_step calls after a warm-up, sizes alternating; held (CUDA): "
        "memory the trainer keeps, step: a step's peak above the memory before it, peak: held + step (CPU: step)",
        f"memory: {result['environment']['memory_method']}"])


def write_train_results(result: dict[str, Any], path: str | Path) -> None:
    """The result as indented JSON, written atomically (parent folders created)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result, indent=1)
