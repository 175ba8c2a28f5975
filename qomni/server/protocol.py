"""The OpenAI chat-completions wire format: request and response models, error JSON, conversion of
OpenAI messages to qomni's conversation format, the Hermes tool-call parser, stop strings, and
speech encoding (wav, mp3, flac, opus, pcm16).

Nothing here touches the model; `http.py` wires it to the engine.
"""

from __future__ import annotations

import base64
import io
import json
import time
import uuid
import wave
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

AUDIO_FORMATS = ("wav", "mp3", "flac", "opus", "pcm16")
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


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


# ---------------------------------------------------------------------------------- request


class _Loose(BaseModel):
    # OpenAI clients send many optional fields we do not use; unknown fields are ignored.
    model_config = ConfigDict(extra="allow")


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
    format: Literal["wav", "mp3", "flac", "opus", "pcm16"] = "wav"


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
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
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
        return (self.audio.voice if self.audio else None) or self.speaker or self.voice

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


def parse_request(data: Any) -> ChatCompletionRequest:
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        raise validation_error(e, data) from None


# ----------------------------------------------------------------- messages -> qomni format

# resolve(kind, reference, param) -> the media's bytes (or decoded samples); raises on anything
# not allowed.
Resolver = Callable[[str, str, str], Any]


def count_media(messages: Sequence[Message]) -> int:
    return sum(1 for m in messages if isinstance(m.content, list)
               for p in m.content if not isinstance(p, TextPart))


def to_conversation(messages: Sequence[Message], resolve: Resolver, *,
                    transcripts: Callable[[str], str | None], tools: bool) -> list[dict]:
    """OpenAI messages -> the model card's conversation format. Media parts become
    {"type": "image"|"audio"|"video", kind: what `resolve` made of the reference}."""
    out = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        content: str | list[dict] = m.content if isinstance(m.content, str) else ""
        if isinstance(m.content, list):
            parts = [_part(p, resolve, f"messages[{i}].content[{j}]")
                     for j, p in enumerate(m.content)]
            if all(p["type"] == "text" for p in parts):
                content = "".join(p["text"] for p in parts)  # as OpenAI joins text parts
            elif role in ("assistant", "tool"):
                raise APIError(400, f"messages[{i}]: {role} messages can only hold text",
                               param=f"messages[{i}].content")
            elif role == "system" and tools and i == 0:
                raise APIError(400, "messages[0]: with tools, the system message must be text",
                               param="messages[0].content")
            else:
                content = parts
        if role == "assistant" and not content and m.audio is not None:
            content = transcripts(m.audio.id) or ""
        msg: dict[str, Any] = {"role": role, "content": content}
        if m.tool_calls:
            msg["tool_calls"] = [tc.model_dump(exclude_none=True) for tc in m.tool_calls]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def _url(ref: URLRef | str) -> str:
    return ref if isinstance(ref, str) else ref.url


def _part(p: BaseModel, resolve: Resolver, param: str) -> dict[str, Any]:
    if isinstance(p, TextPart):
        return {"type": "text", "text": p.text}
    if isinstance(p, InputAudioPart):
        data = p.input_audio.data.strip()
        # input_audio is base64 by definition; a data-URI prefix makes the loader decode it as
        # such instead of guessing (a short or odd string must never be taken for a file path).
        if not data.lower().startswith("data:"):
            data = "data:application/octet-stream;base64," + data
        return {"type": "audio", "audio": resolve("audio", data, f"{param}.input_audio.data")}
    kind, ref, field = {
        ImageURLPart: lambda: ("image", _url(p.image_url), "image_url"),
        AudioURLPart: lambda: ("audio", _url(p.audio_url), "audio_url"),
        VideoURLPart: lambda: ("video", _url(p.video_url), "video_url"),
        ImagePart: lambda: ("image", p.image, "image"),
        AudioPart: lambda: ("audio", p.audio, "audio"),
        VideoPart: lambda: ("video", p.video, "video"),
    }[type(p)]()
    return {"type": kind, kind: resolve(kind, ref, f"{param}.{field}")}


