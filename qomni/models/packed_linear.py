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

For the fewest rows qomni's own kernel (`qomni.cpu_ops`, weight_stream.cpp) reads a weight
faster still and without oneDNN's fixed cost of 15-30 us a call, so a PackedLinear keeps the
plain weight too and runs it up to STREAM_MAX_ROWS rows. Measured on a 2-core Xeon with AMX
(avx512_bf16, amx_bf16), us per call, weights out of cache, qomni's kernel / oneDNN packed
(a loop over copies of each weight, best of 9, one run):
fp32 4096 x 2048: 1 row 1384 / 1854, 8 rows 2300 / 2440, 16 rows 3743 / 3110; fp32 152064 x 512
(the medium lm_head): 1 row 14.8 / 15.9 ms, 4 rows 16.6 / 17.9, 8 rows 21.7 / 21.2, 16 rows
34.9 / 27.4; fp32 512 x 1024: 8 rows 156 / 221; bf16 4096 x 2048: 1 row 575 / 802, 2 rows 556 /
857, 8 rows (AMX tiles) 798 / 651; bf16 rows of 1024 or fewer with AMX tiles: 152064 x 512, 8
rows 9.9 / 12.0 ms, 16 rows 10.3 / 11.6, 32 rows 17.1 / 17.4; 1280 x 512, 16 rows 89 / 103;
the bf16 lm_head 152064 x 2048, 1 row: 33 / 48 ms.

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

from qomni import cpu_ops

PACK_ROWS = 8  # the row count oneDNN lays packed weights out for
# Rows up to which qomni's kernel beats oneDNN's packed weights (measured, see above).
STREAM_MAX_ROWS = {torch.float32: 8, torch.bfloat16: 2}
# bf16 with AMX tiles: rows of up to SHORT_ROW values (2 KB and less apart) run as tiles faster
# than oneDNN up to 16 rows; longer rows lose from 4 rows on (the tile rows 4 KB apart).
SHORT_ROW = 1024
STREAM_MAX_ROWS_AMX_SHORT = 16


def stream_max_rows(weight: torch.Tensor) -> int:
    """Rows up to which qomni's kernel runs this [O, K] weight (0: never)."""
    if cpu_ops.ops() is None:
        return 0
    if (weight.dtype == torch.bfloat16 and weight.shape[1] <= SHORT_ROW
            and weight.shape[1] % 32 == 0 and cpu_ops.amx_bf16()):  # whole tile rows
        return STREAM_MAX_ROWS_AMX_SHORT
    return STREAM_MAX_ROWS.get(weight.dtype, 0)


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
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        """weight [O, K] (an nn.Linear's, or q/k/v joined at load), bias [O] or None."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight = weight.detach().contiguous()
        # Plain attributes, not buffers: Module.to() must not try to convert them.
        self.weight = pack_weight(weight)  # [O, K]
        self.bias = bias
        self.stream_max_rows = stream_max_rows(weight)
        self.plain = weight if self.stream_max_rows else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., O]."""
        if x.numel() == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        rows = x.numel() // self.in_features
        if rows <= self.stream_max_rows and x.dtype == self.plain.dtype:
            y = cpu_ops.ops().linear(x.reshape(rows, self.in_features), self.plain)
            y = y.view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
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
                setattr(parent, name, PackedLinear(child.weight, child.bias))
                count += 1
    return count
