"""qomni's CPU row kernels (qomni/cpu_ops/layer_ops.cpp: RMSNorm, q/k norm + rotary, the KV
cache write, a decode step's attention) against the torch ops they replace, and their errors."""

import pytest
import torch
import torch.nn.functional as F

from qomni import cpu_ops
from qomni.models import layers
from qomni.models.layers import Attention, KVCache
from qomni.models.rope import RoPE, apply_rope

ops = cpu_ops.ops()
pytestmark = pytest.mark.skipif(ops is None, reason="qomni's CPU kernels do not build here")


def _torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference's RMSNorm, op by op (what layers.rms_norm runs without the kernel)."""
    y = x.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def _ulps_bf16(got: torch.Tensor, want: torch.Tensor) -> int:
    """The largest distance in bf16 steps (the bit patterns of finite values of one sign)."""
    g, w = got.view(torch.int16).int(), want.view(torch.int16).int()
    return (g - w).abs().max().item()


@pytest.mark.parametrize("d", [8, 45, 512, 2048])  # a tail only, a tail and vectors, vectors
def test_rms_norm_fp32_equals_torch(d):
    x, w = torch.randn(5, 3, d) * 3, torch.rand(d) + 0.5
    got, want = ops.rms_norm(x, w, 1e-6), _torch_rms_norm(x, w, 1e-6)
    assert got.shape == want.shape and got.dtype == torch.float32
    # only the mean of squares sums in another order
    assert ((got - want).abs() <= 4e-7 * want.abs()).all()


@pytest.mark.parametrize("d", [45, 2048])
def test_rms_norm_bf16_rounds_as_torch(d):
    x, w = (torch.randn(70, d) * 3).bfloat16(), (torch.rand(d) + 0.5).bfloat16()
    got, want = ops.rms_norm(x, w, 1e-6), _torch_rms_norm(x, w, 1e-6)
    assert got.dtype == torch.bfloat16
    # The fp32 values may straddle a rounding boundary by an ulp in the two summation orders;
    # each rounding then moves the result by at most one bf16 step.
    assert _ulps_bf16(got, want) <= 2
    assert (got != want).float().mean() < 0.01


def test_rms_norm_rows_do_not_depend_on_the_batch():
    x, w = torch.randn(130, 96), torch.rand(96)  # more rows than one thread's share
    whole = ops.rms_norm(x, w, 1e-5)
    for i in (0, 64, 129):
        assert torch.equal(ops.rms_norm(x[i:i + 1].contiguous(), w, 1e-5), whole[i:i + 1])


def _qk(dtype, b=2, s=3, heads=6, dh=128, extra=2):
    """A q/k slice of a joined q/k/v tensor [B, S, H + extra, Dh], as Attention makes it."""
    qkv = (torch.randn(b, s, heads + extra, dh) * 2).to(dtype)
    return qkv[:, :, :heads]


@pytest.mark.parametrize("dh", [128, 12])  # whole vectors per half; scalar halves
@pytest.mark.parametrize("shared", [True, False])  # cos, sin [1, S, Dh] or [B, S, Dh]
def test_norm_rope_fp32(dh, shared):
    qk = _qk(torch.float32, dh=dh)
    w = torch.rand(qk.shape[2], dh) + 0.5
    pos = torch.arange(3)[None] + (0 if shared else torch.tensor([[0], [7]]))
    cos, sin = RoPE(dh, 1e6)(pos, torch.float32)
    got = ops.norm_rope(qk, w, 1e-6, cos, sin)
    want = apply_rope(_torch_rms_norm(qk, w, 1e-6).transpose(1, 2), cos, sin)
    assert got.shape == want.shape == (2, qk.shape[2], 3, dh) and got.is_contiguous()
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()
    # without the norm the rotation alone is bit-exact: no product is fused into a sum
    assert torch.equal(ops.norm_rope(qk, None, 0.0, cos, sin),
                       apply_rope(qk.transpose(1, 2), cos, sin))


def test_norm_rope_bf16_rounds_as_torch():
    qk = _qk(torch.bfloat16)
    w = (torch.rand(qk.shape[2], 128) + 0.5).bfloat16()
    cos, sin = RoPE(128, 1e6)(torch.arange(40, 43)[None], torch.bfloat16)
    assert torch.equal(ops.norm_rope(qk, None, 0.0, cos, sin),
                       apply_rope(qk.transpose(1, 2), cos, sin))
    got = ops.norm_rope(qk, w, 1e-6, cos, sin)
    want = apply_rope(_torch_rms_norm(qk, w, 1e-6).transpose(1, 2), cos, sin)
    assert (got.float() - want.float()).abs().max() <= 2 ** -6 * want.float().abs().max()
    assert (got != want).float().mean() < 0.02