# ------------------------------------------------------------- tool calls and stop strings


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def parse_tool_call(block: str) -> dict[str, Any] | None:
    """The JSON inside one `<tool_call>...</tool_call>` block -> an OpenAI tool call, or None
    when it is not a {"name": str, "arguments": ...} object."""
    try:
        obj = json.loads(block.strip())
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return {"id": new_id("call_"), "type": "function",
            "function": {"name": obj["name"], "arguments": args}}


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Whole-text form of `OutputFilter` with tools on: (content, tool calls)."""
    f = OutputFilter(parse_tools=True)
    pieces = f.push(text) + f.finish()
    content = "".join(p for p in pieces if isinstance(p, str))
    calls = [p for p in pieces if isinstance(p, dict)]
    return (content.strip() if calls else content), calls


@dataclass
class Reasoning:
    """A piece of a Thinking model's reasoning (OpenAI-style `reasoning_content`)."""

    text: str


class ReasoningSplitter:
    """Splits a Thinking model's text into its reasoning and its answer, incrementally.

    The Thinking template's generation prompt leaves `<think>` to the model: everything before
    `</think>` is reasoning (a leading `<think>` is dropped), everything after is the answer.
    Partial tags, and whitespace that might end the reasoning, are held back until decided, so
    the joined pieces do not depend on how the text was chunked. `push` returns `Reasoning`
    pieces and answer strings; a reply cut before `</think>` is all reasoning.
    """

    def __init__(self) -> None:
        self.buf = ""
        self.opened = False  # past a possible leading <think>
        self.closed = False  # past </think>
        self.reasoning_started = False  # a non-blank reasoning character was sent
        self.answer_started = False  # a non-blank answer character was sent

    def push(self, text: str) -> list[Reasoning | str]:
        if self.closed:
            return self._answer(text)
        self.buf += text
        if not self.opened:
            head = self.buf.lstrip()
            if len(head) < len(THINK_OPEN) and THINK_OPEN.startswith(head):
                return []  # could still become "<think>"
            self.opened = True
            self.buf = head[len(THINK_OPEN):] if head.startswith(THINK_OPEN) else self.buf
        end = self.buf.find(THINK_CLOSE)
        if end >= 0:
            reasoning, rest = self.buf[:end], self.buf[end + len(THINK_CLOSE):]
            self.buf, self.closed = "", True
            return self._reasoning(reasoning.rstrip()) + self._answer(rest)
        keep = next((n for n in range(min(len(THINK_CLOSE) - 1, len(self.buf)), 0, -1)
                     if self.buf.endswith(THINK_CLOSE[:n])), 0)
        ready = self.buf[:len(self.buf) - keep]
        ready = ready.rstrip()  # trailing blanks wait: they may be the last before </think>
        self.buf = self.buf[len(ready):]
        return self._reasoning(ready)

    def finish(self) -> list[Reasoning | str]:
        out, self.buf = self.buf, ""
        return [] if self.closed else self._reasoning(out.rstrip())

    def _reasoning(self, text: str) -> list[Reasoning | str]:
        if not self.reasoning_started:
            text = text.lstrip()
            self.reasoning_started = bool(text)
        return [Reasoning(text)] if text else []

    def _answer(self, text: str) -> list[Reasoning | str]:
        if not self.answer_started:
            text = text.lstrip()
            self.answer_started = bool(text)
        return [text] if text else []


