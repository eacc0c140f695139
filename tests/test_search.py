"""The code search backends (vqtok.kernels: fused, chunked, k-d tree) against the dense reference and float64
brute force."""

from __future__ import annotations

import os

import pytest
import torch

from vqtok import kernels
from vqtok.kernels import (
    chunking, max_inner_product, max_inner_product_dense, nearest_code, nearest_code_dense, numba_search, run_workers,
)
from vqtok.kernels.chunking import search_chunks
from vqtok.quantize import build_quantizer

# (N, K, D): N = 1, K not a multiple of any chunk, D below / at / above the fused loop's 8-dim groups and its limit.
SHAPES = [(1, 5, 8), (1, 1, 3), (37, 700, 8), (300, 1001, 3), (129, 513, 16), (200, 777, 32), (150, 900, 64)]
PATHS = ["fused", "chunked"]  # "fused" is the automatic choice: the numba loop where it applies


def separated(N: int, K: int, D: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens near a random code each, codes far apart: the nearest code is unambiguous (a clear gap)."""
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(K, D, generator=g) * 4
    z = codebook[torch.randint(K, (N,), generator=g)] + 0.01 * torch.randn(N, D, generator=g)
    return z, codebook


def run(path: str, fn, z, codebook, **chunks):
    with kernels.use(fn.__name__, "auto" if path == "fused" else "chunked"):  # fn: nearest_code / max_inner_product
        return fn(z, codebook, **chunks)


def brute_force(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return ((z.double()[:, None] - codebook.double()[None]) ** 2).sum(-1)  # (N, K) float64


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("N,K,D", SHAPES)
def test_nearest_code_indices_equal_dense_and_distances_equal_brute_force(path, N, K, D):
    z, codebook = separated(N, K, D)
    index, dist = run(path, nearest_code, z, codebook, token_chunk=16, code_chunk=100)
    ref_index, ref_dist = nearest_code_dense(z, codebook)
    assert index.dtype == torch.int64 and index.shape == (N,)
    assert torch.equal(index, ref_index)
    truth = brute_force(z, codebook).min(dim=1).values
    assert torch.allclose(dist.double(), truth, rtol=0, atol=1e-4 * float(codebook.pow(2).sum(1).max()))
    assert torch.allclose(dist, ref_dist, rtol=0, atol=1e-4 * float(codebook.pow(2).sum(1).max()))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("D", [8, 16, 256])
def test_chosen_distance_is_the_true_minimum_on_random_data(path, D):
    """Random data has near-ties where fp32 rounding may pick another index than the dense path; the distance of
    the chosen code must still be the true minimum to 1e-5 relative."""
    torch.manual_seed(1)
    z, codebook = torch.randn(257, D), torch.randn(3001, D)
    index, _ = run(path, nearest_code, z, codebook, code_chunk=256)
    exact = brute_force(z, codebook)
    chosen = exact.gather(1, index[:, None]).squeeze(1)
    assert torch.all((chosen - exact.min(dim=1).values) <= 1e-5 * exact.min(dim=1).values)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("N,K,D", SHAPES)
def test_max_inner_product_equals_dense(path, N, K, D):
    z, codebook = separated(N, K, D, seed=3)
    index, value = run(path, max_inner_product, z, codebook, code_chunk=64)
    ref_index, ref_value = max_inner_product_dense(z, codebook)
    exact = (z.double() @ codebook.double().T).max(dim=1).values
    assert torch.equal(index, ref_index)
    assert torch.allclose(value.double(), exact, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("D", [4, 8, 24])
def test_ties_resolve_to_the_first_index_even_across_chunks(path, D):
    torch.manual_seed(2)
    codebook = torch.randn(300, D)
    codebook[250] = codebook[7]  # the same code in a later chunk
    codebook[260] = codebook[7]
    z = torch.cat([codebook[7:8] + 0.001, codebook[250:251], torch.randn(5, D)])
    index, _ = run(path, nearest_code, z, codebook, code_chunk=64)
    assert index[0] == 7 and index[1] == 7
    assert torch.equal(index, nearest_code_dense(z, codebook)[0])
    unit = torch.nn.functional.normalize(codebook, dim=1)  # then e_7 . e_k is largest at k = 7 and its copies
    mip_index, _ = run(path, max_inner_product, unit[7:8], unit, code_chunk=64)
    assert mip_index.item() == max_inner_product_dense(unit[7:8], unit)[0].item() == 7


def test_pure_torch_fallback_when_numba_is_missing(monkeypatch):
    z, codebook = separated(100, 999, 8)
    monkeypatch.setattr(numba_search, "numba", None)
    assert kernels.choose("nearest_code", z, codebook) == "chunked"
    index, dist = nearest_code(z, codebook)
    assert torch.equal(index, nearest_code_dense(z, codebook)[0])
    assert torch.allclose(dist, nearest_code_dense(z, codebook)[1], atol=1e-3)


def test_bf16_and_float64_inputs_search_in_fp32_and_fp64():
    z, codebook = separated(64, 500, 8)
    index, dist = nearest_code(z.bfloat16(), codebook.bfloat16())
    ref_index, _ = nearest_code_dense(z.bfloat16().float(), codebook.bfloat16().float())
    assert dist.dtype == torch.float32 and torch.equal(index, ref_index)
    index64, dist64 = nearest_code(z.double(), codebook.double())
    assert dist64.dtype == torch.float64
    assert torch.equal(index64, brute_force(z, codebook).argmin(dim=1))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast must not push the search to bf16
        index_ac, dist_ac = nearest_code(z, codebook)
    assert dist_ac.dtype == torch.float32 and torch.equal(index_ac, nearest_code_dense(z, codebook)[0])


def test_dense_mode_routes_to_the_reference_and_bad_input_is_refused():
    z, codebook = separated(10, 50, 8)
    with kernels.use("nearest_code", "dense"):
        index, dist = nearest_code(z, codebook)
    ref_index, ref_dist = nearest_code_dense(z, codebook)
    assert torch.equal(index, ref_index) and torch.equal(dist, ref_dist)
    with pytest.raises(ValueError, match="backend"):
        with kernels.use("nearest_code", "fast"):
            pass
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        nearest_code(z, codebook[:, :4])
    with pytest.raises(ValueError, match="empty"):
        max_inner_product(z, codebook[:0])
    with pytest.raises(ValueError, match="positive"):
        nearest_code(z, codebook, code_chunk=0)


def test_auto_chunks_bound_the_block_and_respect_overrides():
    tokens, codes = search_chunks(100_000, 1_000_000)
    assert tokens * codes <= chunking.BLOCK_ELEMENTS and codes >= 256
    assert search_chunks(5, 3) == (5, 3)
    assert search_chunks(4096, 100_000, token_chunk=64, code_chunk=1000) == (64, 1000)


def test_run_workers_covers_every_item_once_and_restores_threads():
    threads = torch.get_num_threads()
    results = run_workers(lambda items, worker: (worker, list(items)), 11, torch.device("cpu"))
    assert [worker for worker, _ in results] == list(range(len(results)))
    results = [items for _, items in results]
    assert sorted(i for part in results for i in part) == list(range(11))
    assert all(part == sorted(part) for part in results)
    assert len(results) == min(threads, 11) and torch.get_num_threads() == threads


@pytest.mark.parametrize("name,dim", [("vq", 8), ("fc", 8), ("ema", 16), ("lc", 8), ("vq", 48)])
def test_quantizers_give_the_dense_indices_with_the_chunked_search(name, dim):
    torch.manual_seed(0)
    options = {"codebook": torch.randn(3000, 12)} if name == "lc" else {}
    q = build_quantizer(name, codebook_size=3000, dim=dim, **options).eval()
    if name != "lc":
        with torch.no_grad():
            q.codebook.copy_(torch.randn(3000, dim))  # spread out: vq's uniform(+-1/K) init has near-ties
    codes = q.codebook_vectors().detach()
    z = (codes[torch.randint(3000, (2 * 5 * 5,))] + 1e-4 * torch.randn(50, dim)).view(2, 5, 5, dim).permute(0, 3, 1, 2)
    chunked = q(z)
    with kernels.use("nearest_code", "dense"), kernels.use("max_inner_product", "dense"):
        dense = q(z)
    assert torch.equal(chunked.indices, dense.indices)
    assert torch.allclose(chunked.loss, dense.loss, rtol=1e-6, atol=0)


def test_the_fused_search_leaves_torchs_thread_count_alone():
    """numba's OpenMP pool shares torch's libgomp; starting it used to switch torch to NUMBA_NUM_THREADS threads,
    so a run under OMP_NUM_THREADS=1 changed thread count mid-way and stopped being repeatable. A fresh process,
    where the pool starts inside the call."""
    import subprocess
    import sys

    code = ("import torch; from vqtok import kernels; from vqtok.kernels import numba_search; "
            "assert numba_search.numba is not None; z, codebook = torch.randn(300, 8), torch.randn(1000, 8); "
            "assert kernels.choose('nearest_code', z, codebook) == 'fused'; "
            "kernels.nearest_code(z, codebook); print(torch.get_num_threads())")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


def fresh_key() -> tuple[str, object]:
    """A frozen_key no other test uses: the k-d tree cache is shared by the whole process."""
    return ("test", object())


def test_frozen_index_finds_the_exact_nearest_code_and_its_squared_distance():
    g = torch.Generator().manual_seed(1)
    codebook = torch.randn(5000, 8, generator=g)
    z = torch.randn(3000, 8, generator=g)
    key = fresh_key()
    assert kernels.choose("nearest_code", z, codebook, frozen_key=key) == "kdtree"
    found, distance = nearest_code(z, codebook, frozen_key=key)
    exact = brute_force(z, codebook)  # (N, K) float64
    best, first = exact.min(dim=1)
    assert torch.equal(found, first)
    assert distance.dtype == torch.float32 and torch.allclose(distance.double(), best, rtol=1e-6, atol=1e-7)


def test_frozen_index_keeps_the_first_index_of_duplicate_codes():
    g = torch.Generator().manual_seed(2)
    codebook = torch.randn(4096, 4, generator=g)
    codebook[3000:3100] = codebook[100:200]  # 100 codes repeated further down the table
    codebook[4000] = codebook[150]
    z = codebook[100:200] + 1e-3 * torch.randn(100, 4, generator=g)
    key = fresh_key()
    assert kernels.choose("nearest_code", z, codebook, frozen_key=key) == "kdtree"
    found, _ = nearest_code(z, codebook, frozen_key=key)
    assert torch.equal(found, nearest_code(z, codebook)[0])
    assert torch.equal(found, torch.arange(100, 200))


def test_frozen_index_reuses_a_tree_only_for_the_same_key_and_the_same_values(monkeypatch):
    from vqtok.kernels import kdtree

    g = torch.Generator().manual_seed(3)
    codebook = torch.randn(4096, 8, generator=g)
    z = torch.randn(500, 8, generator=g)
    key = fresh_key()
    builds = []
    monkeypatch.setattr(kdtree, "FrozenCodeIndex", lambda c, built=kdtree.FrozenCodeIndex: builds.append(1) or built(c))
    before, _ = nearest_code(z, codebook, frozen_key=key)
    assert torch.equal(nearest_code(z, codebook.clone(), frozen_key=key)[0], before) and len(builds) == 1  # reused
    moved = codebook.roll(1, dims=0)  # every code now at the next index, under the same key (a missed write)
    assert torch.equal(nearest_code(z, moved, frozen_key=key)[0], (before + 1) % 4096) and len(builds) == 2
    assert torch.equal(nearest_code(z, moved, frozen_key=fresh_key())[0], (before + 1) % 4096)


def test_frozen_index_falls_back_where_a_tree_does_not_pay():
    g = torch.Generator().manual_seed(4)
    for K, D in ((1000, 8), (5000, 32)):
        codebook, z = torch.randn(K, D, generator=g), torch.randn(200, D, generator=g)
        key = fresh_key()
        assert kernels.choose("nearest_code", z, codebook, frozen_key=key) != "kdtree"
        assert torch.equal(nearest_code(z, codebook, frozen_key=key)[0], nearest_code(z, codebook)[0])
    with kernels.use("nearest_code", "dense"):
        assert kernels.choose("nearest_code", torch.randn(3, 8), torch.randn(5000, 8), frozen_key=fresh_key()) == "dense"


def test_lc_in_eval_mode_follows_every_change_of_its_projector():
    """Evaluation reuses one k-d tree over P(C) while the projector is unchanged; an optimiser step, an in-place edit
    or load_state_dict must each be seen (the key holds the parameters' version counters)."""
    torch.manual_seed(0)
    q = build_quantizer("lc", codebook_size=6000, dim=8, codebook=torch.randn(6000, 32)).eval()
    z = torch.randn(2, 8, 6, 6)

    def expected() -> torch.Tensor:
        codes = q.codebook_vectors().detach()
        return nearest_code_dense(z.permute(0, 2, 3, 1).reshape(-1, 8), codes)[0].view(2, 6, 6)

    assert torch.equal(q(z).indices, expected())
    opt = torch.optim.Adam(q.parameters(), lr=0.1)
    q.train()
    q(z).loss.backward()
    opt.step()
    q.eval()
    assert torch.equal(q(z).indices, expected())
    with torch.no_grad():
        q.projector.weight.mul_(-1.0)
    assert torch.equal(q(z).indices, expected())
    # writes that leave the version counters as they were: a fused Adam step, and writes through .data
    fused = torch.optim.Adam(q.parameters(), lr=0.1, fused=True)
    q.train()
    q(z).loss.backward()
    fused.step()
    q.eval()
    assert torch.equal(q(z).indices, expected())
    q.projector.bias.data.copy_(torch.randn(8))
    assert torch.equal(q(z).indices, expected())
    other = build_quantizer("lc", codebook_size=6000, dim=8, codebook=torch.randn(6000, 32))
    q.load_state_dict(other.state_dict())
    assert torch.equal(q(z).indices, expected())
