"""The OpenAI chat-completions wire format: the request and response models, the error JSON,
and the streamed chunk. Nothing here touches the model."""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qomni.audio_out import AudioFormat
from qomni.sampling import SamplingParams


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


MAX_REPETITION_PENALTY = 10.0  # the same bound on every endpoint


# ---------------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {message, type, param, code}}` JSON."""

    def __init__(self, status: int, message: str, *, type: str | None = None,
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def validation_error(e: ValidationError, data: Any) -> APIError:
    """The most specific pydantic error as a 400, with `param` in OpenAI's `messages[0].content`
    style (pydantic's union-member labels, which the user never wrote, are left out)."""
    err = max(e.errors(include_url=False), key=lambda x: len(x["loc"]))
    param, node = "", data
    for k, seg in enumerate(err["loc"]):
        missing = err["type"] == "missing" and k == len(err["loc"]) - 1
        if isinstance(seg, int) and isinstance(node, list) and seg < len(node):
            param, node = param + f"[{seg}]", node[seg]
        elif isinstance(node, dict) and (seg in node or missing):
            param += f".{seg}" if param else str(seg)
            node = node.get(seg) if isinstance(node, dict) else None
    msg = "is required" if err["type"] == "missing" else err["msg"]
    code = "missing_required_param" if err["type"] == "missing" else "invalid_value"
    return APIError(400, f"{param or 'body'}: {msg}", param=param or None, code=code)


def invalid_text(data: Any) -> tuple[str, int] | None:
    """(path, index) of the first string in a parsed JSON document that is not valid Unicode
    text (a lone surrogate, which JSON's \\u escapes can write and no tokenizer takes), or
    None. Paths are written `messages[0].content`, as `param` is; keys are checked too."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:  # iterative: a deep document is fine here (json.loads bounds the depth)
        path, node = stack.pop()
        if isinstance(node, str):
            bad = _lone_surrogate(node)
            if bad is not None:
                return path, bad
        elif isinstance(node, dict):
            for k, v in reversed(node.items()):
                bad = _lone_surrogate(k)
                if bad is not None:
                    return path or "body", bad
                stack.append((f"{path}.{k}" if path else k, v))
        elif isinstance(node, list):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(node))))
    return None


def _lone_surrogate(s: str) -> int | None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def parse_json(raw: bytes | str) -> Any:
    """A request body or event: standard JSON (no NaN or Infinity), every string valid text."""
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise APIError(400, "the JSON is nested too deeply") from None
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    bad = invalid_text(data)
    if bad is not None:
        path, index = bad
        raise APIError(400, f"{path or 'body'}: not valid Unicode text (a lone surrogate at "
                       f"character {index})", param=path or None, code="invalid_text")
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# ---------------------------------------------------------------------------------- request


class _Loose(BaseModel):
    # OpenAI clients send many optional fields we do not use: unknown fields are ignored. Known
    # ones are strict: no "yes" for a boolean, no true for an integer.
    model_config = ConfigDict(extra="allow", strict=True)


class TextPart(_Loose):
    type: Literal["text"]
    text: str


class URLRef(_Loose):
    url: str


class ImageURLPart(_Loose):
    type: Literal["image_url"]
    image_url: URLRef | str


class AudioURLPart(_Loose):
    type: Literal["audio_url"]
    audio_url: URLRef | str


class VideoURLPart(_Loose):
    type: Literal["video_url"]
    video_url: URLRef | str


class InputAudio(_Loose):
    data: str
    format: str | None = None  # informative only: the container is sniffed from the bytes


class InputAudioPart(_Loose):
    type: Literal["input_audio"]
    input_audio: InputAudio


class ImagePart(_Loose):  # qomni / model-card style parts, accepted too
    type: Literal["image"]
    image: str


class AudioPart(_Loose):
    type: Literal["audio"]
    audio: str


class VideoPart(_Loose):
    type: Literal["video"]
    video: str


ContentPart = Annotated[
    TextPart | ImageURLPart | AudioURLPart | VideoURLPart | InputAudioPart | ImagePart | AudioPart
    | VideoPart, Field(discriminator="type")]


class FunctionCall(_Loose):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Loose):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class AudioRef(_Loose):
    id: str


class Message(_Loose):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    audio: AudioRef | None = None  # an earlier audio reply, referenced by id


class AudioParam(_Loose):
    voice: str | None = None
    format: AudioFormat = "wav"


class StreamOptions(_Loose):
    include_usage: bool = False


class FunctionDef(_Loose):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Loose):
    type: Literal["function"]
    function: FunctionDef


class ChatCompletionRequest(_Loose):
    model: str
    messages: list[Message] = Field(min_length=1)
    modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioParam | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    n: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto"] | dict[str, Any] | str | None = None
    # Extensions (vLLM / vLLM-Omni / qomni), sent by the openai client through `extra_body`.
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Any] | None = None
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0, le=MAX_REPETITION_PENALTY)
    max_audio_frames: int | None = Field(None, ge=1)
    speaker: str | None = None  # alias of audio.voice
    voice: str | None = None  # alias of audio.voice
    use_audio_in_video: bool | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @property
    def wants_audio(self) -> bool:
        return "audio" in (self.modalities or ["text"])

    @property
    def voice_name(self) -> str | None:
        return self.voice_field[1]

    @property
    def voice_field(self) -> tuple[str, str | None]:
        """(the field errors name, the voice asked for): `audio.voice`, else an alias."""
        for param, voice in (("audio.voice", self.audio.voice if self.audio else None),
                             ("speaker", self.speaker), ("voice", self.voice)):
            if voice:
                return param, voice
        return "audio.voice", None

    @property
    def audio_format(self) -> str:
        return self.audio.format if self.audio else "wav"

    @property
    def stop_strings(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stop):
            raise APIError(400, "stop: stop strings must not be empty", param="stop")
        if len(stop) > 16:
            raise APIError(400, "stop: at most 16 stop strings", param="stop")
        return stop

    @property
    def audio_in_video(self) -> bool:
        if self.use_audio_in_video is not None:
            return self.use_audio_in_video
        value = (self.mm_processor_kwargs or {}).get("use_audio_in_video", False)
        if not isinstance(value, bool):
            raise APIError(400, "mm_processor_kwargs.use_audio_in_video must be a boolean",
                           param="mm_processor_kwargs.use_audio_in_video")
        return value


def thinker_sampling(temperature: float | None, top_p: float | None = None,
                     top_k: int | None = None, repetition_penalty: float | None = None,
                     frequency_penalty: float | None = None,
                     presence_penalty: float | None = None) -> SamplingParams | None:
    """A request's sampling fields as the thinker's SamplingParams; None when none is set.
    No temperature (or 0) is greedy, the reference's default (OpenAI's 1 would sample), and
    the penalties still apply to it."""
    fields = (temperature, top_p, top_k, repetition_penalty, frequency_penalty,
              presence_penalty)
    if all(f is None for f in fields):
        return None
    return SamplingParams(temperature=temperature or 0.0, top_p=top_p or 1.0, top_k=top_k or 0,
                          repetition_penalty=repetition_penalty or 1.0,
                          frequency_penalty=frequency_penalty or 0.0,
                          presence_penalty=presence_penalty or 0.0)


def parse_request(data: Any) -> ChatCompletionRequest:
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        raise validation_error(e, data) from None


# ---------------------------------------------------------------------------------- responses


@dataclass
class UsageInfo:
    prompt_tokens: int
    completion_tokens: int
    audio_frames: int = 0

    def to_json(self) -> dict[str, Any]:
        # Codec frames (12.5 per second of speech) are reported as audio tokens; completion_tokens
        # counts text tokens only, the ones max_completion_tokens bounds.
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "completion_tokens_details": {"text_tokens": self.completion_tokens,
                                              "audio_tokens": self.audio_frames}}


class AudioOut(BaseModel):
    id: str
    data: str
    expires_at: int
    transcript: str


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    audio: AudioOut | None = None
    tool_calls: list[dict[str, Any]] | None = None


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: dict[str, Any]


def chunk(cid: str, model: str, created: int, delta: dict[str, Any] | None,
          finish_reason: str | None = None, usage: dict[str, Any] | None = None,
          with_usage: bool = False) -> dict[str, Any]:
    """One `chat.completion.chunk`; `delta=None` gives the usage-only chunk (no choices)."""
    out: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created,
                           "model": model, "choices": [] if delta is None else [
                               {"index": 0, "delta": delta, "finish_reason": finish_reason,
                                "logprobs": None}]}
    if with_usage:
        out["usage"] = usage
    return out
