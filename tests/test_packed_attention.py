"""Attention with q, k and v packed as one oneDNN matmul (and the one-token grouped attention)
against the separate projections, over the same KV cache steps."""

import pytest
import torch
from torch import nn

from qomni.models.layers import Attention, KVCache, on_tokens, pack_attention, valid_tokens
from qomni.models.packed_linear import native_bf16
from qomni.models.rope import RoPE

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN")


def _attention(dtype: torch.dtype) -> Attention:
    torch.manual_seed(0)
    a = Attention(32, 4, 2, 8, 1e-6)
    with torch.no_grad():
        a.q_norm.weight.uniform_(0.5, 1.5)
        a.k_norm.weight.uniform_(0.5, 1.5)
    return a.to(dtype).eval()


def _steps(attn: Attention, dtype: torch.dtype) -> list[torch.Tensor]:
    """A right-padded prefill of two rows (5 and 3 tokens), then three decode steps."""
    torch.manual_seed(1)
    cache = KVCache(1, 2, 2, 16, 8, dtype)
    rope = RoPE(8, 1e4)
    outs = []
    for n_new, s in ((torch.tensor([5, 3]), 5), (torch.ones(2, dtype=torch.long), 1),
                     (torch.ones(2, dtype=torch.long), 1), (torch.ones(2, dtype=torch.long), 1)):
        x = torch.randn(2, s, 32).to(dtype)
        positions = cache.lengths[:, None] + torch.arange(s)
        cos, sin = rope(positions, dtype)
        slots, mask = cache.slots(n_new, s)
        outs.append(attn(x, cos, sin, 0, cache, slots, mask))
        cache.advance(n_new)
    return outs


def test_packed_equals_separate_fp32():
    ref, packed = _attention(torch.float32), _attention(torch.float32)
    assert pack_attention(nn.ModuleList([packed]), (torch.float32,)) == 1
    assert packed.qkv is not None and not hasattr(packed, "q_proj")
    with torch.inference_mode():
        for want, got in zip(_steps(ref, torch.float32), _steps(packed, torch.float32)):
            assert got.shape == want.shape
            assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.skipif(not native_bf16(), reason="the CPU has no bf16 matrix instructions")
def test_packed_close_to_separate_bf16():
    ref, packed = _attention(torch.bfloat16), _attention(torch.bfloat16)
    packed.pack()
    with torch.inference_mode():
        for want, got in zip(_steps(ref, torch.bfloat16), _steps(packed, torch.bfloat16)):
            assert got.dtype == torch.bfloat16
            assert (got.float() - want.float()).abs().max() <= 0.02 * want.float().abs().max()


def test_pack_attention_only_plain_linears_of_the_dtypes():
    model = nn.ModuleList([_attention(torch.float32), _attention(torch.float16)])
    assert pack_attention(model, (torch.float32,)) == 1
    assert model[0].qkv is not None and model[1].qkv is None
    assert pack_attention(model, (torch.float32,)) == 0  # packed once


def test_a_padded_batch_multiplies_only_its_valid_tokens():
    seen = []

    class Twice(nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape))
            return 2 * x

    x = torch.randn(2, 5, 4)
    out = on_tokens(Twice(), x, valid_tokens(torch.tensor([5, 3]), 5))
    assert seen == [(8, 4)]  # 5 + 3 tokens, none of the padding
    assert torch.equal(out[0], 2 * x[0]) and torch.equal(out[1, :3], 2 * x[1, :3])
    assert not out[1, 3:].any()
    assert valid_tokens(torch.tensor([5, 5]), 5) is None  # nothing padded
    assert valid_tokens(torch.ones(2, dtype=torch.long), 1) is None  # a decode step
    assert torch.equal(on_tokens(Twice(), x, None), 2 * x) and seen[-1] == (2, 5, 4)
