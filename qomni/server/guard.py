"""The ASGI middleware in front of every route: refuses requests from web pages of other origins
(403, unless `--allowed-origins` lets them in, then with CORS headers; see origins.py), caps the
request body (413 before the route sees it) and counts requests by endpoint and status."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi.responses import JSONResponse

from qomni.server.limits import Limits
from qomni.server.origins import OriginPolicy
from qomni.server.state import Metrics
from qomni.server.wire import APIError

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ENDPOINTS = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")
class _TooLarge(Exception):
    pass


class Guard:
    def __init__(self, app: ASGIApp, limits: Limits, metrics: Metrics, origins: OriginPolicy):
        self.app, self.limit, self.metrics = app, limits.max_request_bytes, metrics
        self.origins = origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = next((e for e in ENDPOINTS if path == e or path.startswith(e + "/")), "other")
        status = {"code": 500}
        headers = dict(scope.get("headers") or [])
        origin = _header(headers, b"origin")
        cors: list[tuple[bytes, bytes]] = []
        if origin is not None and not self.origins.same_origin(origin, _header(headers, b"host")):
            cors = [(b"access-control-allow-origin", origin.encode("latin-1")),
                    (b"vary", b"Origin")]

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                if cors:
                    message = {**message, "headers": [*message.get("headers", []), *cors]}
            await send(message)

        try:
            if origin is not None and not self.origins.allows(origin, _header(headers, b"host")):
                cors = []  # the page may not read the refusal either
                await self._refuse(self.origins.refusal(origin), receive, scope, counted_send)
                return
            if cors and scope["method"] == "OPTIONS" and \
                    b"access-control-request-method" in headers:
                await self._preflight(headers, counted_send)
                return
            length = headers.get(b"content-length")
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
        err = APIError(413, f"request body larger than the {self.limit}-byte limit",
                       code="request_too_large")
        await self._refuse(err, receive, scope, send)

    async def _refuse(self, err: APIError, receive: Receive, scope: Scope, send: Send) -> None:
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
        await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)

    @staticmethod
    async def _preflight(headers: dict[bytes, bytes], send: Send) -> None:
        """A browser asks whether an allowed cross-origin page may send this request (with the
        headers it names: the API key, the JSON content type, a client's own)."""
        asked = headers.get(b"access-control-request-headers", b"")
        await send({"type": "http.response.start", "status": 204, "headers": [
            (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
            (b"access-control-allow-headers", asked), (b"access-control-max-age", b"600")]})
        await send({"type": "http.response.body", "body": b""})


def _header(headers: dict[bytes, bytes], name: bytes) -> str | None:
    value = headers.get(name)
    return value.decode("latin-1") if value is not None else None
