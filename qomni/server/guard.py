"""The ASGI middleware in front of every route: caps the request body (413 before the route
sees it) and counts requests by endpoint and status."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi.responses import JSONResponse

from qomni.server.state import Limits, Metrics
from qomni.server.wire import APIError

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ENDPOINTS = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")


class _TooLarge(Exception):
    pass


class Guard:
    def __init__(self, app: ASGIApp, limits: Limits, metrics: Metrics):
        self.app, self.limit, self.metrics = app, limits.max_request_bytes, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = next((e for e in ENDPOINTS if path == e or path.startswith(e + "/")), "other")
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

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
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
        await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)
