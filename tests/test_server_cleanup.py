"""A closed realtime session stops the server's work and gives its memory back: a client that
streams minutes of audio as fast as it can in manual-commit mode, commits and hangs up leaves no
prefix being built, no prefix or cache row held, and resident memory where it was. A live uvicorn
server on 127.0.0.1 serves a tiny random checkpoint in this process."""

from __future__ import annotations

import base64
import gc
import json
import threading
import time

import numpy as np
import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("websockets")

from live_server import rss_mib, serve_in_thread, threads_in, wait_until
from websockets.sync.client import connect

from qomni import Omni
from qomni.server import Limits, create_app
from qomni.tiny import make_tiny

SECONDS = 240  # 120 encoder windows of the tiny checkpoint: minutes of work before the fix
PREFIX_WORK = ("open_prefix", "partial_turn_inputs", "history_inputs", "log_mel_features")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tiny = make_tiny(tmp_path_factory.mktemp("cleanup") / "tiny")
    served = Omni.load(tiny, dtype="float32", device="cpu", progress=False)
    limits = Limits(max_request_bytes=1 << 20, max_media_seconds=SECONDS)
    app = create_app(served, model_name="tiny", limits=limits)
    port, stop = serve_in_thread(app)
    yield served, app.state.qomni, f"ws://127.0.0.1:{port}/v1/realtime"
    stop()


def _flood(url: str, seconds: float) -> None:
    """A manual-commit session: `seconds` of noise sent as fast as the socket takes it (5 s per
    message), a commit, and the client hangs up at once."""
    pcm = (np.random.default_rng(1).standard_normal(int(seconds * 16000)) * 3000).astype("<i2")
    with connect(url, max_size=None, compression=None, open_timeout=30) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
        ws.send(json.dumps({"type": "session.update", "session": {"turn_detection": None}}))
        assert json.loads(ws.recv(timeout=30))["type"] == "session.updated"
        for i in range(0, len(pcm), 5 * 16000):
            chunk = base64.b64encode(pcm[i:i + 5 * 16000].tobytes()).decode()
            ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        assert json.loads(ws.recv(timeout=30))["type"] == "input_audio_buffer.committed"


def _trimmed_after(state, t: float) -> None:
    """The server gives freed memory back (malloc_trim) once a session is gone: wait for a trim
    that began after `t` (the session's end) to end."""
    memory = state.memory
    if not memory.available:
        pytest.skip("not glibc: no malloc_trim")
    wait_until(lambda: memory.started_at > t and not memory.running, 10,
               "no trim after the session closed")


def _idle(engine) -> bool:
    rows = engine.cache.k.shape[1]
    return (not engine.prefixes and len(engine.free_rows) == rows and not engine.running
            and not engine.waiting and not threads_in(*PREFIX_WORK))


def test_a_hang_up_after_a_flood_of_audio_stops_the_work_and_frees_the_memory(live,
                                                                              monkeypatch):
    served, state, url = live
    engine = served._loop().engine
    builds = {"now": 0, "most": 0, "calls": 0}
    lock = threading.Lock()
    real = served.open_prefix

    def counted(*args, **kwargs):
        with lock:
            builds["calls"] += 1
            builds["now"] += 1
            builds["most"] = max(builds["most"], builds["now"])
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                builds["now"] -= 1

    monkeypatch.setattr(served, "open_prefix", counted)
    # Warm-up: the engine's cache rows and the encoder's window cache are touched once (they
    # are the engine's, held for good), then the process is as large as it needs to be.
    _flood(url, SECONDS)
    closed = time.monotonic()
    wait_until(lambda: _idle(engine), 60, "the warm-up session still works")
    _trimmed_after(state, closed)
    gc.collect()
    start = rss_mib()
    for _ in range(2):
        _flood(url, SECONDS)
        closed = time.monotonic()
        calls = builds["calls"]
        took = wait_until(lambda: _idle(engine), 2.0,
                          "the server still builds or holds prefixes of a closed session")
        assert builds["calls"] == calls, "a prefix build started after the session closed"
        print(f"idle {took:.2f} s after the hang-up; {calls} builds so far")
        _trimmed_after(state, closed)
    assert builds["most"] == 1  # one build at a time per session
    gc.collect()
    grown = rss_mib() - start
    print(f"resident memory: {start:.0f} MiB before, {grown:+.0f} MiB after")
    # One session kept alive would hold ~56 MiB (its 240 s of audio twice, its log-mel
    # blocks); what is left here is the allocator's fragmentation (-15..+55 MiB measured).
    assert grown < 80, f"{grown:.0f} MiB still held after the sessions closed"
