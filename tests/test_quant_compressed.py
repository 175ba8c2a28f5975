"""compressed-tensors checkpoints made by the compressed-tensors library load in qomni: prompt
logits within 1e-2 relative L2 of transformers 5.23 on the same weights dequantized by
compressed-tensors (the activations' dtype, bf16 inside qomni's quantized matmuls, is the only
difference); qomni's reader decodes every quantized tensor exactly as the library's dequantizer;
the ignore list is honoured; broken or unsupported schemes are clear errors."""

import json
import shutil

import pytest
import torch
from quant_fixtures import (
    CONVERSATION,
    WIDE,
    compress_with_library,
    decompress_with_library,
    hf_prompt_logits,
    quant_tiny,
    read_tensors,
    rel_l2,
    write_dense,
)
from safetensors.torch import load_file, save_file

from qomni import Omni
from qomni.models.packed_linear import PackedLinear
from qomni.quant.compressed import CompressedConfig
from qomni.quant.experts import QuantExperts
from qomni.quant.linear import QuantLinear
from qomni.weights import WeightsError

SCHEMES = {
    "w4a16-g32": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                  "group_size": 32},
    "w4a16-g128": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                   "group_size": 128},
    "w4a16-asym-g64": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                       "group_size": 64},
    "w4a16-channel": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"},
    "w8a16-channel": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
    "w8a16-asym-g32": {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "group",
                       "group_size": 32},
    "fp8-channel": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"},
    "fp8-tensor": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor"},
}
FORMATS = {"fp8-channel": "float-quantized", "fp8-tensor": "float-quantized"}


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return quant_tiny(tmp_path_factory.mktemp("wide") / "fp", WIDE)


