"""Code search in torch: the nearest code (squared L2) and the maximum inner product, for every token.

nearest code:       argmin_k ||z_n - e_k||^2 = argmin_k ||e_k||^2 - 2 z_n . e_k   (||z_n||^2 is the same for every k)
max inner product:  argmax_k z_n . e_k
Ties resolve to the first index, like torch's argmin/argmax.

Two implementations of each:
- dense (`nearest_code_dense`, `max_inner_product_dense`): the reference, one (N, K) matrix;
- chunked (`nearest_code_chunked`, `max_inner_product_chunked`): addmm of a (tokens x codes) block into one reused
  buffer, then min/max over the block, keeping the running best per token, so no (N, K) matrix ever exists; on CPU
  the code chunks are shared among worker threads (kernels/chunking.py), each keeping its own running best, merged
  at the end. Runs on any device and dtype; it searches in fp32 (fp64 if either input is fp64). Blocks are
  cache-sized on the CPU and sized by a memory budget elsewhere (`search_chunks`).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from .chunking import run_workers, search_chunks, worker_count


def check_search_inputs(z: Tensor, codebook: Tensor) -> None:
    """Refuse what no search can answer: wrong shapes, an empty codebook, two devices."""
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"expected z (N, D) and codebook (K, D), got {tuple(z.shape)} and {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError("the codebook is empty (K = 0): there is no code to search")
    if z.device != codebook.device:
        raise ValueError(f"z is on {z.device} but the codebook is on {codebook.device}; move both to one device")


def search_dtype(z: Tensor, codebook: Tensor) -> torch.dtype:
    """fp32, or fp64 if either input is fp64: bf16/fp16 inputs would pick codes from rounded distances."""
    return torch.float64 if torch.float64 in (z.dtype, codebook.dtype) else torch.float32


def in_search_dtype(z: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    dtype = search_dtype(z, codebook)
    return z.to(dtype).contiguous(), codebook.to(dtype).contiguous()


def squared_norms(x: Tensor, rows: int = 65536) -> Tensor:
    """x.pow(2).sum(1), the same values as the dense path, a block of rows at a time (no (K, D) temporary)."""
    return torch.cat([x[r:r + rows].pow(2).sum(1) for r in range(0, x.shape[0], rows)])


@torch.no_grad()
def nearest_code_dense(z: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """The dense reference: materialises the (N, K) distance matrix ||z||^2 - 2 z.e + ||e||^2, in the inputs'
    dtype. z (N, D), codebook (K, D) -> (indices (N,) int64, squared distances (N,))."""
    check_search_inputs(z, codebook)
    dist = z.pow(2).sum(1, keepdim=True) - 2.0 * (z @ codebook.T) + codebook.pow(2).sum(1)  # (N, K)
    best, index = dist.min(dim=1)
    return index, best


@torch.no_grad()
def max_inner_product_dense(z: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """The dense reference: materialises the (N, K) matrix z E^T. -> (indices (N,) int64, values (N,))."""
    check_search_inputs(z, codebook)
    best, index = (z @ codebook.T).max(dim=1)  # (N, K) -> (N,)
    return index, best


@torch.no_grad()
def nearest_code_chunked(
    z: Tensor, codebook: Tensor, token_chunk: int | None = None, code_chunk: int | None = None
) -> tuple[Tensor, Tensor]:
    """`nearest_code_dense` one (tokens x codes) block at a time; block sizes from the shapes unless given."""
    check_search_inputs(z, codebook)
    z, codebook = in_search_dtype(z, codebook)
    code_sq, z_sq = squared_norms(codebook), squared_norms(z)  # (K,), (N,)
    index, best = _chunked_argbest(z, codebook, code_sq, -2.0, False, token_chunk, code_chunk)
    return index, z_sq + best


@torch.no_grad()
def max_inner_product_chunked(
    z: Tensor, codebook: Tensor, token_chunk: int | None = None, code_chunk: int | None = None
) -> tuple[Tensor, Tensor]:
    """`max_inner_product_dense` one (tokens x codes) block at a time."""
    check_search_inputs(z, codebook)
    z, codebook = in_search_dtype(z, codebook)
    return _chunked_argbest(z, codebook, None, 1.0, True, token_chunk, code_chunk)


def _chunked_argbest(
    z: Tensor, codes: Tensor, bias: Tensor | None, alpha: float, largest: bool,
    token_chunk: int | None, code_chunk: int | None,
) -> tuple[Tensor, Tensor]:
    """Best over k of bias_k + alpha z.e_k for each token, one (tokens x codes) block at a time; workers take code
    chunks and each keeps its own running best (N values), merged at the end."""
    N, K = z.shape[0], codes.shape[0]
    tokens, chunk = search_chunks(N, K, token_chunk, code_chunk, z.device)
    token_blocks = -(-N // tokens)
    n_items = -(-K // chunk) * token_blocks  # item i: code chunk i // token_blocks, token block i % token_blocks
    workers = worker_count(n_items, z.device)
    fill = float("-inf") if largest else float("inf")
    best = torch.full((workers, N), fill, dtype=z.dtype, device=z.device)
    index = torch.zeros(workers, N, dtype=torch.int64, device=z.device)
    scratch = torch.empty(workers, tokens * chunk, dtype=z.dtype, device=z.device)  # scores
    # improving rows (the CPU's _update_best only: elsewhere the block's min/max needs no copy)
    spare = torch.empty(workers, tokens * chunk if z.device.type == "cpu" else 1, dtype=z.dtype, device=z.device)

    def work(items: Iterable[int], worker: int) -> None:
        for i in items:  # a token block meets its code chunks in increasing order within a worker
            k0, n0 = (i // token_blocks) * chunk, (i % token_blocks) * tokens
            e_blk, z_blk = codes[k0:k0 + chunk], z[n0:n0 + tokens]
            scores = scratch[worker, : z_blk.shape[0] * e_blk.shape[0]].view(z_blk.shape[0], e_blk.shape[0])
            if bias is None:
                torch.mm(z_blk, e_blk.T, out=scores)  # (tokens, codes)
            else:
                torch.addmm(bias[k0:k0 + chunk], z_blk, e_blk.T, alpha=alpha, out=scores)  # (tokens, codes)
            _update_best(scores, best[worker, n0:n0 + tokens], index[worker, n0:n0 + tokens], k0, largest,
                         spare[worker])

    with torch.autocast(device_type=z.device.type, enabled=False):
        run_workers(work, n_items, z.device)
    for worker in range(1, workers):
        _keep_better(best[0], index[0], best[worker], index[worker], 0, largest)
    return index[0], best[0]


def _update_best(scores: Tensor, best: Tensor, index: Tensor, offset: int, largest: bool, spare: Tensor) -> None:
    """In place: the running best (n,) and its index against a block of scores (n, codes) whose codes start at
    offset.

    On CPU the values come from amin/amax (a vectorised reduction, much cheaper than min with indices) and the
    index is looked up only in the rows that improve (copied into `spare`), which after the first chunks are few."""
    if scores.device.type != "cpu":
        _keep_better(best, index, *(scores.max(dim=1) if largest else scores.min(dim=1)), offset, largest)
        return
    value = scores.amax(dim=1) if largest else scores.amin(dim=1)  # (n,)
    rows = (value > best if largest else value < best).nonzero().squeeze(1)  # strict: earlier codes win ties
    if rows.numel() == scores.shape[0]:  # every row improves (a token block's first chunk): no copy
        best.copy_(value)
        index.copy_((scores.argmax(dim=1) if largest else scores.argmin(dim=1)) + offset)
    elif rows.numel():
        sub = torch.index_select(scores, 0, rows, out=spare[: rows.numel() * scores.shape[1]].view(-1, scores.shape[1]))
        best[rows] = value[rows]
        index[rows] = (sub.argmax(dim=1) if largest else sub.argmin(dim=1)) + offset  # first index on ties


def _keep_better(best: Tensor, index: Tensor, value: Tensor, arg: Tensor, offset: int, largest: bool) -> None:
    """In place: where value beats best, take it (index arg + offset); on a tie keep the lower index."""
    arg = arg + offset
    better = value > best if largest else value < best
    better |= (value == best) & (arg < index)
    best.copy_(torch.where(better, value, best))
    index.copy_(torch.where(better, arg, index))
