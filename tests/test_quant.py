"""Quantization while loading (`Omni.load(..., quantization=...)`): int8 logits within 1e-2
relative L2 of full precision, the right modules swapped per component, per-component
overrides, speech still produced, memory actually saved, bad options rejected."""

import pytest
import torch
from quant_fixtures import CONVERSATION, SMALL, quant_tiny, rel_l2

from qomni import Omni, cpu_ops
from qomni.cli import main
from qomni.models.moe import Experts
from qomni.models.packed_linear import PackedLinear
from qomni.quant import kernels
from qomni.quant.experts import QuantExperts
from qomni.quant.kernels import Fp8Matmul, Int4Matmul, Int8Matmul, Q8Matmul, quantize_weight
from qomni.quant.linear import QuantEmbedding, QuantLinear
from qomni.quant.plan import parse_quantization

# per-channel int8: qomni's kernel where it builds, torch's otherwise
INT8 = Q8Matmul if cpu_ops.ops() is not None else Int8Matmul


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return quant_tiny(tmp_path_factory.mktemp("small") / "fp", SMALL)


@pytest.fixture(scope="module")
def full(small):
    omni = Omni.load(small, dtype="float32", device="cpu", progress=False, audio_output=False)
    inputs = omni.process(CONVERSATION)
    return inputs, omni.prompt_logits(inputs)


def _load(path, quantization, **kw):
    return Omni.load(path, dtype="float32", device="cpu", progress=False,
                     quantization=quantization, **kw)


def test_int8_logits_close_to_full_precision(small, full):
    inputs, ref = full
    omni = _load(small, "int8", audio_output=False)
    err = rel_l2(omni.prompt_logits(inputs), ref)
    assert err <= 1e-2, f"int8 quantize-on-load: relative L2 {err:.2e} against full precision " \
                        "(bound 1e-2)"


def test_int4_logits_follow_full_precision(small, full):
    """Round-to-nearest int4 in groups is far coarser (~10% per weight on these Gaussian weights),
    so only a loose bound: it must still be the same model, not noise."""
    inputs, ref = full
    err = rel_l2(_load(small, "int4", audio_output=False).prompt_logits(inputs), ref)
    assert err <= 0.35, f"int4 quantize-on-load: relative L2 {err:.2e} against full precision"


def test_components_and_overrides(small):
    omni = _load(small, "int4,code_predictor=int8,lm_heads=int8,embeddings=int8")
    m = omni.model
    assert omni.quantization == {
        "thinker": "int4 (quantized on load)", "talker": "int4 (quantized on load)",
        "code_predictor": "int8 (quantized on load)", "lm_heads": "int8 (quantized on load)",
        "embeddings": "int8 (quantized on load)"}
    attn = m.thinker.model.layers[0].self_attn
    assert isinstance(attn.q_proj.matmul, Int4Matmul)
    assert isinstance(m.thinker.model.layers[1].mlp.experts, QuantExperts)
    talker_moe = m.talker.model.layers[0].mlp
    assert isinstance(talker_moe.experts, QuantExperts)
    assert isinstance(talker_moe.shared_expert.up_proj, QuantLinear)
    # routers and the shared-expert gate stay in the compute dtype
    assert isinstance(talker_moe.gate, PackedLinear)
    assert isinstance(talker_moe.shared_expert_gate, PackedLinear)
    cp_layer = m.talker.code_predictor.model.layers[0]
    assert isinstance(cp_layer.mlp.gate_proj.matmul, INT8)
    assert isinstance(cp_layer.self_attn.o_proj.matmul, INT8)
    assert isinstance(m.thinker.lm_head.matmul, INT8)
    assert isinstance(m.talker.codec_head, QuantLinear)
    assert all(isinstance(h, QuantLinear) for h in m.talker.code_predictor.lm_head)
    assert isinstance(m.thinker.model.embed_tokens, QuantEmbedding)
    assert isinstance(m.talker.code_predictor.model.codec_embedding[3], QuantEmbedding)
    # encoders, projections and the vocoder are untouched
    assert isinstance(m.thinker.audio_tower.layers[0].fc1, PackedLinear)
    assert isinstance(m.thinker.visual.blocks[0].attn.qkv, PackedLinear)
    assert isinstance(m.talker.text_projection.linear_fc1, PackedLinear)
    assert isinstance(m.code2wav.pre_transformer.layers[0].self_attn.q_proj, PackedLinear)
    assert isinstance(m.talker.code_predictor.model.codec_embedding[3], QuantEmbedding)


