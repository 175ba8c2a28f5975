"""Sparse mixture of experts (thinker and talker), computing only the selected experts.

Legend: T tokens, D hidden, E experts, k experts per token, I expert intermediate.

The checkpoint stores one tensor per expert; the loader stacks them into `gate_up_proj [E, 2I, D]`
(gate rows first, then up) and `down_proj [E, D, I]`, so all experts run as one grouped GEMM.

On CPU, where qomni's own kernels build (`qomni.cpu_ops`), `Experts.pack` keeps the stacked
weights and up to STREAM_MAX_TOKENS tokens run as one call of `moe` (weight_stream.cpp): all
routed experts at once, each routed expert's rows read once for all its tokens. More tokens run
the grouped GEMM. bench/moe_kernels.py on a 2-core Xeon with AMX (avx512_bf16, amx_bf16), per
layer, qomni's oneDNN paths below -> `moe`: medium fp32 1 token 0.81 -> 0.31 ms, 8 tokens
1.89 -> 1.43, 120 tokens 5.8 -> 4.2; bf16 1 token 0.94 -> 0.26, 8 tokens 1.09 -> 0.85, 32 tokens
1.57 -> 1.58; real widths (128 experts top-8, D 2048, I 768) fp32 1 token 10.8 -> 7.0 ms, 8
tokens 65 -> 43, 120 tokens 217 -> 173. In fp32 `moe` loses to the grouped GEMM beyond 256-480
tokens (medium, 480: 11.5 against 10.1 ms). In bf16, where the CPU has AMX, `moe` multiplies an
expert's tokens with AMX tiles from 4 tokens on; against the grouped GEMM (oneDNN's AMX kernels),
`--methods stream grouped`: medium 8 tokens 0.60 / 1.83 ms, 32 tokens 0.86 / 2.37, 120 tokens
2.07 / 3.41, 480 tokens 10.1 / 7.3; real widths 8 tokens 25 / 46, 120 tokens 76 / 109, 480 tokens
164 / 170.

Where they do not build, `Experts.pack` replaces the weights by oneDNN-packed ones (measured on
the medium thinker, 2-core Zen 5, per layer, fp32 / bf16):
- one token: its k experts' matmuls, nothing else read or grouped (0.26 / 0.21 ms against the
  grouped GEMM's 0.43 / 0.34 ms);
- a few tokens, when experts are few for k (E <= 4k: a batch of decode tokens picks nearly all
  of them): all experts as two matmuls over their joined weights, unpicked experts weighted 0
  (8 tokens: 0.59 / 0.29 ms against 1.65 / 1.19 ms). It reads every expert and runs E/k times the
  FLOPs, so only up to DENSE_MAX_TOKENS tokens;
- otherwise (prefill, many experts): the tokens grouped by expert once, each picked expert's two
  matmuls on its own packed weights (160 tokens: 2.4 / 1.9 ms against 4.0 / 2.1 ms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qomni import cpu_ops
from qomni.config import TextConfig
from qomni.models.layers import MLP
from qomni.models.packed_linear import pack_weight, packed_linear

DENSE_MAX_EXPERTS_PER_K = 4  # E / k up to which the joined (dense) weights are kept too
DENSE_MAX_TOKENS = 32  # measured: the dense path loses to grouping beyond 32-64 tokens (fp32)
# Tokens up to which qomni's `moe` kernel beats the grouped GEMM (measured, see above).
STREAM_MAX_TOKENS = {torch.float32: 256, torch.bfloat16: 32}
STREAM_MAX_TOKENS_AMX = 256  # bf16, where the kernel has AMX tiles

# The public name of torch's grouped GEMM; builds that predate it have only the private one.
grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.packed: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per expert
        self.dense: tuple[torch.Tensor, torch.Tensor] | None = None  # [E*2I, D], [D, E*I]
        self.stream_max_tokens = 0  # tokens up to which cpu_ops' `moe` runs (0: never)

    def pack(self, top_k: int) -> None:
        """Prepare for CPU inference: qomni's `moe` kernel on the stacked weights where it
        builds; otherwise pack the weights for oneDNN (the stacked parameters are dropped):
        each expert's [2I, D] and [D, I], and, when E <= 4k, all experts' joined as well."""
        dtype = self.gate_up_proj.dtype
        if dtype in STREAM_MAX_TOKENS and cpu_ops.ops() is not None:
            self.gate_up_proj.data = self.gate_up_proj.data.contiguous()
            self.down_proj.data = self.down_proj.data.contiguous()
            self.stream_max_tokens = STREAM_MAX_TOKENS[dtype]
            if dtype == torch.bfloat16 and cpu_ops.amx_bf16():
                self.stream_max_tokens = STREAM_MAX_TOKENS_AMX
            return
        gate_up, down = self.gate_up_proj.detach(), self.down_proj.detach()
        e, two_i, d = gate_up.shape
        self.packed = [(pack_weight(gate_up[i]), pack_weight(down[i])) for i in range(e)]
        if e <= DENSE_MAX_EXPERTS_PER_K * top_k:
            self.dense = (pack_weight(gate_up.reshape(e * two_i, d)),
                          pack_weight(down.permute(1, 0, 2).reshape(d, e * two_i // 2)))
        del self.gate_up_proj, self.down_proj

    def weight_nbytes(self) -> int:
        """Bytes of the per-expert weights (what the routed tokens read from, all experts)."""
        if self.packed is None:
            return sum(p.numel() * p.element_size() for p in self.parameters())
        return sum(w.numel() * w.element_size() for pair in self.packed for w in pair)

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, D]; experts, weights [T, k] -> [T, D]."""
        t, k = experts.shape
        if t <= self.stream_max_tokens:
            return cpu_ops.ops().moe(x, experts, weights, self.gate_up_proj, self.down_proj)
        if self.packed is not None:
            if t == 1:
                return self._one_token(x, experts[0].tolist(), weights[0])
            if self.dense is not None and t <= DENSE_MAX_TOKENS:
                return self._dense(x, experts, weights)
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)  # group the (token, expert) pairs by expert
        # Counted by a scatter, not bincount: on CUDA bincount reads its maximum back to the
        # host, which a CUDA graph cannot capture. The counts are the same.
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=flat.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        token = order // k
        xs = x[token]
        if self.packed is None:
            offsets = counts.cumsum(0).to(torch.int32)
            gate, up = grouped_mm(xs, self.gate_up_proj.transpose(1, 2), offs=offsets).chunk(2, -1)
            out = grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs=offsets)
        else:
            out = torch.empty_like(xs)
            start = 0
            for e, n in enumerate(counts.tolist()):
                if n:
                    seg = slice(start, start + n)
                    out[seg] = self._expert(xs[seg], e)
                    start += n
        out = out * weights.reshape(-1)[order, None]
        pairs = torch.empty_like(out)
        pairs[order] = out
        return pairs.view(t, k, -1).sum(1)

    def _expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        gate_up, down = self.packed[e]
        gate, up = packed_linear(x, gate_up).chunk(2, -1)
        return packed_linear(F.silu(gate) * up, down)

    def _one_token(self, x: torch.Tensor, experts: list[int],
                   weights: torch.Tensor) -> torch.Tensor:
        out = None
        for e, w in zip(experts, weights):  # summed in the order of the top-k, as the reference
            y = self._expert(x, e) * w
            out = y if out is None else out + y
        return out

    def _dense(self, x: torch.Tensor, experts: torch.Tensor,
               weights: torch.Tensor) -> torch.Tensor:
        t, e = x.shape[0], self.num_experts
        gate_up, down = self.dense
        dense_weights = x.new_zeros(t, e).scatter_(1, experts, weights)  # 0: not picked
        h = packed_linear(x, gate_up).view(t, e, 2, -1)
        h = F.silu(h[:, :, 0]) * h[:, :, 1] * dense_weights[..., None]
        return packed_linear(h.reshape(t, -1), down)


class SparseMoE(nn.Module):
    """Softmax router in fp32 -> top-k (optionally renormalised) -> SwiGLU experts, plus the
    talker's sigmoid-gated shared expert when the config has one."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        else:
            self.shared_expert = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gate(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        out = self.experts(x, experts, weights.to(x.dtype))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.view(shape)


def pack_experts(model: nn.Module, dtypes: tuple[torch.dtype, ...]) -> int:
    """`Experts.pack` for every CPU MoE of `model` whose weights are in `dtypes` (quantized
    experts keep their own kernels); returns how many."""
    count = 0
    for m in model.modules():
        if (isinstance(m, SparseMoE) and type(m.experts) is Experts and m.experts.packed is None
                and not m.experts.stream_max_tokens):
            w = m.experts.gate_up_proj
            if w.device.type == "cpu" and w.dtype in dtypes:
                m.experts.pack(m.top_k)
                count += 1
    return count
