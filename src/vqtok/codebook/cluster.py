"""Clustering features (N, F) to K codebook centres with faiss. Every method is seeded and deterministic.

- "kmeans": flat k-means over all features (faiss subsamples to 256 points per centre, its default).
- "two-level": k-means to round(sqrt(K)) coarse clusters, then k-means inside each coarse cluster with centres in
  proportion to its size. The class-free counterpart of VQGAN-LC's per-class k-means (100 centres in each of 1,000 classes): the
  cost is N * sqrt(K) * F per iteration instead of N * K * F, which is what makes 100,000+ centres cheap on a CPU.
- "per-class": labels given, K / classes centres in each class (the remainder goes to the largest classes), k-means
  inside each class, as VQGAN-LC's script does on ImageNet (100 x 1000).
- "random": K distinct features drawn at random (the paper's 99.8%-utilization ablation).

A group holding fewer points than its share of centres gets one centre per point and the surplus is reassigned to
groups with points to spare (see `allocate`); no centre is ever a jittered copy, which would be a dead code.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

CLUSTER_METHODS = ("kmeans", "two-level", "per-class", "random")


def _check_features(features: np.ndarray, k: int) -> np.ndarray:
    x = np.ascontiguousarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"features must be a non-empty (N, F) array, got shape {x.shape}")
    if k < 1 or k > x.shape[0]:
        raise ValueError(f"cannot make {k} centres from {x.shape[0]} features: K must be between 1 and N "
                         "(extract more features, e.g. more crops, or ask for fewer centres)")
    if not np.isfinite(x).all():
        raise ValueError("features hold NaN or infinite values")
    return x


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, niter: int = 20) -> np.ndarray:
    """x (N, F) float32 -> (k, F) centres of faiss k-means (k <= N). k == N returns the points themselves."""
    import faiss

    if k == x.shape[0]:
        return x.copy()
    if k == 1:
        return x.mean(0, keepdims=True)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False, min_points_per_centroid=1,
                      max_points_per_centroid=256)  # min 1: no warning per small group; max 256: faiss's default
    km.train(x)
    return km.centroids.copy()


def assign(x: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centre of each row: (squared L2 distance (N,) float32, index (N,) int64), exact (faiss flat index)."""
    import faiss

    index = faiss.IndexFlatL2(centres.shape[1])
    index.add(np.ascontiguousarray(centres, dtype=np.float32))
    distances, indices = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return distances[:, 0], indices[:, 0]


def allocate(capacity: np.ndarray, k: int, share: np.ndarray) -> np.ndarray:
    """Split k centres over groups: quota_i ~ k * share_i / sum(share) (largest remainder), each at least 1 and at
    most capacity_i (the group's point count); what a full group cannot take goes to groups with room, in
    proportion to their room. Requires len(groups) <= k <= sum(capacity)."""
    capacity = np.asarray(capacity, np.int64)
    if not len(capacity) <= k <= capacity.sum():
        raise ValueError(f"cannot split {k} centres over {len(capacity)} groups holding {capacity.sum()} points: "
                         "need one centre per group at least and no more centres than points")
    ideal = k * np.asarray(share, np.float64) / np.sum(share)
    quota = np.minimum(np.maximum(_round_to_total(ideal, k, capacity), 1), capacity)
    while (excess := quota.sum() - k) > 0:  # the max(., 1) overshot: take back from the largest quotas
        order = np.argsort(-quota, kind="stable")[:excess]
        quota[order] -= quota[order] > 1
    while (deficit := k - quota.sum()) > 0:  # full groups left centres over: give them to groups with room
        room = capacity - quota
        quota += np.minimum(room, _round_to_total(deficit * room / room.sum(), deficit, room))
    return quota


def _round_to_total(values: np.ndarray, total: int, tie_break: np.ndarray) -> np.ndarray:
    """Integers summing to `total` (values sum to it): floors plus one for the largest fractional parts, ties going
    to the largest `tie_break` (with equal shares, the remainder goes to the largest groups)."""
    floor = np.floor(values).astype(np.int64)
    order = np.lexsort((-tie_break, -(values - floor)))[: total - floor.sum()]
    floor[order] += 1
    return floor


