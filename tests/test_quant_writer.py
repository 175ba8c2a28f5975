"""`qomni quantize SRC DST`: a compressed-tensors checkpoint that compressed-tensors' own
dequantizer reads back to the weights qomni uses, that qomni loads, and whose config has the
schema llm-compressor writes."""

import json

import pytest
import torch
from quant_fixtures import (
    CONVERSATION,
    SMALL,
    decompress_with_library,
    hf_prompt_logits,
    quant_tiny,
    read_tensors,
    rel_l2,
    write_dense,
)

from qomni import Omni
from qomni.cli import main
from qomni.models.packed_linear import PackedLinear
from qomni.quant.compressed import CompressedConfig
from qomni.quant.experts import QuantExperts
from qomni.quant.linear import QuantLinear


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return quant_tiny(tmp_path_factory.mktemp("small") / "fp", SMALL)


@pytest.fixture(scope="module")
def written(small, tmp_path_factory):
    dst = tmp_path_factory.mktemp("out") / "w4a16"
    assert main(["quantize", str(small), str(dst), "--scheme", "w4a16", "--group-size", "32",
                 "--keep", "code_predictor", "--quiet"]) == 0
    return dst


def test_config_schema(written):
    qc = json.loads((written / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed"
    group = qc["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["format"] == "pack-quantized"
    w = group["weights"]
    assert (w["num_bits"], w["type"], w["strategy"], w["group_size"], w["symmetric"]) == (
        4, "int", "group", 32, True)
    assert group["input_activations"] is None
    # the talker experts' down_proj (16 inputs) cannot take groups of 32: named in ignore
    assert "talker.model.layers.0.mlp.experts.0.down_proj" in qc["ignore"]


def test_library_reads_back_the_weights_qomni_reads(written, small):
    theirs = decompress_with_library(written)
    raw = read_tensors(written)
    source = read_tensors(small)
    assert set(theirs) == set(source)
    qc = json.loads((written / "config.json").read_text())["quantization_config"]
    config = CompressedConfig(qc)
    quantized = sorted({k.rpartition(".")[0] for k in raw if k.endswith(".weight_packed")})
    assert any(".mlp.experts." in q for q in quantized) and any("self_attn" in q for q in quantized)
    for module in quantized:
        parts = {k.rpartition(".")[2]: v for k, v in raw.items() if k.startswith(module + ".")}
        w = source[module + ".weight"]
        ours = config.scheme_for(module).decode(parts, tuple(w.shape))
        assert torch.equal(ours.dequantize(), theirs[module + ".weight"]), module
        # round to nearest: within half a step of the source weight
        step = ours.scale.repeat_interleave(32, 1)
        assert ((ours.dequantize() - w).abs() <= step / 2 + 1e-7).all(), module
    for key, t in source.items():  # everything else is copied unchanged
        if key.removesuffix(".weight") not in quantized:
            assert torch.equal(theirs[key].to(t.dtype), t), key


def test_qomni_loads_it(written, tmp_path):
    omni = Omni.load(written, dtype="float32", device="cpu", progress=False)
    m = omni.model
    assert isinstance(m.thinker.model.layers[0].mlp.experts, QuantExperts)
    assert isinstance(m.talker.model.layers[0].self_attn.q_proj, QuantLinear)
    # --keep code_predictor: left in full precision
    assert isinstance(m.talker.code_predictor.model.layers[0].mlp.down_proj, PackedLinear)
    assert "code_predictor" not in omni.quantization
    inputs = omni.process(CONVERSATION)
    dense = write_dense(decompress_with_library(written), written, tmp_path / "dense")
    err = rel_l2(omni.prompt_logits(inputs), hf_prompt_logits(dense, inputs.input_ids))
    assert err <= 1e-2, f"relative L2 {err:.2e} against transformers on the weights " \
                        "compressed-tensors dequantizes (bound 1e-2)"
    out = omni.generate(CONVERSATION, max_new_tokens=4, max_audio_frames=4, seed=0)
    assert out.codes.shape == (16, 4)


def test_w8a16_per_channel_single_file(tmp_path):
    from safetensors.torch import save_file

    from qomni.tiny import make_tiny

    src = make_tiny(tmp_path / "src")
    tensors = read_tensors(src)
    for f in [*src.glob("model-*.safetensors"), src / "model.safetensors.index.json"]:
        f.unlink()
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    dst = tmp_path / "w8"
    assert main(["quantize", str(src), str(dst), "--scheme", "w8a16", "--quiet"]) == 0
    assert (dst / "model.safetensors").exists()
    assert not (dst / "model.safetensors.index.json").exists()
    w = json.loads((dst / "config.json").read_text())["quantization_config"][
        "config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["strategy"], w["group_size"]) == (8, "channel", None)
    omni = Omni.load(dst, dtype="float32", device="cpu", progress=False, audio_output=False)
    assert set(omni.quantization) == {"thinker"}
    assert omni.generate(CONVERSATION, max_new_tokens=3).token_ids


@pytest.mark.parametrize("args, message", [
    (["--keep", "audio_tower"], "invalid choice: 'audio_tower'"),
    (["--group-size", "-4"], "group size must be positive"),
])
def test_bad_arguments(small, tmp_path, capsys, args, message):
    try:
        rc = main(["quantize", str(small), str(tmp_path / "x"), "--quiet", *args])
    except SystemExit as e:  # argparse
        rc = e.code
    assert rc == 2 and message in capsys.readouterr().err


def test_dst_must_differ(small, capsys):
    assert main(["quantize", str(small), str(small), "--quiet"]) == 2
    assert "DST must differ from SRC" in capsys.readouterr().err
