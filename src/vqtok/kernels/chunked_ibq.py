"""The IBQ step without any (N, K) tensor: an autograd Function over chunks of codes.

It returns what `ibq_dense` (kernels/ibq.py) returns, with the same values and gradients. Notation, per token n
(the index n is dropped where it is clear): logits l = z E^T, m = max_k l_k, k* = argmax_k l_k (first on ties),
p = softmax(l), q = softmax(l / T), a = (l - m) / T, G = dL/dz_q (N, D), g = G E^T (the upstream gradient seen
by each logit).

Forward, one pass over code chunks: an online softmax (each chunk's state, then merged: when the running max m
grows, every sum kept so far is rescaled by exp(old m - new m)) gives per token
  k*, m, lse = log sum_k exp(l_k), y = p E (so that <p, g> = G . y needs no pass in backward),
  and with the entropy penalty q_sum = sum_k exp(a_k), qa_sum = sum_k exp(a_k) a_k, hence
  H(q_n) = -sum_k q_k log q_k = log q_sum - qa_sum / q_sum.
The codebook entropy C = H(mean_n q_n) = -sum_k v_k log(v_k + eps), v = mean_n q_n, needs each token's final
normaliser, so the pass also keeps the few entries within T * |EXP_FLOOR| of each token's running max (everything
else has q below exp(EXP_FLOOR), the floor at which every exponent here is clamped); when q is too flat for that
(more than NEAR_PER_TOKEN entries per token), a second pass recomputes q chunk by chunk instead (a chunk holds every
token, so its column sums v_k are exact). Either gives C, c_k = dC / dv_k = -(log(v_k + eps) + v_k / (v_k + eps))
and <q_n, c>.

Backward recomputes l and g = G E^T per chunk and applies, with S = mean_n H(q_n), alpha = dL/dS / (N T) and
beta = dL/dC / (N T):
    dl = p (g - <p, g>) - alpha q (log q + H(q_n)) + beta q (c - <q_n, c>)
    dz = sum_k dl_k e_k,   dE_k = sum_n dl_nk z_n + sum_n [k = k*_n] (G_n + G'_n)
where G' is the upstream gradient of the hard path h E.
Every pass computes a chunk's logits with one function, `_chunk_logits` (the same matmul on the same operands,
shapes and buffers): the backward's log q = (l - m) / T - log q_sum combines its own l with the forward's m and
q_sum, so a difference d in a recomputed logit becomes an error d / T in log q (100 d at T = 0.01). Matmul libraries
may round the same products differently for operands of other shapes (cuBLAS picks its kernel by shape), so g is a
separate matmul rather than rows of one stacked [z; G] E^T.
Cost: 6 matmuls of z E^T's size (7 with the second pass); the dense path does as many plus ~20 passes over (N, K)
tensors. Extra memory: a few (N, chunk) buffers per worker, the (K, D) codebook gradient, O(N D + K) statistics.

Layout of this file: the equations on one chunk (`_Softmax`, `_chunk_softmax`, `_codebook_entropy_terms`,
`_log_q`, `_chunk_logit_grad`), then the passes that run them over the chunks (`_first_pass`, `_second_pass`,
`_backward`). How big a chunk is and how chunks are shared among threads is kernels/chunking.py's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from .chunking import buffer_view, ibq_code_chunk, run_workers, worker_buffers, worker_count
from .ibq import CODEBOOK_ENTROPY_EPS, IBQResult, entropy_grad_scales

NEAR_PER_TOKEN = 16  # entries near the max kept per token (on average) before falling back to the second pass
# Exponents are clamped from below before exp: exp(-64) = 1.6e-28 of the largest term is far below fp32's resolution
# of any sum it enters, and neither denormals nor underflow are produced (torch's CPU exp takes a much slower path
# there, and with T = 0.01 most of q would be in it).
EXP_FLOOR = {torch.float32: -64.0, torch.float64: -600.0}


def ibq_chunked(
    z: Tensor, codebook: Tensor, temperature: float = 0.01, *, entropy: bool = True, code_chunk: int | None = None
) -> IBQResult:
    """The IBQ step of `ibq_dense` with the same values and gradients, computed over code chunks.

    z (N, D), codebook (K, D), any float dtypes (computed in fp32, fp64 if either is fp64; z_q in their promoted
    dtype). entropy=False skips everything the entropy penalty needs and returns NaN for both entropies.
    code_chunk: codes per chunk (default: from the shapes, see kernels/chunking.py)."""
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"expected z (N, D) and codebook (K, D), got {tuple(z.shape)} and {tuple(codebook.shape)}")
    if z.shape[0] == 0 or codebook.shape[0] == 0:
        raise ValueError(f"the IBQ step needs at least one token and one code, "
                         f"got N={z.shape[0]}, K={codebook.shape[0]}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    chunk = ibq_code_chunk(z.shape[0], codebook.shape[0], code_chunk, z.device)
    z_q, hard, indices, sample_entropy, codebook_entropy = _IBQFunction.apply(
        z, codebook, float(temperature), chunk, entropy)
    return IBQResult(z_q, indices, sample_entropy, codebook_entropy, hard)


# -- the equations on one chunk of codes ------------------------------------------------------------------------------
def _chunk_logits(z: Tensor, e_blk: Tensor, buffer: Tensor) -> Tensor:
    """l = z e_blk^T (N, width) into the buffer's first N * width elements. The only place any pass computes
    logits: the backward must reproduce the forward's values bit for bit (see the module docstring)."""
    return torch.mm(z, e_blk.T, out=buffer_view(buffer, z.shape[0], e_blk.shape[0]))


