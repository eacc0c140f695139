"""`build_codebook`: encoder features of a data source -> k-means centres -> a codebook file for the `lc` quantizer.

Two caches keep repeated requests cheap: the codebook itself (a file at `out` whose metadata carries the hash of the
same arguments is returned as is), and the extracted features (under `cache_dir`, keyed by everything that decides
them), so a different K, method or seed on the same data skips the encoder, and a killed extraction resumes.
DataLoader workers are in neither key (the features are bitwise the same for any number); batch size, threads and
device are not either, though they can change float rounding and so k-means' result. The encoder's precision enters
both keys when it is bf16 (fp32 requests keep the keys they had before precision was an option).
Under torchrun every rank extracts its share of the features; rank 0 clusters and writes the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..backbones import ENCODERS, build_encoder
from ..core.codebook_file import read_metadata, save_codebook
from ..core.device import resolve_device
from ..data import build_dataset
from .cluster import CLUSTER_METHODS, cluster, faiss_threads
from .features import FeatureShards, extract_features, resolve_precision

log = logging.getLogger(__name__)

FEATURES_PER_CODE = 4  # default training features per centre for sources of unlimited size ("photos")
BATCH_SIZE = {"cpu": 16, "cuda": 128}  # default images per encoder batch: 16 is fastest on a CPU
MAX_DEFAULT_WORKERS = 8


def default_workers() -> int:
    """DataLoader workers when the caller does not say: the CPUs this process may use, shared by the processes
    torchrun starts on this node, less one for the process that runs the encoder; at most MAX_DEFAULT_WORKERS."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(0, min(MAX_DEFAULT_WORKERS, per_process - 1))


def default_cache_dir() -> Path:
    """$VQTOK_CACHE/codebook, or ~/.cache/vqtok/codebook."""
    return Path(os.environ.get("VQTOK_CACHE", "~/.cache/vqtok")).expanduser() / "codebook"


