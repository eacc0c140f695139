"""Tuning shared by the chunked kernels: how big a chunk is, and how chunks are shared among worker threads.

None of this changes a result: the chunked search and the chunked IBQ step give the same values for any chunk size
and any number of workers (ties resolve to the lowest index whatever the split). It only decides how much scratch
memory lives at once and how the work is spread over cores.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import torch
from torch import Tensor

R = TypeVar("R")

# The chunked search: one (tokens x codes) block at a time.
BLOCK_ELEMENTS = 1024 * 1024  # elements of one (tokens x codes) block on the CPU: 4 MiB in fp32, cache-sized
MAX_TOKEN_CHUNK = 2048
# On an accelerator a block is sized by a memory budget instead: few large matmuls, not cache-sized ones.
DEVICE_BLOCK_ELEMENTS = 64 * 1024 * 1024  # 256 MiB of fp32 scores per block
DEVICE_MAX_TOKEN_CHUNK = 16384
MIN_SEARCH_CODE_CHUNK = 256  # narrower blocks make the per-block overhead dominate
# The chunked IBQ step: every token against one chunk of codes at a time (a chunk's column sums must be exact).
CHUNK_ELEMENTS = 1024 * 1024  # elements of one (N x codes) buffer: 4 MiB in fp32; a few live per worker
MIN_CODE_CHUNK = 64
DEVICE_CHUNK_ELEMENTS = 16 * 1024 * 1024  # on an accelerator: 64 MiB per (N x codes) buffer, a few live at once


def search_chunks(n_tokens: int, n_codes: int, token_chunk: int | None = None,
                  code_chunk: int | None = None, device: torch.device | str | None = None) -> tuple[int, int]:
    """(tokens, codes) per block of the chunked search unless given: about BLOCK_ELEMENTS per block on the CPU (and
    when no device is named), DEVICE_BLOCK_ELEMENTS on any other device (CUDA)."""
    for name, value in (("token_chunk", token_chunk), ("code_chunk", code_chunk)):
        if value is not None and int(value) < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    on_cpu = device is None or torch.device(device).type == "cpu"
    budget, max_tokens = (BLOCK_ELEMENTS, MAX_TOKEN_CHUNK) if on_cpu else (DEVICE_BLOCK_ELEMENTS, DEVICE_MAX_TOKEN_CHUNK)
    tokens = min(int(token_chunk) if token_chunk else max_tokens, max(n_tokens, 1))
    codes = int(code_chunk) if code_chunk else max(MIN_SEARCH_CODE_CHUNK, budget // tokens)
    return tokens, min(codes, max(n_codes, 1))


def ibq_code_chunk(n_tokens: int, n_codes: int, code_chunk: int | None = None,
                   device: torch.device | str | None = None) -> int:
    """Codes per chunk of the IBQ step unless given: about CHUNK_ELEMENTS / N on the CPU (and when no device is
    named), DEVICE_CHUNK_ELEMENTS / N on any other device; at least MIN_CODE_CHUNK, at most K."""
    if code_chunk is not None:
        if int(code_chunk) < 1:
            raise ValueError(f"code_chunk must be a positive integer, got {code_chunk}")
        return min(int(code_chunk), n_codes)
    on_cpu = device is None or torch.device(device).type == "cpu"
    budget = CHUNK_ELEMENTS if on_cpu else DEVICE_CHUNK_ELEMENTS
    return min(n_codes, max(MIN_CODE_CHUNK, budget // max(n_tokens, 1)))


def cross_entropy_code_chunk(n_tokens: int, n_codes: int, code_chunk: int | None = None,
                             device: torch.device | str | None = None) -> int:
    """Codes per chunk of the chunked cross-entropy (kernels/cross_entropy.py) unless given: sized as the IBQ
    step's (`ibq_code_chunk`: every token against one chunk, one (N x codes) logits buffer per worker)."""
    return ibq_code_chunk(n_tokens, n_codes, code_chunk, device)


def worker_count(n_items: int, device: torch.device) -> int:
    """How many workers `run_workers` uses for n_items items: one per intra-op thread on CPU, else one."""
    return max(1, min(torch.get_num_threads(), n_items)) if device.type == "cpu" else 1


def run_workers(work: Callable[[Iterable[int], int], R], n_items: int, device: torch.device) -> list[R]:
    """Run work(items, worker) over the items 0..n_items-1 and return one result per worker, in worker order.

    On CPU with several intra-op threads, worker `worker` of W (`worker_count`) takes items worker, worker + W, ...
    (increasing, the same every call: results are deterministic) and runs torch single-threaded. Why: an intra-op
    parallel op ends in a barrier, and on cores shared with other processes each barrier waits for the other
    thread's next time slice (milliseconds), which a chunked loop would pay thousands of times. Elsewhere (CUDA,
    one thread) `work` runs once, here. Callers allocate each worker's large buffers beforehand, in their own thread
    (`worker_buffers`): glibc gives every new thread its own arena and keeps what was freed there resident, so
    buffers allocated inside the workers would stay resident after the call. Callers merge the results; within a
    worker items increase, so "strictly better" keeps the first index, and merges break ties by the lower index."""
    workers = worker_count(n_items, device)
    if workers == 1:
        return [work(range(n_items), 0)]

    def run(first: int) -> R:
        torch.set_num_threads(1)  # this thread's OpenMP/MKL setting (and the default new threads start from)
        with torch.no_grad(), torch.autocast(device_type="cpu", enabled=False):
            return work(range(first, n_items, workers), first)

    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="vqtok-chunk") as pool:
            return list(pool.map(run, range(workers)))
    finally:
        torch.set_num_threads(threads)  # restores the default that new threads start from


def worker_buffers(workers: int, *sizes: int, like: Tensor) -> list[list[Tensor]]:
    """Flat scratch buffers of the given sizes for each worker, allocated in the calling thread (see run_workers)."""
    return [[torch.empty(n, dtype=like.dtype, device=like.device) for n in sizes] for _ in range(workers)]


def buffer_view(buffer: Tensor, rows: int, cols: int) -> Tensor:
    """The first rows * cols elements of a flat buffer as a (rows, cols) matrix."""
    return buffer[: rows * cols].view(rows, cols)
