"""The output head's cross-entropy over K codes (a GPT over token ids, issue 15), without any (N, K) tensor.

For hidden states h (N, d), head weight W (K, d), bias b (K,) and targets t (N,): logits l = h W^T + b (N, K) and
per token loss_n = lse_n - l_{n, t_n}, lse_n = log sum_k exp(l_nk); a row whose target is ignore_index has loss 0 and
no gradient. With g_n = dL/dloss_n (0 on ignored rows) and p = softmax(l):
    dl = g (p - onehot(t)),   dh = dl W,   dW = dl^T h,   db = sum_n dl.

`cross_entropy_dense` is the reference: the full logits and F.cross_entropy, autograd. `cross_entropy_chunked`
(an autograd Function) is the same computation over chunks of codes, the pattern of the chunked IBQ step
(kernels/chunked_ibq.py):
- forward, one pass: per chunk the logits (N, width), the online log-sum-exp (running max m and sum exp(l - m),
  rescaled by exp(old m - new m) when m grows) and the target logit where the target falls in the chunk; it keeps
  only lse (N,) for the backward;
- backward, one pass: the chunk's logits recomputed (the one function `_chunk_logits`), p = exp(l - lse) times g,
  then dh += dl W_chunk, dW_chunk = dl^T h, db_chunk = sum_n dl; the one-hot part -g onehot(t) needs no logits and
  is added afterwards by index (dh -= g W[t], dW[t] -= g h, db[t] -= g).
Cost: 4 matmuls of h W^T's size (the dense path: 3, plus ~6 passes over (N, K) tensors). Extra memory: one
(N, chunk) logits buffer and one (N, d) dh accumulator per worker, O(N) statistics, and the (K, d) weight gradient
the dense path also allocates. Chunk size and worker threads: kernels/chunking.py.

Precision: computed in fp32 (fp64 if any input is fp64), with autocast off; the logits' matmuls follow
torch.get_float32_matmul_precision() as every fp32 matmul does. bf16/fp16 inputs (autocast's hidden states) are
upcast; the loss comes back in the computing dtype, each gradient in its input's dtype. Exponents are floored at
chunked_ibq's EXP_FLOOR (exp(-64) relative to the largest term: far below fp32 resolution, and no denormals).

Name: `vqtok.kernels.cross_entropy` is the registry's function (kernels/registry.py), which shadows this module as
an attribute of the package; import from it by name (`from vqtok.kernels.cross_entropy import ...`) or with
importlib.import_module("vqtok.kernels.cross_entropy").
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from .chunked_ibq import EXP_FLOOR
from .chunking import buffer_view, cross_entropy_code_chunk, run_workers, worker_buffers, worker_count

REDUCTIONS = ("mean", "sum", "none")


# -- inputs, the dense reference and the reduction --------------------------------------------------------------------
def check_cross_entropy_inputs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor | None,
                               ignore_index: int = -100) -> None:
    """Raise ValueError unless hidden (N, d), weight (K, d) with K >= 1, bias (K,) or None, targets (N,) integer;
    on the CPU also unless every target is in [0, K) or ignore_index (on CUDA that check would wait on the device:
    an out-of-range target gives a NaN loss in the chunked path, a device assert in the dense one)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden (N, d) and weight (K, d), got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("the cross-entropy needs at least one code (K = 0)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"expected bias ({weight.shape[0]},) or None, got {tuple(bias.shape)}")
    if targets is None:
        raise ValueError("the cross-entropy needs targets (N,)")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"expected targets ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer class indices, got {targets.dtype}")
    if targets.device.type == "cpu" and targets.numel():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
        if bool(bad.any()):
            first = int(targets[bad][0])
            raise ValueError(f"target {first} is outside [0, {weight.shape[0]}) and is not ignore_index "
                             f"({ignore_index})")


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp64 if any input is fp64, else fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def cross_entropy_dense(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                        ignore_index: int = -100) -> Tensor:
    """Per-token loss (N,) of F.cross_entropy on the full logits h W^T + b (N, K), in fp32 (fp64 if any input is),
    autocast off; 0 where targets == ignore_index. The reference every other backend must equal."""
    check_cross_entropy_inputs(hidden, weight, bias, targets, ignore_index)
    dtype = compute_dtype(hidden, weight, bias)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        logits = hidden.to(dtype) @ weight.to(dtype).T  # (N, K)
        if bias is not None:
            logits = logits + bias.to(dtype)
        return F.cross_entropy(logits, targets.long(), ignore_index=ignore_index, reduction="none")


