"""The realtime voice WebSocket: `WS /v1/realtime?model=NAME`, in the OpenAI Realtime (GA and beta)
and DashScope Qwen-Omni-Realtime dialects.

One session, in order: the client streams PCM16 with `input_audio_buffer.append`; it becomes
16 kHz float32 in one buffer; with `turn_detection` `server_vad` a Silero VAD reads that buffer
and sends `speech_started` / `speech_stopped`; at the end of speech (or at the client's `commit`
when `turn_detection` is null) the segment becomes a user item of the conversation, and a response
runs the whole conversation (system prompt, earlier turns, this turn) through `Omni.astream`:
transcript/text deltas and base64 PCM16 24 kHz audio deltas stream back, then `response.done`
with usage.

This module is the router and the session: the handshake, event dispatch, the response task and
barge-in. Beside it: `realtime_config.py` (settings, dialects and event names, the default
prompt), `realtime_audio.py` (input audio buffer, resampling, VAD), `realtime_conversation.py`
(items, history, the prompt).

Barge-in: with `interrupt_response` (the default) `speech_started` during a response cancels it:
`response.done` with status `cancelled`, reason `turn_detected`. A turn that ends while a response
runs gets its own response when that one is done.

Handshake: the API key (when the server has one) as `Authorization: Bearer KEY`, the browser
subprotocol `openai-insecure-api-key.KEY`, or `?api_key=KEY`; `?model=` must name the served
model. Refusals are HTTP 401/404/400 with OpenAI error JSON.

Limits: one WebSocket message at most `Limits.max_request_bytes`; the input buffer at most
`Limits.max_media_seconds` (see `realtime_audio.py`); an image at most `Limits.max_media_bytes`.
Bad input gets an `error` event and the socket stays open.

While the user speaks, the model reads along: when speech starts (or the first audio of a
manual turn arrives) the conversation so far is prefilled (`Omni.open_prefix`), and every time
an audio-encoder window of the turn (8 s) has all its samples, the turn so far is prefilled up
to that window, continuing the last prefix. The response then prefills only what is left (the
last, unfinished window and the assistant header); the engine checks that what it continues
is exactly what the whole turn gives (see docs/architecture.md, item 4).

Not done: input transcription events, tools, out-of-band responses,
`conversation.item.truncate` / `.retrieve` (answered with an `error` event).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from fastapi import APIRouter, WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect

from qomni.events import AudioChunk, Finished, TextDelta
from qomni.multimodal.media import MediaError
from qomni.server.protocol import APIError, pcm16
from qomni.server.realtime_audio import MODEL_RATE, InputAudioBuffer, SpeechStarted
from qomni.server.realtime_config import (
    DIALECTS,
    VOICE_ASSISTANT_PROMPT,
    RealtimeError,
    SessionConfig,
    Settings,
    check_dict,
    decode_b64,
    event_name,
    handshake_dialect,
    is_ga,
    new_id,
    sampling_kwargs,
    session_json,
    update_dialect,
)
from qomni.server.realtime_conversation import (
    Conversation,
    Item,
    decode_image,
    item_from_event,
    item_json,
    part_json,
    user_turn,
)

# VOICE_ASSISTANT_PROMPT is re-exported: the prompt clients are told about lives on this module.
__all__ = ["VOICE_ASSISTANT_PROMPT", "realtime_router"]

log = logging.getLogger("qomni.server.realtime")


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
        self.id = new_id("sess_")
        self.conversation = Conversation()
        self.images: list[bytes] = []  # input_image_buffer frames for the next user turn
        self.audio = InputAudioBuffer(self.cfg.input_rate, self.cfg.turn_detection,
                                      limits.max_media_seconds)
        self.response: Response | None = None
        self.pending_response = False  # a VAD turn ended while a response was running
        # The conversation so far and the finished audio windows of the turn being spoken,
        # prefilled while the user speaks (each new window continues the last prefix, the
        # response continues the last one; the engine checks that each still matches).
        self.prefix: asyncio.Task | None = None
        self.prefix_windows = 0  # finished windows of the current turn in self.prefix
        self._send_lock = asyncio.Lock()
        self._closed = False

    # -- wire ---------------------------------------------------------------------------------

    async def emit(self, type: str, **fields: Any) -> None:
        body = {"type": event_name(type, self.dialect), "event_id": new_id("event_"), **fields}
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
        return is_ga(self.dialect)

    def session_json(self) -> dict[str, Any]:
        return session_json(self.cfg, self.dialect, self.id, self.model_name)

    async def add_item(self, item: Item, after: str | None = "") -> None:
        """Insert `item` after the item `after` (see `Conversation.insert`) and announce it."""
        prev = self.conversation.insert(item, after)
        body = item_json(item, self._ga())
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
            prefix = await self._take_prefix()
            if prefix is not None:
                prefix.close()

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
        s = check_dict(ev.get("session"), "session")
        dialect = self.dialect or update_dialect(s)  # the first session.update decides
        new = self.settings.apply(self.cfg, s, dialect)
        self.dialect, self.cfg = dialect, new
        self.audio.configure(new.input_rate, new.turn_detection)
        self.images = self.images[-new.max_image_frames:] if new.max_image_frames else []
        await self.emit("session.updated", session=self.session_json())

    # -- input audio and images -----------------------------------------------------------------

    async def on_audio_append(self, ev: dict[str, Any]) -> None:
        td = self.cfg.turn_detection
        if td is None and self.prefix is None:  # manual turns: the first audio starts one
            self._open_prefix()
        await self._audio_events(ev, td)
        if self.response is None and self.prefix is not None:
            self._grow_prefix()

    async def _audio_events(self, ev: dict[str, Any], td: Any) -> None:
        for speech in self.audio.append(decode_b64(ev.get("audio"), "audio")):
            assert td is not None  # only server VAD finds speech
            if isinstance(speech, SpeechStarted):
                await self.emit("input_audio_buffer.speech_started",
                                audio_start_ms=speech.start * 1000 // MODEL_RATE,
                                item_id=speech.item_id)
                if td.interrupt_response and self.response is not None:
                    await self.cancel_response("turn_detected")
                if self.response is None:
                    self._open_prefix()
                continue
            await self.emit("input_audio_buffer.speech_stopped",
                            audio_end_ms=speech.end * 1000 // MODEL_RATE, item_id=speech.item_id)
            await self._commit(speech.audio, speech.item_id)
            if td.create_response:
                if self.response is None:
                    await self.start_response({})
                else:
                    self.pending_response = True

    async def on_audio_commit(self, ev: dict[str, Any]) -> None:
        item_id, audio = self.audio.commit()
        await self._commit(audio, item_id)

    async def _commit(self, audio: np.ndarray, item_id: str) -> None:
        await self.emit("input_audio_buffer.committed",
                        previous_item_id=self.conversation.last_id(), item_id=item_id)
        images, self.images = self.images, []
        await self.add_item(Item(item_id, "user", user_turn(images, [audio])))

    async def on_audio_clear(self, ev: dict[str, Any]) -> None:
        self.audio.clear()
        self.prefix_windows = 0  # the next prefix replaces one that holds the cleared audio
        await self.emit("input_audio_buffer.cleared")

    async def on_image_append(self, ev: dict[str, Any]) -> None:
        data = decode_image(ev.get("image"), "image", self.limits.max_media_bytes)
        if self.cfg.max_image_frames:
            self.images = [*self.images, data][-self.cfg.max_image_frames:]

    # -- conversation -------------------------------------------------------------------------

    async def on_item_create(self, ev: dict[str, Any]) -> None:
        item = item_from_event(ev.get("item"), self.images, self.cfg.input_rate, self.limits)
        if self.conversation.index(item.id) >= 0:
            raise RealtimeError(f"item id {item.id!r} already exists", param="item.id")
        if item.role == "user":
            self.images = []  # they are in this turn now
        after = ev.get("previous_item_id", "")
        await self.add_item(item, after if isinstance(after, str) or after is None else "")

    async def on_item_delete(self, ev: dict[str, Any]) -> None:
        item_id = ev.get("item_id")
        index = self.conversation.index(item_id)
        if index < 0:
            raise RealtimeError(f"item {item_id!r} is not in the conversation", param="item_id",
                                code="item_not_found")
        if self.response is not None and self.response.item is self.conversation.items[index]:
            raise RealtimeError("the item of the response in progress cannot be deleted",
                                param="item_id")
        del self.conversation.items[index]
        await self.emit("conversation.item.deleted", item_id=item_id)

    def messages(self, instructions: str) -> list[dict[str, Any]]:
        return self.conversation.messages(instructions, self.limits.max_media_items)

    # -- responses ----------------------------------------------------------------------------

    async def on_response_create(self, ev: dict[str, Any]) -> None:
        await self.start_response(check_dict(ev.get("response") or {}, "response"))

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
        if not any(it.role == "user" for it in self.conversation.items):
            raise RealtimeError("the conversation has no user turn to answer yet",
                                code="conversation_empty")
        item = Item(new_id("item_"), "assistant", output_audio=cfg.output_audio,
                    status="in_progress")
        resp = Response(new_id("resp_"), item, cfg, self.messages(cfg.instructions))
        self.response = resp
        await self.emit("response.created", response=self.response_json(resp))
        await self.emit("response.output_item.added", response_id=resp.id, output_index=0,
                        item=item_json(item, self._ga()))
        await self.add_item(item)
        await self.emit("response.content_part.added", response_id=resp.id, item_id=item.id,
                        output_index=0, content_index=0, part=part_json(item, self._ga()))
        resp.task = asyncio.create_task(self._run(resp))

    def response_json(self, resp: Response, usage: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
        details = None
        if resp.status in ("cancelled", "incomplete"):
            details = {"type": resp.status, "reason": resp.reason}
        elif resp.status == "failed" and resp.error is not None:
            details = {"type": "failed", "error": {"type": resp.error.type,
                                                   "code": resp.error.code,
                                                   "message": resp.error.message}}
        out = {"id": resp.id, "object": "realtime.response", "status": resp.status,
               "status_details": details,
               "output": ([item_json(resp.item, self._ga())] if resp.status != "in_progress"
                          else []),
               "usage": usage, "conversation_id": self.id, "max_output_tokens": resp.cfg.max_tokens}
        if self._ga():
            out["output_modalities"] = ["audio"] if resp.cfg.output_audio else ["text"]
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

    def _open_prefix(self, audio: np.ndarray | None = None) -> None:
        """Start prefilling the conversation so far, and with `audio` the turn being spoken up
        to its finished windows; the new prefix replaces the last (continuing its row when it
        starts with it)."""
        old, messages = self.prefix, self.messages(self.cfg.instructions)
        if audio is None:
            self.prefix_windows = 0
        else:
            messages = [*messages, {"role": "user", "content": user_turn(self.images, [audio])}]

        async def open_() -> Any:
            replaces = None
            if old is not None:
                with contextlib.suppress(BaseException):
                    replaces = await old
            return await asyncio.to_thread(self.omni.open_prefix, messages,
                                           partial=audio is not None, replaces=replaces)

        self.prefix = asyncio.ensure_future(open_())

    def _grow_prefix(self) -> None:
        """A new window of the turn being spoken has all its audio: prefill it now."""
        processor = self.omni.processor
        frames = self.audio.turn_length() // processor.pre.hop_length
        windows = processor.finished_audio_windows(frames)
        audio = self.audio.turn_so_far() if windows > self.prefix_windows else None
        if audio is not None:
            self.prefix_windows = windows
            self._open_prefix(audio)

    async def _take_prefix(self) -> Any:
        task, self.prefix, self.prefix_windows = self.prefix, None, 0
        if task is None:
            return None
        try:
            return await task
        except Exception:  # a prefix only saves time; the request goes without it
            log.warning("could not prefill the conversation ahead", exc_info=True)
            return None

    async def _open(self, resp: Response) -> Any:
        """Omni.astream on the conversation, started (continuing the prefix prefilled while the
        user spoke); while the engine refuses the prompt as too long, the oldest exchange is
        dropped and the prompt rebuilt."""
        prefix = await self._take_prefix()
        while True:
            kwargs = sampling_kwargs(resp.cfg)
            if prefix is not None:
                kwargs["prefix"] = prefix
            events = self.omni.astream(resp.messages, **kwargs)
            try:
                first = await anext(events)
            except ValueError as e:
                await events.aclose()
                if prefix is not None:  # free its row if no request took it over
                    prefix.close()
                    prefix = None
                if "the prompt has" not in str(e) or not self.conversation.drop_oldest_exchange():
                    raise
                resp.messages = self.messages(resp.cfg.instructions)
                continue
            except BaseException:
                await events.aclose()
                if prefix is not None:
                    prefix.close()
                raise
            return _prepend(first, events)

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
        await self.emit("response.content_part.done", **base, part=part_json(item, self._ga()))
        await self.emit("response.output_item.done", response_id=resp.id, output_index=0,
                        item=item_json(item, self._ga()))
        if self._ga():
            await self.emit("conversation.item.done", item=item_json(item, self._ga()))
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
            cached = u.cached_tokens
        else:  # stopped early: Omni.astream reports usage only at the end
            text, frames = resp.tokens, round(resp.audio_seconds / 0.08)  # 80 ms codec frames
            cached = 0
            try:
                prompt = await asyncio.to_thread(lambda: len(self.omni.process(resp.messages)))
            except Exception:  # noqa: BLE001 - the prompt itself was the problem
                prompt = 0
        return {"total_tokens": prompt + text + frames, "input_tokens": prompt,
                "input_token_details": {"cached_tokens": cached},
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
    open_sessions = 0

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
        offered = ws.scope.get("subprotocols") or []
        dialect = handshake_dialect(ws.query_params.get("dialect"),
                                    ws.headers.get("openai-beta", ""), offered)
        if dialect is not None and dialect not in DIALECTS:
            return await _deny(ws, APIError(400, f"dialect must be one of {', '.join(DIALECTS)}",
                                            param="dialect"))
        nonlocal open_sessions
        if open_sessions >= limits.max_realtime_sessions:
            return await _deny(ws, APIError(
                503, f"{open_sessions} realtime sessions are open, this server's limit; retry "
                "later", code="server_busy"))
        open_sessions += 1
        try:
            await ws.accept(subprotocol="realtime" if "realtime" in offered else None)
            t0 = time.perf_counter()
            session = Session(ws, omni, model_name, limits, dialect)
            try:
                await session.run()
            finally:
                log.info("realtime session %s closed after %.1f s", session.id,
                         time.perf_counter() - t0)
        finally:
            open_sessions -= 1

    return router
