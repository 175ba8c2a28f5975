"""Weight-only quantized matmuls: int4 in groups and int8 per channel (CPU and CUDA), FP8.

Legend: N input rows, K in_features, O out_features, G groups per row (K / group size).

An integer weight is `IntWeight`: signed values q [O, K], scales [O, G] and, for asymmetric
schemes, zero points [O, G] in the same signed range, so w = (q - zero) * scale (the
compressed-tensors convention). `int_matmul` packs it once into a kernel's layout:

- int4 on CPU -> qomni's own kernel (`qomni_cpu.q4_linear`, `q4_moe`; qomni/cpu_ops) where it
  is built and K is a multiple of 128: nibbles in its block layout (`pack_q4`), fp32 scales per
  group, products summed per group exactly and scaled once (1.3-1.7x torch's kernel at one row
  and ~7x at 64, bench/quant_kernels.py). Elsewhere torch._weight_int4pack_mm_for_cpu (CPU) /
  torch._weight_int4pack_mm (CUDA tinygemm): they compute w = (u - 8) * s + z on unsigned
  nibbles u = q + 8, so z = -zero * s is exact; groups of 32..256 over K and O a multiple of
  16: per-channel scales are repeated over kernel groups (exact), O is padded with zero rows.
- int8 per channel, symmetric, on CPU -> qomni's `qomni_cpu.q8_linear` where it is built (fp32
  scales; 1.5x torch's kernel at 1-2 rows on the 152064 x 2048 lm_head, equal at 8); otherwise
  torch._weight_int8pack_mm (the asymmetric correction is one rank-1 term); in groups: one
  kernel call per group, summed (slower, exact).
- FP8 e4m3 weights (`Fp8Matmul`): widened once to bf16 (exact), scales on the outputs.

Every quantized matmul computes in bf16 (ACT_DTYPE); callers cast its output back. Speeds are in
docs/quantization.md (bench/quant_kernels.py). The CUDA branches follow PyTorch's ops but are
NOT validated in this repository's tests (no GPU here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qomni import cpu_ops
from qomni.models.packed_linear import pack_weight, packed_dtypes, packed_linear

INT4_KERNEL_GROUPS = (256, 128, 64, 32)
# The activations' dtype inside every quantized matmul: the CPU int kernels are vectorised for
# bf16 only (fp32 or fp16 inputs run 10-50x slower) and CUDA tinygemm takes bf16.
ACT_DTYPE = torch.bfloat16


@dataclass
class IntWeight:
    q: torch.Tensor  # int8 [O, K], values in [-2^(bits-1), 2^(bits-1) - 1]
    scale: torch.Tensor  # float [O, G]
    zero: torch.Tensor | None  # int8 [O, G] (asymmetric) or None
    bits: int
    group_size: int  # K when per channel

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[O, K] in `dtype`: (q - zero) * scale per group."""
        o, k = self.q.shape
        q = self.q.float().view(o, -1, self.group_size)
        if self.zero is not None:
            q = q - self.zero.float()[..., None]
        return (q * self.scale.float()[..., None]).reshape(o, k).to(dtype)


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None) -> IntWeight:
    """Symmetric round-to-nearest: scale = absmax / (2^(bits-1) - 1) per group of `group_size`
    inputs (None: per output channel); values in [-qmax, qmax]. Works through the rows in
    blocks, so a large bf16 weight needs only a block's fp32 copy besides itself."""
    o, k = w.shape
    g = k if group_size is None else group_size
    if k % g:
        raise ValueError(f"group size {g} does not divide in_features {k}")
    qmax = 2 ** (bits - 1) - 1
    q = torch.empty(o, k, dtype=torch.int8)
    scale = torch.empty(o, k // g)
    step = max(1, (1 << 22) // k)
    for r in range(0, o, step):
        groups = w[r:r + step].float().view(-1, k // g, g)
        s = groups.abs().amax(-1).clamp_min(1e-12) / qmax  # [rows, G]
        q[r:r + step] = torch.round(groups / s[..., None]).clamp_(-qmax, qmax).view(-1, k)
        scale[r:r + step] = s
    return IntWeight(q, scale, None, bits, g)


def int4_kernel_group(group_size: int) -> int | None:
    """The largest group the int4 kernels take that divides the scheme's groups."""
    return next((g for g in INT4_KERNEL_GROUPS if group_size % g == 0), None)


def pack_int4(weight: IntWeight, group_size: int | None = None, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(packed weight, scales_and_zeros [K/g, O', 2]) for the int4 kernel on `device`; O' is O
    rounded up to 16. `group_size` is the kernel's group (default: derived from the weight)."""
    device = torch.device(device)
    o, k = weight.shape
    g = group_size or int4_kernel_group(weight.group_size)
    if g is None or weight.group_size % g or k % g:
        raise ValueError(f"int4 groups of {weight.group_size} over {k} inputs: the int4 kernels "
                         f"take groups of {', '.join(map(str, INT4_KERNEL_GROUPS))}")
    rep = weight.group_size // g
    scale = weight.scale.float().repeat_interleave(rep, 1)  # [O, K/g]
    zero = (torch.zeros_like(scale) if weight.zero is None
            else -weight.zero.float().repeat_interleave(rep, 1) * scale)
    u = weight.q.to(torch.int32) + 8  # [O, K] in 0..15
    pad = -o % 16
    if pad:
        u = F.pad(u, (0, 0, 0, pad), value=8)  # zero rows: (8 - 8) * 0
        scale, zero = F.pad(scale, (0, 0, 0, pad)), F.pad(zero, (0, 0, 0, pad))
    sz = torch.stack((scale.T, zero.T), -1).to(dtype).contiguous()
    if device.type == "cpu":
        packed = torch._convert_weight_to_int4pack_for_cpu(u, 1)
    else:  # tinygemm: two nibbles per byte, high nibble first (not validated here)
        u8 = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8).to(device)
        packed = torch._convert_weight_to_int4pack(u8, 8)
    return packed.to(device), sz.to(device)


Q4_BLOCK = 128  # values per 64-byte block of qomni's int4 layout


def q4_eligible(weight: IntWeight, device: torch.device) -> bool:
    """qomni's int4 kernel takes the weight: CPU, built, K whole blocks, groups of 32s."""
    k = weight.shape[1]
    return (device.type == "cpu" and weight.bits == 4 and k % Q4_BLOCK == 0
            and weight.group_size % 32 == 0 and cpu_ops.ops() is not None)


def pack_q4(weight: IntWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q uint8 [O, K/2], scales fp32 [O, G], zero * scale fp32 [O, G] or None) in the layout of
    qomni_cpu.q4_linear: per block of 128 values, 32 16-bit words, nibble c of word i holding
    value 32c + i as u = q + 8."""
    o, k = weight.shape
    u = (weight.q.to(torch.int32) + 8).view(o, k // Q4_BLOCK, 4, 32)
    words = u[:, :, 0] | u[:, :, 1] << 4 | u[:, :, 2] << 8 | u[:, :, 3] << 12  # [O, K/128, 32]
    q = words.to(torch.uint16).view(torch.uint8).reshape(o, k // 2)  # little-endian words
    scale = weight.scale.float().contiguous()
    zs = None if weight.zero is None else (weight.zero.float() * scale).contiguous()
    return q, scale, zs


def pack_int8(weight: IntWeight, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [O, K], per-channel scales [O] in `dtype`) for torch._weight_int8pack_mm."""
    if weight.group_size != weight.shape[1] or weight.zero is not None:
        raise ValueError("pack_int8 takes symmetric per-channel int8 weights")
    return weight.q.contiguous().to(device), weight.scale[:, 0].to(dtype).to(device)


class Q4Matmul:
    """x [N, K] -> bf16 [N, O] on an int4 weight in qomni's layout (`pack_q4`); `packed` may be
    views into an MoE layer's stacked experts (`Q4Stack`)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zs: torch.Tensor | None,
                 group: int):
        self.q, self.scale, self.zs, self.group = q, scale, zs, group
        self.out_features, self.in_features = q.shape[0], q.shape[1] * 2

    @classmethod
    def of(cls, weight: IntWeight) -> Q4Matmul:
        return cls(*pack_q4(weight), weight.group_size)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.q, self.scale, self.zs) if t is not None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_ops.ops().q4_linear(x.to(ACT_DTYPE), self.q, self.scale, self.zs, self.group)


class Int4Matmul:
    """x [N, K] -> bf16 [N, O] on a packed int4 weight (torch's kernels)."""

    def __init__(self, weight: IntWeight, device: torch.device):
        self.out_features, self.in_features = weight.shape
        self.group = int4_kernel_group(weight.group_size)
        self.packed, self.scales_and_zeros = pack_int4(weight, self.group, ACT_DTYPE, device)
        self.cuda = device.type == "cuda"

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.scales_and_zeros]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(ACT_DTYPE).contiguous()
        if self.cuda:
            y = torch._weight_int4pack_mm(x, self.packed, self.group, self.scales_and_zeros)
        else:
            y = torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group,
                                                  self.scales_and_zeros)
        return y[:, :self.out_features]


class Q8Matmul:
    """x [N, K] -> bf16 [N, O] on a symmetric per-channel int8 weight (qomni_cpu.q8_linear)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        self.q, self.scale = q, scale  # int8 [O, K], fp32 [O]
        self.out_features, self.in_features = q.shape

    @classmethod
    def of(cls, weight: IntWeight) -> Q8Matmul:
        return cls(weight.q.contiguous(), weight.scale[:, 0].float().contiguous())

    @staticmethod
    def takes(weight: IntWeight, device: torch.device) -> bool:
        return (device.type == "cpu" and weight.group_size == weight.shape[1]
                and weight.zero is None and cpu_ops.ops() is not None)

    def tensors(self) -> list[torch.Tensor]:
        return [self.q, self.scale]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_ops.ops().q8_linear(x.to(ACT_DTYPE), self.q, self.scale)


class Int8Matmul:
    """x [N, K] -> [N, O] (bf16; fp32 in groups) on an int8 weight: per channel in one kernel call, in groups as
    one call per group; asymmetric zero points as a correction term."""

    def __init__(self, weight: IntWeight, device: torch.device):
        self.out_features, self.in_features = o, k = weight.shape
        g = weight.group_size
        self.groups = k // g
        # [G, O, g] contiguous: each group is one kernel call
        self.q = weight.q.view(o, self.groups, g).transpose(0, 1).contiguous().to(device)
        self.scale = weight.scale.T.to(ACT_DTYPE).contiguous().to(device)  # [G, O]
        self.zs = (None if weight.zero is None  # [G, O]: zero * scale, times each group's sum
                   else (weight.zero.float() * weight.scale.float()).T.to(ACT_DTYPE)
                   .contiguous().to(device))
        self.cuda = device.type == "cuda"

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.q, self.scale, self.zs) if t is not None]

    def _mm(self, x: torch.Tensor, g: int) -> torch.Tensor:
        if self.cuda:  # widened per call (not validated here)
            return F.linear(x, self.q[g].to(x.dtype)) * self.scale[g]
        return torch._weight_int8pack_mm(x, self.q[g], self.scale[g])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(ACT_DTYPE)
        if self.groups == 1:
            y = self._mm(x.contiguous(), 0)
        else:
            parts = x.view(x.shape[0], self.groups, -1)
            # groups summed in fp32: bf16 partial sums would add a rounding per group
            y = sum(self._mm(parts[:, g].contiguous(), g).float() for g in range(self.groups))
        if self.zs is not None:
            y = y - (x.view(x.shape[0], self.groups, -1).sum(-1) @ self.zs).to(y.dtype)
        return y


class Fp8Matmul:
    """x [N, K] -> bf16 [N, O] on an FP8 (e4m3) weight with per-channel or per-tensor scales.

    e4m3 values are exact in bf16, so the weight is widened once at load (2 bytes per weight)
    and the scale applied to the outputs: exact, and on a CPU with bf16 matrix instructions a
    bf16 oneDNN-packed weight reads ~2.7x faster than fp32, where widening per call would be
    ~100x slower (elsewhere oneDNN cannot pack bf16 and F.linear converts as it goes)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, device: torch.device):
        self.out_features, self.in_features = weight.shape
        w = weight.to(device).to(ACT_DTYPE)
        self.packed = device.type == "cpu" and ACT_DTYPE in packed_dtypes()
        self.weight = pack_weight(w) if self.packed else w
        self.scale = scale.reshape(-1).to(ACT_DTYPE).to(device)  # [O] or [1]

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight, self.scale]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(ACT_DTYPE)
        if self.packed:
            y = packed_linear(x, self.weight)
        else:
            y = F.linear(x, self.weight)
        return y * self.scale


class DenseMatmul:
    """x [N, K] -> [N, O] on a full-precision weight (an expert projection a checkpoint leaves
    unquantized while the others are)."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, device: torch.device):
        self.out_features, self.in_features = weight.shape
        self.weight = weight.to(device=device, dtype=dtype).contiguous()

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight)


Matmul = Q4Matmul | Int4Matmul | Q8Matmul | Int8Matmul | Fp8Matmul | DenseMatmul


def int_matmul(weight: IntWeight, device: torch.device | str) -> Matmul:
    """qomni's int4 kernel or torch's where they take the weight's groups; otherwise the int8
    path, which holds int4 values exactly (one byte each)."""
    device = torch.device(device)
    if q4_eligible(weight, device):
        return Q4Matmul.of(weight)
    if weight.bits == 4 and int4_kernel_group(weight.group_size) is not None:
        return Int4Matmul(weight, device)
    if weight.bits in (4, 8):
        return Q8Matmul.of(weight) if Q8Matmul.takes(weight, device) else Int8Matmul(weight,
                                                                                    device)
    raise ValueError(f"{weight.bits}-bit weights: qomni runs 4- and 8-bit integer weights")


def join_rows(matmuls: list[Matmul]) -> Matmul | None:
    """One matmul of the same input for several (q, k and v): their outputs side by side, each
    row computed as before (qomni's kernels compute rows independently). For qomni's int4 or
    int8 kernels of one layout; None for any other mix."""
    first = matmuls[0]
    if any(type(m) is not type(first) or m.in_features != first.in_features for m in matmuls):
        return None
    if type(first) is Q4Matmul:
        if any(m.group != first.group or (m.zs is None) != (first.zs is None) for m in matmuls):
            return None
        zs = None if first.zs is None else torch.cat([m.zs for m in matmuls])
        return Q4Matmul(torch.cat([m.q for m in matmuls]),
                        torch.cat([m.scale for m in matmuls]), zs, first.group)
    if type(first) is Q8Matmul:
        return Q8Matmul(torch.cat([m.q for m in matmuls]), torch.cat([m.scale for m in matmuls]))
    return None


def nbytes(matmul: Matmul) -> int:
    """Bytes of a matmul's packed tensors (what one call reads)."""
    return sum(t.element_size() * t.numel() for t in matmul.tensors())
