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

