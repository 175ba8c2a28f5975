"""On a CUDA device (deselected by default; run with `pytest -m gpu`): the tiny checkpoint's
logits on the GPU equal the reference's on the CPU, speech runs end to end in bfloat16, and, with
QOMNI_TEST_MODEL=/path/to/Qwen3-Omni-30B-A3B-Instruct, the real model answers and speaks."""

import os

import numpy as np
import pytest
import torch

from qomni import Omni

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def _check_speech(out, min_rms: float | None = None) -> None:
    frames = out.codes.shape[1]
    assert frames > 0 and out.audio.dtype == np.float32 and np.isfinite(out.audio).all()
    assert out.audio.size == 1920 * frames - 555  # every frame's samples, as a whole decode
    if min_rms is not None:  # random weights speak at any level; a real voice is audible
        assert np.sqrt(np.mean(out.audio**2)) > min_rms


def test_tiny_logits_on_cuda_equal_the_reference(hf_tiny):
    path, hf = hf_tiny("a")
    omni = Omni.load(path, dtype="float32", device="cuda", progress=False, audio_output=False)
    inputs = omni.process(QUESTION)
    with torch.no_grad():
        want = hf.thinker(input_ids=inputs.input_ids[None]).logits[0]
    got = omni.prompt_logits(inputs).cpu()
    assert (got - want).abs().max() <= 1e-4


def test_tiny_speech_in_bfloat16_on_cuda(hf_tiny):
    path, _ = hf_tiny("a")
    omni = Omni.load(path, dtype="bfloat16", device="cuda", progress=False)
    outs = omni.generate([QUESTION, QUESTION + [{"role": "assistant", "content": "Paris."},
                                                 {"role": "user", "content": "Why?"}]],
                         max_new_tokens=8, max_audio_frames=12, seed=0)
    for out in outs:
        assert out.token_ids and out.usage.completion_tokens == len(out.token_ids)
        _check_speech(out)


@pytest.mark.skipif(not os.environ.get("QOMNI_TEST_MODEL"), reason="set QOMNI_TEST_MODEL")
def test_real_checkpoint_answers_and_speaks():
    omni = Omni.load(os.environ["QOMNI_TEST_MODEL"], device="cuda")
    out = omni.generate(QUESTION, max_new_tokens=16, seed=0)
    assert "paris" in out.text.lower(), out.text
    _check_speech(out, min_rms=0.01)


def test_cuda_graphs_equal_the_uncaptured_steps(tmp_path):
    """Three speaking requests in a bucket of 4: captured graphs replay exactly what the static
    steps compute uncaptured (tokens, codes, audio)."""
    from qomni.bench.gpu_check import graphs_on_vs_off, tiny_checkpoint

    result = graphs_on_vs_off(tiny_checkpoint(tmp_path), torch.device("cuda"), "bfloat16")
    assert result["captured"] and result["pass"], result


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_talker_on_a_second_gpu_equals_one(hf_tiny):
    path, _ = hf_tiny("a")
    from qomni import SamplingParams

    kw = {"max_new_tokens": 8, "max_audio_frames": 12,
          "talker_sampling": SamplingParams(temperature=0)}
    one = Omni.load(path, dtype="bfloat16", device="cuda:0", progress=False)
    two = Omni.load(path, dtype="bfloat16", device="cuda:0", progress=False,
                    stage_devices="thinker=cuda:0,talker=cuda:1")
    assert two.model.talker.model.norm.weight.device == torch.device("cuda", 1)
    a, b = one.generate(QUESTION, **kw), two.generate(QUESTION, **kw)
    assert a.token_ids == b.token_ids and torch.equal(a.codes, b.codes)
