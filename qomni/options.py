"""What one request asks for: `GenerateOptions`, the parameters of `Omni.generate`, `stream` and
`astream` (given as keywords or as one `options=` object), each checked once, here."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qomni.multimodal.audio import MelCache
from qomni.multimodal.media import MediaPolicy
from qomni.prefix import PromptPrefix
from qomni.sampling import SamplingParams


@dataclass(frozen=True)
class GenerateOptions:
    """max_new_tokens: cap on generated text tokens. sampling: the thinker's (None: greedy, as
    the reference). talker_sampling: the talker's (None: the checkpoint's defaults;
    temperature 0 makes talker and code predictor greedy). speaker: the voice (None: Ethan).
    return_audio: speak too (None: when the talker is loaded). max_audio_frames: cap on codec
    frames of 80 ms (None: the checkpoint's talker_max_new_tokens). seed: seeds both samplers
    unless their params carry one. stop: strings that end the text (cut before them,
    finish_reason "stop"); the speech says exactly the text before them. speech_stop: strings
    where the speech ends while the text goes on (e.g. "<tool_call>"). prefix: an
    `Omni.open_prefix` result whose tokens begin this prompt (one conversation).

    The prompt: use_audio_in_video (a video's sound track is its audio), tools (function
    schemas for the chat template), chat_template_kwargs (the template's other variables,
    e.g. {"enable_thinking": False}), media (a `MediaPolicy` for this request's media
    references; None: the processor's), literal_text (control-token strings such as
    `<|im_start|>` in the messages' text are plain text, not control tokens: the server's
    default; the reference parses them). mel_cache: a `MelCache` of the caller's audio, for a
    caller that sends the same audio again (a realtime session: each turn repeats the earlier
    ones)."""

    max_new_tokens: int = 1024
    sampling: SamplingParams | None = None
    talker_sampling: SamplingParams | None = None
    speaker: str | None = None
    return_audio: bool | None = None
    max_audio_frames: int | None = None
    use_audio_in_video: bool = False
    seed: int | None = None
    stop: Sequence[str] = ()
    speech_stop: Sequence[str] = ()
    prefix: PromptPrefix | None = None
    tools: Sequence[Mapping[str, Any]] | None = None
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    media: MediaPolicy | None = None
    literal_text: bool = False
    mel_cache: MelCache | None = None

    def __post_init__(self) -> None:
        _int("max_new_tokens", self.max_new_tokens)
        _int("max_audio_frames", self.max_audio_frames, optional=True)
        _int("seed", self.seed, optional=True, least=None)
        for name in ("sampling", "talker_sampling"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, SamplingParams):
                raise ValueError(f"{name} must be a SamplingParams, got {type(value).__name__}")
        for name in ("return_audio", "use_audio_in_video", "literal_text"):
            value = getattr(self, name)
            if not isinstance(value, bool) and (value is not None or name != "return_audio"):
                raise ValueError(f"{name} must be a boolean, got {value!r}")
        if self.speaker is not None and not (isinstance(self.speaker, str) and self.speaker):
            raise ValueError(f"speaker must be a voice name, got {self.speaker!r}")
        if self.mel_cache is not None and not isinstance(self.mel_cache, MelCache):
            raise ValueError(f"mel_cache must be a MelCache, got {type(self.mel_cache).__name__}")
        if self.media is not None and not isinstance(self.media, MediaPolicy):
            raise ValueError(f"media must be a MediaPolicy, got {type(self.media).__name__}")
        if self.prefix is not None and not isinstance(self.prefix, PromptPrefix):
            raise ValueError("prefix must come from Omni.open_prefix, "
                             f"got {type(self.prefix).__name__}")
        object.__setattr__(self, "stop", _strings("stop", self.stop))
        object.__setattr__(self, "speech_stop", _strings("speech_stop", self.speech_stop))
        if self.tools is not None:
            if isinstance(self.tools, (str, Mapping)) or not isinstance(self.tools, Sequence) \
                    or not all(isinstance(t, Mapping) for t in self.tools):
                raise ValueError(f"tools must be a list of objects, got {self.tools!r}")
            object.__setattr__(self, "tools", tuple(self.tools))
        kw = self.chat_template_kwargs
        if not isinstance(kw, Mapping) or not all(isinstance(k, str) for k in kw):
            raise ValueError(f"chat_template_kwargs must map names to values, got {kw!r}")
        taken = {"messages", "tools", "add_generation_prompt", "media", "literal_text",
                 "max_model_len", "mel_cache", "cancel"} & set(kw)
        if taken:
            raise ValueError(f"chat_template_kwargs cannot set {', '.join(sorted(taken))}")
        object.__setattr__(self, "chat_template_kwargs", dict(kw))
        if self.sampling is not None and self.sampling.min_tokens > self.max_new_tokens:
            raise ValueError(f"sampling.min_tokens ({self.sampling.min_tokens}) is more than "
                             f"max_new_tokens ({self.max_new_tokens})")

    @classmethod
    def build(cls, options: GenerateOptions | None = None, caller: str = "generate",
              **overrides: Any) -> GenerateOptions:
        """`options` (or the defaults) with the keywords given changed; an unknown keyword is a
        TypeError naming it."""
        if options is not None and not isinstance(options, GenerateOptions):
            raise TypeError(f"options must be a GenerateOptions, got {type(options).__name__}")
        unknown = sorted(set(overrides) - _FIELDS)
        if unknown:
            raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r} "
                            "(chat template variables go in chat_template_kwargs)")
        if options is None:
            return cls(**overrides)
        return dataclasses.replace(options, **overrides) if overrides else options

    def template_kwargs(self) -> dict[str, Any]:
        """What `Processor` takes besides the messages: the template's variables,
        use_audio_in_video, the media policy, literal_text and the mel cache."""
        kw: dict[str, Any] = {**self.chat_template_kwargs,
                              "use_audio_in_video": self.use_audio_in_video}
        if self.tools is not None:
            kw["tools"] = list(self.tools)
        if self.media is not None:
            kw["media"] = self.media
        if self.literal_text:
            kw["literal_text"] = True
        if self.mel_cache is not None:
            kw["mel_cache"] = self.mel_cache
        return kw


_FIELDS = frozenset(f.name for f in dataclasses.fields(GenerateOptions))


def _int(name: str, value: Any, optional: bool = False, least: int | None = 1) -> None:
    if value is None and optional:
        return
    integer = isinstance(value, int) and not isinstance(value, bool)
    if not integer:  # a bad value, as out of range is: both are the caller's ValueError
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if least is not None and value < least:
        raise ValueError(f"{name} must be >= {least}, got {value}")


def _strings(name: str, value: Any) -> tuple[str, ...]:
    values = (value,) if isinstance(value, str) else tuple(value) \
        if isinstance(value, Sequence) else None
    if values is None or not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"{name} must be non-empty strings, got {value!r}")
    return values