@dataclass
class _Softmax:
    """Online-softmax state over some codes, per token (N,): max logit m, its first index, p_sum = sum exp(l - m),
    y = sum exp(l - m) e (N, D); with the entropy, q_sum = sum exp(a) and qa_sum = sum exp(a) a, a = (l - m) / T."""

    m: Tensor
    index: Tensor
    p_sum: Tensor
    y: Tensor
    q_sum: Tensor | None
    qa_sum: Tensor | None

    def absorb(self, other: "_Softmax", temperature: float, ties_to_lower: bool) -> None:
        """In place: the state over both sets of codes; each side's sums are rescaled to the common max
        (exp(a + shift) = exp(a) exp(shift), and sum exp(a + shift) (a + shift) = exp(shift) (qa_sum + shift q_sum)).
        Within one worker `other` holds later codes, so a tie keeps self's index; across workers ties_to_lower picks
        the lower index (other.index may be unset where other.m <= self.m within a worker)."""
        m = torch.maximum(self.m, other.m)
        take = other.m > self.m
        if ties_to_lower:
            take |= (other.m == self.m) & (other.index < self.index)
        self.index = torch.where(take, other.index, self.index)
        p_scale, p_scale_other = torch.exp(self.m - m), torch.exp(other.m - m)
        self.p_sum = self.p_sum * p_scale + other.p_sum * p_scale_other
        self.y.mul_(p_scale[:, None]).addcmul_(other.y, p_scale_other[:, None])  # (N, D), in place: no allocation
        if self.q_sum is not None:
            shift, shift_other = (self.m - m) / temperature, (other.m - m) / temperature  # <= 0
            q_scale, q_scale_other = torch.exp(shift), torch.exp(shift_other)
            self.qa_sum = (q_scale * (self.qa_sum + shift * self.q_sum)
                           + q_scale_other * (other.qa_sum + shift_other * other.q_sum))
            self.q_sum = q_scale * self.q_sum + q_scale_other * other.q_sum
        self.m = m


@dataclass
class _Stats:
    """What the forward keeps for the backward. Shapes (N,) unless noted."""

    index: Tensor  # k* = argmax_k l, int64
    max_logit: Tensor  # m = max_k l
    lse: Tensor  # log sum_k exp(l)
    soft: Tensor  # (N, D) y = p E
    log_q_sum: Tensor | None = None  # log sum_k exp((l - m) / T): log q = (l - m) / T - log_q_sum
    sample_entropy: Tensor | None = None  # H(q_n)
    q_dot_c: Tensor | None = None  # <q_n, c>
    c: Tensor | None = None  # (K,) c_k = dH(mean q) / d(mean q)_k
    near: list[Tensor] | None = None  # (token, code, logit) of the entries within the window of the max


