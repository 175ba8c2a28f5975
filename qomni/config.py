"""Frozen configuration for every component of a Qwen3-Omni checkpoint.

`OmniConfig.from_hf(dir_or_dict)` reads the checkpoint's config.json (the raw file as published,
with `rope_scaling`/`rope_theta`, or as re-saved by transformers 5, with `rope_parameters`).
Model code reads these dataclasses only: never raw dicts, never literal token ids.

Each field is read from the config.json key of its name (or as its `key(...)` metadata says)
and converted to its annotated type; a field without a default is required. Defaults live in the
dataclasses only.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A checkpoint's config.json is missing a required key or holds an impossible value."""


class _Reader:
    """One section of config.json, naming the full key path in errors."""

    def __init__(self, data: Any, path: str):
        if not isinstance(data, dict):
            raise ConfigError(f"config.json: `{path}` must be an object, got {type(data).__name__}")
        self.data, self.path = data, path

    def get(self, *keys: str) -> Any:
        """The value of the first of `keys` present and not null (a dotted key walks into
        sub-sections), else MISSING."""
        for k in keys:
            node = self.data
            for part in k.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:
                return node
        return MISSING

    def sub(self, key: str) -> _Reader:
        value = self.get(key)
        if value is MISSING:
            raise ConfigError(f"config.json: missing required key `{self.path}.{key}`")
        return _Reader(value, f"{self.path}.{key}")

    def rope(self) -> dict:
        """`rope_parameters` (transformers 5) or `rope_scaling` (the raw official file)."""
        return self.data.get("rope_parameters") or self.data.get("rope_scaling") or {}


def key(*names: str, read: Callable[[_Reader], Any] | None = None,
        derive: Callable[[dict[str, Any]], Any] | None = None,
        convert: Callable[[Any, str], Any] | None = None) -> dict[str, Any]:
    """Field metadata: read the field from config.json under the first present of `names`
    (default: the field's name), or by `read(section)`; when absent: its default, else
    `derive(fields read so far)`, else a missing-key error. `convert(value, path)` replaces the
    conversion to the field's annotated type."""
    return {"names": names, "read": read, "derive": derive, "convert": convert}


def read_config(cls: type[T], r: _Reader) -> T:
    """Build dataclass `cls` from section `r`, nested dataclass fields from sub-sections; calls
    `check(path)` on the result when the class defines one."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in fields(cls):
        meta, tp = f.metadata, hints[f.name]
        names = meta.get("names") or (f.name,)
        if is_dataclass(tp):
            values[f.name] = read_config(tp, r.sub(names[0]))
            continue
        value = meta["read"](r) if meta.get("read") else r.get(*names)
        path = f"{r.path}.{names[0]}"
        if value is not MISSING:
            convert = meta.get("convert") or _converter(tp)
            values[f.name] = convert(value, path)
        elif f.default is MISSING and f.default_factory is MISSING:
            if not meta.get("derive"):
                raise ConfigError(f"config.json: missing required key `{path}`")
            values[f.name] = meta["derive"](values)
    cfg = cls(**values)
    if hasattr(cfg, "check"):
        cfg.check(r.path)
    return cfg


def _converter(tp: Any) -> Callable[[Any, str], Any]:
    """int, float, bool, str, or a tuple of one of them (from a JSON list)."""
    many = typing.get_origin(tp) is tuple
    scalar = typing.get_args(tp)[0] if many else tp
    kind = f"a list of {scalar.__name__}" if many else scalar.__name__

    def convert(value: Any, path: str) -> Any:
        try:
            return tuple(scalar(v) for v in value) if many else scalar(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config.json: `{path}` must be {kind}, got {value!r}") from None
    return convert


def _rope_theta(r: _Reader) -> Any:
    return r.rope().get("rope_theta", r.get("rope_theta"))


def _mrope_section(r: _Reader) -> Any:
    section = r.rope().get("mrope_section")
    if section is None:
        raise ConfigError(f"config.json: `{r.path}` needs rope mrope_section (M-RoPE)")
    return section


def _head_dim(v: dict[str, Any]) -> int:
    return v["hidden_size"] // v["num_attention_heads"]


@dataclass(frozen=True, kw_only=True)
class _Decoder:
    """What every transformer stack here has: width, depth, attention heads and RoPE base."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = field(metadata=key(derive=_head_dim))
    rms_norm_eps: float = 1e-6
    rope_theta: float = field(default=10000.0, metadata=key(read=_rope_theta))


@dataclass(frozen=True, kw_only=True)
class TextConfig(_Decoder):
    """A Qwen3-MoE decoder: the thinker LLM, or the talker trunk (which adds a shared expert)."""

    vocab_size: int
    rope_theta: float = field(default=1e6, metadata=key(read=_rope_theta))
    mrope_section: tuple[int, ...] = field(metadata=key(read=_mrope_section))
    num_experts: int = field(default=0, metadata=key("num_experts", "num_local_experts"))
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    # dense MLP width (`mlp_only_layers`); talker: its projections' width
    intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    shared_expert_intermediate_size: int = 0

    def is_moe_layer(self, i: int) -> bool:
        return (
            i not in self.mlp_only_layers
            and self.num_experts > 0
            and (i + 1) % self.decoder_sparse_step == 0
        )

    def check(self, path: str) -> None:
        if 2 * sum(self.mrope_section) != self.head_dim:
            raise ConfigError(
                f"config.json: `{path}` mrope_section {list(self.mrope_section)} must sum to "
                f"head_dim/2 = {self.head_dim // 2}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config.json: `{path}` num_attention_heads ({self.num_attention_heads}) must be "
                f"a multiple of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"config.json: `{path}` num_experts_per_tok ({self.num_experts_per_tok}) must be "
                f"in 1..num_experts ({self.num_experts})"
            )


