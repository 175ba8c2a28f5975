"""Weight-only quantized matmul kernels on CPU: time per call at decode-sized inputs.

Each method multiplies `rows` input rows by `--matrices` distinct weights of one shape in turn,
so the weights come from memory, not the caches (as in decoding a large model). All methods run
interleaved in one process, one pass of every method per round, and the best round of
`--rounds` is kept: on a shared machine that cancels most of the other processes' noise.

    PYTHONPATH=. python bench/quant_kernels.py                      # all shapes, 1 thread
    PYTHONPATH=. python bench/quant_kernels.py --shapes 2048x6144 --rows 1 8 --threads 2

Methods: fp32 and bf16 dense (torch's matmul and oneDNN on a pre-packed weight), int8 per
channel (torch._weight_int8pack_mm, and qomni's own `qomni_cpu.q8_linear`), int4 in groups of
32/64/128 (torch._weight_int4pack_mm_for_cpu, and qomni's own `qomni_cpu.q4_linear`), qomni's
where they build, all with bf16 activations, and torchao's weight-only tensors when torchao is
importable. `--slow` adds the int kernels with fp32/fp16 activations and FP8
weights widened per call (both far slower). Results: docs/quantization.md.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

# (in_features, out_features): the shapes decoding reads most.
SHAPES = {
    "2048x6144": (2048, 6144),  # a wide projection
    "thinker.q_proj": (2048, 4096),
    "thinker.expert.gate_up": (2048, 1536),
    "thinker.expert.down": (768, 2048),
    "talker.expert.gate_up": (1024, 768),
    "code_predictor.gate_up": (1024, 6144),
}


def _methods(k: int, n: int, count: int, slow: bool) -> dict[str, list[Callable]]:
    """name -> one callable per weight matrix (x [rows, k] fp32 -> [rows, n])."""
    from qomni import cpu_ops
    from qomni.quant.kernels import Q4Matmul, Q8Matmul, pack_int4, pack_int8, quantize_weight

    dense = [torch.randn(n, k) * 0.02 for _ in range(count)]
    out: dict[str, list[Callable]] = {}
    out["fp32 matmul"] = [lambda x, w=w: F.linear(x, w) for w in dense]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in dense]
    out["fp32 oneDNN packed"] = [
        lambda x, w=w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        for w in packed]
    bf = [w.bfloat16() for w in dense]
    out["bf16 matmul"] = [lambda x, w=w: F.linear(x.bfloat16(), w) for w in bf]
    bfp = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in bf]
    out["bf16 oneDNN packed"] = [
        lambda x, w=w: torch.ops.mkldnn._linear_pointwise(x.bfloat16(), w, None, "none", [], "")
        for w in bfp]
    i8 = [pack_int8(quantize_weight(w, 8, None), torch.float32) for w in dense]
    # fp32 / fp16 activations: the int kernels' slow paths (10-50x slower than bf16), --slow only
    act = [(torch.bfloat16, "bf16")] + ([(torch.float32, "fp32"), (torch.float16, "fp16")]
                                        if slow else [])
    for dt, tag in act:
        i8b = [(q, s.to(dt)) for q, s in i8]
        out[f"int8 x {tag}"] = [
            lambda x, p=p, dt=dt: torch._weight_int8pack_mm(x.to(dt), p[0], p[1]) for p in i8b]
    if cpu_ops.ops() is not None:
        out["int8 qomni x bf16"] = [Q8Matmul.of(quantize_weight(w, 8, None)) for w in dense]
    for gs in (32, 64, 128):
        i4 = [pack_int4(quantize_weight(w, 4, gs), gs, torch.float32) for w in dense]
        for dt, tag in act:
            i4b = [(q, sz.to(dt)) for q, sz in i4]
            out[f"int4 g{gs} x {tag}"] = [
                lambda x, p=p, gs=gs, dt=dt: torch._weight_int4pack_mm_for_cpu(
                    x.to(dt), p[0], gs, p[1]) for p in i4b]
        if cpu_ops.ops() is not None and k % 128 == 0:
            out[f"int4 g{gs} qomni x bf16"] = [Q4Matmul.of(quantize_weight(w, 4, gs))
                                               for w in dense]
    if slow:  # FP8 widened per call: ~100x slower than a bf16 weight
        f8 = [(w / (w.abs().amax(1, keepdim=True) / 448)).to(torch.float8_e4m3fn) for w in dense]
        scales = [w.abs().amax(1) / 448 for w in dense]
        out["fp8 widened per call x bf16"] = [
            lambda x, w=w, s=s: F.linear(x.bfloat16(), w.bfloat16()) * s.bfloat16()
            for w, s in zip(f8, scales)]
    out.update(_torchao_methods(dense))
    return out


def _torchao_methods(dense: list[torch.Tensor]) -> dict[str, list[Callable]]:
    try:
        import torchao.quantization as tq
    except Exception:  # noqa: BLE001 - torchao is optional here
        return {}
    out = {}
    configs = {"torchao int8 weight-only x bf16": tq.Int8WeightOnlyConfig()}
    try:
        configs["torchao int4 opaque g128 x bf16"] = tq.Int4WeightOnlyConfig(
            group_size=128, int4_packing_format="opaque")
    except Exception as e:  # noqa: BLE001
        print(f"torchao int4 opaque unavailable: {e}")
    for name, config in configs.items():
        layers = []
        try:
            for w in dense:
                lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False).to(torch.bfloat16)
                lin.weight.data.copy_(w)
                tq.quantize_(lin, config)
                layers.append(lambda x, lin=lin: lin(x.bfloat16()))
            layers[0](torch.randn(1, dense[0].shape[1]))
        except Exception as e:  # noqa: BLE001
            print(f"{name} unavailable: {type(e).__name__}: {str(e)[:120]}")
            continue
        out[name] = layers
    return out


def measure(shape: str, rows: list[int], rounds: int, count: int, slow: bool) -> None:
    k, n = SHAPES[shape]
    methods = _methods(k, n, count, slow)
    for m in rows:
        x = torch.randn(m, k)
        best = {name: float("inf") for name in methods}
        for name, fns in methods.items():  # warm-up
            fns[0](x)
        for _ in range(rounds):
            for name, fns in methods.items():
                t0 = time.perf_counter()
                for fn in fns:
                    fn(x)
                best[name] = min(best[name], (time.perf_counter() - t0) / len(fns))
        base = best["fp32 oneDNN packed"]
        print(f"\n{shape} ({k} -> {n}), {m} row(s), best of {rounds}, per matrix:")
        for name, t in best.items():
            print(f"  {name:34s} {t * 1e6:9.1f} us  {base / t:5.2f}x fp32 packed")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--rows", nargs="+", type=int, default=[1, 8])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--matrices", type=int, default=24)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--slow", action="store_true",
                   help="also the int kernels with fp32/fp16 activations and FP8 widened per call")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.matrices} matrices each")
    with torch.inference_mode():
        for shape in args.shapes:
            measure(shape, args.rows, args.rounds, args.matrices, args.slow)


if __name__ == "__main__":
    main()
