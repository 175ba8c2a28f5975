"""One realtime session: the receive loop, event dispatch, the input audio and images, the
conversation, and the response task with barge-in (see realtime.py for the protocol)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from typing import Any, ClassVar

import numpy as np
from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect

from qomni.audio_out import pcm16
from qomni.events import AudioChunk, Finished, TextDelta
from qomni.multimodal.audio import MelCache
from qomni.server.realtime_audio import MODEL_RATE, InputAudioBuffer, SpeechStarted
from qomni.server.realtime_config import (
    RealtimeError,
    SessionParser,
    TurnDetection,
    check_dict,
    decode_b64,
    event_name,
    is_ga,
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
from qomni.server.realtime_prefill import TurnPrefill
from qomni.server.realtime_response import Response, as_realtime_error, open_stream, usage_json
from qomni.server.state import AppState
from qomni.server.wire import invalid_text, new_id

log = logging.getLogger("qomni.server.realtime")
BIG_EVENT_CHARS = 1 << 20


async def _parse_event(text: str) -> dict[str, Any]:
    """One client event: a JSON object (standard JSON). A large one is parsed on a worker
    thread, not on the event loop."""
    try:
        if len(text) > BIG_EVENT_CHARS:
            ev = await asyncio.to_thread(json.loads, text, parse_constant=_no_constant)
        else:
            ev = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise RealtimeError("the message is nested too deeply", code="invalid_json") from None
    except ValueError as e:
        raise RealtimeError(f"the message is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(ev, dict):
        raise RealtimeError("an event must be a JSON object", code="invalid_event")
    return ev


def _check_text(ev: dict[str, Any]) -> None:
    bad = invalid_text(ev)
    if bad is not None:
        path, index = bad
        raise RealtimeError(f"{path}: not valid Unicode text (a lone surrogate at character "
                            f"{index})", param=path, code="invalid_text")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class Session:
    def __init__(self, ws: WebSocket, state: AppState, dialect: str | None):
        self.ws, self.state, self.omni, self.limits = ws, state, state.omni, state.limits
        self.dialect = dialect
        self.parser = SessionParser(state.omni, state.limits)
        self.cfg = self.parser.default(dialect)
        self.id = new_id("sess_")
        self.conversation = Conversation()
        self.images: list[bytes] = []  # input_image_buffer frames for the next user turn
        self.audio = InputAudioBuffer(self.cfg.input_rate, self.cfg.turn_detection,
                                      state.limits.max_media_seconds)
        self.response: Response | None = None
        self.pending_response = False  # a VAD turn ended while a response was running
        self.mel = MelCache()  # the log-mel blocks of the session's audio, for every call
        self.prefill = TurnPrefill(state.omni, state.media, state.literal_text, self.mel)
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

    @property
    def ga(self) -> bool:
        return is_ga(self.dialect)

    def session_json(self) -> dict[str, Any]:
        return session_json(self.cfg, self.dialect, self.id, self.state.name)

    async def add_item(self, item: Item, after: str | None = "") -> None:
        """Insert `item` after the item `after` (see `Conversation.insert`) and announce it."""
        prev = self.conversation.insert(item, after)
        body = item_json(item, self.ga)
        await self.emit("conversation.item.created", previous_item_id=prev, item=body)
        if self.ga:
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
            await self.prefill.close()

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
            ev = await _parse_event(text)
            given = ev.get("event_id")
            event_id = given if isinstance(given, str) and invalid_text(given) is None else None
            _check_text(ev)  # every string of the event, once, before any handler reads it
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
        new = self.parser.parse(self.cfg, s, dialect)
        self.dialect, self.cfg = dialect, new
        self.audio.configure(new.input_rate, new.turn_detection)
        self.images = self.images[-new.max_image_frames:] if new.max_image_frames else []
        await self.emit("session.updated", session=self.session_json())

    # -- input audio and images -----------------------------------------------------------------

    async def on_audio_append(self, ev: dict[str, Any]) -> None:
        td = self.cfg.turn_detection
        if td is None and not self.prefill.active and self.response is None:
            self.prefill.open(self.messages(self.cfg.instructions))  # a manual turn starts
        await self._audio_events(ev, td)
        if self.response is None and self.prefill.active:
            self.prefill.grow(self.audio.turn_length(), self._turn_so_far)

    def _turn_so_far(self) -> list[dict[str, Any]] | None:
        """The conversation, then the turn being spoken so far (its images, its audio until
        now); None when no turn is under way."""
        audio = self.audio.turn_so_far()
        if audio is None:
            return None
        return [*self.messages(self.cfg.instructions),
                {"role": "user", "content": user_turn(self.images, [audio])}]

    async def _audio_events(self, ev: dict[str, Any], td: TurnDetection | None) -> None:
        for speech in self.audio.append(decode_b64(ev.get("audio"), "audio")):
            assert td is not None  # only server VAD finds speech
            if isinstance(speech, SpeechStarted):
                await self.emit("input_audio_buffer.speech_started",
                                audio_start_ms=speech.start * 1000 // MODEL_RATE,
                                item_id=speech.item_id)
                if td.interrupt_response and self.response is not None:
                    await self.cancel_response("turn_detected")
                if self.response is None:
                    self.prefill.open(self.messages(self.cfg.instructions))
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
        self.prefill.forget_turn()
        await self.emit("input_audio_buffer.cleared")

    async def on_image_append(self, ev: dict[str, Any]) -> None:
        data = decode_image(ev.get("image"), "image", self.state.media.max_bytes)
        if self.cfg.max_image_frames:
            self.images = [*self.images, data][-self.cfg.max_image_frames:]

    # -- conversation -------------------------------------------------------------------------

    async def on_item_create(self, ev: dict[str, Any]) -> None:
        item = item_from_event(ev.get("item"), self.images, self.cfg.input_rate, self.state.media)
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
        cfg = self.parser.parse(self.cfg, overrides, self.dialect, prefix="response")
        if not any(it.role == "user" for it in self.conversation.items):
            raise RealtimeError("the conversation has no user turn to answer yet",
                                code="conversation_empty")
        item = Item(new_id("item_"), "assistant", output_audio=cfg.output_audio,
                    status="in_progress")
        resp = Response(new_id("resp_"), item, cfg, self.messages(cfg.instructions))
        self.response = resp
        await self.emit("response.created", response=resp.to_json(self.ga, self.id))
        await self.emit("response.output_item.added", response_id=resp.id, output_index=0,
                        item=item_json(item, self.ga))
        await self.add_item(item)
        await self.emit("response.content_part.added", response_id=resp.id, item_id=item.id,
                        output_index=0, content_index=0, part=part_json(item, self.ga))
        resp.task = asyncio.create_task(self._run(resp))

    async def _run(self, resp: Response) -> None:
        """The one call into the model: the whole conversation through Omni.astream."""
        item, speak = resp.item, resp.cfg.output_audio
        base = {"response_id": resp.id, "item_id": item.id, "output_index": 0,
                "content_index": 0}
        try:
            events = await open_stream(self.omni, resp, await self.prefill.take(),
                                       self.conversation, self.messages, self.state.media,
                                       self.state.literal_text, self.mel)
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
            resp.end()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and hasattr(task, "uncancel"):
                task.uncancel()
            resp.status = "cancelled"
            resp.reason = resp.reason or "client_cancelled"
        except Exception as e:  # noqa: BLE001 - reported as a failed response
            resp.status = "failed"
            resp.error = as_realtime_error(e)
        await self._finish(resp, base)

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
        await self.emit("response.content_part.done", **base, part=part_json(item, self.ga))
        await self.emit("response.output_item.done", response_id=resp.id, output_index=0,
                        item=item_json(item, self.ga))
        if self.ga:
            await self.emit("conversation.item.done", item=item_json(item, self.ga))
        usage = await usage_json(resp, self.omni, self.state.media, self.state.literal_text)
        await self.emit("response.done", response=resp.to_json(self.ga, self.id, usage))
        self.response = None
        if self.pending_response and not self._closed:
            self.pending_response = False
            with contextlib.suppress(RealtimeError):
                await self.start_response({})

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