@pytest.fixture(scope="module")
def fixture(wide, tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            dst = tmp_path_factory.mktemp(name) / "ct"
            made[name] = compress_with_library(wide, dst, SCHEMES[name], fmt=FORMATS.get(name))
        return made[name]

    return get


@pytest.mark.parametrize("name", list(SCHEMES))
def test_logits_match_transformers_on_dequantized_weights(name, fixture, tmp_path):
    path = fixture(name)
    dense = write_dense(decompress_with_library(path), path, tmp_path / "dense")
    omni = Omni.load(path, dtype="float32", device="cpu", progress=False, audio_output=False)
    assert set(omni.quantization) == {"thinker"}, omni.quantization
    inputs = omni.process(CONVERSATION)
    ours = omni.prompt_logits(inputs)
    ref = hf_prompt_logits(dense, inputs.input_ids)
    err = rel_l2(ours, ref)
    assert err <= 1e-2, f"{name}: relative L2 {err:.2e} against transformers on the " \
                        "dequantized weights (bound 1e-2)"


@pytest.mark.parametrize("name", ["w4a16-asym-g64", "w8a16-asym-g32", "fp8-tensor"])
def test_reader_decodes_like_the_library(name, fixture):
    path = fixture(name)
    theirs = decompress_with_library(path)
    raw = read_tensors(path)
    config = CompressedConfig(json.loads((path / "config.json").read_text())["quantization_config"])
    modules = sorted({k.rpartition(".")[0] for k in raw if k.endswith(".weight_scale")})
    assert len(modules) > 20
    for module in modules:
        parts = {k.rpartition(".")[2]: v for k, v in raw.items() if k.startswith(module + ".")}
        decoded = config.scheme_for(module).decode(parts, tuple(theirs[module + ".weight"].shape))
        ours = (decoded.dequantize() if hasattr(decoded, "dequantize")
                else decoded[0].float() * decoded[1][:, None])
        assert torch.equal(ours, theirs[module + ".weight"]), module


def _effective_weight(module, rows: int, cols: int) -> torch.Tensor:
    """What a matmul multiplies by: its output for the identity, transposed -> [O, K]."""
    return module(torch.eye(cols)).float().T[:rows]


def test_kernels_multiply_by_the_dequantized_weights(fixture):
    """The packed int4 / int8 layouts (groups, zero points, row padding) hold exactly the
    checkpoint's weights: identity in, the dequantized weights out (up to bf16 rounding)."""
    for name in ("w4a16-asym-g64", "w4a16-channel", "w8a16-asym-g32"):
        path = fixture(name)
        theirs = decompress_with_library(path)
        omni = Omni.load(path, dtype="float32", device="cpu", progress=False)
        model = omni.model
        base = "thinker.model.layers.1.self_attn"
        attn = model.get_submodule(base)
        if attn.qkv is not None:  # q, k and v joined: one kernel's layout
            proj = attn.qkv
            ref = torch.cat([theirs[f"{base}.{p}_proj.weight"] for p in "qkv"])
        else:
            proj, ref = attn.q_proj, theirs[f"{base}.q_proj.weight"]
        assert isinstance(proj, QuantLinear)
        assert rel_l2(_effective_weight(proj, *ref.shape), ref) < 4e-3, name
        experts = model.get_submodule("talker.model.layers.0.mlp.experts")
        assert isinstance(experts, QuantExperts)
        for e in range(experts.num_experts):
            base = f"talker.model.layers.0.mlp.experts.{e}"
            gate_up = torch.cat((theirs[f"{base}.gate_proj.weight"],
                                 theirs[f"{base}.up_proj.weight"]))
            assert rel_l2(experts.gate_up[e](torch.eye(experts.hidden)).float().T, gate_up) < 4e-3
            down = theirs[f"{base}.down_proj.weight"]
            assert rel_l2(experts.down[e](torch.eye(experts.intermediate)).float().T, down) < 4e-3


def test_ignore_list_is_honoured(fixture):
    omni = Omni.load(fixture("w4a16-g32"), dtype="float32", device="cpu", progress=False)
    m = omni.model
    assert isinstance(m.thinker.model.layers[0].self_attn.o_proj, QuantLinear)
    assert isinstance(m.talker.code_predictor.model.layers[0].mlp.down_proj, QuantLinear)
    for dense in (m.thinker.lm_head, m.thinker.model.layers[0].mlp.gate, m.talker.codec_head,
                  m.thinker.audio_tower.layers[0].fc1,
                  m.code2wav.pre_transformer.layers[0].mlp.up_proj,
                  m.talker.text_projection.linear_fc1):
        assert isinstance(dense, PackedLinear), type(dense)


def test_speech_runs_from_a_compressed_checkpoint(fixture):
    omni = Omni.load(fixture("w4a16-g128"), dtype="float32", device="cpu", progress=False)
    assert {"thinker", "talker", "code_predictor"} <= set(omni.quantization)
    out = omni.generate(CONVERSATION, max_new_tokens=6, max_audio_frames=6, seed=0)
    assert out.codes is not None and out.codes.shape == (16, 6)
    assert out.audio is not None and out.audio.size > 0
    again = omni.generate(CONVERSATION, max_new_tokens=6, max_audio_frames=6, seed=0)
    assert torch.equal(torch.as_tensor(again.codes), torch.as_tensor(out.codes))


# -- broken and unsupported checkpoints ---------------------------------------------------------

def _broken(fixture, tmp_path, name, edit_config=None, edit_tensors=None):
    src = fixture(name)
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config["quantization_config"])
        (dst / "config.json").write_text(json.dumps(config))
    if edit_tensors:
        for f in dst.glob("*.safetensors"):
            tensors = load_file(f)
            edit_tensors(tensors)
            save_file(tensors, str(f), metadata={"format": "pt"})
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        present = {k for f in dst.glob("*.safetensors") for k in load_file(f)}
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in present}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def _load_error(path) -> str:
    with pytest.raises(ValueError) as e:
        Omni.load(path, dtype="float32", device="cpu", progress=False)
    return str(e.value)


