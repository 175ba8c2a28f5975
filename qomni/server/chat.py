"""`POST /v1/chat/completions`: one request, validated and prepared on a worker thread (every
media item read under the server's media policy), streamed from `Omni.astream`, and answered
as one JSON body or an SSE stream.

Defaults that differ from OpenAI's, on purpose:
- no `temperature` means the model's reference default, a greedy thinker (OpenAI samples at 1);
  `temperature` > 0 samples with `top_p` (and the `top_k`, `repetition_penalty` extensions).
  The talker always uses the checkpoint's sampling defaults, seeded by `seed`.
- no `modalities` means text only, as OpenAI (vLLM-Omni answers with text and audio).
- with audio, the text is in `message.content` *and* `message.audio.transcript`; streamed
  speech is base64 PCM16 at the vocoder's rate in `delta.audio.data` whatever `audio.format`
  says.
- usage: `completion_tokens` counts text tokens; codec frames (12.5 per second of speech) are
  `completion_tokens_details.audio_tokens`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from qomni.audio_out import encode_audio, pcm16
from qomni.events import AudioChunk, Finished, TextDelta
from qomni.multimodal.audio import load_audio
from qomni.multimodal.media import MediaError
from qomni.options import GenerateOptions
from qomni.server.filters import TOOL_OPEN, OutputFilter, Reasoning, ReasoningSplitter
from qomni.server.messages import count_media, to_conversation
from qomni.server.state import AppState, app_state
from qomni.server.wire import (
    APIError,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    ResponseMessage,
    UsageInfo,
    b64,
    chunk,
    new_id,
    parse_json,
    parse_request,
    thinker_sampling,
)

log = logging.getLogger("qomni.server")

# What `respond` yields: content, reasoning, a tool call, float32 PCM, and last the end.
Piece = str | Reasoning | dict | np.ndarray | tuple[str, UsageInfo]


@dataclass
class Job:
    """One prepared request: what `Omni.astream` gets, and where each media item came from
    (the processor names them "image #1", ...; the client wrote `messages[0].content[1]`)."""

    messages: list[dict]
    options: GenerateOptions
    media_params: dict[str, str] = field(default_factory=dict)


def as_api_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, MediaError):
        return APIError(400, str(e), param=e.name, code="invalid_media")
    if isinstance(e, ValueError):  # ChatError, bad sampling values, unknown voice, ...
        return APIError(400, str(e), code="invalid_value")
    log.error("internal error", exc_info=e)
    return APIError(500, f"internal server error ({type(e).__name__})", code="internal_error")


async def chat_completions(request: Request) -> Response:
    state = app_state(request)
    t0 = time.perf_counter()
    raw = await request.body()
    try:  # parsing a large body is work too: never on the event loop
        req, job = await run_in_threadpool(_parse_and_prepare, state, raw)
    except Exception as e:  # noqa: BLE001 - mapped to 4xx/5xx
        raise as_api_error(e) from None
    pieces = respond(state, job, t0)
    try:
        first = await anext(pieces)  # errors before any output still get a status code
    except Exception as e:  # noqa: BLE001 - mapped to 4xx/5xx
        raise as_api_error(e) from None
    if req.stream:
        return StreamingResponse(_sse(state, req, first, pieces),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await _whole(state, request, req, first, pieces)


def _resolver(state: AppState, params: dict[str, str]):
    counts = dict.fromkeys(("image", "audio", "video"), 0)

    def resolve(kind: str, ref: str, param: str) -> bytes | np.ndarray:
        counts[kind] += 1  # called in placeholder order, as the processor counts
        params[f"{kind} #{counts[kind]}"] = param
        data = state.media.read(ref, param)
        if kind != "audio":
            return data
        # Decoded here, on a request thread, with the duration cap enforced while decoding
        # (headers can lie); the processor takes the waveform as it is.
        return load_audio(data, sampling_rate=state.omni.processor.pre.sampling_rate,
                          max_seconds=state.media.max_seconds, name=param)
    return resolve


def _parse_and_prepare(state: AppState, raw: bytes) -> tuple[ChatCompletionRequest, Job]:
    req = parse_request(parse_json(raw))
    return req, prepare(state, req)


def prepare(state: AppState, req: ChatCompletionRequest) -> Job:
    """Validate everything that can be checked before the model runs; read the media."""
    omni, limits = state.omni, state.limits
    if req.model != state.name:
        raise APIError(404, f"model {req.model!r} not found (this server serves {state.name!r})",
                       param="model", code="model_not_found")
    if req.n not in (None, 1):
        raise APIError(400, "n: only n=1 is supported", param="n")
    if req.logprobs:
        raise APIError(400, "logprobs are not supported", param="logprobs")
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
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
        raise APIError(400, f"messages: {n_media} media items; at most {limits.max_media_items} per "
                       "request", param="messages")
    max_new = req.max_completion_tokens or req.max_tokens or limits.default_max_tokens
    if max_new > limits.max_tokens:
        asked = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise APIError(400, f"{asked} {max_new} is over this server's limit of "
                       f"{limits.max_tokens}", param=asked)
    options: dict[str, Any] = {"max_new_tokens": max_new, "seed": req.seed,
                               "return_audio": req.wants_audio,
                               "use_audio_in_video": req.audio_in_video,
                               "stop": req.stop_strings,  # the engine ends text and speech
                               "media": state.media, "literal_text": state.literal_text}
    talker = omni.config.talker
    if req.wants_audio and not omni.model.audio_output:
        raise APIError(400, "this model cannot produce audio (no talker loaded); ask for "
                       "modalities ['text']", param="modalities")
    param, voice = req.voice_field
    if voice is not None:
        if talker is None:
            raise APIError(400, f"{param}: this model has no voices", param=param)
        try:
            talker.speaker(voice)
        except ValueError as e:
            raise APIError(400, f"{param}: {e}", param=param, code="invalid_voice") from None
        options["speaker"] = voice
    if req.max_audio_frames is not None and req.max_audio_frames > limits.max_audio_frames:
        raise APIError(400, f"max_audio_frames {req.max_audio_frames} is over this server's "
                       f"limit of {limits.max_audio_frames}", param="max_audio_frames")
    if req.wants_audio and req.max_audio_frames is not None:
        options["max_audio_frames"] = req.max_audio_frames
    options["sampling"] = thinker_sampling(req.temperature, req.top_p, req.top_k,
                                           req.repetition_penalty, req.frequency_penalty,
                                           req.presence_penalty)
    use_tools = bool(req.tools) and req.tool_choice != "none"
    if use_tools:
        options["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
        options["speech_stop"] = [TOOL_OPEN]  # tool calls are written, never spoken
    thinking = (req.chat_template_kwargs or {}).get("enable_thinking")
    if thinking is not None:
        if not isinstance(thinking, bool):
            raise APIError(400, "chat_template_kwargs.enable_thinking must be a boolean",
                           param="chat_template_kwargs")
        options["chat_template_kwargs"] = {"enable_thinking": thinking}
    params: dict[str, str] = {}
    messages = to_conversation(req.messages, _resolver(state, params),
                               transcripts=state.transcripts.get, tools=use_tools)
    return Job(messages, GenerateOptions(**options), params)


async def respond(state: AppState, job: Job, t0: float) -> AsyncIterator[Piece]:
    """The engine's events as response pieces (see `Piece`)."""
    metrics = state.metrics
    out = OutputFilter(parse_tools=job.options.tools is not None)
    template = job.options.chat_template_kwargs
    thinks = state.reasoning and template.get("enable_thinking") is not False
    split = ReasoningSplitter() if thinks else None

    def text_pieces(parts: list[Any]) -> list[Any]:
        pieces = []
        for part in parts:
            pieces += [part] if isinstance(part, Reasoning) else out.push(part)
        return pieces

    frames, first_text, first_audio = 0, True, True
    finished: Finished | None = None
    metrics.running.inc()
    try:
        async with contextlib.aclosing(_stream(state, job)) as evs:
            async for ev in evs:
                if isinstance(ev, TextDelta):
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
        usage = UsageInfo(finished.usage.prompt_tokens, finished.usage.completion_tokens, frames)
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