def request_key(request: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able request."""
    return hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_codebook(out: Path, key: str) -> bool:
    """True when `out` is a codebook built from the request hashed as `key`."""
    if not out.is_file():
        return False
    try:
        return read_metadata(out).get("cache_key") == key
    except Exception:  # unreadable or not a safetensors file: rebuild it
        return False


def default_crops(source: str, size: int, grid: int) -> int | None:
    """How many crops to cut when the caller does not say: FEATURES_PER_CODE * K features from "photos" (any number
    can be cut); None (every image) for finite sources, where `crops` caps the count (evenly spaced images)."""
    return math.ceil(FEATURES_PER_CODE * size / grid**2) if source == "photos" else None


@contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """torch and faiss on n threads inside the block (None: leave them be). On a shared, oversubscribed CPU one
    thread can be 2-3x faster than two: OpenMP threads spin waiting for each other while the cores run other work."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with faiss_threads(n):
            yield
    finally:
        torch.set_num_threads(before)


def build_codebook(*, encoder: str = "efficientnet-lite0", source: str = "photos", size: int = 100_000,
                   method: str = "two-level", out: str | Path, seed: int = 0, grid: int = 4, crops: int | None = None,
                   crop_size: int | None = None, layer: str | None = None, weights: str | None = None,
                   cache_dir: str | Path | None = None, batch_size: int | None = None, niter: int = 20,
                   num_workers: int | None = None, precision: str = "auto", threads: int | None = None,
                   device: str = "auto", rank: int = 0, world_size: int = 1, progress: bool = True) -> Path:
    """Build (or reuse) a (size, F) codebook at `out`; returns `out`.

    crops: training images/crops (default: see `default_crops`); crop_size: their side in pixels (default: the
    encoder's, 128 for CNNs, whose 4x4 map at stride 32 is the 4x4 grid); layer/weights: see `build_encoder`;
    batch_size: images per encoder batch (default 16 on a CPU, 128 on a GPU); num_workers: DataLoader processes
    cutting crops beside the encoder (default: `default_workers()`; 0: the main process; the features are the same
    for any number); precision: the encoder's, "auto" (bf16 autocast on CUDA, fp32 on a CPU), "fp32" or "bf16";
    threads: torch and faiss threads; device: where the encoder runs ("auto": this rank's GPU when there is one,
    else the CPU); rank/world_size: split the extraction over torchrun processes (each calls this with its RANK and
    WORLD_SIZE): rank 0 waits for the others' shards, clusters and writes `out`; the others wait for that file. They
    meet through the file system, so no process group is needed, and a caller that runs the build on one rank only
    keeps the defaults (0, 1).
    """
    _check_request(encoder, method, size, grid, crops)
    out = Path(out)
    crops = crops if crops is not None else default_crops(source, size, grid)
    where = resolve_device(device)
    precision = resolve_precision(precision, where)
    num_workers = default_workers() if num_workers is None else num_workers
    batch_size = batch_size or BATCH_SIZE.get(where.type, BATCH_SIZE["cpu"])
    request = dict(encoder=encoder, layer=layer, weights=weights, source=source, size=size, method=method, seed=seed,
                   grid=grid, crops=crops, crop_size=crop_size, niter=niter)
    if precision != "fp32":  # bf16 features are not fp32's (see features.py); fp32 keeps its keys from before
        request["precision"] = precision
    key = request_key(request)
    if cached_codebook(out, key):
        log.info("reusing %s: built from the same request (cache key %s)", out, key)
        return out
    with cpu_threads(threads):
        started = time.perf_counter()
        enc = build_encoder(encoder, layer=layer, weights=weights).to(where)
        request |= {"layer": enc.layer, "crop_size": crop_size or enc.default_crop_size}
        dataset = build_dataset(source, "train", size=request["crop_size"], length=crops, seed=seed)
        _check_enough_features(len(dataset), grid, size)
        folder = Path(cache_dir or default_cache_dir()) / f"features-{_features_key(request)}"
        shards = extract_features(enc, dataset, grid=grid, batch_size=batch_size, out_dir=folder, rank=rank,
                                  world_size=world_size, progress=progress, num_workers=num_workers,
                                  precision=precision)
        if rank == 0:
            _wait_for(lambda: not shards.missing(), f"the other ranks' feature shards in {folder}")
            _cluster_and_save(shards, request | {"precision": precision}, out, key, started, progress)
        else:
            _wait_for(lambda: cached_codebook(out, key), f"rank 0 to write {out}")
    return out


def _cluster_and_save(shards: FeatureShards, request: dict[str, Any], out: Path, key: str, started: float,
                      progress: bool) -> None:
    features, labels = shards.load()  # (N, F), (N,)
    codebook = cluster(features, request["size"], method=request["method"], labels=labels, seed=request["seed"],
                       niter=request["niter"], progress=progress)  # (K, F)
    metadata = {k: v for k, v in request.items() if k != "size"}  # codebook_size is filled in from the tensor
    metadata |= dict(pooling=f"avg {request['grid']}x{request['grid']}", num_features=len(features), cache_key=key,
                     seconds=round(time.perf_counter() - started, 1))
    save_codebook(out, torch.from_numpy(codebook), metadata)


def _features_key(request: dict[str, Any]) -> str:
    """The hash of what decides the extracted features (not K, method or k-means settings)."""
    decides = ("encoder", "layer", "weights", "source", "seed", "grid", "crops", "crop_size", "precision")
    return request_key({k: request[k] for k in decides if k in request})  # "precision": only when it is bf16


def _check_request(encoder: str, method: str, size: int, grid: int, crops: int | None) -> None:
    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; choose one of {sorted(ENCODERS)}")
    if method not in CLUSTER_METHODS:
        raise ValueError(f"unknown clustering method {method!r}; choose one of {CLUSTER_METHODS}")
    if size < 1 or grid < 1 or (crops is not None and crops < 1):
        raise ValueError(f"size (K), grid and crops must be positive, got {size}, {grid}, {crops}")


def _check_enough_features(images: int, grid: int, size: int) -> None:
    if images * grid**2 < size:
        raise ValueError(f"{images} images x {grid}x{grid} cells give {images * grid**2} features, fewer than the "
                         f"{size} centres asked for: use at least {math.ceil(size / grid**2)} crops/images (--crops), "
                         "a larger --grid, or a smaller --size")


def _wait_for(done: Callable[[], bool], what: str, poll_seconds: float = 1.0) -> None:
    """Block until done() (under torchrun, a failed rank makes the agent stop the others, so this cannot hang)."""
    if not done():
        log.info("waiting for %s", what)
    while not done():
        time.sleep(poll_seconds)
