"""Frozen configuration for every component of a Qwen3-Omni checkpoint.

`OmniConfig.from_hf(dir_or_dict)` reads the checkpoint's config.json (the raw file as published,
with `rope_scaling`/`rope_theta`, or as re-saved by transformers 5, with `rope_parameters`).
Model code reads these dataclasses only: never raw dicts, never literal token ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A checkpoint's config.json is missing a required key or holds an impossible value."""


_MISSING = object()


class _Reader:
    """Reads keys from one section of config.json, naming the full key path in errors."""

    def __init__(self, data: Any, path: str):
        if not isinstance(data, dict):
            raise ConfigError(f"config.json: `{path}` must be an object, got {type(data).__name__}")
        self.data, self.path = data, path

    def __call__(self, key: str, default: Any = _MISSING, *aliases: str) -> Any:
        for k in (key, *aliases):
            if k in self.data and self.data[k] is not None:
                return self.data[k]
        if default is _MISSING:
            raise ConfigError(f"config.json: missing required key `{self.path}.{key}`")
        return default

    def sub(self, key: str) -> _Reader:
        return _Reader(self(key), f"{self.path}.{key}")

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def rope(self, default_theta: float) -> tuple[float, tuple[int, ...] | None]:
        """(theta, mrope_section) from `rope_parameters` (transformers 5) or `rope_scaling` +
        `rope_theta` (the raw official file)."""
        params = self.data.get("rope_parameters") or self.data.get("rope_scaling") or {}
        theta = float(params.get("rope_theta", self.data.get("rope_theta", default_theta)))
        section = params.get("mrope_section")
        return theta, tuple(int(s) for s in section) if section is not None else None


def _ints(value: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in value)


@dataclass(frozen=True)
class TextConfig:
    """A Qwen3-MoE decoder: the thinker LLM, or the talker trunk (which adds a shared expert)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    intermediate_size: int  # dense MLP width (`mlp_only_layers`); talker: its projections' width
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    shared_expert_intermediate_size: int = 0
    max_position_embeddings: int = 65536

    def is_moe_layer(self, i: int) -> bool:
        return (
            i not in self.mlp_only_layers
            and self.num_experts > 0
            and (i + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def from_hf(cls, r: _Reader) -> TextConfig:
        hidden, heads = int(r("hidden_size")), int(r("num_attention_heads"))
        theta, section = r.rope(1e6)
        head_dim = int(r("head_dim", hidden // heads))
        if section is None:
            raise ConfigError(f"config.json: `{r.path}` needs rope mrope_section (M-RoPE)")
        if 2 * sum(section) != head_dim:
            raise ConfigError(
                f"config.json: `{r.path}` mrope_section {list(section)} must sum to head_dim/2 "
                f"= {head_dim // 2}"
            )
        cfg = cls(
            vocab_size=int(r("vocab_size")),
            hidden_size=hidden,
            num_hidden_layers=int(r("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(r("num_key_value_heads")),
            head_dim=head_dim,
            rms_norm_eps=float(r("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            mrope_section=section,
            num_experts=int(r("num_experts", 0, "num_local_experts")),
            num_experts_per_tok=int(r("num_experts_per_tok")),
            moe_intermediate_size=int(r("moe_intermediate_size")),
            norm_topk_prob=bool(r("norm_topk_prob")),
            intermediate_size=int(r("intermediate_size", 0)),
            decoder_sparse_step=int(r("decoder_sparse_step", 1)),
            mlp_only_layers=_ints(r("mlp_only_layers", ())),
            shared_expert_intermediate_size=int(r("shared_expert_intermediate_size", 0)),
            max_position_embeddings=int(r("max_position_embeddings", 65536)),
        )
        if heads % cfg.num_key_value_heads:
            raise ConfigError(
                f"config.json: `{r.path}` num_attention_heads ({heads}) must be a multiple of "
                f"num_key_value_heads ({cfg.num_key_value_heads})"
            )
        if cfg.num_experts and not 0 < cfg.num_experts_per_tok <= cfg.num_experts:
            raise ConfigError(
                f"config.json: `{r.path}` num_experts_per_tok ({cfg.num_experts_per_tok}) must be "
                f"in 1..num_experts ({cfg.num_experts})"
            )
        return cfg


@dataclass(frozen=True)
class AudioConfig:
    """AuT audio encoder (`thinker.audio_tower`)."""

    num_mel_bins: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    d_model: int
    output_dim: int
    n_window: int
    n_window_infer: int
    conv_chunksize: int
    downsample_hidden_size: int
    max_source_positions: int
    activation_function: str = "gelu"

    @classmethod
    def from_hf(cls, r: _Reader) -> AudioConfig:
        return cls(
            num_mel_bins=int(r("num_mel_bins")),
            encoder_layers=int(r("encoder_layers")),
            encoder_attention_heads=int(r("encoder_attention_heads")),
            encoder_ffn_dim=int(r("encoder_ffn_dim")),
            d_model=int(r("d_model")),
            output_dim=int(r("output_dim")),
            n_window=int(r("n_window")),
            n_window_infer=int(r("n_window_infer")),
            conv_chunksize=int(r("conv_chunksize", 500)),
            downsample_hidden_size=int(r("downsample_hidden_size")),
            max_source_positions=int(r("max_source_positions", 1500)),
            activation_function=str(r("activation_function", "gelu")),
        )


@dataclass(frozen=True)
class VisionConfig:
    """Vision encoder (`thinker.visual`) with deepstack mergers."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    spatial_merge_size: int
    temporal_patch_size: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    @classmethod
    def from_hf(cls, r: _Reader) -> VisionConfig:
        return cls(
            depth=int(r("depth")),
            hidden_size=int(r("hidden_size")),
            intermediate_size=int(r("intermediate_size")),
            num_heads=int(r("num_heads")),
            in_channels=int(r("in_channels", 3)),
            patch_size=int(r("patch_size")),
            spatial_merge_size=int(r("spatial_merge_size")),
            temporal_patch_size=int(r("temporal_patch_size")),
            out_hidden_size=int(r("out_hidden_size")),
            num_position_embeddings=int(r("num_position_embeddings", 2304)),  # absent in the real file
            deepstack_visual_indexes=_ints(r("deepstack_visual_indexes")),
            hidden_act=str(r("hidden_act", "gelu_pytorch_tanh")),
            rope_theta=r.rope(10000.0)[0],
        )


