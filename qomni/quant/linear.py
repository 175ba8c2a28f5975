"""nn.Linear and nn.Embedding with weight-only quantized weights, filled by the loader.

Legend: N rows, K in_features, O out_features, V embedding rows, D embedding width.

A `QuantLinear` takes the place of a Linear before loading. The loader hands it the checkpoint
tensors of its weight (`load_part`): a full-precision `weight`, quantized as it arrives
(`QuantizeOnLoad`), or a compressed-tensors module's tensors (`Scheme`). Once it has them all,
it packs them for its matmul kernel and drops the rest, so a full-precision weight lives only
while it is being quantized. The bias stays an ordinary parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qomni.models.layers import Attention
from qomni.quant.compressed import Scheme
from qomni.quant.kernels import (
    DenseMatmul,
    Fp8Matmul,
    IntWeight,
    Matmul,
    int_matmul,
    join_rows,
    nbytes,
    quantize_weight,
)

INT4_GROUP = 128  # quantize-on-load int4 group size (smaller where K is not a multiple)


@dataclass(frozen=True)
class QuantizeOnLoad:
    """Round-to-nearest symmetric quantization of a full-precision weight: int8 per channel,
    int4 in groups of 128 (64 or 32 where in_features is not a multiple; int8 where it is not a
    multiple of 32, which no published Qwen3-Omni linear is)."""

    bits: int
    parts: tuple[str, ...] = ("weight",)

    def __str__(self) -> str:
        return f"int{self.bits} (quantized on load)"

    def decode(self, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> IntWeight:
        w = parts["weight"]
        if tuple(w.shape) != tuple(shape):
            raise ValueError(f"checkpoint shape {tuple(w.shape)}, model expects {tuple(shape)}")
        k = shape[1]
        if self.bits == 8:
            return quantize_weight(w, 8, None)
        group = next((g for g in (INT4_GROUP, 64, 32) if k % g == 0), None)
        return quantize_weight(w, 4, group) if group else quantize_weight(w, 8, None)


@dataclass(frozen=True)
class Dense:
    """A full-precision weight, kept in the compute dtype."""

    parts: tuple[str, ...] = ("weight",)

    def __str__(self) -> str:
        return "full precision"

    def decode(self, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        w = parts["weight"]
        if tuple(w.shape) != tuple(shape) or not w.is_floating_point():
            raise ValueError(f"checkpoint tensor {w.dtype} {tuple(w.shape)}, model expects a "
                             f"float weight {tuple(shape)}")
        return w


Source = QuantizeOnLoad | Scheme | Dense


def build_matmul(decoded: IntWeight | tuple[torch.Tensor, torch.Tensor] | torch.Tensor,
                 dtype: torch.dtype, device: torch.device) -> Matmul:
    if isinstance(decoded, IntWeight):
        return int_matmul(decoded, device)
    if isinstance(decoded, torch.Tensor):
        return DenseMatmul(decoded, dtype, device)
    return Fp8Matmul(*decoded, device)


class _Parts:
    """Collects one weight's checkpoint tensors until its source has all it needs."""

    def __init__(self, source: Source):
        self.source, self.got = source, {}

    def add(self, name: str, tensor: torch.Tensor) -> bool:
        """Keep a tensor; True once all are here."""
        if name not in self.source.parts:
            raise ValueError(f"unexpected tensor {name!r} for {self.source} (it has "
                             f"{', '.join(self.source.parts)})")
        if name in self.got:
            raise ValueError(f"{name} given twice")
        self.got[name] = tensor
        return len(self.got) == len(self.source.parts)

    def missing(self) -> list[str]:
        return [p for p in self.source.parts if p not in self.got]


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, source: Source,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.source, self.dtype, self.device = source, dtype, torch.device(device)
        self._parts: _Parts | None = _Parts(source)
        self.matmul: Matmul | None = None  # plain attribute: its layout is the kernel's

    @classmethod
    def replacing(cls, linear: nn.Linear, source: Source, dtype: torch.dtype,
                  device) -> QuantLinear:
        return cls(linear.in_features, linear.out_features, linear.bias is not None, source,
                   dtype, device)

    @property
    def weight(self) -> torch.Tensor:
        """A stand-in with the logical shape [O, K], the model's dtype and the device (one
        element, stride 0), for code that asks a linear where and in what dtype it computes."""
        return torch.empty(1, dtype=self.dtype, device=self.device).expand(self.out_features,
                                                                          self.in_features)

    @classmethod
    def joined(cls, linears: list[QuantLinear]) -> QuantLinear | None:
        """One linear for several loaded ones of the same input, their outputs side by side
        (q, k and v: one kernel call, not three); None where their kernels cannot be joined."""
        first = linears[0]
        if any(lin.matmul is None or lin.bias is not None for lin in linears):
            return None
        matmul = join_rows([lin.matmul for lin in linears])
        if matmul is None:
            return None
        out = cls(first.in_features, matmul.out_features, False, first.source, first.dtype,
                  first.device)
        out.matmul, out._parts = matmul, None
        return out

    def load_part(self, name: str, tensor: torch.Tensor) -> None:
        if self._parts is None:
            raise ValueError(f"{name} given after the weight was complete")
        if self._parts.add(name, tensor):
            self.matmul = build_matmul(
                self.source.decode(self._parts.got, (self.out_features, self.in_features)),
                self.dtype, self.device)
            self._parts = None

    def missing_parts(self) -> list[str]:
        if self._parts is None:
            return []
        return [f"{', '.join(self._parts.missing())} ({self.source})"]

    def weight_nbytes(self) -> int:
        return nbytes(self.matmul) if self.matmul is not None else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., O] in x's dtype."""
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        y = self.matmul(flat).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.source}"


class QuantEmbedding(nn.Module):
    """nn.Embedding stored as int8 rows with one scale per row; looks up in `dtype`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.q: torch.Tensor | None = None  # int8 [V, D]
        self.scale: torch.Tensor | None = None  # [V, 1] in dtype

    @classmethod
    def replacing(cls, emb: nn.Embedding, dtype: torch.dtype, device) -> QuantEmbedding:
        return cls(emb.num_embeddings, emb.embedding_dim, dtype, device)

    def load_part(self, name: str, tensor: torch.Tensor) -> None:
        if name != "weight" or self.q is not None:
            raise ValueError(f"unexpected tensor {name!r} for an int8 embedding")
        shape = (self.num_embeddings, self.embedding_dim)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"checkpoint shape {tuple(tensor.shape)}, model expects {shape}")
        w = quantize_weight(tensor, 8, None)
        self.q = w.q.to(self.device)
        self.scale = w.scale.to(self.dtype).to(self.device)

    def missing_parts(self) -> list[str]:
        return ["weight (int8 embedding)"] if self.q is None else []

    def weight_nbytes(self) -> int:
        if self.q is None:
            return 0
        return self.q.numel() + self.scale.numel() * self.scale.element_size()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] -> [..., D]."""
        return self.q[ids].to(self.dtype) * self.scale[ids]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per row"


def join_attention(model: nn.Module) -> int:
    """q, k and v of every attention whose three are quantized alike for qomni's CPU kernels as
    one linear (`Attention.pack`): one kernel call, q and k normed and rotated as one tensor;
    returns how many."""
    count = 0
    for m in model.modules():
        if isinstance(m, Attention) and m.qkv is None:
            projs = [m.q_proj, m.k_proj, m.v_proj]
            if all(isinstance(p, QuantLinear) for p in projs):
                qkv = QuantLinear.joined(projs)
                if qkv is not None:
                    m.pack(qkv)
                    count += 1
    return count
