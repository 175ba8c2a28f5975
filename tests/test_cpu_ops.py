"""qomni's own CPU kernels (qomni/cpu_ops/weight_stream.cpp) against torch, and their errors."""

import pytest
import torch
import torch.nn.functional as F

from qomni import cpu_ops

ops = cpu_ops.ops()
pytestmark = pytest.mark.skipif(ops is None, reason="qomni's CPU kernels do not build here")


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 17])
@pytest.mark.parametrize("k", [16, 45, 512])  # whole vectors, a tail, both
def test_linear_fp32_equals_torch(n, k):
    x, w = torch.randn(n, k), torch.randn(37, k)
    assert _rel(ops.linear(x, w), F.linear(x, w)) < 1e-6


def test_linear_bf16_is_the_fp32_product_rounded_once():
    x, w = torch.randn(4, 300).bfloat16(), torch.randn(70, 300).bfloat16()
    got = ops.linear(x, w)
    assert got.dtype == torch.bfloat16
    want = F.linear(x.float(), w.float()).bfloat16()  # exact products, fp32 sums, one rounding
    assert (got.float() - want.float()).abs().max() <= 2 ** -7 * want.float().abs().max()
    assert _rel(got, F.linear(x, w)) < 5e-3


def test_linear_rows_do_not_depend_on_the_batch():
    x, w = torch.randn(9, 130), torch.randn(50, 130)
    whole = ops.linear(x, w)
    for i in range(9):
        assert torch.equal(ops.linear(x[i:i + 1], w), whole[i:i + 1])


