"""The engine client: what the server asks of an `Omni`, answered by engine replicas.

`ReplicatedOmni` stands where the server expects an `Omni`: `astream`, `open_prefix`,
`process`, `processor`, `config`, `path`, `model.audio_output`, `max_model_len`,
`max_audio_frames`. Preprocessing that the server
does itself (validation, media reading, token counts) runs here, on the ingress; generation
runs on a replica, streamed back through a DeploymentHandle.

Each connection to the ingress (an HTTP request, a WebSocket) runs with its own `Connection`
in a context variable (set by ingress.py; tasks and worker threads the server starts for it
inherit it). It records the replica that served the connection, which an HTTP response names;
a WebSocket's (a realtime session's) connection is pinned: its first call goes to the least
loaded replica, every later one to that same replica, where its prefixes and audio cache are.
If that replica dies, the next call re-homes (the conversation itself lives in the session)."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import exceptions as ray_errors
from ray.serve.handle import DeploymentHandle

from qomni.cancel import check_cancelled
from qomni.serve_ray.router import ReplicaGone, TalkerGone
from qomni.server.wire import APIError


@dataclasses.dataclass
class Connection:
    pinned: bool  # every call goes to `replica` once it is known
    replica: str | None = None  # the replica that served it (last)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


connection: contextvars.ContextVar[Connection | None] = contextvars.ContextVar(
    "qomni_connection", default=None)

_DIED = (ray_errors.RayActorError, ray_errors.ActorUnavailableError)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    audio_output: bool  # a talker is loaded: the replicas can speak


class RemotePrefix:
    """A prompt prefix prefilled on one replica (`EngineReplica.open_prefix`)."""

    def __init__(self, client: ReplicatedOmni, replica: str, pid: str, length: int):
        self.client, self.replica, self.pid, self.length = client, replica, pid, length

    def __len__(self) -> int:
        return self.length

    def close(self) -> None:
        """Free its cache row; does not wait for the replica."""
        self.client._handle(self.replica).close_prefix.remote(self.pid, home=self.replica)


class ReplicatedOmni:
    def __init__(self, handle: DeploymentHandle, info: dict[str, Any]):
        self.handle = handle
        self.path = Path(info["path"])
        self.config = info["config"]
        self.processor = info["processor"]
        self.tokenizer = self.processor.tokenizer
        self.model = ModelInfo(info["audio_output"])
        self.max_model_len: int = info["max_model_len"]  # sizes the server's default limits
        self.max_audio_frames: int = info["max_audio_frames"]

    # -- the Omni surface the server uses ----------------------------------------------------

    def process(self, messages: list[dict], use_audio_in_video: bool = False,
                **kwargs: Any) -> Any:
        return self.processor(messages, use_audio_in_video=use_audio_in_video, **kwargs)

    async def astream(self, messages: list[dict], **kwargs: Any) -> AsyncIterator[Any]:
        prefix, kwargs = _take(kwargs, "prefix")
        kwargs.pop("mel_cache", None)  # this process's log-mel blocks: the replica has its own
        for retry in (False, True):
            home = self._target(prefix)
            pid = prefix.pid if prefix is not None and prefix.replica == home else None
            stream = self._handle(home, stream=True).astream.remote(messages, kwargs,
                                                                    prefix=pid, home=home)
            try:
                try:
                    with _mapped_errors():
                        first = await anext(stream)
                except ReplicaGone:
                    if retry:
                        raise _gone() from None
                    # Its replica was replaced before this request started: nothing was sent
                    # yet, so run it anywhere (without the lost prefix), and stay there.
                    self._rehome()
                    prefix = None
                    continue
                self._arrived(first)
                while True:
                    with _mapped_errors(mid_stream=True):
                        try:
                            ev = await anext(stream)
                        except StopAsyncIteration:
                            return
                    yield ev
            finally:
                stream.cancel()  # a no-op once finished; else aborts the request on the replica

    def open_prefix(self, messages: list[dict], *, replaces: RemotePrefix | None = None,
                    **kwargs: Any) -> RemotePrefix:
        """Blocking (the server calls it from a worker thread). `cancel` and `mel_cache` are
        objects of this process: the replica computes its own log-mel, and a cancelled session
        opens nothing."""
        cancel = kwargs.pop("cancel", None)
        kwargs.pop("mel_cache", None)
        check_cancelled(cancel)
        try:
            return self._open_prefix(messages, replaces, kwargs)
        except ReplicaGone:
            # The replica it was meant for was replaced: open it anywhere, and stay there.
            self._rehome()
            try:
                return self._open_prefix(messages, None, kwargs)
            except ReplicaGone:
                raise _gone() from None

    def _open_prefix(self, messages: list[dict], replaces: RemotePrefix | None,
                     kwargs: dict[str, Any]) -> RemotePrefix:
        home = self._target(replaces)
        old = None
        if replaces is not None:
            if replaces.replica == home:
                old = replaces.pid
            else:
                replaces.close()
        with _mapped_errors():
            replica, pid, length = self._handle(home).open_prefix.remote(
                messages, kwargs, replaces=old, home=home).result()
        self._arrived(replica)
        return RemotePrefix(self, replica, pid, length)

    # -- routing -------------------------------------------------------------------------------

    def _target(self, prefix: RemotePrefix | None) -> str | None:
        """The replica a call must reach: the session's, else the prefix's, else any."""
        conn = connection.get()
        if conn is not None and conn.pinned and conn.replica is not None:
            return conn.replica
        return prefix.replica if prefix is not None else None

    def _handle(self, home: str | None, stream: bool = False) -> DeploymentHandle:
        return self.handle.options(stream=stream, session_id=home or "")

    def _arrived(self, replica: str) -> None:
        conn = connection.get()
        if conn is not None:
            with conn.lock:
                if not conn.pinned or conn.replica is None:
                    conn.replica = replica

    def _rehome(self) -> None:
        conn = connection.get()
        if conn is not None:
            with conn.lock:
                conn.replica = None


def _take(kwargs: dict[str, Any], name: str) -> tuple[Any, dict[str, Any]]:
    """Keyword `name` out of the call's keywords or its `options` (a GenerateOptions)."""
    kwargs = dict(kwargs)
    value = kwargs.pop(name, None)
    options = kwargs.get("options")
    if options is not None and getattr(options, name, None) is not None:
        value = getattr(options, name)
        kwargs["options"] = dataclasses.replace(options, **{name: None})
    return value, kwargs


def _gone() -> APIError:
    return APIError(503, "no engine replica could take the request; retry",
                    code="replica_unavailable")


@contextlib.contextmanager
def _mapped_errors(mid_stream: bool = False):
    """A replica's exception as the exception it raised (ValueError -> 400 in the server, ...);
    a replica that died as a 503 naming what happened."""
    try:
        yield
    except ray_errors.RayTaskError as e:
        cause = e.cause if isinstance(e.cause, BaseException) else None
        if cause is None:
            raise
        if isinstance(cause, TalkerGone):
            raise APIError(503, str(cause), code="replica_unavailable") from None
        raise cause from None
    except _DIED as e:
        conn = connection.get()
        if conn is not None:  # a session pinned to it re-homes on its next call
            with conn.lock:
                conn.replica = None
        when = "while answering" if mid_stream else "before answering"
        raise APIError(503, f"the engine replica stopped {when} ({type(e).__name__}); "
                       "retry the request", code="replica_unavailable") from None
