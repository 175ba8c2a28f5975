"""The OpenAI-compatible HTTP server: `create_app(omni, ...)` builds the FastAPI app.

One request, in order: the body-size guard reads at most `max_request_bytes`; the API key is
checked; the JSON is validated (protocol.py); every media item is checked and read here (remote
URLs only when allowed, local paths only under the allowed folder, size capped); then the
request streams from `Omni.astream` (the engine batches concurrent requests) and its events are
turned into one response or an SSE stream. Every failure is an OpenAI error JSON; nothing a
client sends can stop the server from answering the next request.

Defaults that differ from OpenAI's, on purpose:
- no `temperature` means the model's reference default, a greedy thinker (OpenAI samples at 1);
  `temperature` > 0 samples with `top_p` (and the `top_k`, `repetition_penalty` extensions).
  The talker always uses the checkpoint's sampling defaults, seeded by `seed`.
- no `modalities` means text only, as OpenAI (vLLM-Omni answers with text and audio).
- with audio, the text is in `message.content` *and* `message.audio.transcript`; streamed
  speech is base64 PCM16 at 24 kHz in `delta.audio.data` whatever `audio.format` says.
- usage: `completion_tokens` counts text tokens; codec frames (12.5 per second of speech) are
  `completion_tokens_details.audio_tokens`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from qomni.events import AudioChunk, Finished, TextDelta
from qomni.multimodal.audio import load_audio
from qomni.multimodal.media import MediaError, read_media_bytes
from qomni.sampling import SamplingParams
from qomni.server.protocol import (
    TOOL_OPEN,
    APIError,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    OutputFilter,
    Reasoning,
    ReasoningSplitter,
    ResponseMessage,
    UsageInfo,
    b64,
    chunk,
    count_media,
    encode_audio,
    new_id,
    parse_request,
    pcm16,
    to_conversation,
)
from qomni.server.realtime import realtime_router

log = logging.getLogger("qomni.server")

STATIC = Path(__file__).parent / "static"  # the web demo, served at / and /static/
AUDIO_TTL_S = 3600  # how long an audio id's transcript is kept for later turns (expires_at)


@dataclass
class Limits:
    max_request_bytes: int = 64 * 1024 * 1024  # the whole HTTP body (base64 media included)
    max_media_items: int = 16  # media parts per request
    max_media_bytes: int = 48 * 1024 * 1024  # one decoded media item
    max_media_seconds: float = 600.0  # one audio or video item's duration
    media_timeout_s: float = 30.0  # one remote download
    max_tokens: int = 8192  # the largest max_tokens a request may ask for
    default_max_tokens: int = 1024  # when the request gives none (Omni.generate's default)
    max_pending: int = 64  # requests queued or running; more get 503
    max_realtime_sessions: int = 32  # open realtime sockets; more are refused with 503


def configure_media(omni: Any, *, allow_remote: bool, local_root: str | os.PathLike | None,
                    limits: Limits) -> None:
    """Media rules for the processor's loaders (`resolve_media` options). Defence in depth: the
    server already checks and reads every item itself before the model sees the request."""
    omni.processor.media_options.update(
        allow_remote=allow_remote, allow_local=local_root is not None,
        local_root=str(local_root) if local_root is not None else None,
        max_bytes=limits.max_media_bytes, timeout=limits.media_timeout_s)
    omni.processor.max_media_seconds = limits.max_media_seconds


# ---------------------------------------------------------------------------------- the model


@dataclass
class Job:
    """One prepared request: what `Omni.stream` gets."""

    messages: list[dict]
    kwargs: dict[str, Any] = field(default_factory=dict)


class ModelWorker:
    """Admission in front of the engine. At most `max_pending` requests are queued or running
    (more get 503); each streams from `Omni.astream`, whose engine batches it with the others
    (continuous batching: requests join and leave between steps). A consumer that goes away
    (client disconnect, cancelled task) closes its stream, which aborts the request and frees
    its cache rows."""

    def __init__(self, omni: Any, max_pending: int):
        self.omni = omni
        self.max_pending = max_pending
        self.pending = 0

    async def stream(self, job: Job) -> AsyncIterator[Any]:
        if self.pending >= self.max_pending:
            raise APIError(503, f"server busy ({self.pending} requests pending); retry later",
                           code="server_busy")
        self.pending += 1
        try:
            async with contextlib.aclosing(self.omni.astream(job.messages, **job.kwargs)) as evs:
                async for ev in evs:
                    yield ev
        finally:
            self.pending -= 1


# ---------------------------------------------------------------------------------- metrics


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("qomni_requests", "HTTP requests", ["endpoint", "status"],
                                registry=r)
        self.running = Gauge("qomni_requests_running", "chat completions in progress",
                             registry=r)
        self.prompt_tokens = Counter("qomni_prompt_tokens", "prompt tokens processed", registry=r)
        self.completion_tokens = Counter("qomni_completion_tokens", "text tokens generated",
                                         registry=r)
        self.audio_frames = Counter("qomni_audio_frames", "codec frames (80 ms each) sent",
                                    registry=r)
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.ttft = Histogram("qomni_time_to_first_token_seconds", "request to first text token",
                              buckets=buckets, registry=r)
        self.ttfa = Histogram("qomni_time_to_first_audio_seconds", "request to first audio chunk",
                              buckets=buckets, registry=r)
        self.latency = Histogram("qomni_request_duration_seconds", "chat completion duration",
                                 buckets=buckets, registry=r)


_ENDPOINTS = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")


class _Guard:
    """Pure ASGI middleware: caps the request body (413 before the route sees it) and counts
    requests by endpoint and status."""

    def __init__(self, app: Any, limits: Limits, metrics: Metrics):
        self.app, self.limit, self.metrics = app, limits.max_request_bytes, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = next((e for e in _ENDPOINTS if path == e or path.startswith(e + "/")), "other")
        status = {"code": 500}

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.limit):
                await self._too_large(scope, receive, counted_send)
                return
            received = 0

            async def limited_receive() -> dict:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.limit:
                        raise _TooLarge()
                return message

            try:
                await self.app(scope, limited_receive, counted_send)
            except _TooLarge:
                await self._too_large(scope, receive, counted_send)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()

    async def _too_large(self, scope: dict, receive: Callable, send: Callable) -> None:
        # Read (and drop) a bounded amount of the body first: closing a socket with unread
        # data resets the connection, and the client would never see this answer.
        drained, cap = 0, max(4 * self.limit, 16 * 1024 * 1024)
        while drained <= cap:
            message = await receive()
            if message["type"] != "http.request":
                break
            drained += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        err = APIError(413, f"request body larger than the {self.limit}-byte limit",
                       code="request_too_large")
        await _json(err.status, err.body())(scope, receive, send)


class _TooLarge(Exception):
    pass


def _json(status: int, body: dict) -> JSONResponse:
    return JSONResponse(body, status_code=status)


def _as_api_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, MediaError):
        return APIError(400, str(e), param=e.name, code="invalid_media")
    if isinstance(e, ValueError):  # ChatError, bad sampling values, unknown voice, ...
        return APIError(400, str(e), code="invalid_value")
    log.error("internal error", exc_info=e)
    return APIError(500, f"internal server error ({type(e).__name__})", code="internal_error")


# ---------------------------------------------------------------------------------- the app


def create_app(omni: Any, *, model_name: str | None = None, api_key: str | None = None,
               allowed_local_media_path: str | os.PathLike | None = None,
               allow_remote_media: bool = False, limits: Limits | None = None,
               reasoning: bool | None = None) -> FastAPI:
    """The FastAPI app serving `omni` (an `Omni`) under `model_name` (default: the checkpoint
    directory's name). `api_key`: required as `Authorization: Bearer KEY` on /v1 when set.
    `reasoning`: answer with `reasoning_content` (the text before `</think>`) apart from
    `content`; default: on for a checkpoint whose directory name says "Thinking".
    Media: remote URLs only with `allow_remote_media`; local paths only under
    `allowed_local_media_path` (none at all without it)."""
    limits = limits or Limits()
    name = model_name or Path(omni.path).name
    if reasoning is None:
        reasoning = "thinking" in Path(omni.path).name.lower()
    local_root = Path(allowed_local_media_path).resolve() if allowed_local_media_path else None
    configure_media(omni, allow_remote=allow_remote_media, local_root=local_root, limits=limits)
    worker = ModelWorker(omni, limits.max_pending)
    metrics = Metrics()
    transcripts: OrderedDict[str, tuple[float, str]] = OrderedDict()
    created = int(time.time())

    app = FastAPI(title="qomni", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.omni, app.state.worker, app.state.metrics = omni, worker, metrics
    app.add_middleware(_Guard, limits=limits, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return _json(e.status, e.body())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if e.status_code == 404 else None
        msg = f"{request.method} {request.url.path}: {e.detail}"
        return _json(e.status_code, APIError(e.status_code, msg, code=code).body())

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        err = _as_api_error(e)
        return _json(err.status, err.body())

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    # -- small endpoints ----------------------------------------------------------------------

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "qomni"}

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def model(model_id: str) -> dict:
        if model_id != name:
            raise APIError(404, f"model {model_id!r} not found", param="model",
                           code="model_not_found")
        return model_card()

    # -- chat completions ---------------------------------------------------------------------

    def transcript(audio_id: str) -> str | None:
        now = time.time()
        while transcripts and next(iter(transcripts.values()))[0] < now:
            transcripts.popitem(last=False)
        got = transcripts.get(audio_id)
        return got[1] if got else None

    def remember(audio_id: str, text: str) -> int:
        expires = int(time.time()) + AUDIO_TTL_S
        transcripts[audio_id] = (expires, text)
        while len(transcripts) > 4096:
            transcripts.popitem(last=False)
        return expires

    def resolve(kind: str, ref: str, param: str) -> bytes | np.ndarray:
        data = read_media_bytes(
            ref, name=param, allow_remote=allow_remote_media, allow_local=local_root is not None,
            local_root=local_root, max_bytes=limits.max_media_bytes,
            timeout=limits.media_timeout_s)
        if kind != "audio":
            return data
        # Decoded here, on a request thread, with the duration cap enforced while decoding
        # (headers can lie); the processor takes the waveform as it is.
        return load_audio(data, sampling_rate=omni.processor.pre.sampling_rate,
                          max_seconds=limits.max_media_seconds, name=param)

    def prepare(req: ChatCompletionRequest) -> Job:
        """Validate everything that can be checked before the model runs; read the media."""
        if req.model != name:
            raise APIError(404, f"model {req.model!r} not found (this server serves {name!r})",
                           param="model", code="model_not_found")
        if req.n not in (None, 1):
            raise APIError(400, "n: only n=1 is supported", param="n")
        if req.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise APIError(400, "response_format: only {'type': 'text'} is supported",
                           param="response_format")
        if req.tool_choice not in (None, "auto", "none"):
            raise APIError(400, "tool_choice: only 'auto' and 'none' are supported",
                           param="tool_choice")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options needs stream=true", param="stream_options")
        n_media = count_media(req.messages)
        if n_media > limits.max_media_items:
            raise APIError(400, f"{n_media} media items; at most {limits.max_media_items} per "
                           "request", param="messages")
        max_new = req.max_completion_tokens or req.max_tokens or limits.default_max_tokens
        if max_new > limits.max_tokens:
            raise APIError(400, f"max_tokens {max_new} is over this server's limit of "
                           f"{limits.max_tokens}", param="max_completion_tokens")
        kwargs: dict[str, Any] = {"max_new_tokens": max_new, "seed": req.seed,
                                  "return_audio": req.wants_audio,
                                  "use_audio_in_video": req.audio_in_video,
                                  "stop": req.stop_strings}  # the engine ends text and speech
        talker = omni.config.talker
        if req.wants_audio and not omni.model.audio_output:
            raise APIError(400, "this model cannot produce audio (no talker loaded); ask for "
                           "modalities ['text']", param="modalities")
        voice = req.voice_name
        if voice is not None:
            if talker is None:
                raise APIError(400, "this model has no voices", param="audio.voice")
            try:
                talker.speaker(voice)
            except ValueError as e:
                raise APIError(400, str(e), param="audio.voice", code="invalid_voice") from None
            kwargs["speaker"] = voice
        if req.wants_audio and req.max_audio_frames is not None:
            kwargs["max_audio_frames"] = req.max_audio_frames
        # No temperature: the model's reference default, a greedy thinker (OpenAI's default of 1
        # would sample). temperature 0 is greedy too.
        if req.temperature:
            kwargs["sampling"] = SamplingParams(
                temperature=req.temperature, top_p=req.top_p or 1.0, top_k=req.top_k or 0,
                repetition_penalty=req.repetition_penalty or 1.0)
        use_tools = bool(req.tools) and req.tool_choice != "none"
        if use_tools:
            kwargs["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
            kwargs["speech_stop"] = [TOOL_OPEN]  # tool calls are written, never spoken
        thinking = (req.chat_template_kwargs or {}).get("enable_thinking")
        if thinking is not None:
            if not isinstance(thinking, bool):
                raise APIError(400, "chat_template_kwargs.enable_thinking must be a boolean",
                               param="chat_template_kwargs")
            kwargs["enable_thinking"] = thinking
        messages = to_conversation(req.messages, resolve, transcripts=transcript,
                                   tools=use_tools)
        return Job(messages, kwargs)

    async def respond(req: ChatCompletionRequest, job: Job, t0: float) -> AsyncIterator[Any]:
        """The engine's events as response pieces: str (content), Reasoning, dict (a tool
        call), np.ndarray (float32 PCM), and last a (finish_reason, UsageInfo) tuple."""
        out = OutputFilter(parse_tools="tools" in job.kwargs)
        thinks = reasoning and job.kwargs.get("enable_thinking") is not False
        split = ReasoningSplitter() if thinks else None

        def text_pieces(parts: list[Any]) -> list[Any]:
            pieces = []
            for part in parts:
                pieces += [part] if isinstance(part, Reasoning) else out.push(part)
            return pieces
        tokens, frames, first_text, first_audio = 0, 0, True, True
        finished: Finished | None = None
        metrics.running.inc()
        try:
            async with contextlib.aclosing(worker.stream(job)) as events:
                async for ev in events:
                    if isinstance(ev, TextDelta):
                        tokens += len(ev.token_ids)
                        if first_text and ev.token_ids:
                            metrics.ttft.observe(time.perf_counter() - t0)
                            first_text = False
                        for piece in text_pieces(split.push(ev.text) if split else [ev.text]):
                            yield piece
                    elif isinstance(ev, AudioChunk):
                        if ev.pcm.size == 0:
                            continue
                        if first_audio:
                            metrics.ttfa.observe(time.perf_counter() - t0)
                            first_audio = False
                        yield ev.pcm
                    elif isinstance(ev, Finished):
                        finished = ev
            pieces = (text_pieces(split.finish()) if split else []) + out.finish()
            for piece in pieces:
                yield piece
            calls = any(isinstance(p, dict) for p in pieces) or out.in_tools
            if finished is None:
                raise RuntimeError("the model's stream ended without a result")
            if not first_audio:
                frames = finished.usage.audio_frames
            usage = UsageInfo(finished.usage.prompt_tokens, finished.usage.completion_tokens,
                              frames)
            reason = finished.reason
            if calls and reason != "length":
                reason = "tool_calls"
            metrics.prompt_tokens.inc(usage.prompt_tokens)
            metrics.completion_tokens.inc(usage.completion_tokens)
            metrics.audio_frames.inc(usage.audio_frames)
            yield reason, usage
        finally:
            metrics.running.dec()
            metrics.latency.observe(time.perf_counter() - t0)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request) -> Response:
        t0 = time.perf_counter()
        raw = await request.body()
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        req = parse_request(data)
        try:
            job = await run_in_threadpool(prepare, req)
        except Exception as e:  # noqa: BLE001 - mapped to 4xx/5xx
            raise _as_api_error(e) from None
        sample_rate = int(omni.config.code2wav.sample_rate) if req.wants_audio else 24000
        pieces = respond(req, job, t0)
        try:
            first = await anext(pieces)  # errors before any output still get a status code
        except Exception as e:  # noqa: BLE001 - mapped to 4xx/5xx
            raise _as_api_error(e) from None
        if req.stream:
            return StreamingResponse(
                _sse(req, first, pieces, name, remember),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _whole(request, req, first, pieces, name, sample_rate, remember)

    app.include_router(realtime_router(omni, model_name=name, api_key=api_key, limits=limits))
    return app


# ---------------------------------------------------------------------------------- responses


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _whole(request: Request, req: ChatCompletionRequest, first: Any,
                 pieces: AsyncIterator[Any], model: str, sample_rate: int,
                 remember: Callable[[str, str], int]) -> Response:
    async def collect() -> list[Any]:
        items = [first]
        async for p in pieces:
            items.append(p)
        return items

    # A client that hangs up cancels its request instead of leaving it to run to the end.
    task = asyncio.ensure_future(collect())
    watch = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if not task.done():  # cancelling the task closes `pieces`, which stops the model
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        return Response(status_code=499)  # nobody is listening
    try:
        items = task.result()
    except Exception as e:  # noqa: BLE001
        raise _as_api_error(e) from None
    reason, usage = items[-1]
    text = "".join(p for p in items if isinstance(p, str))
    thought = "".join(p.text for p in items if isinstance(p, Reasoning))
    calls = [p for p in items if isinstance(p, dict)]
    if calls:
        text = text.strip()
    audio = None
    pcm = [p for p in items if isinstance(p, np.ndarray)]
    if pcm:
        data = await run_in_threadpool(encode_audio, np.concatenate(pcm), sample_rate,
                                       req.audio_format)
        audio_id = new_id("audio_")
        audio = {"id": audio_id, "data": b64(data), "expires_at": remember(audio_id, text),
                 "transcript": text}
    body = ChatCompletion(
        id=new_id("chatcmpl-"), model=model, usage=usage.to_json(),
        choices=[Choice(finish_reason=reason, message=ResponseMessage(
            content=text if text or not calls else None, audio=audio, tool_calls=calls or None,
            reasoning_content=thought or None))])
    return _json(200, body.model_dump())


async def _sse(req: ChatCompletionRequest, first: Any, pieces: AsyncIterator[Any], model: str,
               remember: Callable[[str, str], int]) -> AsyncIterator[str]:
    cid, created = new_id("chatcmpl-"), int(time.time())
    with_usage = bool(req.stream_options and req.stream_options.include_usage)
    audio_id = new_id("audio_") if req.wants_audio else None
    text: list[str] = []
    n_calls, sent_audio = 0, False

    def event(delta: dict | None, finish: str | None = None, usage: dict | None = None) -> str:
        body = chunk(cid, model, created, delta, finish, usage, with_usage)
        return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"

    try:
        yield event({"role": "assistant", "content": ""})
        async with contextlib.aclosing(pieces):
            piece = first
            while True:
                if isinstance(piece, str):
                    text.append(piece)
                    delta: dict[str, Any] = {"content": piece}
                    if audio_id:
                        delta["audio"] = {"id": audio_id, "transcript": piece}
                    yield event(delta)
                elif isinstance(piece, Reasoning):
                    yield event({"reasoning_content": piece.text})
                elif isinstance(piece, dict):
                    yield event({"tool_calls": [{"index": n_calls, **piece}]})
                    n_calls += 1
                elif isinstance(piece, np.ndarray):
                    sent_audio = True
                    # Streamed speech is always raw PCM16 at 24 kHz (what OpenAI and DashScope
                    # clients play), whatever audio.format asked for.
                    yield event({"audio": {"id": audio_id, "data": b64(pcm16(piece).tobytes())}})
                else:
                    reason, usage = piece
                    if audio_id:  # later turns may cite this id: keep what was said
                        expires = remember(audio_id, "".join(text))
                        if sent_audio:
                            yield event({"audio": {"id": audio_id, "expires_at": expires}})
                    yield event({}, reason)
                    if with_usage:
                        yield event(None, usage=usage.to_json())
                    break
                try:
                    piece = await anext(pieces)
                except StopAsyncIteration:
                    break
        yield "data: [DONE]\n\n"
    except Exception as e:  # noqa: BLE001 - the status is already sent: report in the stream
        err = _as_api_error(e)
        yield f"data: {json.dumps(err.body())}\n\n"
