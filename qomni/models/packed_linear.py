"""nn.Linear for CPU fp32 inference, its weight packed once into oneDNN's blocked layout.

Legend: N rows (tokens), K in_features, O out_features.

Why: decoding multiplies a few rows by large weights, so it is bound by reading the weights. On
the 2-core AVX2 host of docs/benchmarks.md (fp32, weights far larger than the caches), torch's
default CPU matmul reads a weight at 12-17 GB/s for one row and 4-7 GB/s for eight; oneDNN's
inner product on a weight packed ahead reads at 15-27 GB/s and 9-11 GB/s. For example the
lm_head (152064 x 2048): 71 -> 46 ms for one row, 309 -> 111 ms for eight; the code predictor's
down_proj (1024 x 3072): 0.82 -> 0.59 ms and 3.2 -> 1.1 ms. Prefill-sized inputs (hundreds of
rows) run as fast as before. Results differ from torch's matmul in the last bits (another
summation order), as any other kernel choice would.

This is the op torch's own inductor uses for frozen CPU linears (`mkldnn._linear_pointwise`).
The packed weight is an opaque `torch._mkldnn` tensor: it keeps `shape`, `dtype`, `device` and
`element_size()`, nothing else of a strided tensor, and is not in the state dict (load weights
first, then pack).
"""

from __future__ import annotations

import torch
from torch import nn


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # A plain attribute, not a buffer: Module.to() must not try to convert it.
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)  # [O, K]
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., O]."""
        if x.numel() == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def pack_linears(model: nn.Module) -> int:
    """Replace every fp32 CPU nn.Linear in `model` by a PackedLinear (inference only); returns
    how many. Nothing happens where oneDNN is not available."""
    if not torch.backends.mkldnn.is_available():
        return 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) is nn.Linear and child.weight.device.type == "cpu"
                    and child.weight.dtype == torch.float32):
                setattr(parent, name, PackedLinear(child))
                count += 1
    return count
