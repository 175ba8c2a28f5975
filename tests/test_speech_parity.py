"""Speech output against transformers 5.23 `generate(return_audio=True, talker_do_sample=False)`
on the tiny config (fp32): identical text, identical codec codes [16, T], waveform close to the
reference's full decode. The reference's talker crashes when audio comes together with an image
(its talker config lacks the audio config); the tests patch that in, as docs/architecture.md says."""

import glob

import numpy as np
import pytest
import torch
from reference import hf_processor

from qomni import Omni, SamplingParams
from qomni.multimodal.audio import load_audio

GREEDY_TALKER = SamplingParams(temperature=0, repetition_penalty=1.05)  # = talker_do_sample=False
LIBRIVOX = sorted(glob.glob("/usr/share/pocketsphinx/test/data/librivox/*.wav"))


def speech_clip(seconds=2.0):
    if LIBRIVOX:
        return load_audio(LIBRIVOX[0])[: int(seconds * 16000)]
    t = np.arange(int(seconds * 16000)) / 16000  # no test speech installed: a chirp
    return (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.float32)


def photo():
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (70, 100, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def setup(hf_tiny, tmp_path_factory):
    path, hf = hf_tiny("a")
    hf.talker.config.audio_config = hf.config.thinker_config.audio_config  # Q1 workaround
    omni = Omni.load(path, dtype="float32", device="cpu", progress=False)
    return path, hf, omni


def reference(path, hf, conv, *, speaker, text_tokens, frames, **template):
    """Run the reference; returns (generated ids, codes [16, T], full-decode waveform).
    `template`: apply_chat_template keywords (chat_template=, enable_thinking=, ...)."""
    proc = hf_processor(path)
    text = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False, **template)
    audios = [p["audio"] for m in conv if isinstance(m["content"], list)
              for p in m["content"] if p["type"] == "audio"]
    images = [p["image"] for m in conv if isinstance(m["content"], list)
              for p in m["content"] if p["type"] == "image"]
    inputs = proc(text=text, audio=audios or None, images=images or None, return_tensors="pt")
    captured = {}
    original = hf.code2wav.chunked_decode

    def spy(codes, **kw):
        captured["codes"] = codes
        return original(codes, **kw)

    hf.code2wav.chunked_decode = spy
    try:
        with torch.no_grad():
            seqs, _ = hf.generate(**inputs, speaker=speaker, thinker_max_new_tokens=text_tokens,
                                  talker_max_new_tokens=frames + 1, talker_do_sample=False)
            codes = captured["codes"]
            full = hf.code2wav(codes)  # the full (not chunked) decode
    finally:
        hf.code2wav.chunked_decode = original
    n = inputs["input_ids"].shape[1]
    return seqs[0, n:].tolist(), codes[0], full[0, 0]


CASES = {
    "text": [{"role": "user", "content": "Tell me a short story about a lighthouse."}],
    "audio_in": [{"role": "user", "content": [
        {"type": "audio", "audio": speech_clip()},
        {"type": "text", "text": "What did you hear?"}]}],
    "image_audio": [{"role": "user", "content": [
        {"type": "image", "image": photo()}, {"type": "audio", "audio": speech_clip(1.3)},
        {"type": "text", "text": "What can you see and hear?"}]}],
    "multi_turn": [{"role": "system", "content": "You are a friendly voice assistant."},
                   {"role": "user", "content": "Hi!"},
                   {"role": "assistant", "content": "Hello! What can I do for you?"},
                   {"role": "user", "content": "Sing me something."}],
}


@pytest.mark.parametrize("case", CASES)
def test_codes_and_waveform_match_reference(case, setup):
    path, hf, omni = setup
    conv = CASES[case]
    ref_ids, ref_codes, ref_wav = reference(path, hf, conv, speaker="Ethan", text_tokens=8,
                                            frames=12)
    out = omni.generate(conv, max_new_tokens=8, return_audio=True, max_audio_frames=12,
                        talker_sampling=GREEDY_TALKER)
    assert out.token_ids + ([omni.config.tokens.im_end] if out.finish_reason == "stop" else []) \
        == ref_ids
    assert out.codes.shape[0] == 16 and out.codes.shape[1] > 0
    assert torch.equal(out.codes, ref_codes)
    assert out.sample_rate == 24000 and out.audio.dtype == np.float32
    wav = torch.from_numpy(out.audio)
    assert wav.shape == ref_wav.shape
    assert torch.allclose(wav, ref_wav, atol=1e-4, rtol=0), (wav - ref_wav).abs().max()


