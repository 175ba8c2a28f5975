"""`GET /openapi.json`: the server's OpenAPI document. The chat route reads its raw body itself
(size-capped, parsed off the event loop, wire.py), so FastAPI cannot see its request model: the
request and reply schemas are added here from the very models the route validates and answers
with (`ChatCompletionRequest`, `ChatCompletion`), so the document cannot drift from what the
server does. Clients and the fuzzing tests generate requests from it."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from qomni.server.wire import ChatCompletion, ChatCompletionRequest

CHAT = "/v1/chat/completions"
_REF = "#/components/schemas/{model}"
# One event of a streamed reply (OpenAPI before 3.2: `schema` describes each event): its data is
# a `chat.completion.chunk` JSON, an error JSON, or the final `[DONE]`.
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}


def install(app: FastAPI) -> None:
    """Make `app.openapi()` (served at /openapi.json) describe the chat route's body."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            op = doc["paths"][CHAT]["post"]
            op["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": _component(ChatCompletionRequest, schemas)}}}
            op["responses"] = {"200": {
                "description": "the reply (with `stream`: an SSE stream of chunks)",
                "content": {"application/json": {"schema": _component(ChatCompletion, schemas)},
                            "text/event-stream": {"schema": _SSE_EVENT}}}}
            for path in doc["paths"].values():  # FastAPI's own 422: these routes answer 4xx
                for operation in path.values():    # errors in the OpenAI shape instead
                    operation["responses"].pop("422", None)
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = build


def _component(model: type[BaseModel], schemas: dict[str, Any]) -> dict[str, str]:
    """`model`'s JSON schema (and those it uses) as components; returns a reference to it."""
    schema = model.model_json_schema(ref_template=_REF)
    schemas.update(schema.pop("$defs", {}))
    schemas[model.__name__] = schema
    return {"$ref": _REF.format(model=model.__name__)}
