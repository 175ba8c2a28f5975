"""One realtime response: its state, its JSON (`response.created` / `response.done`), its usage,
and how its model stream is opened (continuing the turn's prefix; while the engine refuses the
prompt as too long, the oldest exchange is dropped and the prompt rebuilt)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from qomni.events import AudioChunk, Finished, TextDelta
from qomni.multimodal.audio import MelCache
from qomni.multimodal.chat import PromptTooLong
from qomni.multimodal.media import MediaError, MediaPolicy
from qomni.omni import Omni
from qomni.prefix import PromptPrefix
from qomni.server.realtime_config import RealtimeError, SessionConfig, generate_options
from qomni.server.realtime_conversation import Conversation, Item, item_json

log = logging.getLogger("qomni.server.realtime")

Event = TextDelta | AudioChunk | Finished


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

    def end(self) -> None:
        """The stream is over: status and reason from how it finished."""
        reason = self.finished.reason if self.finished else "abort"
        self.status = {"stop": "completed", "length": "incomplete"}.get(reason, "cancelled")
        self.reason = {"length": "max_output_tokens", "abort": "client_cancelled"}.get(reason)

    def to_json(self, ga: bool, conversation_id: str, usage: dict[str, Any] | None = None
                ) -> dict[str, Any]:
        details = None
        if self.status in ("cancelled", "incomplete"):
            details = {"type": self.status, "reason": self.reason}
        elif self.status == "failed" and self.error is not None:
            details = {"type": "failed", "error": {"type": self.error.type,
                                                   "code": self.error.code,
                                                   "message": self.error.message}}
        cfg = self.cfg
        out = {"id": self.id, "object": "realtime.response", "status": self.status,
               "status_details": details,
               "output": [item_json(self.item, ga)] if self.status != "in_progress" else [],
               "usage": usage, "conversation_id": conversation_id,
               "max_output_tokens": cfg.max_tokens}
        if ga:
            out["output_modalities"] = ["audio"] if cfg.output_audio else ["text"]
            out["audio"] = {"output": {"format": {"type": "audio/pcm", "rate": cfg.output_rate},
                                       "voice": cfg.voice}}
        else:
            out["modalities"] = ["text", "audio"] if cfg.output_audio else ["text"]
            out["voice"] = cfg.voice
        return out


async def usage_json(resp: Response, omni: Omni, media: MediaPolicy, literal_text: bool
                     ) -> dict[str, Any]:
    if resp.finished is not None:
        u = resp.finished.usage
        prompt, text, frames = u.prompt_tokens, u.completion_tokens, u.audio_frames
        cached = u.cached_tokens
    else:  # stopped early: Omni.astream reports usage only at the end
        code2wav = omni.config.code2wav
        frame_seconds = code2wav.samples_per_frame / code2wav.sample_rate
        text, frames = resp.tokens, round(resp.audio_seconds / frame_seconds)
        cached = 0
        try:
            prompt = await asyncio.to_thread(lambda: len(omni.process(
                resp.messages, media=media, literal_text=literal_text)))
        except Exception:  # noqa: BLE001 - the prompt itself was the problem
            prompt = 0
    return {"total_tokens": prompt + text + frames, "input_tokens": prompt,
            "input_token_details": {"cached_tokens": cached},
            "output_tokens": text + frames,
            "output_token_details": {"text_tokens": text, "audio_tokens": frames}}


async def open_stream(omni: Omni, resp: Response, prefix: PromptPrefix | None,
                      conversation: Conversation,
                      messages: Callable[[str], list[dict[str, Any]]],
                      media: MediaPolicy, literal_text: bool, mel: MelCache | None = None
                      ) -> AsyncIterator[Event]:
    """Omni.astream on the response's conversation, started (continuing `prefix`); while the
    engine refuses the prompt as too long, the oldest exchange is dropped and the prompt
    rebuilt (`messages(instructions)`). `mel`: the session's log-mel blocks."""
    while True:
        options = generate_options(resp.cfg, media, literal_text)
        events = omni.astream(resp.messages, options=options, prefix=prefix, mel_cache=mel)
        try:
            first = await anext(events)
        except PromptTooLong:
            await events.aclose()
            if prefix is not None:  # free its row if no request took it over
                prefix.close()
                prefix = None
            if not conversation.drop_oldest_exchange():
                raise
            resp.messages = messages(resp.cfg.instructions)
            continue
        except BaseException:
            await events.aclose()
            if prefix is not None:
                prefix.close()
            raise
        return _prepend(first, events)


async def _prepend(first: Event, rest: AsyncIterator[Event]) -> AsyncIterator[Event]:
    try:
        yield first
        async for ev in rest:
            yield ev
    finally:
        await rest.aclose()


def as_realtime_error(e: BaseException) -> RealtimeError:
    if isinstance(e, RealtimeError):
        return e
    if isinstance(e, MediaError):
        return RealtimeError(str(e), code="invalid_media")
    if isinstance(e, ValueError):  # a prompt too long for the engine, a bad chat, ...
        return RealtimeError(str(e))
    log.error("realtime response failed", exc_info=e)
    return RealtimeError(f"internal server error ({type(e).__name__})", code="internal_error",
                         type="server_error")
