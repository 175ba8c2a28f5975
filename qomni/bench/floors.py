"""Timing, the machine's rates, and each stage's floor: the least time this hardware allows.

Decode-type stages are bound by the bytes of weights (and KV) one step must read ÷ the memory
bandwidth measured in the same process; prefill-type stages by the FLOPs they run ÷ the measured
GEMM rate. On a shared machine other work only ever slows a measurement, so one-shot stages take
the best of REPEATS runs and the calibration is the faster of one taken at the start and one at
the end.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from qomni import cpu_ops
from qomni.config import TextConfig
from qomni.models.moe import Experts, SparseMoE
from qomni.models.packed_linear import PackedLinear
from qomni.quant.experts import QuantExperts
from qomni.quant.linear import QuantEmbedding, QuantLinear

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+; annotations are never evaluated at run time

# One-shot stages (prefill, code2wav) report the best of this many timed runs after a warm-up.
REPEATS = 2


# -- timing ---------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, fn()), with the device's queued work finished on both sides."""
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def fastest(fn: Callable[[], Any], device: torch.device, runs: int = REPEATS) -> tuple[float, Any]:
    """The fastest of `runs` timed calls (seconds, its result)."""
    return min((timed(fn, device) for _ in range(runs)), key=lambda r: r[0])


def _best(fn: Callable[[], Any], device: torch.device, budget_s: float = 1.0) -> float:
    """Best of up to 5 timed runs after a warm-up, as many as fit `budget_s` (bf16 GEMMs on a
    CPU without bf16 instructions take seconds each)."""
    first, _ = timed(fn, device)  # warm-up
    return fastest(fn, device, max(1, min(5, int(budget_s / first))))[0]


