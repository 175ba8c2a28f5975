"""Shared decoder building blocks: RMSNorm, SwiGLU MLP, GQA attention with QK-norm and a KV cache.

Legend: B batch, S new tokens, K cached key slots, D hidden, H query heads, Hkv key/value heads,
Dh head dim, I intermediate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qomni import cpu_ops
from qomni.models.packed_linear import PackedLinear
from qomni.models.rope import apply_rope

ROW_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _own_kernel(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether qomni's CPU row kernels (layer_ops.cpp) take x: fp32 or bf16 on CPU, weight of
    its dtype, and the kernels built."""
    return (x.device.type == "cpu" and x.dtype in ROW_KERNEL_DTYPES
            and (weight is None or weight.dtype is x.dtype) and cpu_ops.ops() is not None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32, cast back to the input dtype, then scale (the reference's order). On
    CPU one call of qomni's kernel (the same roundings; ~20 -> ~3 us at batch 1)."""
    if x.is_contiguous() and _own_kernel(x, weight):
        return cpu_ops.ops().rms_norm(x, weight, eps)
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class KVCache:
    """Preallocated keys/values for every layer, one row per sequence.

    Row b holds `lengths[b]` valid slots. Slot `max_len` is scratch: padded (invalid) tokens of a
    right-padded batch write there, so they never touch a valid slot, and it is always masked.
    `rows(...)` gives a view on some rows, so sequences can join (prefill into a free row) and
    step independently of the others.
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        shape = (num_layers, batch, kv_heads, max_len + 1, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.row_ids = torch.arange(batch, device=device)
        self.max_len = max_len

    def slots(self, n_new: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        return step_slots(self.lengths, n_new, seq, self.max_len)

    def update(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, S, Hkv, Dh] at slots [B, S]; return the first n_keys cached keys and
        values [B, Hkv, n_keys, Dh]."""
        keys, values = self.k[layer], self.v[layer]
        if _own_kernel(k, keys):
            cpu_ops.ops().kv_write(keys, values, self.row_ids[: k.shape[0]], slots, k, v)
        else:
            rows = self.row_ids[: k.shape[0], None]
            keys[rows, :, slots] = k
            values[rows, :, slots] = v
        return keys[:, :, :n_keys], values[:, :, :n_keys]

    def advance(self, n_new: torch.Tensor) -> None:
        self.lengths += n_new

    def rows(self, rows: list[int]) -> CacheRows:
        return CacheRows(self, rows)

    def reset(self, rows: list[int], keep: int = 0) -> None:
        """Rows keep their first `keep` entries (0: free for a new sequence); the others are
        simply overwritten later."""
        self.lengths[rows] = keep


class CacheRows:
    """Some rows of a KVCache, stepping on their own. Contiguous rows are plain views; others
    read their keys through one gather per layer."""

    def __init__(self, cache: KVCache, rows: list[int]):
        self.cache, self.max_len = cache, cache.max_len
        device = cache.lengths.device
        self.index = torch.tensor(rows, dtype=torch.long, device=device)
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        self.span = slice(rows[0], rows[0] + len(rows)) if contiguous else None

    @property
    def lengths(self) -> torch.Tensor:
        return self.cache.lengths[self.span] if self.span else self.cache.lengths[self.index]

    def slots(self, n_new: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        return step_slots(self.lengths, n_new, seq, self.max_len)

    def update(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.k[layer], self.cache.v[layer]
        if _own_kernel(k, keys):
            cpu_ops.ops().kv_write(keys, values, self.index, slots, k, v)
        elif self.span:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            keys[self.span][rows, :, slots] = k
            values[self.span][rows, :, slots] = v
        else:
            keys[self.index[:, None], :, slots] = k
            values[self.index[:, None], :, slots] = v
        if self.span:
            return keys[self.span, :, :n_keys], values[self.span, :, :n_keys]
        return keys[self.index, :, :n_keys], values[self.index, :, :n_keys]

    def advance(self, n_new: torch.Tensor) -> None:
        if self.span:
            self.cache.lengths[self.span] += n_new
        else:
            self.cache.lengths[self.index] += n_new


def step_slots(start: torch.Tensor, n_new: torch.Tensor, seq: int,
               scratch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache slots [B, S] for a step of `seq` tokens of which row b has `n_new[b]` valid, and
    the key-visibility mask [B, 1, S, K] (causal, valid keys only). A row with nothing cached
    and nothing new still sees slot 0, so attention stays finite for idle rows."""
    pos = start[:, None] + torch.arange(seq, device=start.device)  # [B, S]
    valid = torch.arange(seq, device=start.device)[None] < n_new[:, None]
    slots = torch.where(valid, pos, torch.full_like(pos, scratch))
    end = (start + n_new).clamp_min(1)
    keys = torch.arange(int(end.max()), device=start.device)  # one host read per step
    mask = (keys[None, None] <= pos[..., None]) & (keys[None, None] < end[:, None, None])
    return slots, mask[:, None]


def valid_tokens(n_new: torch.Tensor, s: int) -> torch.Tensor | None:
    """The indices in B·S of a right-padded step's valid tokens (row b's first n_new[b]), or
    None where the step has no padding."""
    if s == 1 or int(n_new.min()) == s:
        return None
    return (torch.arange(s, device=n_new.device) < n_new[:, None]).reshape(-1).nonzero()[:, 0]


def pick(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """x [B, S, D] -> its valid tokens [N, D] (`keep` from valid_tokens), or x itself."""
    return x if keep is None else x.reshape(-1, x.shape[-1])[keep]


def spread(y: torch.Tensor, keep: torch.Tensor | None, b: int, s: int) -> torch.Tensor:
    """pick's inverse for outputs: [N, D'] -> [B, S, D'], the padding 0, or y itself."""
    if keep is None:
        return y
    out = y.new_zeros(b * s, y.shape[-1])
    out[keep] = y
    return out.view(b, s, -1)


def on_tokens(f: nn.Module, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """f over the tokens of x [B, S, D] -> [B, S, D'], a token at a time; with `keep` only over
    the valid tokens: a batch of prompts of unequal lengths multiplies no padding (8 prompts of
    13-16 tokens: 115 tokens, not 128)."""
    return spread(f(pick(x, keep)), keep, x.shape[0], x.shape[1])


class Attention(nn.Module):
    """Causal GQA with per-head RMSNorm on q and k (Qwen3), rotary positions and a KV cache.

    On CPU `pack` joins q, k and v into one oneDNN-packed matmul, and q and k are normed and
    rotated as one tensor (the same per-element arithmetic). A decode step (one new token) runs
    attention with each KV head's query heads as its query rows, the same attention as GQA's.
    Per layer on a 2-core Zen 5 (medium thinker, fp32 / bf16, 8 rows): the three matmuls
    75 / 56 us -> 45 / 29 us, norm and rotation 56 / 63 -> 25 / 31 us, attention 48 / 246 ->
    28 / 42 us (CPU flash attention runs one query row per head poorly in bf16). With qomni's
    CPU kernels a decode step attends through `decode_attention` (layer_ops.cpp; 32 query heads
    over 300 / 1000 bf16 keys, 2-core Zen 4, in one process: 108 / 267 -> 75 / 218 us).
    """

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, eps: float,
                 qk_norm: bool = True):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps)
            self.k_norm = RMSNorm(head_dim, eps)
        self.qk_norm = qk_norm
        self.qkv: nn.Module | None = None  # [(H + 2Hkv)·Dh, D], set by `pack`
        # A plain attribute, not a buffer (set by `pack`): Module.to() must not convert it.
        self.qk_weight: torch.Tensor | None = None  # [H + Hkv, Dh] q_norm's rows, k_norm's

    def pack(self, qkv: nn.Module | None = None) -> None:
        """Join q_proj, k_proj and v_proj into one matmul (CPU inference; they are dropped):
        `qkv` where the caller joined them (quantized ones), else one packed weight of theirs."""
        self.qkv = qkv if qkv is not None else PackedLinear(torch.cat(
            [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]))
        del self.q_proj, self.k_proj, self.v_proj
        if self.qk_norm:
            self.qk_weight = torch.cat([self.q_norm.weight.detach().expand(self.heads, -1),
                                        self.k_norm.weight.detach().expand(self.kv_heads, -1)])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                cache: KVCache | CacheRows, slots: torch.Tensor, mask: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        if self.qkv is not None:
            qkv = on_tokens(self.qkv, x, keep).view(b, s, -1, self.head_dim)
            n = self.heads + self.kv_heads
            qk, v = qkv[:, :, :n], qkv[:, :, n:]
            qk = self._norm_rope(qk, cos, sin)
            q, k = qk[:, : self.heads], qk[:, self.heads:]
        else:
            xs = pick(x, keep)  # gathered once for the three
            q = spread(self.q_proj(xs), keep, b, s).view(b, s, self.heads, self.head_dim)
            k = spread(self.k_proj(xs), keep, b, s).view(b, s, self.kv_heads, self.head_dim)
            v = spread(self.v_proj(xs), keep, b, s).view(b, s, self.kv_heads, self.head_dim)
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q = apply_rope(q.transpose(1, 2), cos, sin)
            k = apply_rope(k.transpose(1, 2), cos, sin)
        keys, values = cache.update(layer, slots, k.transpose(1, 2), v, mask.shape[-1])
        if s == 1 and x.device.type == "cpu":  # query heads as rows; the mask is one row
            grouped = q.reshape(b, self.kv_heads, -1, self.head_dim)
            if (_own_kernel(grouped, keys) and mask.dtype is torch.bool
                    and mask.shape[1:3] == (1, 1) and mask.shape[0] in (1, b)):
                out = cpu_ops.ops().decode_attention(grouped, keys, values, mask,
                                                     self.head_dim ** -0.5)
            else:
                out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask)
            return self.o_proj(out.reshape(b, 1, -1))
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        return on_tokens(self.o_proj, out.transpose(1, 2).reshape(b, s, -1), keep)

    def _norm_rope(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """qk [B, S, H + Hkv, Dh] -> normed (with QK-norm) and rotated [B, H + Hkv, S, Dh]."""
        weight = self.qk_weight if self.qk_norm else None
        if (_own_kernel(qk, weight) and cos.dtype is qk.dtype and cos.is_contiguous()
                and sin.is_contiguous()):
            eps = self.q_norm.eps if self.qk_norm else 0.0
            return cpu_ops.ops().norm_rope(qk, weight, eps, cos, sin)
        if self.qk_norm:
            qk = rms_norm(qk, weight, self.q_norm.eps)
        return apply_rope(qk.transpose(1, 2), cos, sin)


class DecoderLayer(nn.Module):
    """Pre-norm Qwen3 decoder layer: h += attn(norm(h)); h += mlp(norm(h)). `mlp` is a dense
    SwiGLU or a sparse MoE block."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, eps: float,
                 mlp: nn.Module, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = Attention(hidden, heads, kv_heads, head_dim, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = mlp
        self.index = index

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | CacheRows, slots: torch.Tensor, mask: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """keep: the valid tokens of a padded batch (see `on_tokens`), or None."""
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, self.index, cache, slots, mask,
                               keep)
        return h + on_tokens(self.mlp, self.post_attention_layernorm(h), keep)


def pack_attention(model: nn.Module, dtypes: tuple[torch.dtype, ...]) -> int:
    """`Attention.pack` for every CPU attention of `model` in `dtypes` with plain linears (before
    `pack_linears`; quantized ones keep their kernels); returns how many."""
    count = 0
    for m in model.modules():
        if isinstance(m, Attention) and m.qkv is None:
            projs = (m.q_proj, m.k_proj, m.v_proj)
            if all(type(p) is nn.Linear and p.bias is None and p.weight.device.type == "cpu"
                   and p.weight.dtype in dtypes for p in projs):
                m.pack()
                count += 1
    return count
