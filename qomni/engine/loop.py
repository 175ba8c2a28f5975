"""Runs one Engine (or a `TalkerEngine`: the same surface) on a background thread. Requests are
submitted and aborted from any thread (the caller's, or the server's event loop); each
request's events go to its own callback."""

from __future__ import annotations

import atexit
import contextlib
import threading
from collections.abc import Callable, Iterator

from qomni.engine.engine import Engine
from qomni.engine.openmp import release_caller_threads
from qomni.engine.request import Prefix, Request

Deliver = Callable[[object], None]  # receives events, or an Exception that ends the request


class EngineLoop:
    def __init__(self, engine: Engine):
        self.engine = engine
        engine.on_events = self._deliver_events
        self._cv = threading.Condition()
        self._inbox: list[tuple[Request, Deliver]] = []
        self._holding = 0  # callers inside `together()`: the inbox waits for them
        self._aborts: list[Request] = []
        self._prefix_ops: list[tuple[bool, Prefix]] = []  # (open?, prefix)
        self._callbacks: dict[str, tuple[Request, Deliver]] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="qomni-engine", daemon=True)
        self._thread.start()
        # Stop between steps at exit: a daemon thread killed inside a torch op aborts the process.
        atexit.register(self.close)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=30)

    def is_alive(self) -> bool:
        """The engine thread runs (it ends only when closed)."""
        return self._thread.is_alive()

    def wake(self) -> None:
        """Look at the engine's work again: something it waits on arrived (a talker's states)."""
        with self._cv:
            self._cv.notify()

    def submit(self, req: Request, deliver: Deliver) -> None:
        release_caller_threads()  # the caller's idle OpenMP workers would slow the engine's
        with self._cv:
            self._inbox.append((req, deliver))
            self._cv.notify()

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Requests submitted inside reach the engine at once, so that a batch is admitted (and
        prefilled) in one step, not its first request alone while the others are made."""
        with self._cv:
            self._holding += 1
        try:
            yield
        finally:
            with self._cv:
                self._holding -= 1
                self._cv.notify()

    def abort(self, req: Request) -> None:
        with self._cv:
            self._aborts.append(req)
            self._cv.notify()

    def open_prefix(self, prefix: Prefix) -> None:
        with self._cv:
            self._prefix_ops.append((True, prefix))
            self._cv.notify()

    def close_prefix(self, prefix: Prefix) -> None:
        with self._cv:
            self._prefix_ops.append((False, prefix))
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not ((self._inbox and not self._holding) or self._aborts
                           or self._prefix_ops or self.engine.has_work() or self._closed):
                    self._cv.wait()
                if self._closed:
                    return
                inbox = []
                if not self._holding:
                    inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
                prefix_ops, self._prefix_ops = self._prefix_ops, []
            for is_open, prefix in prefix_ops:
                if not is_open:
                    self.engine.release_prefix(prefix)
                elif not prefix.closed:
                    try:
                        self.engine.add_prefix(prefix)
                    except ValueError:  # too long to help: the request prefills it all
                        self.engine.release_prefix(prefix)
            for req, deliver in inbox:
                try:
                    self.engine.add(req)
                except Exception as e:  # noqa: BLE001 - e.g. a prompt too long: this request only
                    deliver(e)
                    continue
                self._callbacks[req.id] = (req, deliver)
            try:
                for req in aborts:
                    if req.id in self._callbacks:
                        self.engine.abort(req)
                self.engine.step()
            except Exception as e:  # noqa: BLE001 - ends the requests in flight, not the loop
                for req in list(self.engine.running) + list(self.engine.waiting):
                    self.engine.abort(req)
                    req.events.clear()
                    req.events.append(e)
            self._deliver()

    def _deliver_events(self) -> None:
        """Mid-step delivery: events only; finished requests are retired by `_deliver`."""
        for req, deliver in list(self._callbacks.values()):
            while req.events:
                deliver(req.events.popleft())

    def _deliver(self) -> None:
        for rid, (req, deliver) in list(self._callbacks.items()):
            while req.events:
                deliver(req.events.popleft())
            if req.finished:
                del self._callbacks[rid]
