"""Tiny Qwen3-Omni configurations and helpers for building the transformers reference.

transformers is a test-only dependency: only tests import this module.
Real token, codec and speaker ids (shared/notes/qwen3-omni-reference.md §1.2), tiny widths.
"""

from __future__ import annotations

import copy

_ROPE = {"rope_type": "default", "interleaved": True, "mrope_interleaved": True}

_TOKENS = dict(
    audio_token_id=151675, image_token_id=151655, video_token_id=151656,
    audio_start_token_id=151669, audio_end_token_id=151670,
    vision_start_token_id=151652, vision_end_token_id=151653,
    position_id_per_seconds=13, user_token_id=872,
)

_TALKER = dict(
    thinker_hidden_size=64, num_code_groups=16, codec_eos_token_id=2150,
    codec_nothink_id=2155, codec_think_bos_id=2156, codec_think_eos_id=2157,
    codec_pad_id=2148, codec_bos_id=2149, audio_token_id=151675,
    audio_start_token_id=151669, image_token_id=151655, video_token_id=151656,
    vision_start_token_id=151652, position_id_per_seconds=13, spatial_merge_size=2,
    speaker_id={"chelsie": 2301, "ethan": 2302, "aiden": 2303},
)

# Config "a": the all-paths model of the reference notes §8.
TINY_A = dict(
    enable_audio_output=True,
    thinker_config=dict(
        **_TOKENS,
        audio_config=dict(
            num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
            d_model=32, output_dim=64, n_window=50, n_window_infer=200,
            downsample_hidden_size=8,
        ),
        vision_config=dict(
            depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
            deepstack_visual_indexes=[0, 1, 2],
        ),
        text_config=dict(
            vocab_size=152064, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=8,
            num_experts_per_tok=2, norm_topk_prob=True, rope_theta=1e6,
            rope_scaling={**_ROPE, "mrope_section": [4, 2, 2]},
        ),
    ),
    talker_config=dict(
        **_TALKER,
        accept_hidden_layer=2,
        text_config=dict(
            vocab_size=3072, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, moe_intermediate_size=16, num_experts=4,
            num_experts_per_tok=2, norm_topk_prob=True, shared_expert_intermediate_size=32,
            rope_theta=1e6, rope_scaling={**_ROPE, "mrope_section": [2, 1, 1]},
        ),
        code_predictor_config=dict(
            vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_code_groups=16,
            rope_theta=1e6,
        ),
    ),
    code2wav_config=dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=64, decoder_dim=32,
    ),
)

# Config "b": differs in head counts, head_dim, experts/top-k, norm_topk_prob, mrope_section, depth.
TINY_B = copy.deepcopy(TINY_A)
TINY_B["thinker_config"]["text_config"].update(
    hidden_size=48, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=3,
    head_dim=12, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=3,
    norm_topk_prob=False, rope_scaling={**_ROPE, "mrope_section": [2, 2, 2]},
)
TINY_B["thinker_config"]["audio_config"]["output_dim"] = 48
TINY_B["thinker_config"]["vision_config"]["out_hidden_size"] = 48
TINY_B["talker_config"].update(thinker_hidden_size=48, accept_hidden_layer=3)

TINY_CONFIGS = {"a": TINY_A, "b": TINY_B}


def hf_config(name: str = "a", **overrides):
    """A transformers Qwen3OmniMoeConfig for one of the tiny configs."""
    from transformers import Qwen3OmniMoeConfig

    cfg = copy.deepcopy(TINY_CONFIGS[name])
    cfg.update(overrides)
    return Qwen3OmniMoeConfig(**cfg)