def test_missing_scale_names_the_tensor_and_scheme(fixture, tmp_path):
    victim = "thinker.model.layers.1.self_attn.k_proj.weight_scale"
    path = _broken(fixture, tmp_path, "w4a16-g32", edit_tensors=lambda t: t.pop(victim, None))
    msg = _load_error(path)
    assert "thinker.model.layers.1.self_attn.k_proj" in msg and "weight_scale" in msg, msg
    assert "pack-quantized int4 group 32" in msg, msg


def test_missing_expert_zero_point_is_an_error(fixture, tmp_path):
    victim = "thinker.model.layers.0.mlp.experts.2.up_proj.weight_zero_point"
    path = _broken(fixture, tmp_path, "w4a16-asym-g64", edit_tensors=lambda t: t.pop(victim, None))
    msg = _load_error(path)
    assert "thinker.model.layers.0.mlp.experts" in msg and "2.up_proj.weight_zero_point" in msg
    assert "asymmetric group 64" in msg, msg


def test_group_size_that_does_not_divide(fixture, tmp_path):
    def regroup(qc):
        qc["config_groups"]["group_0"]["weights"]["group_size"] = 48

    msg = _load_error(_broken(fixture, tmp_path, "w4a16-g32", edit_config=regroup))
    assert "group size 48 does not divide in_features 128" in msg, msg
    assert "thinker.model.layers.0" in msg, msg


def test_scale_shape_that_does_not_fit(fixture, tmp_path):
    def regroup(qc):
        qc["config_groups"]["group_0"]["weights"]["group_size"] = 64  # the data has groups of 32

    msg = _load_error(_broken(fixture, tmp_path, "w4a16-g32", edit_config=regroup))
    assert "weight_scale" in msg and "does not fit pack-quantized int4 group 64" in msg, msg


@pytest.mark.parametrize("edit, expected", [
    (lambda qc: qc["config_groups"]["group_0"].update(
        input_activations={"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}),
     "input_activations quantization is not supported"),
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(num_bits=3),
     "pack-quantized int3 weights are not supported"),
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(actorder="group"),
     "actorder 'group' (weight_g_idx) is not supported"),
    (lambda qc: qc.update(quant_method="awq"), "quant_method 'awq' is not supported"),
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(group_size=None),
     "strategy 'group' needs a positive group_size"),
    (lambda qc: qc.update(kv_cache_scheme={"num_bits": 8, "type": "float"}),
     "kv_cache_scheme (a quantized KV cache) is not supported"),
])
def test_unsupported_schemes_are_clear_errors(fixture, tmp_path, edit, expected):
    msg = _load_error(_broken(fixture, tmp_path, "w4a16-g32", edit_config=edit))
    assert expected in msg, msg


def test_quantized_module_that_the_config_ignores(fixture, tmp_path):
    def ignore_layer(qc):
        qc["ignore"].append("thinker.model.layers.0.self_attn.q_proj")

    msg = _load_error(_broken(fixture, tmp_path, "w4a16-g32", edit_config=ignore_layer))
    assert "thinker.model.layers.0.self_attn.q_proj is stored quantized" in msg, msg


def test_quantized_tensors_without_a_config(fixture, tmp_path):
    msg = _load_error(_broken(fixture, tmp_path, "w4a16-g32",
                              edit_config=lambda qc: qc.clear()))
    assert "config.json has no quantization_config" in msg, msg


def test_extra_tensor_of_an_unsupported_feature(fixture, tmp_path):
    module = "thinker.model.layers.0.self_attn.v_proj"

    def add_g_idx(tensors):
        if f"{module}.weight_packed" in tensors:
            tensors[f"{module}.weight_g_idx"] = torch.zeros(128, dtype=torch.int32)

    path = _broken(fixture, tmp_path, "w4a16-g32", edit_tensors=add_g_idx)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"][f"{module}.weight_g_idx"] = index["weight_map"][f"{module}.weight_packed"]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError) as e:
        Omni.load(path, dtype="float32", device="cpu", progress=False)
    assert f"{module}" in str(e.value) and "weight_g_idx" in str(e.value), str(e.value)
