"""nn.Linear for CPU inference, its weight packed once into oneDNN's blocked layout.

Legend: N rows (tokens), K in_features, O out_features.

Why: decoding multiplies a few rows by large weights, so it is bound by reading the weights. On
the 2-core AVX2 host of docs/benchmarks.md (fp32, weights far larger than the caches), torch's
default CPU matmul reads a weight at 12-17 GB/s for one row and 4-7 GB/s for eight; oneDNN's
inner product on a weight packed ahead reads at 15-27 GB/s and 9-11 GB/s. For example the
lm_head (152064 x 2048): 71 -> 46 ms for one row, 309 -> 111 ms for eight; the code predictor's
down_proj (1024 x 3072): 0.82 -> 0.59 ms and 3.2 -> 1.1 ms. Prefill-sized inputs (hundreds of
rows) run as fast as before. Results differ from torch's matmul in the last bits (another
summation order), as any other kernel choice would.

The layout is chosen for batches of 8 rows: on a 2-core Zen 5 (AVX-512; best of 15 on a shared
machine) a 152064 x 512 lm_head packed for 1 row takes 26 ms for 8 rows and 14 ms for 1, packed
for 8 rows 14 ms and 12.5 ms (bf16: 12 / 7.4 ms against 8.7 / 8.0 ms); 32 or 128 were no better.
In bf16, where the CPU has native bf16 dot products (AVX512-BF16, AMX), the packed weight runs
that lm_head about 2x faster than torch's bf16 matmul (`native_bf16`).

This is the op torch's own inductor uses for frozen CPU linears (`mkldnn._linear_pointwise`).
The packed weight is an opaque `torch._mkldnn` tensor: it keeps `shape`, `dtype`, `device` and
`element_size()`, nothing else of a strided tensor, and is not in the state dict (load weights
first, then pack).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

PACK_ROWS = 8  # the row count oneDNN lays packed weights out for


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[O, K] -> oneDNN's packed form of it (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_ROWS)


def packed_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [N, K] @ packed weight [O, K]ᵀ -> [N, O]."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


@functools.cache
def native_bf16() -> bool:
    """The CPU has bf16 matrix instructions (x86 AVX512-BF16 or AMX-BF16; Linux flags)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return False
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def packed_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes whose CPU weights are packed: fp32 always, bf16 where the CPU has bf16
    matrix instructions (elsewhere oneDNN emulates them)."""
    if not torch.backends.mkldnn.is_available():
        return ()
    return (torch.float32, torch.bfloat16) if native_bf16() else (torch.float32,)


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # A plain attribute, not a buffer: Module.to() must not try to convert it.
        self.weight = pack_weight(linear.weight)  # [O, K]
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., O]."""
        if x.numel() == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def pack_linears(model: nn.Module,
                 dtypes: Iterable[torch.dtype] = (torch.float32,)) -> int:
    """Replace every CPU nn.Linear of `dtypes` in `model` by a PackedLinear (inference only);
    returns how many. Nothing happens where oneDNN is not available."""
    if not torch.backends.mkldnn.is_available():
        return 0
    dtypes = tuple(dtypes)
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) is nn.Linear and child.weight.device.type == "cpu"
                    and child.weight.dtype in dtypes):
                setattr(parent, name, PackedLinear(child))
                count += 1
    return count
