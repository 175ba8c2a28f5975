"""config.json parsing: the real Instruct file, thinker-only checkpoints, and broken files."""

import copy
import json
from pathlib import Path

import pytest

from qomni.config import ConfigError, OmniConfig
from qomni.tiny import TINY_CONFIG

FIXTURE = Path(__file__).parent / "fixtures" / "instruct_config.json"


def test_real_instruct_config_parses():
    cfg = OmniConfig.from_hf(FIXTURE)
    t = cfg.thinker.text
    assert (t.num_hidden_layers, t.hidden_size, t.num_attention_heads) == (48, 2048, 32)
    assert (t.num_key_value_heads, t.head_dim, t.vocab_size) == (4, 128, 152064)
    assert (t.num_experts, t.num_experts_per_tok, t.norm_topk_prob) == (128, 8, True)
    assert t.mrope_section == (24, 20, 20) and t.rope_theta == 1e6
    assert cfg.thinker.audio.d_model == 1280 and cfg.thinker.audio.output_dim == 2048
    assert cfg.thinker.vision.deepstack_visual_indexes == (8, 16, 24)
    assert cfg.thinker.vision.num_position_embeddings == 2304
    talker = cfg.talker
    assert talker.text.num_experts_per_tok == 6 and talker.text.shared_expert_intermediate_size == 768
    assert talker.accept_hidden_layer == 24 and talker.codec_eos_token_id == 2150
    assert talker.code_predictor.rope_theta == 1e6 and talker.code_predictor.num_code_groups == 16
    assert cfg.code2wav.samples_per_frame == 1920 and cfg.code2wav.sliding_window == 72
    assert cfg.tokens.audio == 151675 and cfg.tokens.im_end == 151645 and cfg.tokens.tts_pad == 151671


def test_voices_case_insensitive_and_unknown_voice_lists_choices():
    talker = OmniConfig.from_hf(FIXTURE).talker
    assert talker.speaker("Ethan") == talker.speaker("ETHAN") == 2302
    with pytest.raises(ValueError, match="Aiden, Chelsie, Ethan"):
        talker.speaker("Bob")


def test_thinker_only_checkpoint_has_no_talker():
    raw = json.loads(FIXTURE.read_text())
    raw["enable_audio_output"] = False
    del raw["talker_config"], raw["code2wav_config"]
    cfg = OmniConfig.from_hf(raw)
    assert cfg.talker is None and cfg.code2wav is None and not cfg.has_audio_output


@pytest.mark.parametrize("path, key", [
    (("thinker_config", "text_config", "num_hidden_layers"), "num_hidden_layers"),
    (("thinker_config", "audio_token_id"), "audio_token_id"),
    (("talker_config", "codec_eos_token_id"), "codec_eos_token_id"),
    (("im_end_token_id",), "im_end_token_id"),
])
def test_missing_required_key_is_named(path, key):
    raw = copy.deepcopy(TINY_CONFIG)
    node = raw
    for p in path[:-1]:
        node = node[p]
    del node[path[-1]]
    with pytest.raises(ConfigError, match=key):
        OmniConfig.from_hf(raw)


def test_broken_json_and_missing_file(tmp_path):
    (tmp_path / "config.json").write_text('{"thinker_config": ')
    with pytest.raises(ConfigError, match="not valid JSON"):
        OmniConfig.from_hf(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        OmniConfig.from_hf(tmp_path / "nowhere")


def test_impossible_values_are_rejected():
    raw = copy.deepcopy(TINY_CONFIG)
    raw["thinker_config"]["text_config"]["rope_scaling"]["mrope_section"] = [4, 4, 4]
    with pytest.raises(ConfigError, match="mrope_section"):
        OmniConfig.from_hf(raw)
    raw = copy.deepcopy(TINY_CONFIG)
    raw["thinker_config"]["text_config"]["num_key_value_heads"] = 3
    with pytest.raises(ConfigError, match="multiple of"):
        OmniConfig.from_hf(raw)
    raw = copy.deepcopy(TINY_CONFIG)
    raw["thinker_config"]["text_config"] = "oops"
    with pytest.raises(ConfigError, match="must be an object"):
        OmniConfig.from_hf(raw)


def test_wrong_types_name_the_key():
    raw = copy.deepcopy(TINY_CONFIG)
    raw["thinker_config"]["text_config"]["hidden_size"] = "wide"
    with pytest.raises(ConfigError, match=r"`config.thinker_config.text_config.hidden_size` must be"):
        OmniConfig.from_hf(raw)
    raw = copy.deepcopy(TINY_CONFIG)
    raw["code2wav_config"]["upsample_rates"] = 8
    with pytest.raises(ConfigError, match="upsample_rates` must be a list of int"):
        OmniConfig.from_hf(raw)
    raw = copy.deepcopy(TINY_CONFIG)
    raw["talker_config"]["speaker_id"] = []
    with pytest.raises(ConfigError, match="speaker_id` must map voice names to ids"):
        OmniConfig.from_hf(raw)


def test_absent_optional_keys_take_the_defaults():
    raw = copy.deepcopy(TINY_CONFIG)
    c2w = raw["code2wav_config"]
    for k in ("num_key_value_heads", "rms_norm_eps", "rope_theta"):
        del c2w[k]
    del raw["thinker_config"]["text_config"]["head_dim"]
    cfg = OmniConfig.from_hf(raw)
    assert cfg.code2wav.num_key_value_heads == c2w["num_attention_heads"]
    assert cfg.code2wav.head_dim == c2w["hidden_size"] // c2w["num_attention_heads"]
    assert (cfg.code2wav.rms_norm_eps, cfg.code2wav.rope_theta) == (1e-5, 10000.0)
    text = raw["thinker_config"]["text_config"]
    assert cfg.thinker.text.head_dim == text["hidden_size"] // text["num_attention_heads"]
