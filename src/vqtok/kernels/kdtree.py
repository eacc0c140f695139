"""Exact nearest-code search with a k-d tree, for a codebook that stays fixed from one call to the next.

Evaluation and `vqtok encode` search many batches against one codebook. At low D an exact k-d tree (scipy's
cKDTree) built once answers each token in about log K steps instead of K, which pays once the codebook is large;
building it costs about as much as a few brute-force searches, so the tree is cached under the caller's
`frozen_key` and rebuilt only when the key changes.

The key names a codebook: it must differ between codebooks (lc's holds an object owned by the quantizer alone),
because the cache is shared by the whole process, and should change whenever the codebook's values can (lc's holds
its tensors' data pointers and version counters). A key is not trusted with the contents, though: version counters
miss some writes (a fused Adam step and writes through `.data` leave them as they were, torch 2.13), so a cached
tree answers only after its codebook is found equal to the one passed (O(K D), small beside the search); otherwise
the tree is rebuilt. The cache holds the trees of the CACHE_SIZE most recently used keys.

Exactness: cKDTree compares exact float64 distances, where the brute-force paths expand ||e||^2 - 2 z.e in fp32,
so on near-ties the two can pick different codes, the tree's at least as close. Exact duplicate codes keep the
first-index rule: the tree holds each distinct row once and answers with its first index (without that, a tree
would spread tokens over identical codes and inflate the usage count).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

import numpy as np
import torch
from torch import Tensor

CACHE_SIZE = 2  # trees kept: the codebook under evaluation, and one more so two models can alternate


class FrozenCodeIndex:
    """The exact k-d tree over one codebook (K, D): `index.nearest_code(z, dtype)` -> (indices (N,) int64, squared
    distances (N,) in `dtype`)."""

    def __init__(self, codebook: Tensor) -> None:
        from scipy.spatial import cKDTree

        vectors = codebook.detach().to(torch.float64).numpy()
        if not np.isfinite(vectors).all():
            raise ValueError("the codebook holds NaN or infinite values: no code search is meaningful")
        self.codebook = codebook.detach().clone()  # what the tree was built from: `holds` compares against it
        distinct, first = np.unique(vectors, axis=0, return_index=True)  # first: lowest index of each distinct row
        self.tree = cKDTree(distinct)
        self.first = first.astype(np.int64)  # tree row -> first codebook index holding that vector

    def holds(self, codebook: Tensor) -> bool:
        """Whether the tree was built from exactly these values (shape, dtype and every element)."""
        return self.codebook.dtype == codebook.dtype and torch.equal(self.codebook, codebook.detach())

    @torch.no_grad()
    def nearest_code(self, z: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        query = z.detach().to(torch.float64).numpy()
        distance, row = self.tree.query(query, k=1, workers=max(1, torch.get_num_threads()))
        index = torch.from_numpy(self.first[row])
        squared = torch.from_numpy(np.square(distance)).to(dtype)
        return index, squared


_cache: OrderedDict[Hashable, FrozenCodeIndex] = OrderedDict()
_cache_lock = threading.Lock()


@torch.no_grad()
def nearest_code_kdtree(z: Tensor, codebook: Tensor, frozen_key: Hashable) -> tuple[Tensor, Tensor]:
    """z (N, D), codebook (K, D) on CPU, float -> (indices (N,) int64, squared distances (N,)), from the tree cached
    under frozen_key when it was built from these values, else from a tree built now (see the module docstring)."""
    if frozen_key is None:
        raise ValueError("the k-d tree search needs a frozen_key naming the codebook's current contents")
    with _cache_lock:
        index = _cache.get(frozen_key)
        if index is not None:
            _cache.move_to_end(frozen_key)
    if index is None or not index.holds(codebook):
        index = FrozenCodeIndex(codebook)
        with _cache_lock:
            _cache[frozen_key] = index
            while len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
    return index.nearest_code(z, torch.promote_types(z.dtype, codebook.dtype))
