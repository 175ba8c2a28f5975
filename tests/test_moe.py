"""MoE experts on CPU, qomni's `moe` kernel (qomni.cpu_ops) and the oneDNN-packed paths of
machines where it does not build (one token, dense, grouped per expert), against the grouped
GEMM over the stacked weights."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from qomni import cpu_ops
from qomni.models import moe
from qomni.models.moe import Experts, SparseMoE, pack_experts
from qomni.models.packed_linear import native_bf16

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN")


@pytest.fixture(params=["stream", "onednn"])
def kernel(request, monkeypatch):
    """Each test once with qomni's CPU kernels and once as on a machine where they do not build."""
    if request.param == "stream":
        if cpu_ops.ops() is None:
            pytest.skip("qomni's CPU kernels do not build here")
    else:
        monkeypatch.setattr(cpu_ops, "ops", lambda: None)
    return request.param


def _experts(e: int, d: int, i: int, dtype: torch.dtype) -> Experts:
    torch.manual_seed(0)
    m = Experts(e, d, i)
    with torch.no_grad():
        m.gate_up_proj.copy_(torch.randn(e, 2 * i, d) * d ** -0.5)
        m.down_proj.copy_(torch.randn(e, d, i) * i ** -0.5)
    return m.to(dtype).eval()


def _routing(t: int, e: int, k: int, dtype: torch.dtype):
    probs = torch.softmax(torch.randn(t, e), -1)
    w, experts = torch.topk(probs, k, -1)
    return experts, (w / w.sum(-1, keepdim=True)).to(dtype)


@pytest.mark.parametrize("e, k", [(8, 2), (16, 2)])  # joined weights kept (E <= 4k) or not
@pytest.mark.parametrize("t", [1, 5, moe.DENSE_MAX_TOKENS + 9])
def test_packed_equals_grouped_fp32(e, k, t, kernel):
    ref = _experts(e, 64, 24, torch.float32)
    packed = _experts(e, 64, 24, torch.float32)
    packed.pack(k)
    if kernel == "stream":
        assert packed.stream_max_tokens == moe.STREAM_MAX_TOKENS[torch.float32]
    else:
        assert (packed.dense is not None) == (e <= moe.DENSE_MAX_EXPERTS_PER_K * k)
    x = torch.randn(t, 64)
    experts, w = _routing(t, e, k, torch.float32)
    with torch.inference_mode():
        want, got = ref(x, experts, w), packed(x, experts, w)
    assert got.shape == want.shape == (t, 64)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.skipif(not native_bf16(), reason="the CPU has no bf16 matrix instructions")
@pytest.mark.parametrize("t", [1, 5, 40])
def test_packed_close_to_grouped_bf16(t, kernel):
    ref, packed = _experts(8, 64, 24, torch.bfloat16), _experts(8, 64, 24, torch.bfloat16)
    packed.pack(2)
    x = torch.randn(t, 64).bfloat16()
    experts, w = _routing(t, 8, 2, torch.bfloat16)
    with torch.inference_mode():
        want, got = ref(x, experts, w).float(), packed(x, experts, w)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() <= 0.02 * want.abs().max()


def test_pack_drops_the_stacked_weights_and_keeps_their_size(monkeypatch):
    monkeypatch.setattr(cpu_ops, "ops", lambda: None)
    m = _experts(8, 64, 24, torch.float32)
    size = m.weight_nbytes()
    assert size == 3 * 8 * 64 * 24 * 4
    m.pack(2)
    assert list(m.parameters()) == [] and m.weight_nbytes() == size


def test_pack_experts_only_cpu_moe_of_the_dtypes(monkeypatch):
    monkeypatch.setattr(cpu_ops, "ops", lambda: None)
    cfg = SimpleNamespace(hidden_size=32, num_experts=4, num_experts_per_tok=2,
                          norm_topk_prob=True, moe_intermediate_size=8,
                          shared_expert_intermediate_size=0)
    model = nn.ModuleList([SparseMoE(cfg), SparseMoE(cfg).to(torch.float16)])
    assert pack_experts(model, (torch.float32,)) == 1
    assert model[0].experts.packed is not None and model[1].experts.packed is None
    assert pack_experts(model, (torch.float32,)) == 0  # packed once


def test_stream_keeps_the_stacked_weights_and_groups_beyond_its_limit():
    if cpu_ops.ops() is None:
        pytest.skip("qomni's CPU kernels do not build here")
    ref, m = _experts(8, 64, 24, torch.float32), _experts(8, 64, 24, torch.float32)
    size = m.weight_nbytes()
    m.pack(2)
    assert m.packed is None and m.weight_nbytes() == size  # nothing packed, nothing copied
    model = nn.ModuleList([SparseMoE(SimpleNamespace(
        hidden_size=64, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        moe_intermediate_size=24, shared_expert_intermediate_size=0))])
    assert pack_experts(model, (torch.float32,)) == 1
    assert pack_experts(model, (torch.float32,)) == 0  # prepared once
    t = m.stream_max_tokens + 3  # the grouped GEMM
    x = torch.randn(t, 64)
    experts, w = _routing(t, 8, 2, torch.float32)
    with torch.inference_mode():
        want, got = ref(x, experts, w), m(x, experts, w)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
