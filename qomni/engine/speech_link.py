"""A thinker whose talker runs elsewhere (`Omni.remote_talker`, a `TalkerLink`): each speaking
request opens a channel; the engine sends the request's thinker states down it
(`Request.states_out`), and what comes back (audio, then the end of the speech) joins the
request's own events. Its `Finished` waits for the end of the speech and then counts its
frames, so a caller sees what the single-process engine gives.

A link is `talker_engine.LocalTalker` (a talker engine in this process) or
`serve_ray.talker.RayTalker` (talker replicas on Ray Serve)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Protocol

from qomni.engine.loop import Deliver
from qomni.engine.request import Request
from qomni.engine.talker_engine import SpeechEnd
from qomni.engine.thinker_states import StatesUpdate
from qomni.events import Finished


class TalkerChannel(Protocol):
    def send(self, update: StatesUpdate) -> None:
        """From the engine thread, in order; must not block it."""

    def abort(self) -> None:
        """From any thread: the talker drops the request (nothing more is delivered)."""


class TalkerLink(Protocol):
    def open(self, deliver: Deliver) -> TalkerChannel:
        """A channel for one request; `deliver` (any thread) gets its `AudioChunk`s, then one
        `talker_engine.SpeechEnd`, or an Exception."""


class SpeechJoin:
    """One request's events from its thinker and from its talker, as one stream."""

    def __init__(self, req: Request, link: TalkerLink, deliver: Deliver,
                 abort_thinker: Callable[[], None]):
        self.req, self.deliver, self._abort_thinker = req, deliver, abort_thinker
        self._lock = threading.Lock()
        self._finished: Finished | None = None
        self._end: SpeechEnd | None = None
        self.closed = False  # its last event went out (or it was cancelled)
        self.channel = link.open(self.from_talker)
        req.states_out = self.channel.send

    def from_thinker(self, ev: object) -> None:
        if isinstance(ev, Finished) and ev.reason != "abort":
            self._settle(finished=ev)
        elif isinstance(ev, (Finished, Exception)):  # aborted or failed: its speech too
            self._fail(ev, self.channel.abort)
        else:
            with self._lock:
                if not self.closed:
                    self.deliver(ev)

    def from_talker(self, ev: object) -> None:
        if isinstance(ev, SpeechEnd):
            self._settle(end=ev)
        elif isinstance(ev, Exception):
            self._fail(ev, self._abort_thinker)
        else:
            with self._lock:
                if not self.closed:
                    self.deliver(ev)

    def cancel(self) -> None:
        """The caller went away: stop the speech (the caller aborts the thinker's request)."""
        with self._lock:
            closing, self.closed = not self.closed, True
        if closing:
            self.channel.abort()

    def _fail(self, ev: object, stop_other: Callable[[], None]) -> None:
        with self._lock:
            closing, self.closed = not self.closed, True
            if closing:
                self.deliver(ev)
        if closing:
            stop_other()

    def _settle(self, finished: Finished | None = None, end: SpeechEnd | None = None) -> None:
        with self._lock:
            if self.closed:
                return
            self._finished = finished or self._finished
            self._end = end or self._end
            if self._finished is None or self._end is None:
                return
            self.closed = True
            speech, codes = self.req.speech, self._end.codes
            speech.codes, speech.frames = list(codes.unbind(1)), codes.shape[1]
            usage = dataclasses.replace(self._finished.usage, audio_frames=speech.frames)
            self.deliver(Finished(self._finished.reason, usage))