def test_attention_kernel_path_matches_torchs_ops(monkeypatch):
    torch.manual_seed(0)
    attn = Attention(64, 4, 2, 16, 1e-6).eval()
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    attn.pack()
    qk = torch.randn(2, 5, 6, 16)
    cos, sin = RoPE(16, 1e4)(torch.arange(5)[None].expand(2, -1), torch.float32)
    assert layers._own_kernel(qk, attn.qk_weight)
    with torch.inference_mode():
        fused = attn._norm_rope(qk, cos, sin)
        monkeypatch.setattr(layers, "_own_kernel", lambda x, w: False)
        plain = attn._norm_rope(qk, cos, sin)
    assert fused.shape == plain.shape == (2, 6, 5, 16)
    assert (fused - plain).abs().max() <= 1e-6 * plain.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_write_equals_index_put(dtype):
    keys, values = torch.randn(2, 4, 3, 9, 8).to(dtype), torch.randn(2, 4, 3, 9, 8).to(dtype)
    want_k, want_v = keys.clone(), values.clone()
    qkv = torch.randn(2, 3, 7, 8).to(dtype)  # a batch of 2 rows, 3 tokens: k and v are views
    k, v = qkv[:, :, 1:4], qkv[:, :, 4:]
    rows, slots = torch.tensor([3, 1]), torch.tensor([[0, 1, 8], [5, 6, 7]])
    ops.kv_write(keys[1], values[1], rows, slots, k, v)
    want_k[1][rows[:, None], :, slots] = k
    want_v[1][rows[:, None], :, slots] = v
    assert torch.equal(keys, want_k) and torch.equal(values, want_v)


def test_cache_rows_write_through_the_kernel_as_through_index_put(monkeypatch):
    def steps(cache_rows):
        cache = KVCache(2, 4, 2, 6, 8, torch.float32)
        view = cache.rows(cache_rows)
        torch.manual_seed(3)
        for n_new, s in ((torch.tensor([3, 2]), 3), (torch.ones(2, dtype=torch.long), 1)):
            slots, _ = view.slots(n_new, s)
            k, v = torch.randn(2, s, 2, 8), torch.randn(2, s, 2, 8)
            got = view.update(1, slots, k, v, 4)
            view.advance(n_new)
        return cache.k, cache.v, got

    for rows in ([1, 2], [3, 0]):  # a span of rows, and rows gathered
        fused = steps(rows)
        with monkeypatch.context() as m:
            m.setattr(layers, "_own_kernel", lambda x, w: False)
            plain = steps(rows)
        for a, b in zip(fused[:2] + fused[2], plain[:2] + plain[2]):
            assert torch.equal(a, b)


def _decode_inputs(dtype, dh=128, n=37, b=2):
    """q [B, Hkv, G, Dh] and keys/values as views of a longer cache [B, Hkv, n + 13, Dh], with
    each row's own visible keys (row 1 sees fewer, and one of its keys is hidden)."""
    q = torch.randn(b, 4, 8, dh).to(dtype)
    cache_k, cache_v = (torch.randn(b, 4, n + 13, dh).to(dtype) for _ in range(2))
    visible = torch.ones(b, 1, 1, n, dtype=torch.bool)
    visible[1, ..., 30:] = False
    visible[1, ..., 3] = False
    return q, cache_k[:, :, :n], cache_v[:, :, :n], visible


@pytest.mark.parametrize("dh", [128, 20])  # whole vectors; a tail
def test_decode_attention_fp32_equals_sdpa(dh):
    q, keys, values, visible = _decode_inputs(torch.float32, dh)
    got = ops.decode_attention(q, keys, values, visible, dh ** -0.5)
    want = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_decode_attention_bf16_close_to_sdpa():
    q, keys, values, visible = _decode_inputs(torch.bfloat16, n=300)
    got = ops.decode_attention(q, keys, values, visible, 128 ** -0.5)
    want = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)
    exact = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(),
                                           attn_mask=visible)
    assert got.dtype == torch.bfloat16
    # as far from the fp32 result as torch's bf16 kernel is (the probabilities rounded to bf16)
    assert _rel(got, exact) <= 2 * _rel(want, exact) + 1e-3


