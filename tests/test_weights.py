"""Loading checkpoints: single file and sharded, strictness, and errors that name the problem."""

import json
import shutil

import pytest
import torch
from reference import loaded_network
from safetensors.torch import load_file, save_file

from qomni import Omni
from qomni.config import ConfigError
from qomni.tiny import make_tiny
from qomni.weights import WeightsError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture
def copy_of(tiny, tmp_path):
    dest = tmp_path / "ckpt"
    shutil.copytree(tiny, dest)
    return dest


def _shard_with(path, key):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return path / index["weight_map"][key], index


def _rewrite(file, fn):
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _load(path):
    return Omni.load(path, dtype="float32", device="cpu", progress=False)


def test_sharded_and_single_file_give_same_model(tiny, tmp_path):
    sharded = _load(tiny)
    single = tmp_path / "single"
    shutil.copytree(tiny, single)
    merged = {}
    for f in sorted(single.glob("model-*.safetensors")):
        merged.update(load_file(f))
        f.unlink()
    (single / "model.safetensors.index.json").unlink()
    save_file(merged, single / "model.safetensors", metadata={"format": "pt"})
    one = _load(single)
    a, b = sharded.model.state_dict(), one.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_experts_are_stacked_from_per_expert_keys(tiny):
    file, _ = _shard_with(tiny, "thinker.model.layers.1.mlp.experts.3.up_proj.weight")
    raw = load_file(file)
    layer = loaded_network(tiny).thinker.model.layers[1].mlp.experts
    inter = raw["thinker.model.layers.1.mlp.experts.3.up_proj.weight"].shape[0]
    assert torch.equal(layer.gate_up_proj[3, inter:], raw["thinker.model.layers.1.mlp.experts.3.up_proj.weight"])


def test_missing_tensor_is_named(copy_of):
    key = "thinker.model.layers.0.self_attn.q_proj.weight"
    file, index = _shard_with(copy_of, key)
    _rewrite(file, lambda t: t.pop(key))
    del index["weight_map"][key]
    (copy_of / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=r"missing from the checkpoint: .*layers\.0\.self_attn\.q_proj"):
        _load(copy_of)


def test_missing_expert_is_named(copy_of):
    key = "thinker.model.layers.2.mlp.experts.5.gate_proj.weight"
    file, index = _shard_with(copy_of, key)
    _rewrite(file, lambda t: t.pop(key))
    del index["weight_map"][key]
    (copy_of / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=r"layers\.2\.mlp\.experts\.gate_up_proj: .*expert 5\.gate"):
        _load(copy_of)


def test_extra_tensor_is_named(copy_of):
    key = "thinker.model.layers.0.self_attn.q_proj.weight"
    file, index = _shard_with(copy_of, key)
    _rewrite(file, lambda t: t.update({"thinker.model.bogus.weight": torch.zeros(3)}))
    index["weight_map"]["thinker.model.bogus.weight"] = file.name
    (copy_of / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=r"no place for: thinker\.model\.bogus\.weight"):
        _load(copy_of)


def test_wrong_shape_is_named(copy_of):
    key = "thinker.model.norm.weight"
    file, _ = _shard_with(copy_of, key)
    _rewrite(file, lambda t: t.update({key: torch.ones(7)}))
    with pytest.raises(WeightsError, match=r"thinker\.model\.norm\.weight: checkpoint shape \(7,\)"):
        _load(copy_of)


def test_index_naming_a_missing_shard(copy_of):
    file, _ = _shard_with(copy_of, "thinker.model.norm.weight")
    file.unlink()
    with pytest.raises(WeightsError, match=f"names {file.name}, which does not exist"):
        _load(copy_of)


def test_broken_config_fails_to_load(copy_of):
    (copy_of / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        _load(copy_of)


def test_no_weights_at_all(copy_of):
    for f in copy_of.glob("model*"):
        f.unlink()
    with pytest.raises(WeightsError, match="no model.safetensors"):
        _load(copy_of)


def test_progress_bar_ends_its_line(tiny, capsys):
    """What is printed after loading starts on a line of its own, on a terminal or in a log."""
    Omni.load(tiny, dtype="float32", device="cpu", progress=True, audio_output=False)
    err = capsys.readouterr().err
    assert "Loading weights" in err and err.endswith("\n"), repr(err[-80:])
