"""qomni's int4 and int8 CPU kernels (qomni_cpu.q4_linear, q4_moe, q8_linear) against the
dequantized weights, the stacked experts in QuantExperts, q, k and v joined, and the kernels'
errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qomni import cpu_ops
from qomni.models.layers import Attention, KVCache
from qomni.models.rope import RoPE
from qomni.quant.experts import QuantExperts
from qomni.quant.kernels import (
    IntWeight,
    Q4Matmul,
    Q8Matmul,
    join_rows,
    pack_q4,
    quantize_weight,
)
from qomni.quant.linear import QuantizeOnLoad, QuantLinear, join_attention

ops = cpu_ops.ops()
pytestmark = pytest.mark.skipif(ops is None, reason="qomni's CPU kernels do not build here")


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def _weight(o: int, k: int, group: int | None, asymmetric: bool = False) -> IntWeight:
    w = quantize_weight(torch.randn(o, k), 4, group)
    if asymmetric:  # zero points in the signed range, as compressed-tensors writes them
        w.zero = torch.randint(-3, 4, w.scale.shape, dtype=torch.int8)
    return w


@pytest.mark.parametrize("n", [1, 2, 3, 4, 9, 33])  # dot products (1-3), AMX tiles from 4
@pytest.mark.parametrize("group", [32, 64, 128, None])  # None: one scale per output channel
@pytest.mark.parametrize("asymmetric", [False, True])
def test_q4_linear_is_the_dequantized_product(n, group, asymmetric):
    torch.manual_seed(n)
    w = _weight(42, 256, group, asymmetric)  # 42: rows past the last block of 4
    x = torch.randn(n, 256).bfloat16()
    got = Q4Matmul.of(w)(x)
    want = x.float() @ w.dequantize().T
    assert got.dtype == torch.bfloat16 and got.shape == (n, 42)
    # the output's bf16 rounding (~2e-3); tiles also round the weights to bf16
    assert _rel(got, want) < 4e-3
    # a row's result is the same whether it runs alone or with another (dot products; without
    # AMX, 2 tokens or more dequantize the rows to bf16 once, as tiles do from 4)
    if n <= 2 and cpu_ops.amx_bf16():
        assert torch.equal(Q4Matmul.of(w)(x[:1]), got[:1])


def test_q4_layout_holds_every_value():
    """Every nibble position of the layout, at every value -8..7, multiplies its own input."""
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(8 * 128 // 16).view(8, 128)
    q = q[torch.randperm(8)][:, torch.randperm(128)]
    w = IntWeight(q, torch.ones(8, 1), None, 4, 128)
    eye = torch.eye(128).bfloat16()
    assert torch.equal(Q4Matmul.of(w)(eye[:3]).float(), q.float().T[:3])
    packed, scale, zs = pack_q4(w)
    assert packed.shape == (8, 64) and packed.dtype == torch.uint8 and zs is None
    assert scale.dtype == torch.float32 and scale.shape == (8, 1)


def _moe_reference(x, ids, weights, gate_up, down):
    """The per-expert loop in fp32 on dequantized weights."""
    out = torch.zeros(x.shape[0], x.shape[1])
    for t in range(x.shape[0]):
        for e, wt in zip(ids[t].tolist(), weights[t].float()):
            gate, up = F.linear(x[t:t + 1].float(), gate_up[e]).chunk(2, -1)
            out[t] += (F.linear(F.silu(gate) * up, down[e]) * wt)[0]
    return out


def _experts(e: int, d: int, i: int, group: int | None, asymmetric: bool = False):
    gu = [_weight(2 * i, d, group, asymmetric) for _ in range(e)]
    dn = [_weight(d, i, group, asymmetric) for _ in range(e)]
    return gu, dn, _stack(gu), _stack(dn)


def _stack(weights: list[IntWeight]) -> list[torch.Tensor | None]:
    """(q, scales, zero * scales) of the experts, each stacked [E, ...] (None: symmetric)."""
    return [None if parts[0] is None else torch.stack(parts)
            for parts in zip(*(pack_q4(w) for w in weights))]


@pytest.mark.parametrize("t", [1, 3, 24])
@pytest.mark.parametrize("asymmetric", [False, True])
def test_q4_moe_is_the_expert_loop(t, asymmetric):
    torch.manual_seed(t)
    e, k, d, i = 6, 2, 256, 128
    gu, dn, (gq, gs, gz), (dq, ds, dz) = _experts(e, d, i, 64, asymmetric)
    x = torch.randn(t, d).bfloat16()
    w, ids = torch.topk(torch.softmax(torch.randn(t, e), -1), k, -1)
    w = w.bfloat16()
    got = ops.q4_moe(x, ids, w, gq, gs, gz, 64, dq, ds, dz, 64)
    want = _moe_reference(x, ids, w, [g.dequantize() for g in gu], [g.dequantize() for g in dn])
    assert got.dtype == torch.bfloat16 and got.shape == (t, d)
    assert _rel(got, want) < 1e-2


def test_quant_experts_run_the_fused_kernel_as_the_expert_loop():
    """QuantExperts with int4 experts of whole 128-value blocks stack them as they load and run
    one q4_moe call; the same experts one matmul at a time (unstacked) agree."""
    torch.manual_seed(0)
    e, d, i = 4, 128, 256
    source = {p: QuantizeOnLoad(4) for p in ("gate_proj", "up_proj", "down_proj")}
    fused = QuantExperts(e, d, i, source, torch.bfloat16)
    dense = {}
    for n in range(e):
        for proj, shape in (("gate_proj", (i, d)), ("up_proj", (i, d)), ("down_proj", (d, i))):
            dense[n, proj] = torch.randn(shape) * shape[1] ** -0.5
            fused.load_part(f"{n}.{proj}.weight", dense[n, proj])
    assert fused._fused() is not None and not fused.missing_parts()
    assert fused.expert_nbytes() == (2 * i * d + d * i) // 2 + (2 * i * d + d * i) // 128 * 4
    x = torch.randn(5, d).bfloat16()
    w, ids = torch.topk(torch.softmax(torch.randn(5, e), -1), 2, -1)
    got = fused(x, ids, w.bfloat16())
    unstacked = fused.forward.__func__  # the per-expert path, on the same packed matmuls
    fused._stacks.clear()
    assert fused._fused() is None
    loop = unstacked(fused, x, ids, w.bfloat16())
    assert _rel(got, loop) < 1e-2


def test_quant_experts_quantized_unalike_are_an_error():
    source = {p: QuantizeOnLoad(4) for p in ("gate_proj", "up_proj", "down_proj")}
    experts = QuantExperts(2, 128, 128, source, torch.bfloat16)
    experts._build(0, "down_proj", _weight(128, 128, 128))
    with pytest.raises(ValueError, match="expert 1's down_proj is quantized unlike expert 0's"):
        experts._build(1, "down_proj", _weight(128, 128, 64))
    with pytest.raises(TypeError, match="expert 1's down_proj is Tensor"):
        experts._build(1, "down_proj", torch.randn(128, 128))


def _q(o=4, k=128):
    return torch.zeros(o, k // 2, dtype=torch.uint8)


@pytest.mark.parametrize("call, message", [
    (lambda: ops.q4_linear(torch.randn(2, 128).bfloat16(), _q(), torch.ones(4, 1), None, 128),
     None),
    (lambda: ops.q4_linear(torch.randn(2, 128), _q(), torch.ones(4, 1), None, 128),
     "x must be bfloat16"),
    (lambda: ops.q4_linear(torch.randn(2, 64).bfloat16(), _q(), torch.ones(4, 1), None, 128),
     "x has 64 features, the weight 128"),
    (lambda: ops.q4_linear(torch.randn(2, 64).bfloat16(), _q(k=64), torch.ones(4, 1), None, 64),
     "in_features 64 is not a multiple of 128"),
    (lambda: ops.q4_linear(torch.randn(2, 128).bfloat16(), _q(), torch.ones(4, 3), None, 48),
     "3 groups of 48 over 128"),
    (lambda: ops.q4_linear(torch.randn(2, 128).bfloat16(), _q(), torch.ones(4, 2), None, 128),
     "2 groups of 128 over 128"),
    (lambda: ops.q4_linear(torch.randn(2, 128).bfloat16(), _q().int(), torch.ones(4, 1), None,
                           128), "q must be contiguous uint8"),
    (lambda: ops.q4_linear(torch.randn(2, 128).bfloat16(), _q(), torch.ones(5, 1), None, 128),
     "scales must be contiguous float32"),
    (lambda: ops.q4_linear(torch.randn(2, 128).bfloat16(), _q(), torch.ones(4, 1).half(), None,
                           128), "scales must be contiguous float32"),
    (lambda: ops.q4_linear(torch.randn(2, 128).bfloat16(), _q(), torch.ones(4, 1),
                           torch.ones(4, 2), 128), "zero points"),
    (lambda: ops.q4_moe(torch.randn(2, 128).bfloat16(), torch.tensor([[0], [2]]), torch.ones(2, 1),
                        _q(2, 128)[None].expand(2, 2, 64).contiguous(), torch.ones(2, 2, 1), None,
                        128, _q(1, 128)[None].expand(2, 128, 64).contiguous(),
                        torch.ones(2, 128, 1), None, 128), "gate_up \\[E, 2, 128\\]"),
])
def test_q4_bad_inputs_are_clear_errors(call, message):
    if message is None:  # the well-formed call the others break
        assert call().shape == (2, 4)
        return
    with pytest.raises(RuntimeError, match=message):
        call()


def test_q4_moe_expert_ids_are_checked():
    e, d, i = 2, 128, 128
    _, _, (gq, gs, _), (dq, ds, _) = _experts(e, d, i, 128)
    x = torch.randn(2, d).bfloat16()
    with pytest.raises(RuntimeError, match="expert id 2 outside \\[0, 2\\)"):
        ops.q4_moe(x, torch.tensor([[0], [2]]), torch.ones(2, 1), gq, gs, None, 128, dq, ds,
                   None, 128)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 20])  # dot products (1-3), AMX tiles from 4
@pytest.mark.parametrize("k", [45, 256])  # a tail of K, whole vectors
def test_q8_linear_is_the_dequantized_product(n, k):
    torch.manual_seed(n + k)
    w = quantize_weight(torch.randn(37, k), 8, None)
    x = torch.randn(n, k).bfloat16()
    got = Q8Matmul.of(w)(x)
    want = x.float() @ w.dequantize().T
    assert got.dtype == torch.bfloat16 and got.shape == (n, 37)
    assert _rel(got, want) < 4e-3


@pytest.mark.parametrize("call, message", [
    (lambda: ops.q8_linear(torch.randn(2, 8), torch.zeros(3, 8, dtype=torch.int8), torch.ones(3)),
     "x must be bfloat16"),
    (lambda: ops.q8_linear(torch.randn(2, 8).bfloat16(), torch.zeros(3, 8), torch.ones(3)),
     "q must be contiguous int8"),
    (lambda: ops.q8_linear(torch.randn(2, 8).bfloat16(), torch.zeros(3, 8, dtype=torch.int8),
                           torch.ones(4)), "scales must be contiguous float32 \\[O\\]"),
    (lambda: ops.q8_linear(torch.randn(2, 9).bfloat16(), torch.zeros(3, 8, dtype=torch.int8),
                           torch.ones(3)), "x has 9 features, the weight 8"),
])
def test_q8_bad_inputs_are_clear_errors(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


@pytest.mark.parametrize("asymmetric", [False, True])
def test_joined_rows_compute_as_apart(asymmetric):
    """q, k and v as one int4 (or int8) matmul: every output exactly as the three apart."""
    torch.manual_seed(3)
    for make in (lambda o: Q4Matmul.of(_weight(o, 256, 64, asymmetric)),
                 lambda o: Q8Matmul.of(quantize_weight(torch.randn(o, 256), 8, None))):
        parts = [make(o) for o in (48, 16, 16)]
        joined = join_rows(parts)
        for n in (1, 5):
            x = torch.randn(n, 256).bfloat16()
            assert torch.equal(joined(x), torch.cat([p(x) for p in parts], 1))


def test_unlike_matmuls_are_not_joined():
    q4 = Q4Matmul.of(_weight(16, 256, 64))
    assert join_rows([q4, Q4Matmul.of(_weight(16, 256, 128))]) is None  # groups differ
    assert join_rows([q4, Q4Matmul.of(_weight(16, 256, 64, asymmetric=True))]) is None
    assert join_rows([q4, Q8Matmul.of(quantize_weight(torch.randn(16, 256), 8, None))]) is None
    assert join_rows([q4, Q4Matmul.of(_weight(16, 128, 64))]) is None  # inputs differ


def _quant_attention(seed: int) -> Attention:
    torch.manual_seed(seed)
    a = Attention(128, 4, 2, 32, 1e-6).eval()
    with torch.no_grad():
        a.q_norm.weight.uniform_(0.5, 1.5)
        a.k_norm.weight.uniform_(0.5, 1.5)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        plain = getattr(a, name)
        quant = QuantLinear.replacing(plain, QuantizeOnLoad(4), torch.float32, "cpu")
        quant.load_part("weight", plain.weight.detach())
        setattr(a, name, quant)
    return a


def test_joined_quantized_attention_equals_the_three_projections():
    """join_attention: the model's attention with its int4 q, k, v as one kernel call (q and k
    normed and rotated together) gives the outputs of the three apart, prefill and decode."""
    ref, joined = _quant_attention(0), _quant_attention(0)
    assert join_attention(nn.ModuleList([joined])) == 1
    assert isinstance(joined.qkv, QuantLinear) and not hasattr(joined, "q_proj")
    torch.manual_seed(1)
    cache_a, cache_b = KVCache(1, 2, 2, 16, 32, torch.float32), KVCache(1, 2, 2, 16, 32,
                                                                         torch.float32)
    rope = RoPE(32, 1e4)
    with torch.inference_mode():
        for n_new, s in ((torch.tensor([5, 3]), 5), (torch.ones(2, dtype=torch.long), 1),
                         (torch.ones(2, dtype=torch.long), 1)):
            x = torch.randn(2, s, 128)
            positions = cache_a.lengths[:, None] + torch.arange(s)
            cos, sin = rope(positions, torch.float32)
            slots, mask = cache_a.slots(n_new, s)
            want = ref(x, cos, sin, 0, cache_a, slots, mask)
            got = joined(x, cos, sin, 0, cache_b, slots, mask)
            assert (got - want).abs().max() <= 1e-5 * want.abs().max()
            cache_a.advance(n_new)
            cache_b.advance(n_new)


def test_the_bench_counts_the_quantized_kernels_flops():
    """qomni bench's compute floors count qomni's int4 / int8 kernels as the dense products they
    stand for (prefill floors were short of the experts' FLOPs without this)."""
    from qomni.bench.floors import flop_counter

    n, k, o = 3, 256, 40
    x = torch.randn(n, k).bfloat16()
    with flop_counter() as counter:
        Q4Matmul.of(_weight(o, k, 128))(x)
        Q8Matmul.of(quantize_weight(torch.randn(o, k), 8, None))(x)
    assert counter.get_total_flops() == 2 * (2 * n * k * o)
    e, top, d, i = 4, 2, 256, 128
    _, _, (gq, gs, _), (dq, ds, _) = _experts(e, d, i, 128)
    w, ids = torch.topk(torch.softmax(torch.randn(n, e), -1), top, -1)
    with flop_counter() as counter:
        ops.q4_moe(torch.randn(n, d).bfloat16(), ids, w.bfloat16(), gq, gs, None, 128, dq, ds,
                   None, 128)
    assert counter.get_total_flops() == 2 * n * top * (2 * i * d + d * i)
