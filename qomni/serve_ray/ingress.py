"""The Serve ingress: the server's FastAPI app over a `ReplicatedOmni`, plus what only a
replicated server has: `/health` and `/metrics` over every engine replica (and every talker
replica, where they speak apart), and an `x-qomni-replica` header naming the replica that
served each HTTP response."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from ray.serve.handle import DeploymentHandle

from qomni.serve_ray import live
from qomni.serve_ray.client import Connection, ReplicatedOmni, connection
from qomni.serve_ray.router import ReplicaGone
from qomni.server.state import ENGINE_GAUGES

REPLICA_HEADER = b"x-qomni-replica"
PROBE_TIMEOUT_S = 10.0  # a replica that does not answer a probe in time is reported "busy"
_COUNTERS = {  # EngineReplica.stats key -> (metric, help)
    "requests": ("qomni_replica_requests", "requests this replica finished"),
    "errors": ("qomni_replica_errors", "requests this replica ended with an error"),
    "cancelled": ("qomni_replica_cancelled", "requests cancelled (their client went away)"),
    "prompt_tokens": ("qomni_replica_prompt_tokens", "prompt tokens this replica processed"),
    "completion_tokens": ("qomni_replica_completion_tokens", "text tokens it generated"),
    "audio_frames": ("qomni_replica_audio_frames", "codec frames (80 ms) it generated"),
    "pinned_calls": ("qomni_replica_pinned_calls", "calls of realtime sessions pinned to it"),
}
_GAUGES = {"running": ("requests_running", "requests streaming on this replica")}
_TALKER_COUNTERS = {  # TalkerReplica.stats key -> (metric, help)
    "requests": ("qomni_talker_replica_requests", "speaking requests this talker replica ended"),
    "errors": ("qomni_talker_replica_errors", "speaking requests it ended with an error"),
    "audio_frames": ("qomni_talker_replica_audio_frames", "codec frames (80 ms) it spoke"),
}
_TALKER_GAUGES = {  # TalkerReplica.stats key -> (metric suffix, help)
    "jobs": ("jobs", "speaking requests open on it"),
    "free_rows": ("free_rows", "talker cache rows free"),
}


class Ingress:
    """Deployed by `build_app` with `@serve.ingress()`: Serve builds the ASGI app on the replica,
    after the engine replicas answered (the app validates requests with their config)."""

    async def __init__(self, engine: DeploymentHandle, server_options: dict[str, Any],
                       talker: DeploymentHandle | None = None):
        """`talker`: the talker replicas that speak for the engine replicas, if any (probed
        by /health and /metrics; the engine replicas call them)."""
        info = await engine.info.remote()
        self.client = ReplicatedOmni(engine, info)
        self.server_options = server_options
        self.talker = talker

    def __serve_build_asgi_app__(self) -> Callable:
        from qomni.server import Limits, create_app

        options = dict(self.server_options)
        limits = options.pop("limits", None)  # a Limits, or its fields (from a config file)
        if isinstance(limits, dict):
            limits = Limits(**limits)
        return ReplicaAware(create_app(self.client, limits=limits, **options), self.client,
                            self.talker)


class ReplicaAware:
    """ASGI wrapper: answers GET /health and GET /metrics over all replicas, passes the rest to
    the server app in a `Connection` of its own (pinned for a WebSocket), the replica that
    served an HTTP request named in its response headers."""

    def __init__(self, app: Callable, client: ReplicatedOmni,
                 talker: DeploymentHandle | None = None):
        self.app, self.client, self.talker = app, client, talker

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            # Under a route prefix (serve.run(route_prefix=...)) the path starts with it.
            path, root = scope["path"], scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root):]
            if path == "/health":
                return await self._health(send)
            if path == "/metrics":
                return await self._metrics(scope, receive, send)
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        conn = Connection(pinned=scope["type"] == "websocket")
        token = connection.set(conn)

        async def named_send(message: dict) -> None:
            if message["type"] == "http.response.start" and conn.replica is not None:
                headers = [*message.get("headers", []), (REPLICA_HEADER, conn.replica.encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, named_send)
        finally:
            connection.reset(token)

    async def replicas(self) -> list[dict[str, Any]]:
        """Each live replica's stats with its `role` ("engine", or "talker" for the talker
        replicas of a thinker-only deployment), or its state: "gone" (died since the router
        last looked) or "busy" (no answer within PROBE_TIMEOUT_S: every slot taken)."""
        handles = {"engine": self.client.handle, "talker": self.talker}
        rounds = await asyncio.gather(*(_probe(h, role) for role, h in handles.items()
                                        if h is not None))
        return [r for replicas in rounds for r in replicas]

    async def _health(self, send: Callable) -> None:
        """200 while an engine replica serves, and a talker replica too where they speak."""
        replicas = await self.replicas()
        roles = {"engine"} | ({"talker"} if self.talker is not None else set())
        serving = {r["role"] for r in replicas if r["state"] in ("up", "busy")}
        ok = roles <= serving
        body = {"status": "ok" if ok else "unavailable", "replicas": replicas}
        await _send(send, 200 if ok else 503, json.dumps(body).encode(), b"application/json")

    async def _metrics(self, scope: dict, receive: Callable, send: Callable) -> None:
        """The server's own metrics (its requests, latencies), then every replica's."""
        status, ingress = await _capture(self.app, scope, receive)
        registry = CollectorRegistry()
        registry.register(_Snapshot(await self.replicas()))
        await _send(send, status, ingress + generate_latest(registry),
                    b"text/plain; version=0.0.4; charset=utf-8")


class _Snapshot:
    """A prometheus collector over one round of replica probes."""

    def __init__(self, replicas: list[dict[str, Any]]):
        self.items = replicas

    def collect(self) -> Any:
        engines = [r for r in self.items if r["role"] == "engine"]
        talkers = [r for r in self.items if r["role"] == "talker"]
        yield from _families("qomni_replica", "engine replica", engines, _COUNTERS, _GAUGES)
        engine = {k: GaugeMetricFamily(f"qomni_engine_{k}", h, labels=["replica"])
                  for k, h in ENGINE_GAUGES.items()}
        for r in engines:
            if r["state"] == "up":
                for k, family in engine.items():
                    family.add_metric([r["replica"]], r["engine"][k])
        yield from engine.values()
        if talkers:
            yield from _families("qomni_talker_replica", "talker replica", talkers,
                                 _TALKER_COUNTERS, _TALKER_GAUGES)


def _families(prefix: str, what: str, replicas: list[dict[str, Any]],
              counters: dict[str, tuple[str, str]], gauges: dict[str, tuple[str, str]]
              ) -> Any:
    """`{prefix}_up` for each replica, and its counters (stats key -> (metric, help)) and
    gauges (stats key -> (metric suffix, help)) where it answered."""
    up = GaugeMetricFamily(f"{prefix}_up", f"{what} answering its probe (1)",
                           labels=["replica"])
    families = {k: (CounterMetricFamily(m, h, labels=["replica"]) if k in counters else
                    GaugeMetricFamily(f"{prefix}_{m}", h, labels=["replica"]))
                for k, (m, h) in (counters | gauges).items()}
    for r in replicas:
        up.add_metric([r["replica"]], float(r["state"] in ("up", "busy")))
        if r["state"] == "up":
            for k, family in families.items():
                family.add_metric([r["replica"]], r[k])
    yield up
    yield from families.values()


async def _probe(handle: DeploymentHandle, role: str) -> list[dict[str, Any]]:
    """The stats of each replica of one deployment routed by router.py, by id."""
    key = live.key(handle.app_name, handle.deployment_name)
    if key not in live.REPLICAS:  # the router starts with the first call
        await handle.stats.remote()
    ids = live.REPLICAS.get(key, ())

    async def probe(rid: str) -> dict[str, Any]:
        call = handle.options(session_id=rid).stats.remote(home=rid)
        try:
            stats = await asyncio.wait_for(call, PROBE_TIMEOUT_S)
        except asyncio.TimeoutError:
            call.cancel()
            return {"replica": rid, "role": role, "state": "busy"}
        except Exception as e:  # noqa: BLE001 - ReplicaGone, or the actor died
            cause = getattr(e, "cause", e)
            state = "gone" if isinstance(cause, ReplicaGone) else "error"
            return {"replica": rid, "role": role, "state": state, "error": type(cause).__name__}
        return {**stats, "role": role, "state": "up"}

    return list(await asyncio.gather(*(probe(rid) for rid in ids)))


async def _capture(app: Callable, scope: dict, receive: Callable) -> tuple[int, bytes]:
    status, body = 500, bytearray()

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))

    await app(scope, receive, send)
    return status, bytes(body)


async def _send(send: Callable, status: int, body: bytes, content_type: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
