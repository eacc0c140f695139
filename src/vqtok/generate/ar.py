"""ar: a class-conditional GPT over a tokenizer's ids (LlamaGen-style; IBQ's AdaLN and VQGAN-LC's GPT as options).

The sequence for an image of h x w tokens (row-major, T = h * w) is [class, x_0, ..., x_{T-2}]; the hidden state at
position t predicts x_t. Blocks are pre-norm: RMSNorm, causal attention with 2D RoPE, RMSNorm, SwiGLU (hidden
2/3 * 4 * dim rounded up to a multiple of 256, LlamaGen / Llama). For classifier-free guidance the class table has
one extra row, the null class (index num_classes), that training swaps in with probability class_dropout.

Positions. "rope2d" (LlamaGen, IBQ): the head dimension is split in half, the first half rotated by the token's row,
the second by its column (head_dim / 4 frequencies base^(-4j / head_dim) each, pairs (x_2i, x_2i+1) rotated as
complex numbers). The class prefix is left unrotated (angle 0, the same rotation as the image token at (0, 0)).
LlamaGen and IBQ instead multiply the prefix's query and key by zero (their rotation table is zero-filled there), so
their prefix is attended with logit 0 and attends only to itself; we keep the rotation a rotation. "learned"
(VQGAN-LC / taming minGPT): a (T, dim) table added to the input embeddings.

Options: `adaln` (IBQ, SEED-Voken llama.py): every block scales, shifts and gates both branches by a linear map of
the class embedding (6 x dim), and the final norm is modulated likewise (2 x dim); gate weights start at 1e-3 of the
normal init, scale/shift weights at 0.5 of it. `pkeep` (VQGAN-LC, 0.8): in training, each input id is replaced by a
uniformly random one with probability 1 - pkeep (targets stay the true ids). `token_dropout`: dropout on the input
embeddings (class prefix included, as LlamaGen). `dropout`: on the attention and SwiGLU outputs (LlamaGen's
resid/ffn dropout). `zero_init_head`: LlamaGen and IBQ start the output head at zero (uniform logits).

The head is `self.head` (dim -> K, no bias, as all three references). `forward` returns hidden states, not logits:
with K = 100,000+ the trainer computes the loss in chunks over head.weight. `loss` is the dense reference.

Presets (parameter counts measured with `count_parameters` at K = 16,384, 1,000 classes, a 16 x 16 grid;
tiny / small are CPU presets, the rest as their papers list them):

| preset   | depth | dim  | heads | positions | other                         | parameters | paper          |
|----------|-------|------|-------|-----------|-------------------------------|------------|----------------|
| tiny     | 4     | 128  | 4     | rope2d    |                               | 5.37M      |                |
| small    | 6     | 256  | 8     | rope2d    |                               | 13.76M     |                |
| B        | 12    | 768  | 12    | rope2d    | LlamaGen GPT-B                | 110.89M    | 111M           |
| L        | 24    | 1024 | 16    | rope2d    | LlamaGen GPT-L                | 342.91M    | 343M           |
| XL       | 36    | 1280 | 20    | rope2d    | LlamaGen GPT-XL               | 774.70M    | 775M           |
| XXL      | 48    | 1536 | 24    | rope2d    | LlamaGen GPT-XXL              | 1.411B     | 1.4B           |
| ibq-B    | 16    | 1024 | 16    | rope2d    | adaln                         | 342.99M    | 342M           |
| ibq-L    | 20    | 1280 | 20    | rope2d    | adaln                         | 649.64M    | 649M           |
| ibq-XL   | 24    | 1536 | 24    | rope2d    | adaln                         | 1.076B     | 1.1B           |
| ibq-XXL  | 30    | 1920 | 30    | rope2d    | adaln                         | 2.063B     | 2.1B           |
| vqgan-lc | 24    | 1024 | 16    | learned   | pkeep 0.8, no label dropout   | 343.17M    |                |

vqgan-lc keeps this file's RMSNorm / SwiGLU blocks (taming's minGPT has LayerNorm, GELU 4x and biases; its width,
depth, heads, learned positions, one-token class prefix, pkeep and the absence of CFG are what the preset
reproduces). At VQGAN-LC's K = 100,000 it has 514.42M parameters.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POSITIONS = ("rope2d", "learned")
ADALN_GATE_INIT = 1e-3  # IBQ (`alng`): the gate rows of each block's AdaLN map start at 1e-3 x the normal init
ADALN_INIT = 0.5  # IBQ: the scale / shift rows (and the head's AdaLN) start at 0.5 x the normal init
INIT_STD = 0.02  # LlamaGen / IBQ initializer_range: Linear and Embedding weights ~ N(0, 0.02^2)


@dataclass
class GPTConfig:
    """Everything needed to rebuild a GPT; saved in config.json. Defaults are the `tiny` preset on a 10-class,
    8 x 8, 1,024-code tokenizer."""

    preset: str = "tiny"  # the PRESETS entry this config started from (from_dict starts from it)
    vocab_size: int = 1024  # K: the tokenizer's codebook size
    num_classes: int = 10  # class ids 0 .. num_classes - 1; num_classes is the null (unconditional) class
    grid: tuple[int, int] = (8, 8)  # (h, w) tokens per image; T = h * w
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_hidden: int | None = None  # SwiGLU hidden width; None: 2/3 * 4 * dim rounded up to mlp_multiple_of
    mlp_multiple_of: int = 256
    positions: str = "rope2d"  # "rope2d" (LlamaGen, IBQ) | "learned" (VQGAN-LC)
    adaln: bool = False  # IBQ: per-block AdaLN (scale, shift, gate) from the class embedding
    class_dropout: float = 0.1  # training: label -> null class with this probability (0: no CFG possible)
    token_dropout: float = 0.1  # training: dropout on the input embeddings
    pkeep: float = 1.0  # training: keep each input id with this probability, else a random id (VQGAN-LC 0.8)
    dropout: float = 0.0  # training: dropout on the attention and SwiGLU outputs
    zero_init_head: bool = True  # LlamaGen / IBQ: the head starts at zero
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        self.grid = tuple(int(g) for g in self.grid)  # a JSON list -> a tuple
        problems = []
        if len(self.grid) != 2 or min(self.grid) < 1:
            problems.append(f"grid must be two positive sizes (h, w), got {self.grid}")
        if self.positions not in POSITIONS:
            problems.append(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.dim % self.heads:
            problems.append(f"dim {self.dim} is not a multiple of heads {self.heads}")
        elif self.positions == "rope2d" and (self.dim // self.heads) % 4:
            problems.append(f"rope2d needs a head dimension divisible by 4, got {self.dim // self.heads}")
        for name in ("class_dropout", "token_dropout", "dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 < self.pkeep <= 1.0:
            problems.append(f"pkeep must be in (0, 1], got {self.pkeep}")
        if min(self.vocab_size, self.num_classes, self.depth) < 1:
            problems.append("vocab_size, num_classes and depth must be positive")
        if problems:
            raise ValueError("invalid GPT config: " + "; ".join(problems))

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width: LlamaGen's find_multiple(int(2 * 4 * dim / 3), 256) unless mlp_hidden is set."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        hidden = int(2 * 4 * self.dim / 3)
        return -(-hidden // self.mlp_multiple_of) * self.mlp_multiple_of

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # tuples -> lists

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GPTConfig":
        """The preset named by data["preset"] (default "tiny") with every other key replacing its value; a full
        `to_dict()` therefore rebuilds the same config exactly, and {"preset": "L", "vocab_size": ...} works too."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown GPT config key(s) {unknown}; valid keys are {sorted(known)}")
        overrides = {k: v for k, v in data.items() if k != "preset"}
        return get_preset(data.get("preset", "tiny"), **overrides)