def _chunk_softmax(logits: Tensor, m: Tensor, index: Tensor, e_blk: Tensor, temperature: float, entropy: bool,
                   p_buffer: Tensor, y_buffer: Tensor) -> _Softmax:
    """The state of one chunk from its logits (N, width), their row max m and index (valid where needed); the
    logits are used as scratch, p and y live in the given buffers."""
    p = torch.softmax(logits, 1, out=buffer_view(p_buffer, *logits.shape))  # normalised in the chunk: one pass
    p_sum = 1.0 / p.amax(dim=1)  # p at the chunk's max is exp(0) / p_sum
    y = torch.mm(p, e_blk, out=buffer_view(y_buffer, p.shape[0], e_blk.shape[1])).mul_(p_sum[:, None])
    q_sum = qa_sum = None
    if entropy:
        a = logits.sub_(m[:, None]).div_(temperature).clamp_(min=EXP_FLOOR[logits.dtype])  # (l - m) / T <= 0
        q = torch.exp(a, out=p)  # unnormalised q, in p's buffer
        q_sum, qa_sum = q.sum(dim=1), q.mul_(a).sum(dim=1)
    return _Softmax(m, index, p_sum, y, q_sum, qa_sum)


def _codebook_entropy_terms(avg: Tensor) -> tuple[Tensor, Tensor]:
    """For v = mean_n q over some codes: their part of H(v) = -sum v log(v + eps), and c = dH / dv."""
    log_avg = (avg + CODEBOOK_ENTROPY_EPS).log()
    return -(avg * log_avg).sum(), -(log_avg + avg / (avg + CODEBOOK_ENTROPY_EPS))


def _log_q(logits: Tensor, stats: _Stats, temperature: float) -> Tensor:
    """In place: l -> log q = (l - m) / T - log q_sum, floored at EXP_FLOOR."""
    log_q = logits.sub_(stats.max_logit[:, None]).div_(temperature).sub_(stats.log_q_sum[:, None])
    return log_q.clamp_(min=EXP_FLOOR[logits.dtype])


def _chunk_logit_grad(logits: Tensor, g: Tensor, k0: int, stats: _Stats, p_dot_g: Tensor, temperature: float,
                      entropy_scales: tuple[Tensor, Tensor, Tensor] | None, log_q_buffer: Tensor) -> Tensor:
    """In place: g (N, width), the chunk's G e_k^T, becomes dL/dl for the chunk's codes k0, k0 + 1, ...:
        dl = p (g - <p, g>) - alpha q (log q + H(q_n)) + beta q (c - <q_n, c>)
    entropy_scales: (alpha, beta, row) with row = -alpha H(q_n) - beta <q_n, c> (N,), or None without the penalty.
    The logits (N, width) are used as scratch."""
    width = logits.shape[1]
    if entropy_scales is not None:
        log_q = _log_q(buffer_view(log_q_buffer, *logits.shape).copy_(logits), stats, temperature)  # (N, width)
    p = logits.sub_(stats.lse[:, None]).clamp_(min=EXP_FLOOR[logits.dtype]).exp_()  # (N, width)
    g.sub_(p_dot_g[:, None]).mul_(p)  # p (g - <p, g>)
    if entropy_scales is not None:
        alpha, beta, row = entropy_scales
        q = p.copy_(log_q).exp_()  # p is no longer needed: its buffer takes q
        # -alpha q (log q + H) + beta q (c - <q, c>) = q (-alpha log q + beta c + row)
        g.addcmul_(q, log_q.mul_(-alpha).add_(beta * stats.c[k0:k0 + width]).add_(row[:, None]))
    return g


