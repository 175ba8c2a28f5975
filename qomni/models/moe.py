"""Sparse mixture of experts (thinker and talker), computing only the selected experts.

Legend: T tokens, D hidden, E experts, k experts per token, I expert intermediate.

The checkpoint stores one tensor per expert; the loader stacks them into `gate_up_proj [E, 2I, D]`
(gate rows first, then up) and `down_proj [E, D, I]`, so all experts run as one grouped GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qomni.config import TextConfig
from qomni.models.layers import MLP

# The public name of torch's grouped GEMM; builds that predate it have only the private one.
grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, D]; experts, weights [T, k] -> [T, D]."""
        t, k = experts.shape
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)  # group the (token, expert) pairs by expert
        # Counted by a scatter, not bincount: on CUDA bincount reads its maximum back to the
        # host, which a CUDA graph cannot capture. The counts are the same.
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=flat.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        offsets = counts.cumsum(0).to(torch.int32)
        xs = x[order // k]
        gate, up = grouped_mm(xs, self.gate_up_proj.transpose(1, 2), offs=offsets).chunk(2, -1)
        out = grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs=offsets)
        out = out * weights.reshape(-1)[order, None]
        pairs = torch.empty_like(out)
        pairs[order] = out
        return pairs.view(t, k, -1).sum(1)


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