class CallTimer:
    """Wall time of every call of some modules (forward hooks), and the FLOPs each ran when a
    FlopCounterMode is active: calls[name] = [(seconds, flops), ...]; starts[name] = the
    perf_counter() at each call's start."""

    def __init__(self, modules: Mapping[str, nn.Module], device: torch.device,
                 flops: FlopCounterMode | None = None):
        self.modules, self.device, self.flops = modules, device, flops
        self.calls: dict[str, list[tuple[float, int]]] = {name: [] for name in modules}
        self.starts: dict[str, list[float]] = {name: [] for name in modules}
        self._open: dict[str, tuple[float, int]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> Self:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(partial(self._start, name)))
            self._handles.append(module.register_forward_hook(partial(self._stop, name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def seconds(self, name: str) -> float:
        return sum(s for s, _ in self.calls[name])

    def total_flops(self, name: str) -> int:
        return sum(f for _, f in self.calls[name])

    def _counted(self) -> int:
        return self.flops.get_total_flops() if self.flops is not None else 0

    def _start(self, name: str, module: nn.Module, args: Any) -> None:
        _sync(self.device)
        self._open[name] = (time.perf_counter(), self._counted())
        self.starts[name].append(self._open[name][0])

    def _stop(self, name: str, module: nn.Module, args: Any, out: Any) -> None:
        _sync(self.device)
        start, flops = self._open.pop(name)
        self.calls[name].append((time.perf_counter() - start, self._counted() - flops))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# -- the machine's rates --------------------------------------------------------------------------

def calibrate(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Memory read bandwidth (sum over a tensor far larger than any cache) and GEMM rate in the
    benchmark's dtype, measured in this process."""
    # 256 MiB of fp32: 8x this machine's L3 and beyond a GPU's L2, yet little enough to sit
    # beside a full-size model within its memory budget (1 GiB did not)
    big = torch.ones((256 << 20) // 4, device=device)
    read = _nbytes(big) / _best(big.sum, device)
    del big
    # Larger GEMMs run closer to peak; grow until one takes 0.1 s (bf16 on a CPU without bf16
    # instructions stays at the first size: it already takes seconds).
    n, largest = 1024, 8192 if device.type == "cuda" else 4096
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        seconds, _ = timed(partial(torch.mm, a, b), device)
        if seconds >= 0.1 or n >= largest:
            break
        n *= 2
    rate = 2 * n**3 / _best(partial(torch.mm, a, b), device)
    return {"read_bytes_per_s": read, "matmul_flops_per_s": rate, "gemm_n": n}


def best_calibration(*runs: Mapping[str, float]) -> dict[str, float]:
    """The fastest of several calibrations (taken at the start and the end of a run): other work
    on a shared machine only ever slows a measurement, and a floor must not be inflated by it."""
    best = dict(max(runs, key=lambda c: c["matmul_flops_per_s"]))
    best["read_bytes_per_s"] = max(c["read_bytes_per_s"] for c in runs)
    return best


# -- what a stage must do -------------------------------------------------------------------------

def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[-1] * math.prod(out_shape)


def _sdpa_flops(q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    b, h, s, d = q_shape
    return 4 * b * h * s * k_shape[-2] * d  # q·kᵀ and p·v


def _routed_moe_flops(x_shape, ids_shape, weights_shape, gate_up_shape, down_shape, *args,
                      out_shape=None, **kwargs) -> int:
    """qomni_cpu.moe: each (token, chosen expert) pair runs gate_up [2I, D] and down [D, I]."""
    return 2 * math.prod(ids_shape) * (math.prod(gate_up_shape[1:]) + math.prod(down_shape[1:]))


def _q4_moe_flops(x_shape, ids_shape, weights_shape, gate_up_q_shape, gate_up_s_shape,
                  gate_up_zs_shape, group, down_q_shape, *args, out_shape=None, **kwargs) -> int:
    """qomni_cpu.q4_moe: as qomni_cpu.moe, on packed int4 (two values a byte) gate_up
    [E, 2I, D/2] and down [E, D, I/2]."""
    d, two_i, i = x_shape[-1], gate_up_q_shape[1], 2 * down_q_shape[2]
    return 2 * math.prod(ids_shape) * (two_i * d + d * i)


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, plus the ops the models use that it does not know (MoE grouped
    GEMM; the CPU attention kernel; PackedLinear's oneDNN inner product, the quantized matmuls
    and qomni's own linears (also int4, int8), whose shapes read like a grouped GEMM's:
    x [..., K], out [..., N]; qomni's own routed-experts calls, dense and int4)."""
    aten = torch.ops.aten
    mapping = {
        aten._grouped_mm: _grouped_mm_flops,
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
        torch.ops.mkldnn._linear_pointwise: _grouped_mm_flops,
        aten._weight_int4pack_mm_for_cpu: _grouped_mm_flops,
        aten._weight_int8pack_mm: _grouped_mm_flops}
    if (qomni_cpu := cpu_ops.ops()) is not None:
        mapping |= {qomni_cpu.linear: _grouped_mm_flops, qomni_cpu.moe: _routed_moe_flops,
                    qomni_cpu.q4_linear: _grouped_mm_flops, qomni_cpu.q8_linear: _grouped_mm_flops,
                    qomni_cpu.q4_moe: _q4_moe_flops}
    return FlopCounterMode(display=False, custom_mapping=mapping)


def param_count(model: nn.Module) -> int:
    """Parameters, with the weights PackedLinear and the quantized modules hold outside them
    (counted as the weights they stand for)."""
    held = 0
    for m in model.modules():
        if isinstance(m, (PackedLinear, QuantLinear)):
            held += m.in_features * m.out_features
        elif isinstance(m, QuantExperts) or (isinstance(m, Experts) and m.packed is not None):
            held += 3 * m.num_experts * m.hidden * m.intermediate
        elif isinstance(m, QuantEmbedding):
            held += m.num_embeddings * m.embedding_dim
    return held + sum(p.numel() for p in model.parameters())


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def weight_bytes(module: nn.Module, tokens: int = 1) -> float:
    """Bytes of `module`'s weights one step over `tokens` tokens reads: every weight, except that
    MoE layers read only the experts the tokens pick (expected count under uniform routing) and
    embedding tables only the tokens' rows."""
    total, partial_ids = 0.0, set()
    for m in module.modules():
        if isinstance(m, SparseMoE):
            e = m.experts.num_experts
            used = e * (1 - (1 - m.top_k / e) ** tokens)
            total += m.experts.weight_nbytes() * used / e  # packed, quantized or parameters
            partial_ids.update(id(p) for p in m.experts.parameters())
        elif isinstance(m, nn.Embedding):
            total += tokens * m.weight.shape[1] * m.weight.element_size()
            partial_ids.add(id(m.weight))
        elif isinstance(m, QuantEmbedding):
            total += tokens * m.weight_nbytes() / m.num_embeddings
        elif isinstance(m, PackedLinear):  # its packed weight is no parameter
            total += _nbytes(m.weight)
        elif isinstance(m, QuantLinear):
            total += m.weight_nbytes()
    return total + sum(_nbytes(p) for p in module.parameters() if id(p) not in partial_ids)


def kv_bytes(cfg: TextConfig, context: float, element_size: int) -> float:
    """Keys and values one decode step reads at `context` cached tokens."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * context \
        * element_size


# -- result rows and their floors -----------------------------------------------------------------

def stage(seconds: float, work: float | None = None, unit: str | None = None, *,
          bytes_read: float | None = None, flops: float | None = None) -> dict[str, Any]:
    """One result row: `work` units (tok, frames, audio s) in `seconds`, and what bounds the
    same work on this hardware: the bytes of weights and KV it must read (decode-type) or the
    FLOPs it must run (prefill-type). `set_floors` turns those into seconds."""
    return {"seconds": seconds, "work": work, "unit": unit, "bytes_read": bytes_read,
            "flops": flops, "floor_seconds": None, "floor": None}


def set_floors(stages: Mapping[str, dict[str, Any]], calib: Mapping[str, float]) -> None:
    for row in stages.values():
        if row["bytes_read"]:
            row["floor_seconds"] = row["bytes_read"] / calib["read_bytes_per_s"]
            per = row["bytes_read"] / row["work"] / 1e9
            row["floor"] = f"memory: {per:.3g} GB/{row['unit'].removesuffix('s')}"
        elif row["flops"]:
            row["floor_seconds"] = row["flops"] / calib["matmul_flops_per_s"]
            row["floor"] = f"compute: {row['flops'] / 1e9:.3g} GFLOP"