@contextmanager
def faiss_threads(n: int) -> Iterator[None]:
    """Run faiss with n OpenMP threads inside the block. Small k-means problems run much faster on one thread (no
    fork/join per step), and on an oversubscribed CPU spinning OpenMP threads slow each other down, so the builder
    passes the thread count it was given (`benchmarks/bench_codebook.py --threads N` compares settings)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def grouped_kmeans(x: np.ndarray, groups: np.ndarray, quotas: np.ndarray, *, seed: int, niter: int,
                   progress: bool = False, workers: int | None = None) -> np.ndarray:
    """k-means inside each group: groups (N,) in 0..G-1, quotas (G,) centres per group -> (sum(quotas), F).

    Groups run concurrently on `workers` Python threads (default: faiss's thread count), each faiss call on one
    OpenMP thread (faiss releases the GIL). Group g always uses seed + g and writes its own rows, so the result does
    not depend on the number of workers or the order groups finish in."""
    import faiss

    order = np.argsort(groups, kind="stable")
    bounds = np.searchsorted(groups[order], np.arange(len(quotas) + 1))
    offsets = np.concatenate([[0], np.cumsum(quotas)])
    out = np.empty((int(offsets[-1]), x.shape[1]), np.float32)

    def run(g: int) -> None:
        with faiss_threads(1):
            members = x[order[bounds[g]:bounds[g + 1]]]  # (n_g, F)
            out[offsets[g]:offsets[g + 1]] = kmeans(members, int(quotas[g]), seed=seed + g, niter=niter)

    largest_first = np.argsort(-(bounds[1:] - bounds[:-1]) * quotas, kind="stable")  # balances the workers
    with ThreadPoolExecutor(workers or faiss.omp_get_max_threads()) as pool:
        jobs = [pool.submit(run, int(g)) for g in largest_first]
        for job in tqdm(as_completed(jobs), total=len(jobs), desc="k-means per group", unit="group",
                        disable=not progress):
            job.result()
    return out


def cluster(features: np.ndarray, k: int, *, method: str = "two-level", labels: np.ndarray | None = None,
            seed: int = 0, niter: int = 20, progress: bool = False) -> np.ndarray:
    """features (N, F) -> codebook (k, F) float32 by `method` (see module docstring); labels (N,) for per-class."""
    if method not in CLUSTER_METHODS:
        raise ValueError(f"unknown clustering method {method!r}; choose one of {CLUSTER_METHODS}")
    x = _check_features(features, k)
    if method == "random":
        return x[np.sort(np.random.default_rng(seed).choice(len(x), size=k, replace=False))]
    if method == "kmeans":
        return kmeans(x, k, seed=seed, niter=niter)
    if method == "per-class":
        groups, counts = _groups_from_labels(labels, len(x))
        quotas = allocate(counts, k, share=np.ones(len(counts)))  # K / classes each
    else:  # two-level
        coarse = kmeans(x, max(1, round(k**0.5)), seed=seed, niter=niter)  # (sqrt(K), F)
        groups = assign(x, coarse)[1]
        counts = np.bincount(groups, minlength=len(coarse))
        groups, counts = _drop_empty(groups, counts)
        quotas = allocate(counts, k, share=counts)  # in proportion to size
    return grouped_kmeans(x, groups, quotas, seed=seed + 1, niter=niter, progress=progress)


def _groups_from_labels(labels: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    if labels is None or len(labels) != n:
        raise ValueError(f"method 'per-class' needs one label per feature ({n}), got "
                         f"{'none' if labels is None else len(labels)}; use 'two-level' for unlabelled data")
    classes, groups = np.unique(np.asarray(labels), return_inverse=True)
    return groups.astype(np.int64), np.bincount(groups, minlength=len(classes))


def _drop_empty(groups: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber groups so that none is empty (a coarse centre that won no point after the final assignment)."""
    keep = counts > 0
    renumber = np.cumsum(keep) - 1
    return renumber[groups], counts[keep]