async def _stream(state: AppState, job: Job) -> AsyncIterator[TextDelta | AudioChunk | Finished]:
    """The request's events; a media error names the item as the client wrote it."""
    try:
        async with contextlib.aclosing(state.admission.stream(job.messages, job.options)) as evs:
            async for ev in evs:
                yield ev
    except MediaError as e:
        if e.name not in job.media_params:
            raise
        raise MediaError(job.media_params[e.name], e.reason) from None


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _whole(state: AppState, request: Request, req: ChatCompletionRequest, first: Piece,
                 pieces: AsyncIterator[Piece]) -> Response:
    async def collect() -> list[Piece]:
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
        raise as_api_error(e) from None
    reason, usage = items[-1]
    text = "".join(p for p in items if isinstance(p, str))
    thought = "".join(p.text for p in items if isinstance(p, Reasoning))
    calls = [p for p in items if isinstance(p, dict)]
    if calls:
        text = text.strip()
    audio = None
    pcm = [p for p in items if isinstance(p, np.ndarray)]
    if pcm:
        rate = state.omni.config.code2wav.sample_rate
        data = await run_in_threadpool(encode_audio, np.concatenate(pcm), rate, req.audio_format)
        audio_id = new_id("audio_")
        audio = {"id": audio_id, "data": b64(data),
                 "expires_at": state.transcripts.remember(audio_id, text), "transcript": text}
    body = ChatCompletion(
        id=new_id("chatcmpl-"), model=state.name, usage=usage.to_json(),
        choices=[Choice(finish_reason=reason, message=ResponseMessage(
            content=text if text or not calls else None, audio=audio, tool_calls=calls or None,
            reasoning_content=thought or None))])
    return JSONResponse(body.model_dump())


async def _sse(state: AppState, req: ChatCompletionRequest, first: Piece,
               pieces: AsyncIterator[Piece]) -> AsyncIterator[str]:
    cid, created = new_id("chatcmpl-"), int(time.time())
    with_usage = bool(req.stream_options and req.stream_options.include_usage)
    audio_id = new_id("audio_") if req.wants_audio else None
    text: list[str] = []
    n_calls, sent_audio = 0, False

    def event(delta: dict | None, finish: str | None = None, usage: dict | None = None) -> str:
        body = chunk(cid, state.name, created, delta, finish, usage, with_usage)
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
                    # Streamed speech is always raw PCM16 (what OpenAI and DashScope clients
                    # play), whatever audio.format asked for.
                    yield event({"audio": {"id": audio_id, "data": b64(pcm16(piece).tobytes())}})
                else:
                    reason, usage = piece
                    if audio_id:  # later turns may cite this id: keep what was said
                        expires = state.transcripts.remember(audio_id, "".join(text))
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
        err = as_api_error(e)
        yield f"data: {json.dumps(err.body())}\n\n"