def _preset(name: str, **values: Any) -> GPTConfig:
    return GPTConfig(preset=name, **values)


_LLAMAGEN = dict(dropout=0.1, token_dropout=0.1, class_dropout=0.1, zero_init_head=True)  # train_c2i.py defaults
_IBQ = dict(_LLAMAGEN, adaln=True)  # SEED-Voken configs/IBQ/gpu/imagenet_conditional_llama_*.yaml

PRESETS: dict[str, GPTConfig] = {
    # CPU presets: seconds per step on two cores at K ~ 1-2k, 8 x 8 tokens.
    "tiny": _preset("tiny", dim=128, depth=4, heads=4),
    "small": _preset("small", dim=256, depth=6, heads=8),
    # LlamaGen c2i (autoregressive/models/gpt.py): depth / dim / heads.
    "B": _preset("B", dim=768, depth=12, heads=12, **_LLAMAGEN),
    "L": _preset("L", dim=1024, depth=24, heads=16, **_LLAMAGEN),
    "XL": _preset("XL", dim=1280, depth=36, heads=20, **_LLAMAGEN),
    "XXL": _preset("XXL", dim=1536, depth=48, heads=24, **_LLAMAGEN),
    # IBQ (SEED-Voken src/IBQ/modules/transformer/llama.py): LlamaGen + per-block AdaLN, head dimension 64.
    "ibq-B": _preset("ibq-B", dim=1024, depth=16, heads=16, **_IBQ),
    "ibq-L": _preset("ibq-L", dim=1280, depth=20, heads=20, **_IBQ),
    "ibq-XL": _preset("ibq-XL", dim=1536, depth=24, heads=24, **_IBQ),
    "ibq-XXL": _preset("ibq-XXL", dim=1920, depth=30, heads=30, **_IBQ),
    # VQGAN-LC (vqgan-gpt-lc/models/models_gpt.py, taming minGPT): learned positions, pkeep 0.8, no CFG, no dropout.
    "vqgan-lc": _preset("vqgan-lc", dim=1024, depth=24, heads=16, positions="learned", pkeep=0.8,
                        class_dropout=0.0, token_dropout=0.0, dropout=0.0, zero_init_head=False),
}


