"""PackedLinear (oneDNN inner product on a pre-packed weight) against nn.Linear."""

import pytest
import torch
from torch import nn

from qomni.models.packed_linear import PackedLinear, native_bf16, pack_linears, packed_dtypes

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 64), (8, 64), (3, 5, 64), (300, 64)])
def test_equals_linear(shape, bias):
    torch.manual_seed(0)
    lin = nn.Linear(64, 96, bias=bias)
    x = torch.randn(shape)
    with torch.inference_mode():
        want = lin(x)
        got = PackedLinear(lin.weight, lin.bias)(x)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_empty_input():
    lin = nn.Linear(8, 4)
    packed = PackedLinear(lin.weight, lin.bias)
    assert packed(torch.zeros(0, 8)).shape == (0, 4)


def test_pack_linears_replaces_fp32_cpu_linears_only():
    model = nn.Sequential(nn.Linear(4, 4), nn.ModuleList([nn.Linear(4, 4), nn.Embedding(3, 4)]),
                          nn.Linear(4, 4).to(torch.bfloat16))
    assert pack_linears(model) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[1][0], PackedLinear)
    assert isinstance(model[1][1], nn.Embedding) and type(model[2]) is nn.Linear
    w = model[0].weight  # what callers read of a weight still works
    assert w.shape == (4, 4) and w.dtype == torch.float32 and w.device.type == "cpu"


def test_omni_load_packs_on_cpu(omni_tiny):
    omni = omni_tiny("a")
    assert isinstance(omni.model.thinker.lm_head, PackedLinear)
    assert omni.device.type == "cpu" and omni.dtype == torch.float32


@pytest.mark.skipif(not native_bf16(), reason="the CPU has no bf16 matrix instructions")
def test_bf16_packed_where_the_cpu_has_bf16_matmul():
    torch.manual_seed(0)
    lin = nn.Linear(64, 96).to(torch.bfloat16)
    x = torch.randn(5, 64).bfloat16()
    model = nn.Sequential(lin)
    assert torch.bfloat16 in packed_dtypes()
    with torch.inference_mode():
        want = lin(x).float()
        assert pack_linears(model, packed_dtypes()) == 1
        got = model[0](x)
    assert isinstance(model[0], PackedLinear) and got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() <= 0.02 * want.abs().max()


@pytest.mark.parametrize("native", [True, False])
def test_default_dtype_is_bf16_on_cpus_with_bf16_matmul(monkeypatch, native):
    from qomni import loading

    monkeypatch.setattr(loading, "native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert loading.resolve_dtype(None, cpu) == (torch.bfloat16 if native else torch.float32)
    assert loading.resolve_dtype("float32", cpu) == torch.float32  # explicit stays as given
    assert loading.resolve_dtype(None, torch.device("cuda")) == torch.bfloat16


def test_bf16_is_computed_in_fp32_on_cpus_without_bf16_matmul(monkeypatch, hf_tiny, omni_tiny):
    from qomni import Omni, loading

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(loading, "native_bf16", lambda: False)
    assert loading.compute_dtype(torch.bfloat16, [cpu], quantized=False) == torch.float32
    assert loading.compute_dtype(torch.bfloat16, [cpu], quantized=True) == torch.bfloat16
    assert loading.compute_dtype(torch.bfloat16, [cpu, cuda], quantized=False) == torch.bfloat16
    assert loading.compute_dtype(torch.float16, [cpu], quantized=False) == torch.float16
    monkeypatch.setattr(loading, "native_bf16", lambda: True)
    assert loading.compute_dtype(torch.bfloat16, [cpu], quantized=False) == torch.bfloat16

    monkeypatch.setattr(loading, "native_bf16", lambda: False)
    ours = Omni.load(hf_tiny()[0], dtype="bfloat16", device="cpu", progress=False)
    assert ours.dtype == torch.float32  # computed in fp32, from weights rounded to bf16
    embed = [o.model.thinker.model.embed_tokens.weight for o in (ours, omni_tiny())]
    w, w32 = embed
    assert torch.equal(w, w32.to(torch.bfloat16).float())
    assert not torch.equal(w, w32)  # rounded: not the fp32 weights
