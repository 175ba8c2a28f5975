"""The OpenAI-compatible server (`qomni serve`). Needs the `serve` extra (FastAPI, uvicorn)."""

from qomni.server.http import create_app, server_config
from qomni.server.state import Limits

__all__ = ["Limits", "create_app", "server_config"]
