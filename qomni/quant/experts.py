"""MoE experts with weight-only quantized weights: each routed expert is two quantized matmuls.

Legend: T tokens, D hidden, E experts, k experts per token, I expert intermediate.

Takes the place of `qomni.models.moe.Experts` before loading. The checkpoint's per-expert
tensors (`N.gate_proj.weight`, or compressed-tensors' `N.gate_proj.weight_packed`, ...) arrive
through `load_part`; expert N's gate and up rows are joined into one [2I, D] weight once both
are here, and every weight is packed for its kernel on arrival. The forward pass groups the
(token, expert) pairs by expert and runs only the experts that were chosen: at batch 1 a layer
reads k of its E experts' packed weights. Where qomni's int4 kernel takes the experts (CPU,
int4, K a multiple of 128), their weights are packed into one stacked tensor per projection
(`Q4Stack`) as they arrive, and a forward pass is one `qomni_cpu.q4_moe` call: all routed
experts' matmuls, the SwiGLU and the weighted sum over the top k, with no op per expert.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from qomni import cpu_ops
from qomni.quant.kernels import (
    ACT_DTYPE,
    IntWeight,
    Matmul,
    Q4Matmul,
    nbytes,
    pack_q4,
    q4_eligible,
)
from qomni.quant.linear import Source, _Parts, build_matmul

_PART = re.compile(r"^(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.(?P<part>\w+)$")


def _join_rows(a, b):
    """Gate rows then up rows as one weight (both decoded the same way)."""
    if isinstance(a, IntWeight):
        if a.group_size != b.group_size or a.bits != b.bits:
            raise ValueError("gate_proj and up_proj are quantized differently")
        zero = None if a.zero is None else torch.cat((a.zero, b.zero))
        return IntWeight(torch.cat((a.q, b.q)), torch.cat((a.scale, b.scale)), zero, a.bits,
                         a.group_size)
    if isinstance(a, torch.Tensor):  # full precision
        return torch.cat((a, b))
    (wa, sa), (wb, sb) = a, b  # FP8: per-tensor scales become per-channel
    scale = torch.cat((sa.expand(wa.shape[0]), sb.expand(wb.shape[0])))
    return torch.cat((wa, wb)), scale


PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class Q4Stack:
    """E int4 weights [O, K] in qomni's layout, stacked: q uint8 [E, O, K/2], scales and
    zero * scale fp32 [E, O, G], allocated when the first expert arrives (all experts of a
    projection share one scheme)."""

    def __init__(self, num_experts: int, first: IntWeight):
        (o, k), g = first.shape, first.shape[1] // first.group_size
        self.group = first.group_size
        self.q = torch.empty(num_experts, o, k // 2, dtype=torch.uint8)
        self.scale = torch.empty(num_experts, o, g)
        self.zs = None if first.zero is None else torch.empty(num_experts, o, g)

    def put(self, e: int, weight: IntWeight, name: str) -> Q4Matmul:
        """Expert e's weight packed into its slot; a matmul on the slot's views."""
        q, scale, zs = pack_q4(weight)
        if (q.shape != self.q.shape[1:] or weight.group_size != self.group
                or (zs is None) != (self.zs is None)):
            raise ValueError(f"expert {e}'s {name} is quantized unlike expert 0's (shape, group "
                             f"size or zero points differ)")
        self.q[e], self.scale[e] = q, scale
        if zs is not None:
            self.zs[e] = zs
        return Q4Matmul(self.q[e], self.scale[e], None if zs is None else self.zs[e], self.group)


class QuantExperts(nn.Module):
    """`sources` says how each projection of every expert is stored: {"gate_proj": Source, ...};
    gate_proj and up_proj alike."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int,
                 sources: dict[str, Source], dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        super().__init__()
        if str(sources["gate_proj"]) != str(sources["up_proj"]):
            raise ValueError(f"gate_proj is {sources['gate_proj']} but up_proj is "
                             f"{sources['up_proj']}: qomni joins them into one matmul")
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, intermediate
        self.sources, self.dtype, self.device = sources, dtype, torch.device(device)
        self.gate_up: list[Matmul | None] = [None] * num_experts  # [2I, D] each
        self.down: list[Matmul | None] = [None] * num_experts  # [D, I] each
        self._parts: dict[tuple[int, str], _Parts] = {}
        self._decoded: dict[tuple[int, str], object] = {}  # gate or up waiting for the other
        self._done: set[tuple[int, str]] = set()
        # qomni's int4 kernel: stacked weights, decided by the first expert's projection
        self._stacks: dict[str, Q4Stack | None] = {}

    @classmethod
    def replacing(cls, experts: nn.Module, sources: dict[str, Source], dtype: torch.dtype,
                  device) -> QuantExperts:
        e, two_i, d = experts.gate_up_proj.shape
        return cls(e, d, two_i // 2, sources, dtype, device)

    def load_part(self, name: str, tensor: torch.Tensor) -> None:
        m = _PART.match(name)
        if not m:
            raise ValueError(f"unexpected tensor {name!r} for MoE experts")
        e, proj = int(m["expert"]), m["proj"]
        if e >= self.num_experts:
            raise ValueError(f"expert {e} of {self.num_experts}")
        key = (e, proj)
        if key in self._done:
            raise ValueError(f"{name} given after expert {e}'s {proj} was complete")
        parts = self._parts.setdefault(key, _Parts(self.sources[proj]))
        if not parts.add(m["part"], tensor):
            return
        del self._parts[key]
        self._done.add(key)
        shape = (self.hidden, self.intermediate) if proj == "down_proj" else (
            self.intermediate, self.hidden)
        decoded = self.sources[proj].decode(parts.got, shape)
        if proj == "down_proj":
            self.down[e] = self._build(e, "down_proj", decoded)
            return
        other = (e, "up_proj" if proj == "gate_proj" else "gate_proj")
        if other not in self._decoded:
            self._decoded[key] = decoded
            return
        halves = (decoded, self._decoded.pop(other))
        if proj == "up_proj":
            halves = halves[::-1]
        self.gate_up[e] = self._build(e, "gate_up", _join_rows(*halves))

    def _build(self, e: int, proj: str, decoded) -> Matmul:
        if proj not in self._stacks:
            eligible = isinstance(decoded, IntWeight) and q4_eligible(decoded, self.device)
            self._stacks[proj] = Q4Stack(self.num_experts, decoded) if eligible else None
        stack = self._stacks[proj]
        if stack is None:
            return build_matmul(decoded, self.dtype, self.device)
        if not isinstance(decoded, IntWeight):
            raise TypeError(f"expert {e}'s {proj} is {type(decoded).__name__}, expert 0's int4")
        return stack.put(e, decoded, proj)

    def _fused(self) -> tuple[Q4Stack, Q4Stack] | None:
        gu, down = self._stacks.get("gate_up"), self._stacks.get("down_proj")
        return (gu, down) if gu is not None and down is not None else None

    def missing_parts(self) -> list[str]:
        out = []
        for proj in PROJECTIONS:
            missing = []
            for e in range(self.num_experts):
                if (e, proj) in self._parts:
                    missing += [f"{e}.{proj}.{p}" for p in self._parts[(e, proj)].missing()]
                elif (e, proj) not in self._done:
                    missing += [f"{e}.{proj}.{p}" for p in self.sources[proj].parts]
            if missing:
                shown = ", ".join(missing[:6]) + (f" ... ({len(missing)} in all)"
                                                  if len(missing) > 6 else "")
                out.append(f"{shown} ({self.sources[proj]})")
        return out

    def weight_nbytes(self) -> int:
        return sum(nbytes(m) for m in self.gate_up + self.down if m is not None)

    def expert_nbytes(self) -> int:
        """Bytes one expert's weights take (what a routed token reads per expert)."""
        return nbytes(self.gate_up[0]) + nbytes(self.down[0])

    def forward(self, x: torch.Tensor, experts: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        """x [T, D]; experts, weights [T, k] -> [T, D]."""
        t, k = experts.shape
        if (stacks := self._fused()) is not None:
            gu, down = stacks
            y = cpu_ops.ops().q4_moe(x.to(ACT_DTYPE), experts, weights, gu.q,
                                     gu.scale, gu.zs, gu.group, down.q, down.scale, down.zs,
                                     down.group)
            return y.to(x.dtype)
        if t == 1:
            return self._one_token(x, experts[0].tolist(), weights[0])
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)  # group the (token, expert) pairs by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        xs = x[order // k]
        out = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if not n:
                continue
            seg = slice(start, start + n)
            out[seg] = self._expert(xs[seg], e).to(out.dtype)
            start += n
        out = out * weights.reshape(-1)[order, None]
        pairs = torch.empty_like(out)
        pairs[order] = out
        return pairs.view(t, k, -1).sum(1)

    def _expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        gate, up = self.gate_up[e](x).float().chunk(2, -1)
        return self.down[e](F.silu(gate) * up)

    def _one_token(self, x: torch.Tensor, experts: list[int],
                   weights: torch.Tensor) -> torch.Tensor:
        """A decode step: the token's k experts in turn, without grouping pairs by expert (the
        sort, the counts and the scatter cost more than the matmuls' launch at one token);
        summed in top-k order and rounded as the grouped path does."""
        ys = [self._expert(x, e).to(x.dtype) * w for e, w in zip(experts, weights)]
        return torch.stack(ys).sum(0)

    def extra_repr(self) -> str:
        return (f"{self.num_experts} experts, hidden={self.hidden}, "
                f"intermediate={self.intermediate}, gate/up {self.sources['gate_proj']}, "
                f"down {self.sources['down_proj']}")

