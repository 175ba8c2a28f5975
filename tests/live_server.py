"""Run a FastAPI app with uvicorn on a free loopback port, in a thread, for tests."""

from __future__ import annotations

import socket
import threading
import time


def serve_in_thread(app) -> tuple[int, callable]:
    """Start `app` on 127.0.0.1 as `qomni serve` runs it; returns (port, stop)."""
    import uvicorn

    from qomni.server import server_config

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(server_config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()

    return port, stop



def rss_mib() -> float:
    """Resident memory of this process (the server runs in it), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def threads_in(*functions: str) -> list[str]:
    """Names of the threads whose stack is inside any of `functions` right now."""
    import sys
    import traceback

    names = {t.ident: t.name for t in threading.enumerate()}
    return [names.get(ident, str(ident)) for ident, frame in sys._current_frames().items()
            if any(f.name in functions for f in traceback.extract_stack(frame))]


def wait_until(check, timeout: float, what: str, step: float = 0.02) -> float:
    """Poll `check()` until it is true; returns the seconds it took."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"{what} after {timeout} s"
        time.sleep(step)
    return time.monotonic() - t0
