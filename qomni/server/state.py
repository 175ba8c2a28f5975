"""What one server is, fixed when `create_app` builds it: the `Omni` it serves, its `Limits`
(limits.py), its media and origin policies, its key; and the little it keeps while it runs (admission count, metrics, the
transcripts of audio replies). Routes reach it as `request.app.state.qomni`."""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.requests import HTTPConnection

from qomni.events import AudioChunk, Finished, TextDelta
from qomni.multimodal.media import MediaPolicy
from qomni.omni import Omni
from qomni.options import GenerateOptions
from qomni.server.limits import Limits
from qomni.server.memory import MemoryTrim
from qomni.server.origins import OriginPolicy
from qomni.server.wire import APIError

AUDIO_TTL_S = 3600  # how long an audio id's transcript is kept for later turns (expires_at)
MAX_TRANSCRIPTS = 4096


# Engine.occupancy() key -> the help of its qomni_engine_<key> gauge
ENGINE_GAUGES = {"waiting": "requests waiting for a cache row",
                 "running": "requests in the engine's batch",
                 "prefixes": "prompt prefixes held (realtime turns read ahead)",
                 "rows_in_use": "KV-cache rows held by requests and prefixes"}


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

    def watch(self, occupancy: Callable[[], dict[str, int]]) -> None:
        """Gauges of what the engine holds (`Omni.engine_occupancy`), read at each scrape: a
        server that has gone quiet must show zeros (rows, prefixes and requests all freed)."""
        for key, doc in ENGINE_GAUGES.items():
            gauge = Gauge(f"qomni_engine_{key}", doc, registry=self.registry)
            gauge.set_function(lambda key=key: occupancy()[key])


class Transcripts:
    """What each audio reply said, by its audio id, so a later turn can cite the id (OpenAI's
    `{"role": "assistant", "audio": {"id": ...}}`); kept for AUDIO_TTL_S."""

    def __init__(self) -> None:
        self._items: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def get(self, audio_id: str) -> str | None:
        now = time.time()
        while self._items and next(iter(self._items.values()))[0] < now:
            self._items.popitem(last=False)
        got = self._items.get(audio_id)
        return got[1] if got else None

    def remember(self, audio_id: str, text: str) -> int:
        """Keep `text` for `audio_id`; returns when it expires (unix seconds)."""
        expires = int(time.time()) + AUDIO_TTL_S
        self._items[audio_id] = (expires, text)
        while len(self._items) > MAX_TRANSCRIPTS:
            self._items.popitem(last=False)
        return expires


class Admission:
    """At most `max_pending` requests queued or running (more get 503); each streams from
    `Omni.astream`, whose engine batches it with the others (continuous batching: requests
    join and leave between steps). A consumer that goes away (client disconnect, cancelled
    task) closes its stream, which aborts the request and frees its cache rows."""

    def __init__(self, omni: Omni, max_pending: int, memory: MemoryTrim | None = None):
        self.omni = omni
        self.max_pending = max_pending
        self.pending = 0
        self.memory = memory  # told when no request is pending any more

    async def stream(self, messages: list[dict], options: GenerateOptions
                     ) -> AsyncIterator[TextDelta | AudioChunk | Finished]:
        if self.pending >= self.max_pending:
            raise APIError(503, f"server busy ({self.pending} requests pending); retry later",
                           code="server_busy")
        self.pending += 1
        try:
            async with contextlib.aclosing(self.omni.astream(messages, options=options)) as evs:
                async for ev in evs:
                    yield ev
        finally:
            self.pending -= 1
            if self.pending == 0 and self.memory is not None:
                self.memory.request()


@dataclass
class AppState:
    omni: Omni
    name: str  # the model id clients send
    limits: Limits
    media: MediaPolicy
    api_key: str | None
    reasoning: bool  # answer with reasoning_content apart from content
    literal_text: bool  # control-token strings in message text are text
    admission: Admission
    origins: OriginPolicy
    memory: MemoryTrim  # freed memory back to the system when the server goes quiet
    metrics: Metrics = field(default_factory=Metrics)
    transcripts: Transcripts = field(default_factory=Transcripts)
    created: int = field(default_factory=lambda: int(time.time()))
    realtime_sessions: int = 0  # open realtime sockets

    def model_card(self) -> dict[str, Any]:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "qomni"}


def app_state(conn: HTTPConnection | FastAPI) -> AppState:
    """The state of the app serving `conn` (a request or a WebSocket), or of `app`."""
    app = conn if isinstance(conn, FastAPI) else conn.app
    return app.state.qomni