@dataclass(frozen=True)
class ThinkerConfig:
    text: TextConfig
    audio: AudioConfig
    vision: VisionConfig
    position_id_per_seconds: float

    @classmethod
    def from_hf(cls, r: _Reader) -> ThinkerConfig:
        return cls(
            text=TextConfig.from_hf(r.sub("text_config")),
            audio=AudioConfig.from_hf(r.sub("audio_config")),
            vision=VisionConfig.from_hf(r.sub("vision_config")),
            position_id_per_seconds=float(r("position_id_per_seconds")),
        )


@dataclass(frozen=True)
class CodePredictorConfig:
    """Dense 1-D-RoPE decoder that predicts codebooks 1..G-1 of each frame."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    num_code_groups: int

    @classmethod
    def from_hf(cls, r: _Reader) -> CodePredictorConfig:
        hidden, heads = int(r("hidden_size")), int(r("num_attention_heads"))
        return cls(
            vocab_size=int(r("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(r("intermediate_size")),
            num_hidden_layers=int(r("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(r("num_key_value_heads")),
            head_dim=int(r("head_dim", hidden // heads)),
            rms_norm_eps=float(r("rms_norm_eps", 1e-6)),
            rope_theta=r.rope(10000.0)[0],
            num_code_groups=int(r("num_code_groups")),
        )


@dataclass(frozen=True)
class TalkerConfig:
    text: TextConfig
    code_predictor: CodePredictorConfig
    num_code_groups: int
    thinker_hidden_size: int
    accept_hidden_layer: int
    position_id_per_seconds: float
    spatial_merge_size: int
    codec_eos_token_id: int
    codec_pad_id: int
    codec_bos_id: int
    codec_nothink_id: int
    codec_think_bos_id: int
    codec_think_eos_id: int
    speaker_id: dict[str, int] = field(default_factory=dict)

    def speaker(self, name: str) -> int:
        """Codec id of a voice; names are case-insensitive."""
        key = name.strip().lower()
        if key not in self.speaker_id:
            known = ", ".join(sorted(s.capitalize() for s in self.speaker_id))
            raise ValueError(f"unknown voice {name!r}; available voices: {known}")
        return self.speaker_id[key]

    @classmethod
    def from_hf(cls, r: _Reader) -> TalkerConfig:
        speakers = r("speaker_id")
        if not isinstance(speakers, dict) or not speakers:
            raise ConfigError("config.json: `talker_config.speaker_id` must map voice names to ids")
        return cls(
            text=TextConfig.from_hf(r.sub("text_config")),
            code_predictor=CodePredictorConfig.from_hf(r.sub("code_predictor_config")),
            num_code_groups=int(r("num_code_groups")),
            thinker_hidden_size=int(r("thinker_hidden_size")),
            accept_hidden_layer=int(r("accept_hidden_layer")),
            position_id_per_seconds=float(r("position_id_per_seconds")),
            spatial_merge_size=int(r("spatial_merge_size")),
            codec_eos_token_id=int(r("codec_eos_token_id")),
            codec_pad_id=int(r("codec_pad_id")),
            codec_bos_id=int(r("codec_bos_id")),
            codec_nothink_id=int(r("codec_nothink_id")),
            codec_think_bos_id=int(r("codec_think_bos_id")),
            codec_think_eos_id=int(r("codec_think_eos_id")),
            speaker_id={str(k).lower(): int(v) for k, v in speakers.items()},
        )


@dataclass(frozen=True)
class Code2WavConfig:
    """Codec decoder: codes [G, F] -> 24 kHz waveform."""

    codebook_size: int
    num_quantizers: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    sliding_window: int
    rms_norm_eps: float
    rope_theta: float
    upsample_rates: tuple[int, ...]
    upsampling_ratios: tuple[int, ...]
    decoder_dim: int
    sample_rate: int = 24000

    @property
    def samples_per_frame(self) -> int:
        n = 1
        for r in (*self.upsample_rates, *self.upsampling_ratios):
            n *= r
        return n

    @classmethod
    def from_hf(cls, r: _Reader) -> Code2WavConfig:
        hidden, heads = int(r("hidden_size")), int(r("num_attention_heads"))
        return cls(
            codebook_size=int(r("codebook_size")),
            num_quantizers=int(r("num_quantizers")),
            hidden_size=hidden,
            num_hidden_layers=int(r("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(r("num_key_value_heads", heads)),
            head_dim=int(r("head_dim", hidden // heads)),
            intermediate_size=int(r("intermediate_size")),
            sliding_window=int(r("sliding_window")),
            rms_norm_eps=float(r("rms_norm_eps", 1e-5)),
            rope_theta=r.rope(10000.0)[0],
            upsample_rates=_ints(r("upsample_rates")),
            upsampling_ratios=_ints(r("upsampling_ratios")),
            decoder_dim=int(r("decoder_dim")),
        )


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids the code needs by meaning, read from config.json."""

    im_start: int
    im_end: int
    system: int
    user: int
    assistant: int
    tts_pad: int
    tts_bos: int
    tts_eos: int
    audio: int
    image: int
    video: int
    audio_start: int
    audio_end: int
    vision_start: int
    vision_end: int

    @classmethod
    def from_hf(cls, top: _Reader, thinker: _Reader) -> SpecialTokens:
        return cls(
            im_start=int(top("im_start_token_id")),
            im_end=int(top("im_end_token_id")),
            system=int(top("system_token_id")),
            user=int(top("user_token_id")),
            assistant=int(top("assistant_token_id")),
            tts_pad=int(top("tts_pad_token_id")),
            tts_bos=int(top("tts_bos_token_id")),
            tts_eos=int(top("tts_eos_token_id")),
            audio=int(thinker("audio_token_id")),
            image=int(thinker("image_token_id")),
            video=int(thinker("video_token_id")),
            audio_start=int(thinker("audio_start_token_id")),
            audio_end=int(thinker("audio_end_token_id")),
            vision_start=int(thinker("vision_start_token_id")),
            vision_end=int(thinker("vision_end_token_id")),
        )


