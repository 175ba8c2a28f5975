"""Stopping work nobody waits for any more. A caller hands a `threading.Event` to a long call
(preparing a request's inputs, building a prompt prefix); the call checks it between units of
work (a log-mel block, a media item) and raises `Cancelled` once it is set, so a closed request
or session stops using the CPU within one unit, not when the whole call would have ended."""

from __future__ import annotations

import threading


class Cancelled(Exception):
    """The caller gave up on this call (its request or session was closed)."""


def check_cancelled(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled by the caller")