@dataclass(frozen=True, kw_only=True)
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
    conv_chunksize: int = 500
    downsample_hidden_size: int
    activation_function: str = "gelu"


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """Vision encoder (`thinker.visual`) with deepstack mergers."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int = 3
    patch_size: int
    spatial_merge_size: int
    temporal_patch_size: int
    out_hidden_size: int
    num_position_embeddings: int = 2304  # absent in the real file
    deepstack_visual_indexes: tuple[int, ...]
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = field(default=10000.0, metadata=key(read=_rope_theta))


@dataclass(frozen=True, kw_only=True)
class ThinkerConfig:
    text: TextConfig = field(metadata=key("text_config"))
    audio: AudioConfig = field(metadata=key("audio_config"))
    vision: VisionConfig = field(metadata=key("vision_config"))
    position_id_per_seconds: float


@dataclass(frozen=True, kw_only=True)
class CodePredictorConfig(_Decoder):
    """Dense 1-D-RoPE decoder that predicts codebooks 1..G-1 of each frame."""

    vocab_size: int
    intermediate_size: int
    num_code_groups: int


def _speakers(value: Any, path: str) -> dict[str, int]:
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"config.json: `{path}` must map voice names to ids")
    return {str(k).lower(): int(v) for k, v in value.items()}


@dataclass(frozen=True, kw_only=True)
class TalkerConfig:
    text: TextConfig = field(metadata=key("text_config"))
    code_predictor: CodePredictorConfig = field(metadata=key("code_predictor_config"))
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
    speaker_id: dict[str, int] = field(metadata=key(convert=_speakers))

    def speaker(self, name: str) -> int:
        """Codec id of a voice; names are case-insensitive."""
        voice = name.strip().lower()
        if voice not in self.speaker_id:
            known = ", ".join(sorted(s.capitalize() for s in self.speaker_id))
            raise ValueError(f"unknown voice {name!r}; available voices: {known}")
        return self.speaker_id[voice]


@dataclass(frozen=True, kw_only=True)
class Code2WavConfig(_Decoder):
    """Codec decoder: codes [G, F] -> 24 kHz waveform."""

    num_key_value_heads: int = field(metadata=key(derive=lambda v: v["num_attention_heads"]))
    rms_norm_eps: float = 1e-5
    codebook_size: int
    num_quantizers: int
    intermediate_size: int
    sliding_window: int
    upsample_rates: tuple[int, ...]
    upsampling_ratios: tuple[int, ...]
    decoder_dim: int
    sample_rate: ClassVar[int] = 24000  # fixed by the codec; not in config.json

    @property
    def samples_per_frame(self) -> int:
        n = 1
        for r in (*self.upsample_rates, *self.upsampling_ratios):
            n *= r
        return n


@dataclass(frozen=True, kw_only=True)
class SpecialTokens:
    """Token ids the code needs by meaning, read from config.json."""

    im_start: int = field(metadata=key("im_start_token_id"))
    im_end: int = field(metadata=key("im_end_token_id"))
    system: int = field(metadata=key("system_token_id"))
    user: int = field(metadata=key("user_token_id"))
    assistant: int = field(metadata=key("assistant_token_id"))
    tts_pad: int = field(metadata=key("tts_pad_token_id"))
    tts_bos: int = field(metadata=key("tts_bos_token_id"))
    tts_eos: int = field(metadata=key("tts_eos_token_id"))
    audio: int = field(metadata=key("thinker_config.audio_token_id"))
    image: int = field(metadata=key("thinker_config.image_token_id"))
    video: int = field(metadata=key("thinker_config.video_token_id"))
    audio_start: int = field(metadata=key("thinker_config.audio_start_token_id"))
    audio_end: int = field(metadata=key("thinker_config.audio_end_token_id"))
    vision_start: int = field(metadata=key("thinker_config.vision_start_token_id"))
    vision_end: int = field(metadata=key("thinker_config.vision_end_token_id"))


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
        talker = code2wav = None
        audio_out = top.get("enable_audio_output")
        if audio_out is not MISSING and audio_out:
            talker = read_config(TalkerConfig, top.sub("talker_config"))
            code2wav = read_config(Code2WavConfig, top.sub("code2wav_config"))
        thinker = read_config(ThinkerConfig, top.sub("thinker_config"))
        if talker is not None and talker.accept_hidden_layer > thinker.text.num_hidden_layers:
            raise ConfigError(
                f"config.json: talker_config.accept_hidden_layer ({talker.accept_hidden_layer}) "
                f"exceeds the thinker's {thinker.text.num_hidden_layers} layers"
            )
        return cls(thinker=thinker, tokens=read_config(SpecialTokens, top), talker=talker,
                   code2wav=code2wav)


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


@dataclass(frozen=True, kw_only=True)
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
        return read_config(cls, _Reader(_read_json(file), file.name))