@dataclass(frozen=True)
class OmniConfig:
    thinker: ThinkerConfig
    tokens: SpecialTokens
    talker: TalkerConfig | None
    code2wav: Code2WavConfig | None

    @property
    def has_audio_output(self) -> bool:
        return self.talker is not None

    @classmethod
    def from_hf(cls, source: str | Path | dict) -> OmniConfig:
        """Parse a checkpoint directory, a config.json path, or its already-loaded dict."""
        data = source if isinstance(source, dict) else _read_json(Path(source))
        top = _Reader(data, "config")
        thinker_r = top.sub("thinker_config")
        audio_out = bool(top("enable_audio_output", False))
        talker = code2wav = None
        if audio_out:
            talker = TalkerConfig.from_hf(top.sub("talker_config"))
            code2wav = Code2WavConfig.from_hf(top.sub("code2wav_config"))
        thinker = ThinkerConfig.from_hf(thinker_r)
        if talker is not None and talker.accept_hidden_layer > thinker.text.num_hidden_layers:
            raise ConfigError(
                f"config.json: talker_config.accept_hidden_layer ({talker.accept_hidden_layer}) "
                f"exceeds the thinker's {thinker.text.num_hidden_layers} layers"
            )
        return cls(
            thinker=thinker,
            tokens=SpecialTokens.from_hf(top, thinker_r),
            talker=talker,
            code2wav=code2wav,
        )


def _read_json(path: Path) -> dict:
    if path.is_dir():
        path = path / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"no config.json at {path}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


@dataclass(frozen=True)
class PreprocessorConfig:
    """preprocessor_config.json: Whisper log-mel features and the Qwen2-VL image processor.
    Defaults are the published values (identical in the Instruct, Thinking and Captioner repos)."""

    feature_size: int = 128
    sampling_rate: int = 16000
    hop_length: int = 160
    n_fft: int = 400
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 3136
    max_pixels: int = 12845056
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def from_file(cls, path: Path) -> PreprocessorConfig:
        file = path / "preprocessor_config.json" if path.is_dir() else path
        if not file.exists():
            return cls()
        data = _read_json(file)
        known = {f for f in cls.__dataclass_fields__}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**values)