def test_encoders_and_vocoder_quantize_their_linears_only(small):
    """audio_tower / visual / code2wav cover linears; the vision position table and code2wav's
    code table stay embeddings (read whole by the encoder, not looked up by row), and an image +
    audio turn still runs to speech."""
    import numpy as np
    from PIL import Image

    omni = _load(small, "audio_tower=int8,visual=int8,code2wav=int8")
    m = omni.model
    assert isinstance(m.thinker.audio_tower.layers[0].fc1.matmul, INT8)
    assert isinstance(m.thinker.visual.blocks[0].attn.qkv.matmul, INT8)
    assert isinstance(m.code2wav.pre_transformer.layers[0].self_attn.q_proj, QuantLinear)
    assert type(m.thinker.visual.pos_embed) is torch.nn.Embedding
    assert type(m.code2wav.code_embedding) is torch.nn.Embedding
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    audio = (0.1 * rng.standard_normal(16000)).astype(np.float32)
    out = omni.generate([{"role": "user", "content": [
        {"type": "image", "image": image}, {"type": "audio", "audio": audio},
        {"type": "text", "text": "What is this?"}]}], max_new_tokens=3, max_audio_frames=4)
    assert len(out.token_ids) == 3 and out.audio.size > 0


def test_one_token_experts_match_the_grouped_path(small):
    """A decode step's experts run one by one, without grouping (token, expert) pairs: the same
    result as the grouped path gives that token among others."""
    experts = _load(small, "int4", audio_output=False).model.thinker.model.layers[1].mlp.experts
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, experts.hidden, generator=gen).bfloat16()
    k = 2
    ids = torch.stack([torch.randperm(experts.num_experts, generator=gen)[:k] for _ in range(3)])
    w = torch.rand(3, k, generator=gen).bfloat16()
    grouped = experts(x, ids, w)
    for t in range(3):
        one = experts(x[t:t + 1], ids[t:t + 1], w[t:t + 1])
        assert one.shape == (1, experts.hidden)
        assert rel_l2(one.float(), grouped[t:t + 1].float()) < 1e-2


def test_quantized_modules_multiply_by_their_weights(small):
    """A quantized linear multiplies by the round-to-nearest quantization of the checkpoint's
    weight (identity in -> its dequantized weight out, up to bf16 rounding); a quantized
    embedding looks up dequantized rows."""
    from quant_fixtures import read_tensors

    tensors = read_tensors(small)
    m = _load(small, "int4,embeddings=int8").model
    name = "thinker.model.layers.1.self_attn.o_proj"
    w = tensors[f"{name}.weight"]
    lin = m.get_submodule(name)
    ref = quantize_weight(w, 4, 64).dequantize()
    assert rel_l2(lin(torch.eye(w.shape[1])).T, ref) < 4e-3
    emb = m.thinker.model.embed_tokens
    ids = torch.tensor([0, 7, 151643])
    ref = quantize_weight(tensors["thinker.model.embed_tokens.weight"][ids], 8, None).dequantize()
    assert rel_l2(emb(ids), ref) < 1e-6


def test_speech_works_quantized(small):
    omni = _load(small, "int4,code_predictor=int8")
    out = omni.generate(CONVERSATION, max_new_tokens=8, max_audio_frames=8, seed=0)
    assert out.codes is not None and out.codes.shape == (16, 8)
    assert out.audio is not None and out.audio.size > 0
    assert torch.isfinite(torch.as_tensor(out.audio)).all()
    # the greedy path (talker temperature 0) runs and repeats itself
    from qomni import SamplingParams

    greedy = SamplingParams(temperature=0.0, repetition_penalty=1.05)
    a = omni.generate(CONVERSATION, max_new_tokens=8, max_audio_frames=8, talker_sampling=greedy)
    b = omni.generate(CONVERSATION, max_new_tokens=8, max_audio_frames=8, talker_sampling=greedy)
    assert a.token_ids == b.token_ids and torch.equal(torch.as_tensor(a.codes),
                                                      torch.as_tensor(b.codes))


