"""Audio and image prompts through the whole thinker against transformers 5.23 (tiny config,
fp32): input_ids equal to the reference processor's, prompt logits max|Δ| ≤ 1e-4, greedy tokens
identical to `thinker.generate`, batches equal to single runs."""

import glob

import numpy as np
import pytest
import torch
from reference import hf_processor

from qomni.multimodal.audio import load_audio

LIBRIVOX = sorted(glob.glob("/usr/share/pocketsphinx/test/data/librivox/*.wav"))
needs_speech = pytest.mark.skipif(not LIBRIVOX, reason="pocketsphinx-testdata not installed")


def clip(i, seconds=None):
    wav = load_audio(LIBRIVOX[i])
    return wav if seconds is None else wav[: int(seconds * 16000)]


def photo(h=70, w=100, seed=0):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), np.uint8))


def conversations():
    return {
        "audio_text": [{"role": "user", "content": [
            {"type": "audio", "audio": clip(0)}, {"type": "text", "text": "What is said?"}]}],
        "short_audio": [{"role": "user", "content": [
            {"type": "audio", "audio": clip(1, 0.45)}, {"type": "text", "text": "Hm?"}]}],
        "two_audios": [{"role": "system", "content": "You are Qwen."},
                       {"role": "user", "content": [
                           {"type": "audio", "audio": clip(1)},
                           {"type": "audio", "audio": clip(2, 1.7)},
                           {"type": "text", "text": "Compare the two clips."}]}],
        "audio_turns": [{"role": "user", "content": [{"type": "audio", "audio": clip(3, 2.2)}]},
                        {"role": "assistant", "content": "A quote from a novel."},
                        {"role": "user", "content": [{"type": "audio", "audio": clip(4)},
                                                     {"type": "text", "text": "And this?"}]}],
        "image_text": [{"role": "user", "content": [
            {"type": "image", "image": photo(224, 320)}, {"type": "text", "text": "Describe."}]}],
        "model_card": [{"role": "user", "content": [
            {"type": "image", "image": photo()}, {"type": "audio", "audio": clip(0, 3.3)},
            {"type": "text", "text": "What can you see and hear? Answer in one short sentence."}]}],
        "two_images": [{"role": "user", "content": [
            {"type": "image", "image": photo(64, 64, 1)}, {"type": "text", "text": "and"},
            {"type": "image", "image": photo(96, 160, 2)}]}],
    }


def hf_inputs(path, conv):
    proc = hf_processor(path)
    text = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    parts = [p for m in conv if isinstance(m["content"], list) for p in m["content"]]
    audios = [p["audio"] for p in parts if p["type"] == "audio"]
    images = [p["image"] for p in parts if p["type"] == "image"]
    return proc(text=text, audio=audios or None, images=images or None, return_tensors="pt")


@pytest.fixture(scope="module")
def convs():
    if not LIBRIVOX:
        pytest.skip("pocketsphinx-testdata not installed (real LibriVox speech)")
    return conversations()


@pytest.mark.parametrize("name", ["audio_text", "short_audio", "two_audios", "audio_turns",
                                  "image_text", "model_card", "two_images"])
def test_input_ids_and_prompt_logits(name, convs, hf_tiny, omni_tiny):
    path, hf = hf_tiny("a")
    omni = omni_tiny("a", audio_output=False)
    conv = convs[name]
    ref_inputs = hf_inputs(path, conv)
    ours = omni.process(conv)
    assert ours.input_ids.tolist() == ref_inputs["input_ids"][0].tolist()
    with torch.no_grad():
        ref = hf.thinker(**ref_inputs).logits[0]
    logits = omni.prompt_logits(ours)
    d = (logits - ref).abs()
    assert d.max() <= 1e-4, f"max|Δ|={d.max():.3g} mean|Δ|={d.mean():.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["two_audios", "model_card"])
def test_greedy_tokens_match(name, convs, hf_tiny, omni_tiny):
    path, hf = hf_tiny("a")
    omni = omni_tiny("a", audio_output=False)
    conv = convs[name]
    ref_inputs = hf_inputs(path, conv)
    im_end = omni.config.tokens.im_end
    with torch.no_grad():
        ref = hf.thinker.generate(**ref_inputs, max_new_tokens=24, do_sample=False,
                                  eos_token_id=im_end, pad_token_id=im_end)
    ref_new = ref[0, ref_inputs["input_ids"].shape[1]:].tolist()
    out = omni.generate(conv, max_new_tokens=24)
    assert out.token_ids + ([im_end] if out.finish_reason == "stop" else []) == ref_new


def test_batch_of_media_prompts_equals_single_runs(convs, omni_tiny):
    omni = omni_tiny("a", audio_output=False)
    batch = [convs["audio_text"], convs["model_card"], convs["image_text"], convs["two_audios"]]
    singles = [omni.generate(c, max_new_tokens=10) for c in batch]
    together = omni.generate(batch, max_new_tokens=10)
    assert [o.token_ids for o in together] == [o.token_ids for o in singles]
