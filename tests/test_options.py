"""GenerateOptions: one definition of generate's parameters, each value checked once."""

import dataclasses

import pytest

from qomni import EngineConfig, GenerateOptions, SamplingParams


@pytest.mark.parametrize("bad, name", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": "8"}, "max_new_tokens"),
    ({"max_new_tokens": True}, "max_new_tokens"), ({"max_audio_frames": 0}, "max_audio_frames"),
    ({"seed": 1.5}, "seed"), ({"sampling": {"temperature": 1}}, "sampling"),
    ({"talker_sampling": 0.7}, "talker_sampling"), ({"return_audio": "yes"}, "return_audio"),
    ({"use_audio_in_video": None}, "use_audio_in_video"), ({"speaker": ""}, "speaker"),
    ({"stop": [""]}, "stop"), ({"stop": 3}, "stop"), ({"speech_stop": [None]}, "speech_stop"),
    ({"prefix": "abc"}, "open_prefix"), ({"tools": {"type": "function"}}, "tools"),
    ({"chat_template_kwargs": ["x"]}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, "add_generation_prompt"),
    ({"sampling": SamplingParams(min_tokens=9), "max_new_tokens": 8}, "min_tokens"),
])
def test_bad_values_are_value_errors_naming_the_parameter(bad, name):
    with pytest.raises(ValueError, match=name):
        GenerateOptions(**bad)


def test_values_are_normalised():
    o = GenerateOptions(stop="END", speech_stop=["<tool_call>"], tools=[{"type": "function"}])
    assert o.stop == ("END",) and o.speech_stop == ("<tool_call>",)
    assert o.template_kwargs() == {"use_audio_in_video": False, "tools": [{"type": "function"}]}
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.max_new_tokens = 3


def test_build_overrides_and_rejects_unknown_names():
    base = GenerateOptions(max_new_tokens=7, seed=3)
    assert GenerateOptions.build(base) is base
    changed = GenerateOptions.build(base, max_new_tokens=2)
    assert (changed.max_new_tokens, changed.seed, base.max_new_tokens) == (2, 3, 7)
    assert GenerateOptions.build(None, seed=1) == GenerateOptions(seed=1)
    with pytest.raises(TypeError, match="'enable_thinking'"):
        GenerateOptions.build(None, "stream", enable_thinking=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerateOptions.build(base, max_new_tokens=-1)


@pytest.mark.parametrize("bad", [{"ignore_eos": 1}, {"min_tokens": -1}, {"min_tokens": 2.0}])
def test_sampling_length_params_are_checked(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


@pytest.mark.parametrize("bad, name", [
    ({"max_num_seqs": 0}, "max_num_seqs"), ({"max_model_len": 8.5}, "max_model_len"),
    ({"max_talker_len": 5}, "max_talker_len"), ({"chunk_frames": True}, "chunk_frames"),
    ({"audio_cache_windows": -1}, "audio_cache_windows"),
    ({"first_chunk_frames": 30, "chunk_frames": 25}, "first_chunk_frames"),
])
def test_bad_engine_settings_name_themselves(bad, name):
    with pytest.raises(ValueError, match=name):
        EngineConfig(**bad)


def test_engine_defaults_and_the_derived_talker_length():
    c = EngineConfig()
    assert (c.max_num_seqs, c.max_model_len, c.first_chunk_frames, c.chunk_frames,
            c.audio_cache_windows) == (8, 4096, 1, 25, 64)
    assert c.talker_len == 4096 + 512 and EngineConfig(max_model_len=100).talker_len == 612
    assert EngineConfig(max_talker_len=300).talker_len == 300
    assert EngineConfig(audio_cache_windows=0).audio_cache_windows == 0