@pytest.mark.parametrize("native", [True, False])
def test_fp8_matmul_with_and_without_bf16_instructions(native, monkeypatch):
    """An FP8 weight multiplies exactly (e4m3 values are bf16 values) whether the CPU packs bf16
    weights for oneDNN or not (without bf16 matrix instructions oneDNN refuses to pack them)."""
    if native and torch.bfloat16 not in kernels.packed_dtypes():
        pytest.skip("the CPU has no bf16 matrix instructions")
    if not native:
        monkeypatch.setattr(kernels, "packed_dtypes", lambda: (torch.float32,))
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(48, 64, generator=g) * 4).to(torch.float8_e4m3fn)
    scale = torch.rand(48, 1, generator=g) + 0.5
    mm = Fp8Matmul(w, scale, torch.device("cpu"))
    assert mm.packed == native
    x = torch.randn(3, 64, generator=g).to(torch.bfloat16)
    ref = x.float() @ (w.float() * scale.to(torch.bfloat16).float()).T
    assert rel_l2(mm(x).float(), ref) < 1e-2


def test_quantized_weights_take_less_memory(small):
    def weight_bytes(model, cls):
        return sum(m.weight_nbytes() for m in model.modules() if isinstance(m, cls))

    fp = _load(small, None).model
    dense = sum(p.numel() * 4 for n, p in fp.named_parameters()
                if ".layers." in n and "experts" in n)
    dense += sum(m.weight_nbytes() for m in fp.modules()  # experts packed, not parameters
                 if isinstance(m, Experts) and m.packed is not None)
    dense += sum(m.weight.numel() * 4 for n, m in fp.named_modules()
                 if isinstance(m, PackedLinear) and ".layers." in n and not n.endswith(".gate")
                 and "shared_expert_gate" not in n and not n.startswith(("thinker.audio",
                                                                         "thinker.visual",
                                                                         "code2wav")))
    for method, ratio in (("int8", 0.3), ("int4", 0.3)):
        q = _load(small, method).model
        held = weight_bytes(q, QuantLinear) + weight_bytes(q, QuantExperts)
        assert held < ratio * dense, (method, held, dense)


@pytest.mark.parametrize("spec, expected", [
    ("int4", {"thinker": 4, "talker": 4, "code_predictor": 4}),
    ("int4,code_predictor=int8", {"thinker": 4, "talker": 4, "code_predictor": 8}),
    ("talker=int8", {"talker": 8}),
    ({"default": "int8", "talker": "none", "lm_heads": "int8"},
     {"thinker": 8, "code_predictor": 8, "lm_heads": 8}),
    (None, {}),
])
def test_parse_quantization(spec, expected):
    assert parse_quantization(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("int3", "unknown quantization 'int3'"),
    ("int4,speaker=int8", "unknown quantization component 'speaker'"),
    ("int4,embeddings=int4", "embeddings can be quantized to int8 only"),
    ("int4,thinker=int8,thinker=int4", "sets 'thinker' twice"),
])
def test_bad_quantization_options(small, spec, message):
    with pytest.raises(ValueError, match=message):
        _load(small, spec)


def test_cli_generate_quantized(small, capsys, tmp_path):
    wav = tmp_path / "out.wav"
    rc = main(["generate", "--model", str(small), "--prompt", "Hi", "--max-new-tokens", "4",
               "--max-audio-frames", "4", "--quantization", "int4,code_predictor=int8",
               "--output", str(wav), "--quiet"])
    assert rc == 0 and wav.stat().st_size > 44
    rc = main(["generate", "--model", str(small), "--prompt", "Hi", "--quantization", "int5"])
    assert rc == 2 and "unknown quantization 'int5'" in capsys.readouterr().err