def get_preset(name: str, **overrides: Any) -> GPTConfig:
    """The named preset with field overrides: `get_preset("B", vocab_size=16384, num_classes=1000, grid=(16, 16))`."""
    if name not in PRESETS:
        raise ValueError(f"unknown GPT preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# ---------------------------------------------------------------------------------------------------------------
# Building blocks.


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (Llama)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_2d_table(h: int, w: int, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos, sin (1 + h * w, head_dim // 2) for the sequence [class, image tokens in row-major order]: row 0 (the
    class prefix) is the identity rotation; image token (r, c) turns its first head_dim // 4 pairs by r * f_j and
    the rest by c * f_j, f_j = base^(-4j / head_dim) (LlamaGen's precompute_freqs_cis_2d on an h x w grid)."""
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # (head_dim/4,)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    angles = torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=1)  # (h*w, head_dim/2)
    angles = torch.cat([torch.zeros(1, 2 * quarter, dtype=torch.float64), angles])  # (1 + h*w, head_dim/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_2i, x_2i+1) of x (B, S, H, head_dim) by the angles whose cos / sin are (S, head_dim // 2)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, S, H, head_dim/2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None], sin[:, None]  # (S, 1, head_dim/2): broadcast over heads
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2).type_as(x)


@dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding, plus the class conditioning (AdaLN)."""

    keys: list[Tensor]  # per layer (B, heads, max_len, head_dim)
    values: list[Tensor]
    cond: Tensor | None = None  # (B, 1, dim): the class embedding, stored at position 0

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.heads, self.head_dim = config.heads, config.head_dim
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.out = nn.Linear(config.dim, config.dim, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, cache: tuple[Tensor, Tensor] | None = None,
                pos: int = 0) -> Tensor:
        """x (B, S, dim) at positions pos .. pos + S - 1. Without a cache: causal self-attention over x (pos = 0).
        With one (S = 1): the new key/value are written at pos and the query attends to positions 0 .. pos."""
        B, S, C = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, self.head_dim).unbind(2)  # each (B, S, H, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, hd)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            assert S == 1, "the KV cache takes one position at a time"
            keys, values = cache
            keys[:, :, pos:pos + 1] = k
            values[:, :, pos:pos + 1] = v
            y = F.scaled_dot_product_attention(q, keys[:, :, :pos + 1], values[:, :, :pos + 1])
        y = y.transpose(1, 2).reshape(B, S, C)  # (B, S, dim)
        return self.dropout(self.out(y))


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x) (Llama's FeedForward)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    """Pre-norm transformer block; with adaln (IBQ): x + gate1 * attn(norm(x) * (1 + scale1) + shift1), likewise
    for the SwiGLU, the six vectors a linear map of silu(class embedding)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = SwiGLU(config)
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(config.dim, 6 * config.dim)) if config.adaln else None

    def forward(self, x: Tensor, cond: Tensor | None, rope: tuple[Tensor, Tensor] | None,
                cache: tuple[Tensor, Tensor] | None = None, pos: int = 0) -> Tensor:
        if self.adaln is None:
            x = x + self.attention(self.attention_norm(x), rope, cache, pos)
            return x + self.mlp(self.mlp_norm(x))
        # (B, 1, dim) each; SEED-Voken's order: gamma1, gamma2, scale1, scale2, shift1, shift2
        gate1, gate2, scale1, scale2, shift1, shift2 = self.adaln(cond).chunk(6, dim=-1)
        x = x + gate1 * self.attention(self.attention_norm(x) * (1 + scale1) + shift1, rope, cache, pos)
        return x + gate2 * self.mlp(self.mlp_norm(x) * (1 + scale2) + shift2)


class AdaLNHeadNorm(nn.Module):
    """IBQ's norm before the head: rmsnorm(x) * (1 + scale) + shift, (scale, shift) from silu(class embedding)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(config.dim, 2 * config.dim))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.adaln(cond).chunk(2, dim=-1)  # (B, 1, dim) each
        return self.norm(x) * (1 + scale) + shift


# ---------------------------------------------------------------------------------------------------------------
# The model.


class GPT(nn.Module):
    """Class-conditional GPT: `hidden = gpt(ids, labels)`, `logits = gpt.logits(hidden)`; `loss(ids, labels)` is the
    dense reference. Incremental decoding: `cache = gpt.init_cache(B)`, then `gpt.forward_step(labels, 0, cache)`,
    `gpt.forward_step(ids[:, t - 1], t, cache)` for t = 1 .. T - 1, each (B, dim) equal to forward's hidden[:, t]."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.class_emb = nn.Embedding(config.num_classes + 1, config.dim)  # row num_classes: the null class
        self.pos_emb = nn.Parameter(torch.zeros(config.seq_len, config.dim)) if config.positions == "learned" else None
        self.token_dropout = nn.Dropout(config.token_dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.depth)])
        self.norm = AdaLNHeadNorm(config) if config.adaln else RMSNorm(config.dim, config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.positions == "rope2d":
            cos, sin = rope_2d_table(*config.grid, config.head_dim, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)  # (1 + T, head_dim/2), derived from the config
            self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    def init_weights(self) -> None:
        """N(0, 0.02) for Linear / Embedding / learned positions, zero biases; IBQ's AdaLN scaling; zero head."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=INIT_STD)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        if self.pos_emb is not None:
            nn.init.normal_(self.pos_emb, std=INIT_STD)
        with torch.no_grad():
            for block in self.blocks:
                if block.adaln is not None:
                    weight = block.adaln[1].weight  # rows: gate1, gate2 | scale1, scale2, shift1, shift2
                    weight[: 2 * self.config.dim].mul_(ADALN_GATE_INIT)
                    weight[2 * self.config.dim:].mul_(ADALN_INIT)
            if isinstance(self.norm, AdaLNHeadNorm):
                self.norm.adaln[1].weight.mul_(ADALN_INIT)
        if self.config.zero_init_head:
            nn.init.zeros_(self.head.weight)

    # -- training-time corruptions (global torch RNG, so the trainer's saved RNG state resumes them exactly) -----

    def drop_labels(self, labels: Tensor) -> Tensor:
        """Each label becomes the null class with probability class_dropout (CFG training)."""
        if self.config.class_dropout == 0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device) < self.config.class_dropout
        return torch.where(drop, torch.full_like(labels, self.null_class), labels)

    def corrupt_ids(self, ids: Tensor) -> Tensor:
        """VQGAN-LC's pkeep: each id kept with probability pkeep, else replaced by a uniformly random id."""
        if self.config.pkeep >= 1.0:
            return ids
        keep = torch.rand(ids.shape, device=ids.device) < self.config.pkeep
        return torch.where(keep, ids, torch.randint_like(ids, self.config.vocab_size))

    # -- full sequence ---------------------------------------------------------------------------------------------

    def forward(self, ids: Tensor, labels: Tensor) -> Tensor:
        """ids (B, T) or (B, h, w) int64, labels (B,) int64 -> hidden (B, T, dim); hidden[:, t] predicts ids[:, t]
        from the class and ids[:, :t]. In training mode labels are dropped to the null class and ids corrupted
        (pkeep) first; the targets stay the given ids."""
        ids = ids.reshape(ids.shape[0], -1)  # (B, T)
        if ids.shape[1] > self.seq_len:
            raise ValueError(f"{ids.shape[1]} ids per row, more than the grid's {self.seq_len}")
        if self.training:
            labels = self.drop_labels(labels)
            ids = self.corrupt_ids(ids)
        return self.trunk(labels, ids[:, :-1])

    def trunk(self, labels: Tensor, prev_ids: Tensor) -> Tensor:
        """The network on [class, prev_ids]: labels (B,), prev_ids (B, n) with n < T -> hidden (B, 1 + n, dim), the
        last row predicting id n. No label dropout or pkeep here (forward applies them)."""
        cond = self.class_emb(labels)[:, None]  # (B, 1, dim)
        x = torch.cat([cond, self.tok_emb(prev_ids)], dim=1)  # (B, S, dim), S = 1 + n
        S = x.shape[1]
        if self.pos_emb is not None:
            x = x + self.pos_emb[:S]
        x = self.token_dropout(x)
        rope = (self.rope_cos[:S], self.rope_sin[:S]) if self.pos_emb is None else None
        for block in self.blocks:
            x = block(x, cond, rope)
        return self._final_norm(x, cond)  # (B, S, dim)

    def _final_norm(self, x: Tensor, cond: Tensor | None) -> Tensor:
        return self.norm(x, cond) if isinstance(self.norm, AdaLNHeadNorm) else self.norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden (..., dim) -> logits (..., K). Full logits: for sampling and tests, not for training at large K."""
        return self.head(hidden)

    def loss(self, ids: Tensor, labels: Tensor) -> Tensor:
        """Dense cross-entropy of forward's predictions against ids (the reference for the chunked loss)."""
        ids = ids.reshape(ids.shape[0], -1)
        logits = self.logits(self(ids, labels)).float()  # (B, T, K)
        return F.cross_entropy(logits.flatten(0, 1), ids.flatten())

    # -- incremental decoding ------------------------------------------------------------------------------------

    def init_cache(self, batch: int, max_len: int | None = None, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> KVCache:
        """Empty keys / values for `batch` rows and up to max_len positions (default T, the whole sequence)."""
        weight = self.head.weight
        shape = (batch, self.config.heads, max_len or self.seq_len, self.config.head_dim)
        kw = dict(device=device or weight.device, dtype=dtype or weight.dtype)
        return KVCache([torch.zeros(shape, **kw) for _ in self.blocks], [torch.zeros(shape, **kw) for _ in self.blocks])

    def forward_step(self, token_or_class: Tensor, pos: int, cache: KVCache) -> Tensor:
        """One position: at pos 0 token_or_class holds the labels (B,), at pos t >= 1 the ids x_{t-1} (B,).
        Returns hidden (B, dim), the prediction of x_pos; the same math as forward's hidden[:, pos]."""
        if pos == 0:
            cache.cond = self.class_emb(token_or_class)[:, None]  # (B, 1, dim)
            x = cache.cond
        else:
            if cache.cond is None:
                raise ValueError("forward_step must start at pos 0 with the class labels")
            x = self.tok_emb(token_or_class)[:, None]  # (B, 1, dim)
        if self.pos_emb is not None:
            x = x + self.pos_emb[pos]
        x = self.token_dropout(x)
        rope = (self.rope_cos[pos:pos + 1], self.rope_sin[pos:pos + 1]) if self.pos_emb is None else None
        for block, keys, values in zip(self.blocks, cache.keys, cache.values):
            x = block(x, cache.cond, rope, (keys, values), pos)
        return self._final_norm(x, cache.cond)[:, 0]  # (B, dim)

    # -- optimiser -------------------------------------------------------------------------------------------------

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups as LlamaGen / IBQ: weight decay on parameters with 2+ dimensions (matrices, embeddings,
        learned positions), none on norms and biases."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def count_parameters(config: GPTConfig) -> int:
    """Parameters of GPT(config), built on the meta device (no memory, so XXL is instant)."""
    with torch.device("meta"):
        model = GPT(config)
    return sum(p.numel() for p in model.parameters())
