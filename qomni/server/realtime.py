"""The realtime voice WebSocket: `WS /v1/realtime?model=NAME`, in the OpenAI Realtime (GA and beta)
and DashScope Qwen-Omni-Realtime dialects.

One session, in order: the client streams PCM16 with `input_audio_buffer.append`; it becomes
16 kHz float32 in one buffer; with `turn_detection` `server_vad` a Silero VAD reads that buffer
and sends `speech_started` / `speech_stopped`; at the end of speech (or at the client's `commit`
when `turn_detection` is null) the segment becomes a user item of the conversation, and a response
runs the whole conversation (system prompt, earlier turns, this turn) through `Omni.astream`:
transcript/text deltas and base64 PCM16 audio deltas (at the vocoder's 24 kHz) stream back, then
`response.done` with usage.

This module is the route and the handshake. Beside it: `realtime_session.py` (event dispatch,
the response task, barge-in), `realtime_response.py` (one response: its JSON, usage, stream),
`realtime_prefill.py` (the model reading along while the user speaks), `realtime_config.py`
(the session parser, dialects and event names, the default prompt), `realtime_audio.py` (input
audio buffer, resampling, VAD), `realtime_conversation.py` (items, history, the prompt).

Barge-in: with `interrupt_response` (the default) `speech_started` during a response cancels it:
`response.done` with status `cancelled`, reason `turn_detected`. A turn that ends while a response
runs gets its own response when that one is done.

Handshake: a browser page's `Origin` must be allowed (origins.py); the API key (when the server
has one) as `Authorization: Bearer KEY`, the browser subprotocol `openai-insecure-api-key.KEY`,
or `?api_key=KEY`; `?model=` must name the served model. Refusals are HTTP 403/401/404/400/503
with OpenAI error JSON.

Limits: one WebSocket message at most `Limits.max_request_bytes`; the input buffer at most
`Limits.max_media_seconds` (see `realtime_audio.py`); an image at most `Limits.max_media_bytes`.
Bad input gets an `error` event and the socket stays open.

While the user speaks, the model reads along (`realtime_prefill.py`): the conversation so far,
then every finished audio-encoder window (8 s) of the turn, is prefilled before the turn ends.

Not done: input transcription events, tools, out-of-band responses,
`conversation.item.truncate` / `.retrieve` (answered with an `error` event).
"""

from __future__ import annotations

import hmac
import logging
import time

from fastapi import WebSocket
from fastapi.responses import JSONResponse

from qomni.server.realtime_config import DIALECTS, VOICE_ASSISTANT_PROMPT, handshake_dialect
from qomni.server.realtime_session import Session
from qomni.server.state import app_state
from qomni.server.wire import APIError

# VOICE_ASSISTANT_PROMPT is re-exported: the prompt clients are told about lives on this module.
__all__ = ["VOICE_ASSISTANT_PROMPT", "realtime"]

log = logging.getLogger("qomni.server.realtime")


async def realtime(ws: WebSocket) -> None:
    """`WS /v1/realtime`: the handshake's checks, then one `Session` until the socket closes."""
    state = app_state(ws)
    origin = ws.headers.get("origin")
    if not state.origins.allows(origin, ws.headers.get("host")):
        return await _deny(ws, state.origins.refusal(origin or ""))
    if state.api_key is not None:
        given = _given_key(ws) or ""
        if not hmac.compare_digest(given.encode(), state.api_key.encode()):
            return await _deny(ws, APIError(
                401, "invalid or missing API key (send 'Authorization: Bearer KEY' or "
                "?api_key=KEY)", code="invalid_api_key"))
    model = ws.query_params.get("model")
    if model is not None and model != state.name:
        return await _deny(ws, APIError(404, f"model {model!r} not found (this server "
                                        f"serves {state.name!r})", param="model",
                                        code="model_not_found"))
    offered = ws.scope.get("subprotocols") or []
    dialect = handshake_dialect(ws.query_params.get("dialect"),
                                ws.headers.get("openai-beta", ""), offered)
    if dialect is not None and dialect not in DIALECTS:
        return await _deny(ws, APIError(400, f"dialect must be one of {', '.join(DIALECTS)}",
                                        param="dialect"))
    if state.realtime_sessions >= state.limits.max_realtime_sessions:
        return await _deny(ws, APIError(
            503, f"{state.realtime_sessions} realtime sessions are open, this server's limit; "
            "retry later", code="server_busy"))
    state.realtime_sessions += 1
    try:
        await ws.accept(subprotocol="realtime" if "realtime" in offered else None)
        t0 = time.perf_counter()
        session = Session(ws, state, dialect)
        try:
            await session.run()
        finally:
            log.info("realtime session %s closed after %.1f s", session.id,
                     time.perf_counter() - t0)
    finally:
        state.realtime_sessions -= 1
        state.memory.request()  # what the session's turns took, back to the system


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