# -- the passes over the chunks ---------------------------------------------------------------------------------------
def _first_pass(z: Tensor, codebook: Tensor, temperature: float, chunk: int, entropy: bool) -> _Stats:
    """Online softmax over code chunks: argmax, log-sum-exp, y = p E and (entropy) H(q_n)."""
    N, K, D = z.shape[0], codebook.shape[0], z.shape[1]
    n_chunks = -(-K // chunk)
    workers = worker_count(n_chunks, z.device)
    buffers = worker_buffers(workers, N * chunk, N * chunk, N * chunk, N * D, N * D, like=z)
    masks = [torch.empty(N * chunk, dtype=torch.bool, device=z.device) for _ in range(workers)]
    window = -EXP_FLOOR[z.dtype] * temperature  # codes with l < max - window have q < exp(EXP_FLOOR)
    # On CUDA the second pass is cheap and collecting entries would synchronise once per chunk.
    collect = entropy and z.device.type == "cpu"

    def work(chunks: Iterable[int], worker: int) -> tuple[_Softmax, list[tuple[Tensor, Tensor, Tensor]] | None]:
        logits_buffer, p_buffer, spare, y_buffer, y_state = buffers[worker]
        state, near, kept = None, ([] if collect else None), 0
        for i in chunks:
            k0 = i * chunk
            e_blk = codebook[k0:k0 + chunk]  # (width, D)
            logits = _chunk_logits(z, e_blk, logits_buffer)  # (N, width)
            m = logits.amax(dim=1)  # (N,) values only: the index is looked up where it matters
            index = _argmax_where(logits, m, state, k0, spare)
            if near is not None:  # every (n, k) that can still carry q mass, against this worker's running max
                running = m if state is None else torch.maximum(state.m, m)
                near.append(_near_max(logits, running - window, k0, masks[worker]))
                kept += len(near[-1][0])
                if kept > NEAR_PER_TOKEN * N:
                    near = None  # q is too flat for the shortcut: the second pass will recompute it
            part = _chunk_softmax(logits, m, index, e_blk, temperature, entropy, p_buffer, y_buffer)
            if state is None:
                part.y = y_state.view(N, D).copy_(part.y)  # the state owns its y; the chunk's lives in y_buffer
                state = part
            else:
                state.absorb(part, temperature, ties_to_lower=False)
        return state, near

    (state, near), *others = run_workers(work, n_chunks, z.device)  # every worker has at least one chunk
    for other, other_near in others:
        state.absorb(other, temperature, ties_to_lower=True)
        near = near + other_near if near is not None and other_near is not None else None
    stats = _Stats(index=state.index, max_logit=state.m, lse=state.m + state.p_sum.log(),
                   soft=state.y / state.p_sum[:, None])
    if entropy:
        stats.log_q_sum = state.q_sum.log()
        stats.sample_entropy = stats.log_q_sum - state.qa_sum / state.q_sum  # H = log q_sum - qa_sum / q_sum
        stats.near = [torch.cat(parts) for parts in zip(*near)] if near is not None else None
    return stats


def _argmax_where(logits: Tensor, chunk_max: Tensor, state: _Softmax | None, k0: int, spare: Tensor) -> Tensor:
    """The chunk's argmax + k0 for every token on a worker's first chunk (and always on CUDA, where looking up
    rows would synchronise), else only where the chunk's max beats the running one (elsewhere the index is never
    taken; -1 marks it): on CPU argmax with indices costs much more than the amax already computed. Rows are
    copied into `spare` to search them."""
    if state is None or logits.device.type != "cpu":
        return logits.argmax(dim=1) + k0  # first index on ties
    index = torch.full_like(state.index, -1)
    rows = (chunk_max > state.m).nonzero().squeeze(1)
    if rows.numel():
        sub = torch.index_select(logits, 0, rows, out=buffer_view(spare, rows.numel(), logits.shape[1]))
        index[rows] = sub.argmax(dim=1) + k0
    return index


def _near_max(logits: Tensor, threshold: Tensor, k0: int, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(token, code, logit) of every entry of logits (N, width) at or above its row's threshold (N,)."""
    token, code = torch.ge(logits, threshold[:, None], out=mask[: logits.numel()].view(logits.shape)).nonzero(
        as_tuple=True)
    return token, code + k0, logits[token, code]


def _codebook_entropy_from_near(stats: _Stats, K: int, temperature: float) -> Tensor:
    """H(mean q), c and <q_n, c> from the entries near each token's max: the rest of q is below exp(EXP_FLOOR)."""
    token, code, logit = stats.near
    keep = logit >= stats.max_logit[token] + EXP_FLOOR[logit.dtype] * temperature  # against the final max
    token, code, logit = token[keep], code[keep], logit[keep]
    log_q = ((logit - stats.max_logit[token]) / temperature - stats.log_q_sum[token]).clamp_(
        min=EXP_FLOOR[logit.dtype])
    q = log_q.exp()
    N = stats.max_logit.shape[0]
    avg = torch.zeros(K, dtype=q.dtype, device=q.device).index_add_(0, code, q) / N  # (K,) mean_n q
    codebook_entropy, stats.c = _codebook_entropy_terms(avg)
    stats.q_dot_c = torch.zeros(N, dtype=q.dtype, device=q.device).index_add_(0, token, q * stats.c[code])
    stats.near = None
    return codebook_entropy


def _second_pass(z: Tensor, codebook: Tensor, stats: _Stats, temperature: float, chunk: int) -> Tensor:
    """mean_n q per chunk (exact: a chunk holds every token), H(mean q), c and <q_n, c>. Returns H(mean q)."""
    N, K = z.shape[0], codebook.shape[0]
    n_chunks = -(-K // chunk)
    buffers = worker_buffers(worker_count(n_chunks, z.device), N * chunk, N * chunk, like=z)
    stats.c = torch.empty(K, dtype=z.dtype, device=z.device)

    def work(chunks: Iterable[int], worker: int) -> tuple[Tensor, Tensor]:
        logits_buffer, q_buffer = buffers[worker]
        entropy = torch.zeros((), dtype=z.dtype, device=z.device)
        q_dot_c = torch.zeros(N, dtype=z.dtype, device=z.device)
        for i in chunks:
            k0 = i * chunk
            e_blk = codebook[k0:k0 + chunk]
            width = e_blk.shape[0]
            logits = _chunk_logits(z, e_blk, logits_buffer)  # (N, width)
            q = torch.exp(_log_q(logits, stats, temperature), out=buffer_view(q_buffer, N, width))  # (N, width)
            part, c_blk = _codebook_entropy_terms(q.sum(dim=0) / N)  # from mean_n q (width,)
            entropy += part
            stats.c[k0:k0 + width] = c_blk
            q_dot_c.addmv_(q, c_blk)
        return entropy, q_dot_c

    entropies, q_dot_cs = zip(*run_workers(work, n_chunks, z.device))
    stats.q_dot_c = torch.stack(q_dot_cs).sum(dim=0)
    return torch.stack(entropies).sum()


def _backward(
    z: Tensor, codebook: Tensor, stats: _Stats, grad_zq: Tensor, grad_hard: Tensor | None, alpha: Tensor | None,
    beta: Tensor | None, temperature: float, chunk: int, need_dz: bool, need_de: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """dz and dE chunk by chunk; alpha/beta are the entropy terms' scales (None when they carry no gradient);
    grad_hard is the upstream gradient of the hard path h E (None: none)."""
    N, K = z.shape[0], codebook.shape[0]
    entropy = alpha is not None
    p_dot_g = (grad_zq * stats.soft).sum(dim=1)  # (N,) <p, g> = G . (p E)
    # (N,) the per-token part of the entropy terms: -alpha H(q_n) - beta <q_n, c>
    entropy_scales = (alpha, beta, -alpha * stats.sample_entropy - beta * stats.q_dot_c) if entropy else None
    de = torch.empty_like(codebook) if need_de else None
    n_chunks = -(-K // chunk)
    workers = worker_count(n_chunks, z.device)
    buffers = worker_buffers(workers, N * chunk, N * chunk, N * chunk if entropy else 0, like=z)
    dz = torch.zeros(workers, *z.shape, dtype=z.dtype, device=z.device) if need_dz else None  # one per worker

    def work(chunks: Iterable[int], worker: int) -> None:
        logits_buffer, g_buffer, log_q_buffer = buffers[worker]
        for i in chunks:
            k0 = i * chunk
            e_blk = codebook[k0:k0 + chunk]
            width = e_blk.shape[0]
            logits = _chunk_logits(z, e_blk, logits_buffer)  # (N, width): the forward's values exactly
            g = torch.mm(grad_zq, e_blk.T, out=buffer_view(g_buffer, N, width))  # (N, width)
            dl = _chunk_logit_grad(logits, g, k0, stats, p_dot_g, temperature, entropy_scales, log_q_buffer)
            if need_dz:
                dz[worker].addmm_(dl, e_blk)  # (N, D)
            if need_de:
                torch.mm(dl.T, z, out=de[k0:k0 + width])  # (width, D)

    run_workers(work, n_chunks, z.device)
    if need_de:
        one_hot = grad_zq if grad_hard is None else grad_zq + grad_hard
        de.index_add_(0, stats.index, one_hot)  # the one-hot paths of z_q and of h E: dE_k* += G (+ G')
    return (dz.sum(dim=0) if need_dz else None), de


class _IBQFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, codebook: Tensor, temperature: float, chunk: int, entropy: bool):
        dtype = torch.float64 if torch.float64 in (z.dtype, codebook.dtype) else torch.float32
        out_dtype = torch.promote_types(z.dtype, codebook.dtype)
        with torch.no_grad(), torch.autocast(device_type=z.device.type, enabled=False):
            zc, ec = z.detach().to(dtype).contiguous(), codebook.detach().to(dtype).contiguous()
            stats = _first_pass(zc, ec, temperature, chunk, entropy)
            z_q = F.embedding(stats.index, ec).to(out_dtype)  # exactly e_k*
            hard = z_q.clone()  # h E: the same value, its own gradient (to E's rows k* only)
            nan = torch.full((), float("nan"), dtype=dtype, device=z.device)
            sample_entropy = stats.sample_entropy.mean() if entropy else nan
            if not entropy:
                codebook_entropy = nan.clone()
            elif stats.near is not None:
                codebook_entropy = _codebook_entropy_from_near(stats, ec.shape[0], temperature)
            else:
                codebook_entropy = _second_pass(zc, ec, stats, temperature, chunk)
        ctx.save_for_backward(zc, ec)
        ctx.stats, ctx.temperature, ctx.chunk, ctx.entropy = stats, temperature, chunk, entropy
        ctx.dtypes = (z.dtype, codebook.dtype)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(stats.index)
        if not entropy:
            ctx.mark_non_differentiable(sample_entropy, codebook_entropy)
        return z_q, hard, stats.index, sample_entropy, codebook_entropy

    @staticmethod
    def backward(ctx, grad_zq, grad_hard, _grad_indices, grad_sample, grad_codebook):
        zc, ec = ctx.saved_tensors
        need_dz, need_de = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dz or need_de):
            return None, None, None, None, None
        with torch.no_grad(), torch.autocast(device_type=zc.device.type, enabled=False):
            grad_zq = torch.zeros_like(zc) if grad_zq is None else grad_zq.to(zc.dtype).contiguous()
            alpha, beta = entropy_grad_scales(ctx.entropy, grad_sample, grad_codebook, zc.shape[0], ctx.temperature, zc)
            grad_hard = None if grad_hard is None else grad_hard.to(zc.dtype)
            dz, de = _backward(zc, ec, ctx.stats, grad_zq, grad_hard, alpha, beta, ctx.temperature, ctx.chunk,
                               need_dz, need_de)
        z_dtype, e_dtype = ctx.dtypes
        dz = dz.to(z_dtype) if dz is not None else None
        de = de.to(e_dtype) if de is not None else None
        return dz, de, None, None, None
