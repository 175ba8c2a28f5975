"""Giving freed memory back to the system. glibc keeps what a thread frees in that thread's malloc
arena, for reuse: after a long realtime turn (hundreds of MB of audio features made on worker
threads) the process stays that large although nothing holds the memory any more. So when a
realtime session closes, or no request is pending, the server calls `malloc_trim(0)`, which
returns the free pages of every arena (glibc only; elsewhere nothing is done)."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import time
from typing import Any

log = logging.getLogger("qomni.server")


def _malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


class MemoryTrim:
    """`request()` from the event loop: a trim on a worker thread `delay_s` later (what a closed
    connection holds is let go of meanwhile), one at a time and at most one per `interval_s`
    (a trim walks every arena, holding each one's lock meanwhile); a request that comes while
    one runs gets a trim after it."""

    def __init__(self, delay_s: float = 0.5, interval_s: float = 2.0):
        self.delay_s, self.interval_s = delay_s, interval_s
        self.trims = 0
        self.started_at = float("-inf")  # time.monotonic() when the last trim began
        self._trim = _malloc_trim()
        self._scheduled = self._running = self._again = False

    @property
    def available(self) -> bool:
        return self._trim is not None

    @property
    def running(self) -> bool:
        return self._running

    def request(self) -> None:
        if self._trim is None or self._scheduled:
            return
        if self._running:
            self._again = True
            return
        self._scheduled = True
        loop = asyncio.get_running_loop()
        delay = max(self.delay_s, self.started_at + self.interval_s - time.monotonic())
        loop.call_later(delay, self._start, loop)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled, self._running = False, True
        self.started_at = time.monotonic()
        done = loop.run_in_executor(None, self._run)
        done.add_done_callback(self._done)

    def _run(self) -> None:
        gc.collect()  # a closed session's objects may sit in reference cycles until then
        self._trim(0)

    def _done(self, done: asyncio.Future) -> None:
        self._running = False
        self.trims += 1
        if not done.cancelled() and done.exception() is not None:
            log.warning("malloc_trim failed", exc_info=done.exception())
        if self._again:
            self._again = False
            self.request()
