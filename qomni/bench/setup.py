"""What the benchmark runs on: its checkpoint (real widths, shallow depth), settings and prompts.

The benchmark model has the real widths, head counts and expert counts of the published
Instruct checkpoint, a shallow depth (so it fits 24 GiB in fp32 and runs in minutes on 2 CPU
cores) and random weights; it is built once and cached. The random model never emits EOS, so
token and frame counts are fixed by the settings.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qomni.config import OmniConfig
from qomni.engine.config import EngineConfig
from qomni.sampling import SamplingParams
from qomni.tiny import TINY_CONFIG, cached_checkpoint, make_tiny, user_cache

# The published checkpoint's rope settings (the tiny config spells them the same way).
_MROPE = {**TINY_CONFIG["thinker_config"]["text_config"]["rope_scaling"],
          "mrope_section": [24, 20, 20]}

# Widths, head counts and expert counts of the published Qwen3-Omni-30B-A3B-Instruct config.json
# (depths are set by SHALLOW_DEPTH); the code predictor and code2wav are at full depth.
REAL_WIDTHS: dict[str, Any] = {
    "thinker_config": {
        "audio_config": {"encoder_attention_heads": 20, "encoder_ffn_dim": 5120, "d_model": 1280,
                         "output_dim": 2048, "n_window_infer": 800,
                         "downsample_hidden_size": 480},
        "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
                          "out_hidden_size": 2048},
        "text_config": {"hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 4,
                        "head_dim": 128, "moe_intermediate_size": 768, "num_experts": 128,
                        "num_experts_per_tok": 8, "rope_scaling": _MROPE},
    },
    "talker_config": {
        "thinker_hidden_size": 2048,
        "text_config": {"hidden_size": 1024, "num_attention_heads": 16, "head_dim": 128,
                        "intermediate_size": 2048, "moe_intermediate_size": 384,
                        "num_experts": 128, "num_experts_per_tok": 6,
                        "shared_expert_intermediate_size": 768, "rope_scaling": _MROPE},
        "code_predictor_config": {"hidden_size": 1024, "intermediate_size": 3072,
                                  "num_hidden_layers": 5, "num_attention_heads": 16,
                                  "num_key_value_heads": 8, "head_dim": 128},
    },
    "code2wav_config": {"hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 16,
                        "num_key_value_heads": 16, "intermediate_size": 3072,
                        "decoder_dim": 1536},
}

# Depth small enough to fit 24 GiB in fp32 and run in minutes on 2 cores (real: 48 thinker
# layers, 32 audio, 27 vision with deepstack after blocks 8/16/24, 20 talker, accept layer 24).
# Vision keeps 3 blocks so all 3 deepstack mergers run, as in the real model.
SHALLOW_DEPTH: dict[str, Any] = {
    "thinker_config": {"audio_config": {"encoder_layers": 2},
                       "vision_config": {"depth": 3, "deepstack_visual_indexes": [0, 1, 2]},
                       "text_config": {"num_hidden_layers": 2}},
    "talker_config": {"accept_hidden_layer": 1, "text_config": {"num_hidden_layers": 2}},
}
BUILD_VERSION = 1  # bump when the checkpoint written here changes

# The engine's default vocoder chunks (frames): a small first chunk for latency, then larger.
FIRST_CHUNK, CHUNK = EngineConfig().first_chunk_frames, EngineConfig().chunk_frames
# = the reference's generate(talker_do_sample=False): greedy with its repetition penalty.
GREEDY_TALKER = SamplingParams(temperature=0.0, repetition_penalty=1.05)
SYSTEM = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
          "perceiving auditory and visual inputs, as well as generating text and speech.")
TEXT_CONVERSATION = [{"role": "user", "content": "Tell me a story about a lighthouse keeper."}]


@dataclasses.dataclass(frozen=True)
class Settings:
    audio_seconds: float = 10.0  # the prompt's synthetic audio clip
    image_size: int = 448  # the prompt's synthetic square image (448 -> 196 tokens)
    decode_tokens: int = 16  # thinker decode steps timed, and text tokens in end-to-end runs
    talker_frames: int = 16  # talker + code predictor frames timed
    code2wav_frames: int = 50  # frames vocoded (80 ms each)
    e2e_frames: int = 24  # speech frames per request in the speech-throughput runs
    # Time to first audio is taken on a long spoken reply: 64 text tokens and 4 frames (320 ms
    # of speech) per token, about the pace of normal speech (~3 tokens/s at 12.5 frames/s).
    # The random model never stops by itself, so both backends are held to these counts.
    reply_tokens: int = 64
    reply_frames: int = 256
    batches: tuple[int, ...] = (1, 4, 8)  # concurrent requests for speech throughput
    # Read the time-to-first-audio reply to its end: the turn's real-time factor as well.
    reply_to_end: bool = False
    max_model_len: int = 2048  # the engine's KV cache rows (thinker tokens)
    # Calibrate again after the run (the faster kept); otherwise twice before it. A second
    # 256 MiB buffer beside a full-size model and its engine would be the run's peak RSS.
    calibrate_at_end: bool = True

    def __post_init__(self) -> None:
        # per-step medians need a few steps (the reference's first step is its prefill)
        if (self.decode_tokens < 3 or self.talker_frames < 2 or self.e2e_frames < 3
                or self.reply_tokens < 3 or self.reply_frames < 3):
            raise ValueError("need decode_tokens >= 3, talker_frames >= 2, e2e_frames >= 3, "
                             "reply_tokens >= 3, reply_frames >= 3")
        if self.audio_seconds <= 0 or self.image_size < 32 or self.code2wav_frames < 1:
            raise ValueError("need audio_seconds > 0, image_size >= 32, code2wav_frames >= 1")
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batches must be request counts >= 1, not {self.batches}")

    def changed(self, assignments: Sequence[str]) -> Settings:
        """These settings with `NAME=VALUE` changes (`qomni bench --set`): VALUE is read as the
        field's type, batches as a comma-separated list."""
        names = [f.name for f in dataclasses.fields(self)]
        changes: dict[str, Any] = {}
        for item in assignments:
            name, sep, value = item.partition("=")
            if not sep or name not in names:
                raise ValueError(f"--set {item!r}: expected NAME=VALUE, NAME one of "
                                 f"{', '.join(names)}")
            kind = type(getattr(self, name))
            try:
                if kind is bool:
                    if value.lower() not in ("true", "false", "1", "0"):
                        raise ValueError(value)
                    changes[name] = value.lower() in ("true", "1")
                else:
                    changes[name] = (tuple(int(v) for v in value.split(",")) if kind is tuple
                                     else kind(value))
            except ValueError:
                raise ValueError(f"--set {item!r}: {value!r} is not a valid {name} "
                                 f"({'comma-separated ints' if kind is tuple else kind.__name__})"
                                 ) from None
        return dataclasses.replace(self, **changes)


