"""Routing to engine replicas: least loaded, unless the request names its replica.

A request whose `session_id` (DeploymentHandle.options) is a replica's id goes to that replica
and waits for a free slot there: a realtime session's prefixes and audio cache live on one
replica. Every other request takes the less loaded of two random replicas (Serve's "power of
two choices"; the queue lengths are probed by Serve). When the named replica is gone (it died,
or was scaled away), the request goes anywhere and that replica answers `ReplicaGone`, so the
caller can re-home instead of waiting for a replica that will never come back."""

from __future__ import annotations

import random

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from qomni.serve_ray import live


class ReplicaGone(RuntimeError):
    """The replica a call was meant for is not the one that got it (it is gone)."""


class TalkerGone(RuntimeError):
    """The talker replica of a speaking request died: the engine replica raises it, the ingress
    answers it as a 503 (an APIError does not survive Ray's pickling)."""


class PinnedOrLeastLoaded(FIFOMixin, RequestRouter):
    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        dep = self._deployment_id
        live.REPLICAS[live.key(dep.app_name, dep.name)] = tuple(
            sorted(r.replica_id.unique_id for r in replicas))

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Sleep between rounds when every candidate is full (else the router spins).
            pending_request.routing_context.should_backoff = True
            home = pending_request.metadata.session_id
            if home:
                pinned = [r for r in candidate_replicas if r.replica_id.unique_id == home]
                if pinned:
                    return [pinned]
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]


ROUTER = f"{__name__}:{PinnedOrLeastLoaded.__name__}"