@pytest.mark.parametrize("voice", ["Chelsie", "aiden", "ETHAN"])
def test_each_voice_matches_reference(voice, setup):
    path, hf, omni = setup
    conv = CASES["text"]
    _, ref_codes, _ = reference(path, hf, conv, speaker=voice, text_tokens=5, frames=8)
    out = omni.generate(conv, max_new_tokens=5, speaker=voice, max_audio_frames=8,
                        talker_sampling=GREEDY_TALKER)
    assert torch.equal(out.codes, ref_codes)


@pytest.mark.parametrize("header", ["no_newline", "closed_think"])
def test_an_assistant_header_of_other_lengths_matches_reference(header, setup, monkeypatch):
    """A generation prompt that does not end in `<|im_start|>assistant\\n`: the talker reads
    the assistant segment's first three tokens as the header wherever they come from (the
    generated text when it is shorter, the prompt's extra tokens when it is longer)."""
    path, hf, omni = setup
    conv = [{"role": "user", "content": "Hi"}]  # speech here depends on where tts_eos lands
    if header == "no_newline":
        template = omni.processor.template.replace("'<|im_start|>assistant\\n'",
                                                   "'<|im_start|>assistant'")
        assert template != omni.processor.template
        monkeypatch.setattr(omni.processor, "template", template)
        ref_kw, our_kw = {"chat_template": template}, {}
    else:  # the template's enable_thinking=False: an empty think block after the header
        ref_kw = {"enable_thinking": False}
        our_kw = {"chat_template_kwargs": ref_kw}
    ids = omni.process(conv, **ref_kw if header == "closed_think" else {}).input_ids
    from qomni.engine.speech import assistant_header

    assert assistant_header(ids, omni.config.tokens) != 3
    ref_ids, ref_codes, _ = reference(path, hf, conv, speaker="Ethan", text_tokens=8, frames=14,
                                      **ref_kw)
    out = omni.generate(conv, max_new_tokens=8, max_audio_frames=14,
                        talker_sampling=GREEDY_TALKER, **our_kw)
    assert out.token_ids == ref_ids[: len(out.token_ids)]
    assert out.codes.shape[1] > 9 and torch.equal(out.codes, ref_codes)


def test_voices_change_the_speech(setup):
    _, _, omni = setup
    conv = CASES["text"]
    a = omni.generate(conv, max_new_tokens=5, speaker="Chelsie", max_audio_frames=8,
                      talker_sampling=GREEDY_TALKER)
    b = omni.generate(conv, max_new_tokens=5, speaker="Aiden", max_audio_frames=8,
                      talker_sampling=GREEDY_TALKER)
    assert a.text == b.text and not torch.equal(a.codes, b.codes)


def test_unknown_voice_lists_available(setup):
    _, _, omni = setup
    with pytest.raises(ValueError, match="Aiden, Chelsie, Ethan"):
        omni.generate(CASES["text"], max_new_tokens=2, speaker="Robot")


def test_seeded_sampling_is_reproducible_and_codes_in_range(setup):
    _, _, omni = setup
    conv = CASES["text"]
    a = omni.generate(conv, max_new_tokens=4, max_audio_frames=20, seed=123)
    b = omni.generate(conv, max_new_tokens=4, max_audio_frames=20, seed=123)
    c = omni.generate(conv, max_new_tokens=4, max_audio_frames=20, seed=124)
    assert torch.equal(a.codes, b.codes) and np.array_equal(a.audio, b.audio)
    assert not torch.equal(a.codes, c.codes)
    assert int(a.codes.min()) >= 0 and int(a.codes.max()) < 2048
    assert a.audio.shape[0] == 1920 * a.codes.shape[1] - 555


def test_return_audio_false_and_text_only_load(setup, hf_tiny):
    path, _, omni = setup
    out = omni.generate(CASES["text"], max_new_tokens=4, return_audio=False)
    assert out.audio is None and out.codes is None
    text_only = Omni.load(path, dtype="float32", device="cpu", progress=False,
                          audio_output=False)
    assert not hasattr(text_only.model, "talker")
    assert text_only.generate(CASES["text"], max_new_tokens=4).text == out.text
    with pytest.raises(ValueError, match="audio_output=False"):
        text_only.generate(CASES["text"], max_new_tokens=2, return_audio=True)