DEFAULT = Settings()
QUICK = Settings(audio_seconds=4.0, image_size=224, decode_tokens=6, talker_frames=6,
                 code2wav_frames=16, e2e_frames=8, reply_tokens=8, reply_frames=24,
                 batches=(1, 2))


@dataclasses.dataclass(frozen=True)
class Load:
    """How a backend loads the checkpoint; options that change loading belong here."""
    dtype: str | None = None  # None: as Omni.load (bf16 on GPU and bf16-capable CPUs)
    device: str | None = None  # None: cuda when there is one
    quantization: str | None = None  # Omni.load's quantization (qomni only)


def log(message: str) -> None:
    print(f"qomni bench: {message}", file=sys.stderr, flush=True)


# -- the benchmark checkpoint ---------------------------------------------------------------------

def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, Mapping) and key.endswith("config") and key in base:
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def bench_config() -> dict[str, Any]:
    """config.json of the benchmark model: the tiny config's ids, real widths, shallow depth."""
    config = copy.deepcopy(TINY_CONFIG)
    _merge(config, REAL_WIDTHS)
    _merge(config, SHALLOW_DEPTH)
    return config


def bench_checkpoint(config: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """The random-weight checkpoint for `config` in the user cache, keyed by the config; built on
    first use (5.6 GB, a few minutes)."""
    config = config or bench_config()
    key = json.dumps({"config": config, "seed": seed, "version": BUILD_VERSION}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    path = user_cache() / f"bench-{digest}"

    def build(tmp: Path) -> None:
        log(f"building the random benchmark checkpoint in {path} (once; a few minutes)")
        # Built in bf16 (the published checkpoint's dtype): an fp32 model plus its random state
        # dict would not fit 24 GiB. The loader converts to the benchmark's dtype.
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            make_tiny(tmp, config=config, seed=seed, max_shard_bytes=2 << 30)
        finally:
            torch.set_default_dtype(default)

    return cached_checkpoint(path, build)


def model_summary(path: Path) -> dict[str, Any]:
    cfg = OmniConfig.from_hf(path)
    depth = {"thinker": cfg.thinker.text.num_hidden_layers,
             "audio": cfg.thinker.audio.encoder_layers, "vision": cfg.thinker.vision.depth}
    if cfg.talker is not None:
        depth |= {"talker": cfg.talker.text.num_hidden_layers,
                  "code predictor": cfg.talker.code_predictor.num_hidden_layers,
                  "code2wav": cfg.code2wav.num_hidden_layers}
    return {"path": str(path), "depth": depth}


# -- inputs (the same for every backend) ----------------------------------------------------------

def _chirp(seconds: float, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """A rising tone with a little noise, at 16 kHz."""
    t = np.arange(int(seconds * 16000)) / 16000
    return amplitude * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.01 * rng.standard_normal(t.size)


def media_conversation(settings: Settings) -> list[dict[str, Any]]:
    """System prompt + a synthetic image and audio clip + a question (a few hundred tokens)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    audio = _chirp(settings.audio_seconds, 0.3, rng)
    size = settings.image_size
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": [
                {"type": "image", "image": Image.fromarray(pixels)},
                {"type": "audio", "audio": audio.astype(np.float32)},
                {"type": "text", "text": "What can you see and hear? Answer in one sentence."}]}]


def spoken_turn(settings: Settings) -> list[dict[str, Any]]:
    """System prompt + a user turn that is only audio, as a voice assistant gets it. The clip's
    loudest moment is at its start, so its early windows are final once spoken (a louder moment
    later would raise the log-mel floor and change them)."""
    audio = _chirp(settings.audio_seconds, 0.2, np.random.default_rng(1))
    audio[:3200] *= 3
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": [{"type": "audio", "audio": audio.astype(np.float32)}]}]


def random_codes(cfg: OmniConfig, frames: int, device: torch.device) -> torch.Tensor:
    """[1, G, frames] codec codes."""
    gen = torch.Generator().manual_seed(0)
    c = cfg.code2wav
    return torch.randint(0, c.codebook_size, (1, c.num_quantizers, frames), generator=gen
                         ).to(device)