def reduce_loss(loss: Tensor, targets: Tensor, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """F.cross_entropy's reductions of a per-token loss: "none" (N,), "sum", "mean" over the rows not ignored
    (NaN when every row is ignored, as torch's)."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / (targets != ignore_index).sum().to(loss.dtype)
    raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(map(repr, REDUCTIONS))}")


# -- the chunked path -------------------------------------------------------------------------------------------------
def cross_entropy_chunked(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                          ignore_index: int = -100, *, code_chunk: int | None = None) -> Tensor:
    """`cross_entropy_dense`'s per-token loss (N,) and gradients, computed over chunks of codes: no (N, K) tensor
    in the forward or the backward. code_chunk: codes per chunk (default: from the shapes, kernels/chunking.py)."""
    check_cross_entropy_inputs(hidden, weight, bias, targets, ignore_index)
    chunk = cross_entropy_code_chunk(hidden.shape[0], weight.shape[0], code_chunk, hidden.device)
    return _CrossEntropyFunction.apply(hidden, weight, bias, targets, int(ignore_index), chunk)


def _chunk_logits(hidden: Tensor, w_blk: Tensor, b_blk: Tensor | None, buffer: Tensor) -> Tensor:
    """l = h w_blk^T + b_blk (N, width) into the buffer. The only place either pass computes logits, so the
    backward recomputes the forward's values."""
    out = buffer_view(buffer, hidden.shape[0], w_blk.shape[0])
    if b_blk is None:
        return torch.mm(hidden, w_blk.T, out=out)
    return torch.addmm(b_blk, hidden, w_blk.T, out=out)


def _forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int
             ) -> tuple[Tensor, Tensor]:
    """(lse (N,), target logit (N,)) by an online log-sum-exp over code chunks; the target logit is NaN where the
    target is in no chunk (ignored or out of range)."""
    N, K = hidden.shape[0], weight.shape[0]
    n_chunks = -(-K // chunk)
    buffers = worker_buffers(worker_count(n_chunks, hidden.device), N * chunk, like=hidden)
    floor = EXP_FLOOR[hidden.dtype]

    def work(chunks: Iterable[int], worker: int) -> tuple[Tensor, Tensor, Tensor]:
        (logits_buffer,) = buffers[worker]
        m = torch.full((N,), float("-inf"), dtype=hidden.dtype, device=hidden.device)  # running max
        s = torch.zeros(N, dtype=hidden.dtype, device=hidden.device)  # sum exp(l - m)
        target_logit = torch.full((N,), float("nan"), dtype=hidden.dtype, device=hidden.device)
        for i in chunks:
            k0 = i * chunk
            b_blk = None if bias is None else bias[k0:k0 + chunk]
            logits = _chunk_logits(hidden, weight[k0:k0 + chunk], b_blk, logits_buffer)  # (N, width)
            width = logits.shape[1]
            local = targets - k0  # (N,) the target's column in this chunk, where it is in [0, width)
            picked = logits.gather(1, local.clamp(0, width - 1)[:, None]).squeeze(1)
            target_logit = torch.where((local >= 0) & (local < width), picked, target_logit)
            new_m = torch.maximum(m, logits.amax(dim=1))
            # s <- s exp(m - new m) + sum_k exp(l_k - new m); the logits buffer is scratch from here
            s = s * torch.exp(m - new_m) + logits.sub_(new_m[:, None]).clamp_(min=floor).exp_().sum(dim=1)
            m = new_m
        return m, s, target_logit

    (m, s, target_logit), *others = run_workers(work, n_chunks, hidden.device)
    for m_other, s_other, target_other in others:
        new_m = torch.maximum(m, m_other)
        s = s * torch.exp(m - new_m) + s_other * torch.exp(m_other - new_m)
        m = new_m
        target_logit = torch.fmax(target_logit, target_other)  # each target is in one worker's chunks: not NaN there
    return m + s.log(), target_logit


def _backward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, lse: Tensor, g: Tensor,
              chunk: int, needs: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """dh, dW, db (None where not needed) for the upstream gradient g (N,) of the per-token loss, 0 on ignored rows;
    targets (N,) in [0, K) (ignored rows hold any valid index: their g is 0)."""
    need_dh, need_dw, need_db = needs
    N, K = hidden.shape[0], weight.shape[0]
    n_chunks = -(-K // chunk)
    workers = worker_count(n_chunks, hidden.device)
    buffers = worker_buffers(workers, N * chunk, like=hidden)
    dh = torch.zeros(workers, *hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_dh else None
    dw = torch.empty_like(weight) if need_dw else None
    db = torch.empty(K, dtype=hidden.dtype, device=hidden.device) if need_db else None
    floor = EXP_FLOOR[hidden.dtype]

    def work(chunks: Iterable[int], worker: int) -> None:
        (logits_buffer,) = buffers[worker]
        for i in chunks:
            k0 = i * chunk
            w_blk = weight[k0:k0 + chunk]  # (width, d)
            b_blk = None if bias is None else bias[k0:k0 + chunk]
            logits = _chunk_logits(hidden, w_blk, b_blk, logits_buffer)  # (N, width): the forward's values
            width = logits.shape[1]
            dl = logits.sub_(lse[:, None]).clamp_(min=floor).exp_().mul_(g[:, None])  # g p, in place (N, width)
            if need_dh:
                dh[worker].addmm_(dl, w_blk)  # (N, d)
            if need_dw:
                torch.mm(dl.T, hidden, out=dw[k0:k0 + width])  # (width, d)
            if need_db:
                torch.sum(dl, dim=0, out=db[k0:k0 + width])

    run_workers(work, n_chunks, hidden.device)
    # the one-hot part of dl = g (p - onehot(t)): no logits needed
    if need_dh:
        dh = dh.sum(dim=0) if workers > 1 else dh[0]
        dh.sub_(weight[targets] * g[:, None])  # dh_n -= g_n W[t_n]
    if need_dw:
        dw.index_add_(0, targets, hidden * g[:, None], alpha=-1)  # dW[t_n] -= g_n h_n
    if need_db:
        db.index_add_(0, targets, g, alpha=-1)
    return dh, dw, db


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, ignore_index: int,
                chunk: int) -> Tensor:
        dtype = compute_dtype(hidden, weight, bias)
        with torch.no_grad(), torch.autocast(device_type=hidden.device.type, enabled=False):
            hc = hidden.detach().to(dtype).contiguous()
            wc = weight.detach().to(dtype).contiguous()
            bc = None if bias is None else bias.detach().to(dtype).contiguous()
            valid = targets != ignore_index  # (N,)
            safe_targets = torch.where(valid, targets.long(), 0)  # ignored rows point at code 0, with g = 0
            lse, target_logit = _forward(hc, wc, bc, targets.long(), chunk)
            loss = torch.where(valid, lse - target_logit, 0.0)  # (N,)
        ctx.save_for_backward(hc, wc, bc, safe_targets, valid, lse)
        ctx.chunk = chunk
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.set_materialize_grads(False)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor | None):
        hc, wc, bc, targets, valid, lse = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bc is not None and ctx.needs_input_grad[2])
        if grad_loss is None or not any(needs):
            return None, None, None, None, None, None
        with torch.no_grad(), torch.autocast(device_type=hc.device.type, enabled=False):
            g = torch.where(valid, grad_loss.to(hc.dtype), 0.0)  # (N,) no gradient through ignored rows
            grads = _backward(hc, wc, bc, targets, lse, g, ctx.chunk, needs)
        dh, dw, db = (None if grad is None else grad.to(dtype) for grad, dtype in zip(grads, ctx.dtypes))
        return dh, dw, db, None, None, None