class OutputFilter:
    """Incremental tool-call parsing of the model's text. `push(delta)` returns pieces that are
    safe to emit: str (content) or dict (a complete OpenAI tool call). Text that could still
    become a `<tool_call>` tag is held back until it can be decided. Once a `<tool_call>` opens,
    `in_tools` is True; whitespace between calls is dropped. (Stop strings are the engine's:
    it cuts the text, and the speech, before them.)
    """

    def __init__(self, parse_tools: bool):
        self.markers = [TOOL_OPEN] if parse_tools else []
        self.buf = ""
        self.in_tools = False  # a tool call has started
        self._inside = False  # currently inside an unterminated <tool_call> block
        self._gap = ""  # whitespace before the open block: dropped unless the block is not JSON

    def push(self, text: str) -> list[str | dict]:
        self.buf += text
        out: list[str | dict] = []
        while self.buf:
            if self._inside:
                end = self.buf.find(TOOL_CLOSE)
                if end < 0:
                    break
                self._emit_call(self.buf[:end], out)
                self.buf, self._inside = self.buf[end + len(TOOL_CLOSE):], False
                continue
            i = self.buf.find(TOOL_OPEN) if self.markers else -1
            if i < 0:
                keep = self._partial_tail()
                self._content(self.buf[:len(self.buf) - keep], out)
                self.buf = self.buf[len(self.buf) - keep:]
                break
            head = self.buf[:i].rstrip()
            self._content(head, out)
            self._gap = self.buf[len(head):i]
            self.buf, self._inside, self.in_tools = self.buf[i + len(TOOL_OPEN):], True, True
        return out

    def finish(self) -> list[str | dict]:
        """Flush what is held back at the end of generation (an unterminated tool call is
        parsed if it is complete JSON, else returned as text)."""
        out: list[str | dict] = []
        if self._inside:
            if parse_tool_call(self.buf) is not None:
                self._emit_call(self.buf, out)
            else:
                out.append(self._gap + TOOL_OPEN + self.buf)
        else:
            self._content(self.buf, out)
        self.buf, self._inside = "", False
        return out

    def _content(self, text: str, out: list) -> None:
        if text and not (self.in_tools and not text.strip()):
            out.append(text)

    def _emit_call(self, block: str, out: list) -> None:
        call = parse_tool_call(block)
        out.append(call if call is not None else self._gap + TOOL_OPEN + block + TOOL_CLOSE)

    def _partial_tail(self) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some marker (with
        tools, plus the whitespace before it: that belongs to no one if a tool call follows)."""
        best = 0
        for m in self.markers:
            for n in range(min(len(m) - 1, len(self.buf)), best, -1):
                if self.buf.endswith(m[:n]):
                    best = n
                    break
        if TOOL_OPEN in self.markers:
            head = self.buf[:len(self.buf) - best]
            best += len(head) - len(head.rstrip())
        return best


# ---------------------------------------------------------------------------------- audio


def pcm16(pcm: np.ndarray) -> np.ndarray:
    """float32 [-1, 1] -> little-endian int16 (clipped, rounded)."""
    return np.clip(np.round(np.asarray(pcm, np.float32) * 32767.0), -32768, 32767).astype("<i2")


_AV_CODECS = {"mp3": ("libmp3lame", "mp3"), "flac": ("flac", "flac"), "opus": ("libopus", "ogg")}


def encode_audio(pcm: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """Mono float32 samples -> bytes of `fmt` (one of AUDIO_FORMATS)."""
    samples = pcm16(pcm)
    if fmt == "pcm16":
        return samples.tobytes()
    if fmt == "wav":
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(sample_rate)
            w.writeframes(samples.tobytes())
        return buf.getvalue()
    if fmt not in _AV_CODECS:
        raise ValueError(f"unknown audio format {fmt!r}; choose one of {', '.join(AUDIO_FORMATS)}")
    import av  # a core dependency (media decoding); the encoders ship with its wheels

    codec, container = _AV_CODECS[fmt]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=sample_rate, layout="mono")
        if samples.size:
            frame = av.AudioFrame.from_ndarray(samples[None, :], format="s16", layout="mono")
            frame.sample_rate = sample_rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


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
