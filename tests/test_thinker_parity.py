"""Thinker text path against transformers 5.23 on tiny configs (fp32, CPU).

Checkpoints are written by transformers' save_pretrained (sharded, per-expert keys) and loaded by
qomni's own loader. Tolerances (fp32): logits max|Δ| ≤ 1e-4, token ids exactly equal.
"""

import pytest
import torch
from reference import hf_processor

CONVERSATIONS = [
    [{"role": "user", "content": "Give me three facts about the Moon."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": [{"type": "text", "text": "Why is the sky blue? 为什么天空是蓝色的?"}]}],
    [{"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Write a haiku about autumn leaves falling in the wind."}],
]


def _diff(a, b):
    d = (a.float() - b.float()).abs()
    return f"max|Δ|={d.max().item():.3g} mean|Δ|={d.mean().item():.3g}"


@pytest.mark.parametrize("name", ["a", "b"])
def test_input_ids_match_transformers(name, hf_tiny, omni_tiny):
    path, _ = hf_tiny(name)
    processor = hf_processor(path)
    omni = omni_tiny(name, audio_output=False)
    for conv in CONVERSATIONS:
        ref = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
        assert omni.process(conv).input_ids.tolist() == list(ref[0])


@pytest.mark.parametrize("name", ["a", "b"])
def test_prompt_logits_match(name, hf_tiny, omni_tiny):
    _, hf = hf_tiny(name)
    omni = omni_tiny(name, audio_output=False)
    for conv in CONVERSATIONS:
        inputs = omni.process(conv)
        ours = omni.prompt_logits(inputs)
        with torch.no_grad():
            ref = hf.thinker(input_ids=inputs.input_ids[None]).logits[0]
        assert ours.shape == ref.shape
        assert torch.allclose(ours, ref, atol=1e-4, rtol=0), _diff(ours, ref)


@pytest.mark.parametrize("name", ["a", "b"])
def test_greedy_tokens_match_thinker_generate(name, hf_tiny, omni_tiny):
    _, hf = hf_tiny(name)
    omni = omni_tiny(name, audio_output=False)
    im_end = omni.config.tokens.im_end
    for conv in CONVERSATIONS[:2]:
        inputs = omni.process(conv)
        ids = inputs.input_ids[None]
        with torch.no_grad():
            ref = hf.thinker.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=32, do_sample=False,
                                      eos_token_id=im_end, pad_token_id=im_end)
        ref_new = ref[0, ids.shape[1]:].tolist()
        out = omni.generate(conv, max_new_tokens=32)
        produced = out.token_ids + ([im_end] if out.finish_reason == "stop" else [])
        assert produced == ref_new


@pytest.mark.parametrize("name", ["a", "b"])
def test_batch_equals_single_runs(name, omni_tiny):
    omni = omni_tiny(name, audio_output=False)
    singles = [omni.generate(c, max_new_tokens=12) for c in CONVERSATIONS]
    batch = omni.generate(CONVERSATIONS, max_new_tokens=12)
    assert isinstance(batch, list) and len(batch) == 3
    lengths = {len(omni.process(c)) for c in CONVERSATIONS}
    assert len(lengths) == 3, "prompts must differ in length for this test to mean anything"
    for s, b in zip(singles, batch):
        assert b.token_ids == s.token_ids
        assert b.text == s.text
        assert b.finish_reason == s.finish_reason


def test_batched_prefill_logits_equal_single(omni_tiny):
    """Right-padded rows see exactly their own tokens: last-position logits match single runs."""
    from qomni.engine.prefill import prefill

    omni = omni_tiny("a", audio_output=False)
    inputs = [omni.process(c) for c in CONVERSATIONS]
    thinker = omni.model.thinker
    with torch.inference_mode():
        hidden = prefill(thinker, inputs).hidden
        for b, x in enumerate(inputs):
            single = omni.prompt_logits(x)
            batched = thinker.logits(hidden[b, : len(x)]).float()
            assert torch.allclose(batched, single, atol=1e-5, rtol=0), _diff(batched, single)


def test_stream_equals_generate(omni_tiny):
    from qomni import Finished, TextDelta

    omni = omni_tiny("a", audio_output=False)
    conv = CONVERSATIONS[1]
    out = omni.generate(conv, max_new_tokens=20)
    events = list(omni.stream(conv, max_new_tokens=20))
    assert isinstance(events[-1], Finished)
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert "".join(d.text for d in deltas) == out.text
    assert [t for d in deltas for t in d.token_ids] == out.token_ids
    assert events[-1].reason == out.finish_reason
    assert events[-1].usage.completion_tokens == out.usage.completion_tokens
