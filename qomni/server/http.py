"""The OpenAI-compatible server: `create_app(omni, ...)` builds the FastAPI app.

One request, in order: the body-size guard reads at most `max_request_bytes` (guard.py); the API
key is checked; the JSON is validated (wire.py); every media item is checked and read under the
server's media policy (remote URLs only when allowed, local paths only under the allowed
folder, size and duration capped); then the request streams from `Omni.astream` (the engine
batches concurrent requests) and its events become one response or an SSE stream (chat.py).
Every failure is an OpenAI error JSON; nothing a client sends can stop the server from
answering the next request.

Routes are module functions over the app's `AppState` (state.py), set once here.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from qomni.omni import Omni
from qomni.server import openapi
from qomni.server.chat import as_api_error, chat_completions
from qomni.server.guard import Guard
from qomni.server.limits import Limits
from qomni.server.memory import MemoryTrim
from qomni.server.origins import OriginPolicy
from qomni.server.realtime import realtime
from qomni.server.state import Admission, AppState, app_state
from qomni.server.wire import APIError

if TYPE_CHECKING:
    import uvicorn

STATIC = Path(__file__).parent / "static"  # the web demo, served at / and /static/


def create_app(omni: Omni, *, model_name: str | None = None, api_key: str | None = None,
               allowed_local_media_path: str | os.PathLike | None = None,
               allow_remote_media: bool = False, limits: Limits | None = None,
               reasoning: bool | None = None,
               allowed_origins: Sequence[str] | None = None,
               special_tokens_in_text: bool = False) -> FastAPI:
    """The FastAPI app serving `omni` under `model_name` (default: the checkpoint
    directory's name). `api_key`: required as `Authorization: Bearer KEY` on /v1 when set.
    `reasoning`: answer with `reasoning_content` (the text before `</think>`) apart from
    `content`; default: on for a checkpoint whose directory name says "Thinking".
    Media: remote URLs only with `allow_remote_media`; local paths only under
    `allowed_local_media_path` (none at all without it). `allowed_origins`: web pages of
    these origins may call the server too (`["*"]`: any page); by default only its own.
    `special_tokens_in_text`: read control-token strings in message text (`<|im_start|>`,
    ...) as control tokens, as the reference does; by default they are plain text, so a
    client cannot forge turns or media placeholders."""
    limits = (limits or Limits()).for_model(omni)
    if reasoning is None:
        reasoning = "thinking" in Path(omni.path).name.lower()
    local_root = Path(allowed_local_media_path).resolve() if allowed_local_media_path else None
    memory = MemoryTrim()
    state = AppState(
        omni=omni, name=model_name or Path(omni.path).name, limits=limits,
        media=limits.media_policy(allow_remote=allow_remote_media, local_root=local_root),
        api_key=api_key, reasoning=reasoning, literal_text=not special_tokens_in_text,
        admission=Admission(omni, limits.max_pending, memory),
        origins=OriginPolicy(allowed_origins), memory=memory)

    occupancy = getattr(omni, "engine_occupancy", None)
    if occupancy is not None:  # a local engine (replicas behind Ray report theirs per replica)
        state.metrics.watch(occupancy)
    app = FastAPI(title="qomni", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    openapi.install(app)
    app.state.qomni = state
    app.add_middleware(Guard, limits=limits, metrics=state.metrics, origins=state.origins)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal)

    app.add_api_route("/", index, methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    v1 = [Depends(authorize)]
    app.add_api_route("/v1/models", models, methods=["GET"], dependencies=v1)
    app.add_api_route("/v1/models/{model_id:path}", model, methods=["GET"], dependencies=v1)
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"],
                      dependencies=v1)
    app.add_api_websocket_route("/v1/realtime", realtime)
    return app


def server_config(app: FastAPI, **kwargs: Any) -> uvicorn.Config:
    """How `qomni serve` runs `app` under uvicorn (`kwargs`: host, port, log_level, ...). The
    realtime socket is served by wsproto: it refuses a handshake with the app's status and
    JSON without logging a spurious error, as uvicorn's websockets-sansio protocol does. A
    WebSocket message may be twice the request limit: up to that, an oversized event gets an
    `error` event and the session goes on; beyond it uvicorn closes the socket (1009)."""
    import uvicorn

    limits = app_state(app).limits
    return uvicorn.Config(app, ws="wsproto", ws_max_size=2 * limits.max_request_bytes, **kwargs)


# ---------------------------------------------------------------------------------- errors


async def _api_error(request: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, APIError)
    return JSONResponse(e.body(), status_code=e.status)


async def _http_error(request: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, StarletteHTTPException)
    code = "not_found" if e.status_code == 404 else None
    msg = f"{request.method} {request.url.path}: {e.detail}"
    return JSONResponse(APIError(e.status_code, msg, code=code).body(),
                        status_code=e.status_code)


async def _internal(request: Request, e: Exception) -> JSONResponse:
    err = as_api_error(e)
    return JSONResponse(err.body(), status_code=err.status)


async def authorize(request: Request) -> None:
    key = app_state(request).api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                             key.encode()):
        raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                       code="invalid_api_key")


# ---------------------------------------------------------------------------------- routes


async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def health() -> dict:
    return {"status": "ok"}


async def metrics(request: Request) -> Response:
    registry = app_state(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


async def models(request: Request) -> dict:
    return {"object": "list", "data": [app_state(request).model_card()]}


async def model(request: Request, model_id: str) -> dict:
    state = app_state(request)
    if model_id != state.name:
        raise APIError(404, f"model {model_id!r} not found", param="model",
                       code="model_not_found")
    return state.model_card()
