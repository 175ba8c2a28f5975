"""The OpenAI-compatible server (`qomni serve`). Needs the `serve` extra (FastAPI, uvicorn);
`Limits` alone does not, so the command line can read its defaults without them."""

from typing import Any

from qomni.server.limits import Limits

__all__ = ["Limits", "create_app", "server_config"]


def __getattr__(name: str) -> Any:
    if name in ("create_app", "server_config"):
        from qomni.server import http

        return getattr(http, name)
    raise AttributeError(f"module 'qomni.server' has no attribute {name!r}")
