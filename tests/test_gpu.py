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