def test_decode_attention_one_mask_for_every_row():
    q, keys, values, visible = _decode_inputs(torch.float32, 16)
    shared = visible[1:]  # [1, 1, 1, n]
    got = ops.decode_attention(q, keys, values, shared, 0.25)
    assert torch.equal(got, ops.decode_attention(q, keys, values, shared.expand(2, -1, -1, -1),
                                                 0.25))
    want = F.scaled_dot_product_attention(q, keys, values, attn_mask=shared, scale=0.25)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_decode_attention_hidden_keys_do_not_count():
    q, keys, values, visible = _decode_inputs(torch.float32, 16)
    noisy_k, noisy_v = keys.clone(), values.clone()
    noisy_k[1, :, 30:] = 1e4  # hidden: must not change anything, however large
    noisy_v[1, :, 3] = float("nan")
    a = ops.decode_attention(q, keys, values, visible, 0.25)
    b = ops.decode_attention(q, noisy_k, noisy_v, visible, 0.25)
    assert torch.equal(a, b)


def _rel(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize("call, message", [
    (lambda: ops.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-6), "w \\[D\\] for x"),
    (lambda: ops.rms_norm(torch.randn(2, 8), torch.ones(8).bfloat16(), 1e-6), "one dtype"),
    (lambda: ops.rms_norm(torch.randn(8, 2).t(), torch.ones(8), 1e-6), "contiguous"),
    (lambda: ops.rms_norm(torch.randn(2, 8).half(), torch.ones(8).half(), 1e-6),
     "float32 or bfloat16"),
    (lambda: ops.norm_rope(torch.randn(2, 3, 4), None, 0.0, torch.ones(1, 3, 8),
                           torch.ones(1, 3, 8)), "x \\[B, S, H, Dh\\]"),
    (lambda: ops.norm_rope(torch.randn(2, 3, 4, 8), None, 0.0, torch.ones(1, 2, 8),
                           torch.ones(1, 2, 8)), "cos, sin"),
    (lambda: ops.norm_rope(torch.randn(2, 3, 4, 8), torch.ones(3, 8), 0.0, torch.ones(1, 3, 8),
                           torch.ones(1, 3, 8)), "w \\[H, Dh\\]"),
    (lambda: ops.norm_rope(torch.randn(2, 3, 4, 7), None, 0.0, torch.ones(1, 3, 7),
                           torch.ones(1, 3, 7)), "even Dh"),
    (lambda: ops.kv_write(torch.zeros(2, 1, 4, 8), torch.zeros(2, 1, 4, 8), torch.tensor([2]),
                          torch.tensor([[0]]), torch.ones(1, 1, 1, 8), torch.ones(1, 1, 1, 8)),
     "row 2 outside"),
    (lambda: ops.kv_write(torch.zeros(2, 1, 4, 8), torch.zeros(2, 1, 4, 8), torch.tensor([0]),
                          torch.tensor([[-1]]), torch.ones(1, 1, 1, 8), torch.ones(1, 1, 1, 8)),
     "slot -1 outside"),
    (lambda: ops.kv_write(torch.zeros(2, 1, 4, 8), torch.zeros(2, 1, 4, 8), torch.tensor([0]),
                          torch.tensor([[0]]), torch.ones(1, 1, 2, 8), torch.ones(1, 1, 2, 8)),
     "k and v \\[B, S, 1, 8\\]"),
    (lambda: ops.kv_write(torch.zeros(2, 1, 4, 8), torch.zeros(2, 1, 4, 8), torch.tensor([0]),
                          torch.tensor([[0]]), torch.ones(1, 1, 1, 8).bfloat16(),
                          torch.ones(1, 1, 1, 8).bfloat16()), "cache's dtype"),
    (lambda: ops.decode_attention(torch.ones(1, 2, 4, 8), torch.ones(1, 2, 5, 8),
                                  torch.ones(1, 2, 5, 8), torch.ones(1, 1, 1, 5), 1.0),
     "visible bool"),
    (lambda: ops.decode_attention(torch.ones(2, 2, 4, 8), torch.ones(2, 2, 5, 8),
                                  torch.ones(2, 2, 5, 8), torch.ones(3, 1, 1, 5).bool(), 1.0),
     "visible bool \\[B or 1, 1, 1, n\\]"),
    (lambda: ops.decode_attention(torch.ones(1, 2, 4, 8), torch.ones(1, 3, 5, 8),
                                  torch.ones(1, 3, 5, 8), torch.ones(1, 1, 1, 5).bool(), 1.0),
     "keys and values \\[1, 2, n > 0, 8\\]"),
    (lambda: ops.decode_attention(torch.ones(1, 2, 4, 8), torch.ones(1, 2, 5, 8).bfloat16(),
                                  torch.ones(1, 2, 5, 8).bfloat16(),
                                  torch.ones(1, 1, 1, 5).bool(), 1.0), "one dtype"),
])
def test_bad_inputs_are_clear_errors(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()
