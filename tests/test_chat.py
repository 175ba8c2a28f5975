"""Chat template rendering equal to transformers' apply_chat_template, tokenizer ids, and
streaming decode across multi-byte characters."""

import pytest
from reference import hf_processor

from qomni.multimodal.chat import (
    ChatError,
    StreamDecoder,
    Tokenizer,
    load_chat_template,
    render_chat,
)

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]

CASES = {
    "plain": ([{"role": "user", "content": "Hello"}], {}),
    "system": ([{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello"}], {}),
    "list_content": ([{"role": "user", "content": [
        {"type": "image", "image": "x.png"}, {"type": "audio", "audio": "a.wav"},
        {"type": "text", "text": "What can you see and hear?"}]}], {}),
    "video": ([{"role": "user", "content": [{"type": "video", "video": "v.mp4"},
                                            {"type": "text", "text": "Describe."}]}], {}),
    "system_list": ([{"role": "system", "content": [{"type": "text", "text": "You are Qwen-Omni."}]},
                     {"role": "user", "content": "Hi"}], {}),
    "multi_turn": ([{"role": "user", "content": "Q1"},
                    {"role": "assistant", "content": "<think>\nmm\n</think>\n\nA1"},
                    {"role": "user", "content": "Q2"}], {}),
    "reasoning": ([{"role": "user", "content": "Q"},
                   {"role": "assistant", "content": "A", "reasoning_content": "because"}], {}),
    "tools": ([{"role": "system", "content": "SYS"},
               {"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                   "name": "get_weather", "arguments": {"city": "Paris"}}}]},
               {"role": "tool", "content": '{"temp": 20}'}], {"tools": TOOLS}),
    "no_thinking": ([{"role": "user", "content": "Hi"}], {"enable_thinking": False}),
    "unicode": ([{"role": "user", "content": "Grüße 👋 你好"}], {}),
}


@pytest.fixture(scope="module")
def checkpoint(hf_tiny):
    path, _ = hf_tiny("a")
    return path


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_render_equals_transformers(name, gen_prompt, checkpoint):
    messages, kwargs = CASES[name]
    proc = hf_processor(checkpoint)
    ref = proc.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=False,
                                   **kwargs)
    tok = Tokenizer(checkpoint)
    ours = render_chat(load_chat_template(checkpoint), messages, add_generation_prompt=gen_prompt,
                       special_tokens=tok.special_tokens(), **kwargs)
    assert ours == ref


def test_token_ids_equal_transformers_tokenizer(checkpoint):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    tok = Tokenizer(checkpoint)
    text = ("<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|>Grüße 👋 你好, "
            "<tts_pad> don't\t  stop<|im_end|>\n")
    assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
    assert tok.token_id("<|audio_pad|>") == 151675


def test_template_errors_are_chat_errors(checkpoint):
    template = load_chat_template(checkpoint)
    with pytest.raises(ChatError, match="list"):
        render_chat(template, "hello")
    with pytest.raises(ChatError, match="role"):
        render_chat(template, [{"content": "no role"}])
    with pytest.raises(ChatError, match="chat template error"):
        render_chat("{{ raise_exception('bad roles') }}", [{"role": "user", "content": "x"}])


def test_stream_decoder_never_splits_characters(checkpoint):
    tok = Tokenizer(checkpoint)
    text = "Emoji 👋🏽 and 你好世界, Grüße — ok"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # byte-level pieces: some characters span tokens
    dec = StreamDecoder(tok)
    pieces = [dec.push([i]) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    held_back = [p for p in pieces[:-1] if p == ""]
    assert held_back, "some emoji bytes must have been held back until complete"
