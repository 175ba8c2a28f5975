"""Stage placement (`stage_devices`) and the cuda_graphs switch: the specs, their errors, the
hand-off of thinker states to the talker's device, and, on the CPU, thinker=cpu,talker=cpu
giving what one device gives."""

import numpy as np
import pytest
import torch

from qomni import Omni, SamplingParams
from qomni.engine.config import EngineConfig
from qomni.engine.placement import parse_stage_devices, stage_of
from qomni.engine.runner import graph_mode

CPU = torch.device("cpu")
GREEDY_TALKER = SamplingParams(temperature=0, repetition_penalty=1.05)
STORY = [{"role": "user", "content": "Tell me a story about a lighthouse keeper."}]


def test_stage_device_specs():
    assert parse_stage_devices(None, CPU) == {"thinker": CPU, "talker": CPU}
    assert parse_stage_devices("thinker=cpu, talker=cpu", CPU) == {"thinker": CPU,
                                                                  "talker": CPU}
    assert parse_stage_devices({"talker": "cpu"}, CPU)["talker"] == CPU
    default = torch.device("cuda", 0)  # parsing names no device it does not need
    assert parse_stage_devices("talker=cpu", default) == {"thinker": default, "talker": CPU}


@pytest.mark.parametrize("spec, says", [
    ("speaker=cpu", "unknown stage 'speaker'"),
    ("thinker=cpu,thinker=cpu", "sets 'thinker' twice"),
    ("thinker", "is not STAGE=DEVICE"),
    ("talker=", "is not STAGE=DEVICE"),
    ("talker=gpu7", "'gpu7' is not a device"),
    ("talker=meta", "qomni runs on cpu or cuda devices"),
    (["talker", "cpu"], "must be a string or a mapping"),
])
def test_bad_stage_device_specs_are_clear_errors(spec, says):
    with pytest.raises(ValueError, match=says):
        parse_stage_devices(spec, CPU)


def test_a_device_the_machine_lacks_is_a_clear_error():
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    says = "no CUDA device" if count == 0 else f"has {count} CUDA device"
    with pytest.raises(ValueError, match=says):
        parse_stage_devices(f"talker=cuda:{count}", CPU)


def test_stages_of_checkpoint_names():
    assert stage_of("thinker.model.layers.0.mlp.experts") == "thinker"
    assert stage_of("thinker.audio_tower.conv2d1.weight") == "thinker"
    assert stage_of("talker.code_predictor.lm_head.3.weight") == "talker"
    assert stage_of("code2wav.decoder.0.conv.weight") == "talker"
    assert stage_of("talker") == "talker" and stage_of("code2wav") == "talker"


def test_graph_modes():
    cuda = torch.device("cuda", 0)
    assert graph_mode(None, CPU, []) is None  # auto: eager on the CPU
    assert graph_mode(True, CPU, []) is False  # static steps, uncaptured
    assert graph_mode(None, cuda, []) is True
    assert graph_mode(None, cuda, ["thinker.model.layers.0.mlp.experts"]) is None
    assert graph_mode(False, cuda, []) is None
    with pytest.raises(ValueError, match="cannot be captured: thinker.model.layers.0"):
        graph_mode(True, cuda, ["thinker.model.layers.0.mlp.experts"])
    with pytest.raises(ValueError, match="cuda_graphs must be True, False or None"):
        EngineConfig(cuda_graphs="yes")


@pytest.fixture(scope="module")
def placed(hf_tiny):
    path, _ = hf_tiny("a")
    opts = {"dtype": "float32", "device": "cpu", "progress": False,
            "engine": EngineConfig(max_num_seqs=3, max_model_len=256)}
    return (Omni.load(path, **opts),
            Omni.load(path, stage_devices="thinker=cpu,talker=cpu", **opts))


def test_two_stage_placement_on_the_cpu_equals_one_device(placed):
    one, two = placed
    for conv in (STORY, [{"role": "user", "content": "Hi"}]):
        a = one.generate(conv, max_new_tokens=8, max_audio_frames=7,
                         talker_sampling=GREEDY_TALKER)
        b = two.generate(conv, max_new_tokens=8, max_audio_frames=7,
                         talker_sampling=GREEDY_TALKER)
        assert a.token_ids == b.token_ids and torch.equal(a.codes, b.codes)
        assert np.array_equal(a.audio, b.audio)


def test_thinker_states_are_handed_to_the_talker_device(placed):
    """Every per-token state the talker reads goes through the runner's hand-off: the prompt's
    embeddings and accept-layer states, and each generated token's embedding."""
    _, two = placed
    runner = two._loop().engine.talker.runner
    assert runner.talker_device == CPU and runner.talker_cache.k.device == CPU
    moved = []
    hand_off = runner.to_talker

    def spy(x):
        out = hand_off(x)
        moved.append((tuple(x.shape), out.device))
        return out

    runner.to_talker = spy
    try:
        out = two.generate(STORY, max_new_tokens=6, max_audio_frames=20,
                           talker_sampling=GREEDY_TALKER)
    finally:
        del runner.to_talker
    prompt_len = len(two.process(STORY))
    d = two.config.thinker.text.hidden_size
    assert moved[:2] == [((prompt_len, d), CPU)] * 2  # embeddings, accept-layer states
    # the generated tokens after the first few, read as trailing text, one at a time
    assert len(moved) - 2 >= len(out.token_ids) - 4
    assert all(shape == (1, d) and dev == CPU for shape, dev in moved[2:])
    # the hand-off itself: to whatever device the talker stage has (a device-free target)
    runner.talker_device = torch.device("meta")
    try:
        assert runner.to_talker(torch.ones(2, 3)).device.type == "meta"
    finally:
        runner.talker_device = CPU
