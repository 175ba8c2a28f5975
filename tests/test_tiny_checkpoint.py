"""`qomni make-tiny` writes the official layout: transformers 5.23 loads it with every key
matched, and both implementations compute the same logits from it."""

import pytest
import torch
from reference import loaded_network

from qomni import Omni
from qomni.tiny import make_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("made") / "tiny", seed=3, audible=True)


def test_transformers_loads_every_key(tiny):
    from transformers import Qwen3OmniMoeForConditionalGeneration

    model, info = Qwen3OmniMoeForConditionalGeneration.from_pretrained(
        tiny, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    # qomni's weights made it through: an expert of the last thinker layer, stacked by transformers
    ours = loaded_network(tiny).thinker.model.layers[-1].mlp.experts.gate_up_proj
    theirs = model.thinker.model.language_model.layers[-1].mlp.experts.gate_up_proj
    assert torch.equal(ours, theirs)


def test_same_logits_from_both(tiny):
    from transformers import Qwen3OmniMoeForConditionalGeneration

    hf = Qwen3OmniMoeForConditionalGeneration.from_pretrained(tiny, dtype=torch.float32).eval()
    omni = Omni.load(tiny, dtype="float32", device="cpu", progress=False, audio_output=False)
    inputs = omni.process([{"role": "user", "content": "What is a tiny checkpoint?"}])
    with torch.no_grad():
        ref = hf.thinker(input_ids=inputs.input_ids[None]).logits[0]
    assert (omni.prompt_logits(inputs) - ref).abs().max() <= 1e-4


def test_demo_speech_is_audible_noise(tiny):
    """Random weights speak noise, but at a level one can hear: not ~1e-8, not stuck in the clamp."""
    omni = Omni.load(tiny, dtype="float32", device="cpu", progress=False)
    out = omni.generate([{"role": "user", "content": "Hello! What can you do?"}],
                        max_new_tokens=8, max_audio_frames=20, seed=0)
    audio = torch.from_numpy(out.audio)
    rms, clipped = audio.pow(2).mean().sqrt().item(), (audio.abs() >= 1).float().mean().item()
    assert 0.02 < rms < 0.5 and clipped < 0.01, (rms, clipped)
