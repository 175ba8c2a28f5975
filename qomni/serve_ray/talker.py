"""Talker replicas: the talker, code predictor and code2wav of each speaking request on a Serve
deployment of their own (`qomni serve --talker-replicas M`), apart from the engine replicas,
which then load the thinker alone.

An engine replica's `Omni` has a `RayTalker` as its remote talker (engine/speech_link.py). For
each speaking request it opens one streaming call, `TalkerReplica.talk`, with the prompt's
thinker states, on the less loaded of two talker replicas; the stream answers that replica's
id, then the request's audio chunks and the end of its speech. The states of later thinker
steps follow in `feed` calls pinned to that replica (router.py), in order: one call in flight
per talker replica, carrying what every request going there got since the last one.

What crosses per request: the prompt's states once (input embeddings and accept-layer hidden
states, 2 x S x Dt in the thinker's dtype, with the ids and media grids), then per spoken token
its input embedding (Dt) and id; back come the samples (float32, 1920 per frame) and, at the
end, the codes. docs/scaling.md has the figures."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray import exceptions as ray_errors
from ray import serve
from ray.serve.handle import DeploymentHandle

from qomni.engine.config import EngineConfig
from qomni.engine.loop import EngineLoop
from qomni.engine.talker_engine import SpeechEnd, TalkerEngine, TalkJob
from qomni.engine.thinker_states import StatesUpdate
from qomni.serve_ray.router import ReplicaGone, TalkerGone


class TalkerReplica:
    def __init__(self, model: str | None = None, *, dtype: str | None = None,
                 device: str | None = None, quantization: str | None = None,
                 engine_options: dict[str, Any] | None = None):
        self.engine = TalkerEngine.load(model, dtype=dtype, device=device,
                                        quantization=quantization, progress=False,
                                        engine=EngineConfig(**(engine_options or {})))
        self.loop = EngineLoop(self.engine)
        self.id = serve.get_replica_context().replica_id.unique_id
        self.jobs: dict[str, TalkJob] = {}
        # jobs that ended (spoken, failed or dropped), those that failed, frames spoken
        self.served = {"requests": 0, "errors": 0, "audio_frames": 0}

    async def talk(self, first: list[StatesUpdate]) -> AsyncIterator[Any]:
        """(this replica's id, the job's id), then the job's AudioChunks and its SpeechEnd.
        `first`: the request's first thinker states (its prompt's, and those sent since).
        Cancelling the stream (the request ended elsewhere) drops the job."""
        job = TalkJob()
        events: asyncio.Queue = asyncio.Queue()
        aio = asyncio.get_running_loop()
        self.jobs[job.id] = job
        for update in first:
            job.feed(update)
        self.loop.submit(job, lambda ev: aio.call_soon_threadsafe(events.put_nowait, ev))
        try:
            yield self.id, job.id
            while True:
                ev = await events.get()
                if isinstance(ev, Exception):
                    self.served["errors"] += 1
                    raise ev
                if isinstance(ev, SpeechEnd):
                    self.served["audio_frames"] += ev.codes.shape[1]
                yield ev
                if isinstance(ev, SpeechEnd):
                    return
        finally:
            del self.jobs[job.id]
            self.served["requests"] += 1
            if not job.finished:
                self.loop.abort(job)

    async def feed(self, updates: dict[str, list[StatesUpdate]], home: str | None = None
                   ) -> None:
        """Jobs' next thinker states (job id -> its states, in order)."""
        if home and home != self.id:
            raise ReplicaGone(f"talker replica {home} is gone (this is {self.id})")
        for job_id, states in updates.items():
            job = self.jobs.get(job_id)
            if job is None:  # it ended: its stream was cancelled, or it failed
                continue
            for update in states:
                job.feed(update)
        self.loop.wake()

    async def stats(self, home: str | None = None) -> dict[str, Any]:
        """Counters for /metrics and /health."""
        if home and home != self.id:
            raise ReplicaGone(f"talker replica {home} is gone (this is {self.id})")
        e = self.engine
        return {"replica": self.id, **self.served, "jobs": len(self.jobs),
                "running": len(e.running), "waiting": len(e.waiting),
                "free_rows": len(e.free_rows)}

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy (replaced)."""
        if not self.loop.is_alive():
            raise RuntimeError("the talker engine thread has stopped")


class RayTalker:
    """A `speech_link.TalkerLink` to the talker replicas, for an engine replica. Its channels
    and senders run on the event loop of the calls that open them (the replica's)."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle
        self.senders: dict[str, _Sender] = {}  # by talker replica, while they have states

    def open(self, deliver: Callable[[object], None]) -> _RayChannel:
        return _RayChannel(self, deliver, asyncio.get_running_loop())

    def send(self, replica: str, channel: _RayChannel, job: str,
             updates: list[StatesUpdate]) -> None:
        sender = self.senders.get(replica)
        if sender is None:
            sender = self.senders[replica] = _Sender(self, replica)
        sender.put(channel, job, updates)


class _Sender:
    """The states going to one talker replica: one feed call in flight, carrying what every
    request's engine steps made since the last one (a call per engine step, not per request)."""

    def __init__(self, talker: RayTalker, replica: str):
        self.talker, self.replica = talker, replica
        self.handle = talker.handle.options(session_id=replica)
        self.pending: dict[str, tuple[_RayChannel, list[StatesUpdate]]] = {}
        self.task: asyncio.Task | None = None

    def put(self, channel: _RayChannel, job: str, updates: list[StatesUpdate]) -> None:
        self.pending.setdefault(job, (channel, []))[1].extend(updates)
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self.pending:
            batch, self.pending = self.pending, {}
            try:
                await self.handle.feed.remote({job: ups for job, (_, ups) in batch.items()},
                                              home=self.replica)
            except Exception as e:  # noqa: BLE001 - these requests' speech fails
                for channel, _ in batch.values():
                    channel.fail(_talker_error(e))
        self.talker.senders.pop(self.replica, None)


class _RayChannel:
    def __init__(self, talker: RayTalker, deliver: Callable[[object], None],
                 aio: asyncio.AbstractEventLoop):
        self.talker, self.deliver, self.aio = talker, deliver, aio
        self.backlog: list[StatesUpdate] = []  # until its talker replica is known
        self.home: tuple[str, str] | None = None  # (talker replica, job id) once known
        self.task: asyncio.Task | None = None  # from the first states on
        self.closed = False

    def send(self, update: StatesUpdate) -> None:
        # Compact CPU copies now, on the engine thread: a view would pickle its whole storage,
        # and the engine reuses its buffers.
        self.aio.call_soon_threadsafe(self._put, update.to("cpu"))

    def abort(self) -> None:
        self.aio.call_soon_threadsafe(self._close)

    def fail(self, error: Exception) -> None:
        if not self.closed:
            self.deliver(error)
            self._close()

    def _put(self, update: StatesUpdate) -> None:
        if self.closed:
            return
        if self.home is not None:
            replica, job = self.home
            self.talker.send(replica, self, job, [update])
            return
        self.backlog.append(update)
        if self.task is None:
            self.task = self.aio.create_task(self._run())

    def _close(self) -> None:
        self.closed = True
        if self.task is not None:
            self.task.cancel()

    async def _run(self) -> None:
        await asyncio.sleep(0)  # states already on their way come along
        first, self.backlog = self.backlog, []
        stream = self.talker.handle.options(stream=True).talk.remote(first)
        try:
            replica, job = await anext(stream)
            self.home = replica, job
            if self.backlog:
                self.talker.send(replica, self, job, self.backlog)
                self.backlog = []
            async for ev in stream:
                self.deliver(ev)
                if isinstance(ev, SpeechEnd):
                    break
        except Exception as e:  # noqa: BLE001 - this request's speech fails, as it said
            self.deliver(_talker_error(e))
        finally:
            self.closed = True
            stream.cancel()  # a no-op once it ended; else the talker drops the job


def _talker_error(e: Exception) -> Exception:
    """What the talker raised (a ValueError is the request's fault: a 400), or TalkerGone when
    the talker replica died."""
    if isinstance(e, ray_errors.RayTaskError) and isinstance(e.cause, Exception):
        e = e.cause
    if isinstance(e, (ReplicaGone, ray_errors.RayActorError, ray_errors.ActorUnavailableError)):
        return TalkerGone(f"the talker replica stopped while speaking ({type(e).__name__}); "
                          "retry the request")
    return e