@pytest.mark.parametrize("n", [1, 4, 15, 16, 17, 33, 70])  # AMX tiles from 4 tokens on
@pytest.mark.parametrize("o", [16, 47, 96])  # whole tiles of rows, a tail of rows
def test_linear_bf16_tiles_equal_torch(n, o):
    """K a multiple of 32: where the CPU has AMX, 4 rows or more run as tiles."""
    x, w = torch.randn(n, 256).bfloat16(), torch.randn(o, 256).bfloat16()
    got = ops.linear(x, w)
    want = F.linear(x.float(), w.float()).bfloat16()
    assert (got.float() - want.float()).abs().max() <= 2 ** -7 * want.float().abs().max()
    # every row the same whichever other rows share the call, once there are enough for tiles
    if n >= 8:
        assert torch.equal(ops.linear(x[: n // 2 + 4], w), got[: n // 2 + 4])


def _moe_reference(x, ids, weights, gate_up, down):
    """transformers' expert loop: each token's experts summed in top-k order, bf16 rounding
    after every op where the inputs are bf16."""
    out = []
    for t in range(x.shape[0]):
        acc = None
        for e, w in zip(ids[t].tolist(), weights[t]):
            gate, up = F.linear(x[t:t + 1], gate_up[e]).chunk(2, -1)
            y = F.linear(F.silu(gate) * up, down[e]) * w
            acc = y if acc is None else acc + y
        out.append(acc)
    return torch.cat(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 3, 16])
def test_moe_equals_the_expert_loop(dtype, t):
    e, k, d, i = 8, 3, 48, 40
    x = torch.randn(t, d, dtype=dtype)
    gate_up = (torch.randn(e, 2 * i, d) * d ** -0.5).to(dtype)
    down = (torch.randn(e, d, i) * i ** -0.5).to(dtype)
    probs = torch.softmax(torch.randn(t, e), -1)
    w, ids = torch.topk(probs, k, -1)
    w = w.to(dtype)
    got = ops.moe(x, ids, w, gate_up, down)
    want = _moe_reference(x, ids, w, gate_up, down)
    assert got.dtype == dtype and got.shape == (t, d)
    assert _rel(got, want) < (1e-6 if dtype == torch.float32 else 1e-2)
    # A token's result does not depend on the others in the call.
    assert torch.equal(ops.moe(x[:1], ids[:1], w[:1], gate_up, down), got[:1])


@pytest.mark.parametrize("t", [2, 12, 40])
def test_moe_bf16_tiles_equal_the_expert_loop(t):
    """D and I multiples of 32 and up to 40 tokens on 4 experts: experts with 4 tokens or more
    run as AMX tiles where the CPU has them, the others as dot products."""
    e, k, d, i = 4, 2, 64, 96
    x = torch.randn(t, d).bfloat16()
    gate_up = (torch.randn(e, 2 * i, d) * d ** -0.5).bfloat16()
    down = (torch.randn(e, d, i) * i ** -0.5).bfloat16()
    probs = torch.softmax(torch.randn(t, e) + torch.tensor([3.0, 0, 0, -3]), -1)
    w, ids = torch.topk(probs, k, -1)
    w = w.bfloat16()
    got = ops.moe(x, ids, w, gate_up, down)
    assert _rel(got, _moe_reference(x, ids, w, gate_up, down)) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b, v", [(1, 5), (1, 151936), (3, 17), (8, 152064), (2, 40000)])
def test_first_max_is_torchs_max_index(dtype, b, v):
    torch.manual_seed(v)
    x = torch.randn(b, v).to(dtype)
    assert torch.equal(ops.first_max(x), x.float().max(-1).indices)
    # ties: the first wins, within a vector's lanes, across vectors, across the threads' spans
    x[:, [v // 2, v - 1, 0 if v < 16 else 15]] = 50.0
    x[0, [v - 1, v // 3]] = 60.0
    assert torch.equal(ops.first_max(x), x.float().max(-1).indices)
    x[-1] = float("-inf")
    assert ops.first_max(x)[-1] == 0
    x[0, [v - 1, v // 2]] = float("nan")  # a NaN above all, as torch's max
    assert ops.first_max(x)[0] == v // 2 == x.float().max(-1).indices[0]
    assert torch.equal(ops.first_max(x.t().contiguous().t()), ops.first_max(x))


def test_empty_batch():
    assert ops.linear(torch.randn(0, 8), torch.randn(3, 8)).shape == (0, 3)
    out = ops.moe(torch.randn(0, 8), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2),
                  torch.randn(4, 6, 8), torch.randn(4, 8, 3))
    assert out.shape == (0, 8)


@pytest.mark.parametrize("call, message", [
    (lambda: ops.linear(torch.randn(2, 8), torch.randn(3, 9)), "x has 8 features, the weight 9"),
    (lambda: ops.linear(torch.randn(2, 8), torch.randn(3, 8).bfloat16()), "the weight"),
    (lambda: ops.linear(torch.randn(2, 8).half(), torch.randn(3, 8).half()), "float32 or bfloat16"),
    (lambda: ops.linear(torch.randn(2, 8), torch.randn(8, 3).t()), "contiguous"),
    (lambda: ops.linear(torch.randn(8), torch.randn(3, 8)), "x \\[N, K\\]"),
    (lambda: ops.first_max(torch.randn(8)), "x \\[B, V\\] with V > 0"),
    (lambda: ops.first_max(torch.randn(2, 0)), "V > 0"),
    (lambda: ops.first_max(torch.randn(2, 8).half()), "float32 or bfloat16"),
    (lambda: ops.moe(torch.randn(2, 8), torch.tensor([[0], [4]]), torch.ones(2, 1),
                     torch.randn(4, 6, 8), torch.randn(4, 8, 3)), "expert id 4 outside \\[0, 4\\)"),
    (lambda: ops.moe(torch.randn(2, 8), torch.tensor([[0], [-1]]), torch.ones(2, 1),
                     torch.randn(4, 6, 8), torch.randn(4, 8, 3)), "expert id -1"),
    (lambda: ops.moe(torch.randn(2, 8), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1),
                     torch.randn(4, 6, 8), torch.randn(4, 8, 4)), "gate_up \\[E, 2I, D\\]"),
    (lambda: ops.moe(torch.randn(2, 8), torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 1),
                     torch.randn(4, 6, 8), torch.randn(4, 8, 3)), "ids and weights \\[T, k\\]"),
])
def test_bad_inputs_are_clear_errors(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


def test_disabled_by_the_environment(monkeypatch):
    monkeypatch.setenv("QOMNI_CPU_OPS", "0")
    assert cpu_ops.ops.__wrapped__() is None


def test_build_folder_names_the_source_and_the_cpu(monkeypatch):
    here = cpu_ops.build_dir()
    monkeypatch.setattr(cpu_ops, "_cpu_flags", lambda: "fpu sse2")
    assert cpu_ops.build_dir() != here and cpu_ops.build_dir().parent == here.parent
