"""MoE expert kernels on CPU: time per layer of the routed SwiGLU experts at decode and prefill sizes.

Each method runs `--layers` distinct layers of experts in turn (so the weights come from memory,
as in decoding), on the same tokens and routing. All methods run interleaved in one process, one
pass of every method per round, and the best round of `--rounds` is kept: on a shared machine
that cancels most of the other processes' noise. Every method's output is checked against the
first one's.

    PYTHONPATH=. python bench/moe_kernels.py                          # medium thinker, fp32
    PYTHONPATH=. python bench/moe_kernels.py --dtype bfloat16 --tokens 1 8 160
    PYTHONPATH=. python bench/moe_kernels.py --shape real --layers 1 --dtype bfloat16

Methods:
- grouped: (token, expert) pairs sorted by expert, `F.grouped_mm` over the stacked weights
- loop packed: the same grouping, then each routed expert's two oneDNN matmuls on its own
  pre-packed weights (only the routed experts' weights are read)
- loop plain: as loop packed on slices of the stacked weights (`F.linear`)
- dense packed: every expert for every token, as two oneDNN matmuls over all experts' weights
  joined (unrouted experts weighted 0): no grouping at all, but all weights read
- dense plain / loop slices: the same on unpacked weights (one buffer serving both)
- dense fused / loop fused: SiLU and the product as oneDNN post-ops of separate gate and up
  matmuls
- stream: qomni's own CPU kernel (`qomni.cpu_ops`, weight_stream.cpp): all routed experts in one
  call, each routed expert's rows read once for all its tokens, on the unpacked stacked weights
- qomni: what `qomni.models.moe.Experts` runs on CPU (packed: one token, joined or per expert)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

# name -> (experts, top-k, hidden, expert intermediate)
SHAPES = {"medium": (16, 4, 512, 192), "real": (128, 8, 2048, 768)}


def _lin(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def _pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 8)


def _group(experts: torch.Tensor, e: int):
    flat = experts.reshape(-1)
    order = flat.argsort(stable=True)
    return order, torch.bincount(flat, minlength=e)


def grouped(gate_up, down):
    e = gate_up.shape[0]

    def run(x, experts, weights):
        t, k = experts.shape
        order, counts = _group(experts, e)
        offsets = counts.cumsum(0).to(torch.int32)
        xs = x[order // k]
        gate, up = F.grouped_mm(xs, gate_up.transpose(1, 2), offs=offsets).chunk(2, -1)
        out = F.grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offsets)
        out = out * weights.reshape(-1)[order, None]
        return x.new_zeros(t, x.shape[1]).index_add_(0, order // k, out)
    return run


def loop(gate_up, down, packed: bool):
    e = gate_up.shape[0]
    gu = [_pack(w) if packed else w for w in gate_up]
    dn = [_pack(w) if packed else w for w in down]
    lin = _lin if packed else F.linear

    def run(x, experts, weights):
        t, k = experts.shape
        order, counts = _group(experts, e)
        token = order // k
        xs = x[token]
        w = weights.reshape(-1)[order, None]
        out = torch.empty_like(xs)
        start = 0
        for i, n in enumerate(counts.tolist()):
            if n:
                seg = slice(start, start + n)
                gate, up = lin(xs[seg], gu[i]).chunk(2, -1)
                out[seg] = lin(F.silu(gate) * up, dn[i])
                start += n
        return x.new_zeros(t, x.shape[1]).index_add_(0, token, out * w)
    return run


def dense_packed(gate_up, down):
    e, two_i, d = gate_up.shape
    i = two_i // 2
    gu = _pack(gate_up.reshape(e * two_i, d))
    dn = _pack(down.permute(1, 0, 2).reshape(d, e * i))

    def run(x, experts, weights):
        t = x.shape[0]
        w = x.new_zeros(t, e).scatter_(1, experts, weights)
        h = _lin(x, gu).view(t, e, 2, i)
        h = F.silu(h[:, :, 0]) * h[:, :, 1] * w[:, :, None]
        return _lin(h.reshape(t, e * i), dn)
    return run


def qomni_experts(gate_up, down, top_k):
    from qomni.models.moe import Experts

    e, two_i, d = gate_up.shape
    mod = Experts(e, d, two_i // 2).to(gate_up.dtype)
    mod.gate_up_proj.data.copy_(gate_up)
    mod.down_proj.data.copy_(down)
    mod.pack(top_k)
    return mod


def dense_plain(gate_up, down):
    e, two_i, d = gate_up.shape
    i = two_i // 2
    gu = gate_up.reshape(e * two_i, d).contiguous()
    dn = down.permute(1, 0, 2).reshape(d, e * i).contiguous()  # [D, E*I]
    dnt = dn.t().contiguous()  # [E*I, D]

    def run(x, experts, weights):
        t = x.shape[0]
        w = x.new_zeros(t, e).scatter_(1, experts, weights)
        h = _lin(x, gu).view(t, e, 2, i)
        h = F.silu(h[:, :, 0]) * h[:, :, 1] * w[:, :, None]
        return _lin(h.reshape(t, e * i), dn)

    def loop_run(x, experts, weights):
        t, k = experts.shape
        order, counts = _group(experts, e)
        token = order // k
        xs = x[token]
        out = torch.empty_like(xs)
        start = 0
        for j, n in enumerate(counts.tolist()):
            if n:
                seg = slice(start, start + n)
                gate, up = _lin(xs[seg], gu[j * two_i:(j + 1) * two_i]).chunk(2, -1)
                out[seg] = torch.mm(F.silu(gate) * up, dnt[j * i:(j + 1) * i])
                start += n
        return x.new_zeros(t, x.shape[1]).index_add_(0, token, out * weights.reshape(-1)[order, None])
    return run, loop_run


def _swish(x, w):
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "swish", [], "")


def _times(x, other, w):
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, w, None, "mul")


def fused(gate_up, down, dense: bool):
    """SiLU and the product fused into the gate and up matmuls (oneDNN post-ops)."""
    e, two_i, d = gate_up.shape
    i = two_i // 2
    if dense:
        g = _pack(gate_up[:, :i].reshape(e * i, d))
        u = _pack(gate_up[:, i:].reshape(e * i, d))
        dn = _pack(down.permute(1, 0, 2).reshape(d, e * i))

        def run(x, experts, weights):
            t = x.shape[0]
            w = x.new_zeros(t, e, 1).scatter_(1, experts[..., None], weights[..., None])
            h = (_swish(x, g).view(t, e, i) * w).view(t, e * i)
            return _lin(_times(x, h, u), dn)
        return run
    gs = [_pack(w[:i]) for w in gate_up]
    us = [_pack(w[i:]) for w in gate_up]
    dn = [_pack(w) for w in down]

    def run_loop(x, experts, weights):
        t, k = experts.shape
        if t == 1:  # one token: its k experts, no grouping
            out = None
            for j, w in zip(experts[0].tolist(), weights[0]):
                y = _lin(_times(x, _swish(x, gs[j]), us[j]), dn[j]) * w
                out = y if out is None else out + y
            return out
        order, counts = _group(experts, e)
        token = order // k
        xs = x[token]
        out = torch.empty_like(xs)
        start = 0
        for j, n in enumerate(counts.tolist()):
            if n:
                seg = slice(start, start + n)
                xe = xs[seg]
                out[seg] = _lin(_times(xe, _swish(xe, gs[j]), us[j]), dn[j])
                start += n
        return x.new_zeros(t, x.shape[1]).index_add_(0, token, out * weights.reshape(-1)[order, None])
    return run_loop


def stream(gate_up, down):
    from qomni.cpu_ops import ops

    moe = ops().moe
    gate_up, down = gate_up.contiguous(), down.contiguous()
    return lambda x, experts, weights: moe(x, experts, weights, gate_up, down)


METHODS: dict[str, Callable] = {
    "qomni": None,  # needs top-k: built in measure()
    "stream": stream,
    "grouped": grouped,
    "loop packed": lambda g, d: loop(g, d, True),
    "loop plain": lambda g, d: loop(g, d, False),
    "dense packed": dense_packed,
    "dense plain": lambda g, d: dense_plain(g, d)[0],
    "loop slices": lambda g, d: dense_plain(g, d)[1],
    "dense fused": lambda g, d: fused(g, d, True),
    "loop fused": lambda g, d: fused(g, d, False),
}


def measure(shape: str, dtype: torch.dtype, tokens: list[int], layers: int, rounds: int,
            names: list[str]) -> None:
    e, k, d, i = SHAPES[shape]
    weights = [(torch.randn(e, 2 * i, d, dtype=dtype) * d ** -0.5,
                torch.randn(e, d, i, dtype=dtype) * i ** -0.5) for _ in range(layers)]
    methods = {n: [qomni_experts(g, dn, k) if n == "qomni" else METHODS[n](g, dn)
                   for g, dn in weights] for n in names}
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for t in tokens:
        x = torch.randn(t, d, dtype=dtype)
        probs = torch.softmax(torch.randn(t, e), -1)
        w, experts = torch.topk(probs, k, -1)
        w = (w / w.sum(-1, keepdim=True)).to(dtype)
        ref = None
        for name, fns in methods.items():  # warm-up and check
            y = fns[0](x, experts, w).float()
            ref = y if ref is None else ref
            err = (y - ref).abs().max().item()
            if err > tol * max(1.0, ref.abs().max().item()):
                raise AssertionError(f"{name} differs from {names[0]} by {err:.3g}")
        best = {name: float("inf") for name in methods}
        for _ in range(rounds):
            for name, fns in methods.items():
                t0 = time.perf_counter()
                for fn in fns:
                    fn(x, experts, w)
                best[name] = min(best[name], (time.perf_counter() - t0) / len(fns))
        base = best[names[0]]
        print(f"\n{shape} (E {e}, top-{k}, D {d}, I {i}) {dtype}, {t} token(s), best of "
              f"{rounds}, per layer:")
        for name, s in best.items():
            print(f"  {name:14s} {s * 1e3:8.3f} ms  {base / s:5.2f}x {names[0]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="medium", choices=list(SHAPES))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 160])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    with torch.inference_mode():
        measure(args.shape, getattr(torch, args.dtype), args.tokens, args.layers, args.rounds,
                args.methods)


if __name__ == "__main__":
    main()
