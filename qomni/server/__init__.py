"""The OpenAI-compatible server (`qomni serve`). Needs the `serve` extra (FastAPI, uvicorn)."""

from qomni.server.http import Limits, create_app

__all__ = ["Limits", "create_app"]
