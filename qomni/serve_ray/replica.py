"""One engine replica: a Serve deployment wrapping one `Omni` (one device, or a CPU share).

The ingress calls it through a DeploymentHandle (client.py). Every call may name the replica
it means (`home`): a realtime session's calls all go to the replica holding its prefixes, and
a call that reaches another one (its replica died and was replaced) is answered `ReplicaGone`.
Prefixes stay here, by id; the ingress holds only their ids and lengths."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from qomni.engine.config import EngineConfig
from qomni.events import Finished
from qomni.omni import Omni
from qomni.prefix import PromptPrefix
from qomni.serve_ray.router import ReplicaGone
from qomni.serve_ray.talker import RayTalker


class EngineReplica:
    def __init__(self, model: str | None = None, *, dtype: str | None = None,
                 device: str | None = None, audio_output: bool | None = None,
                 quantization: str | None = None, engine_options: dict[str, Any] | None = None,
                 max_prefixes: int = 64, talker: DeploymentHandle | None = None):
        """`talker`: the talker replicas (talker.py), which then speak for this one: it loads
        the thinker alone."""
        self.omni = Omni.load(model, dtype=dtype, device=device,
                              audio_output=False if talker is not None else audio_output,
                              quantization=quantization, progress=False,
                              engine=EngineConfig(**(engine_options or {})))
        if talker is not None:
            self.omni.remote_talker = RayTalker(talker)
        ctx = serve.get_replica_context()
        self.id = ctx.replica_id.unique_id
        self.prefixes: OrderedDict[str, PromptPrefix] = OrderedDict()
        self.max_prefixes = max_prefixes
        self.started = time.time()
        self.running = 0
        self.served = {"requests": 0, "errors": 0, "cancelled": 0, "prompt_tokens": 0,
                       "completion_tokens": 0,
                       "audio_frames": 0, "cached_tokens": 0, "pinned_calls": 0}

    def _at_home(self, home: str | None) -> None:
        if home:
            if home != self.id:
                raise ReplicaGone(f"engine replica {home} is gone (this is {self.id})")
            self.served["pinned_calls"] += 1

    async def info(self) -> dict[str, Any]:
        """What the ingress needs to validate requests without the weights."""
        omni = self.omni
        return {"replica": self.id, "path": str(omni.path), "config": omni.config,
                "processor": omni.processor, "audio_output": omni.speaks,
                "max_model_len": omni.max_model_len, "max_audio_frames": omni.max_audio_frames}

    async def astream(self, messages: list[dict], kwargs: dict[str, Any],
                      prefix: str | None = None, home: str | None = None
                      ) -> AsyncIterator[Any]:
        """This replica's id, then `Omni.astream`'s events. `prefix`: the id of a prefix opened
        here. Cancelling the stream (the client went away) aborts the request."""
        self._at_home(home)
        kwargs = dict(kwargs)
        if prefix is not None:  # a prefix only saves time: an unknown one means none
            kwargs["prefix"] = self.prefixes.pop(prefix, None)
        self.running += 1
        try:
            yield self.id
            async with contextlib.aclosing(self.omni.astream(messages, **kwargs)) as events:
                async for ev in events:
                    if isinstance(ev, Finished):
                        u = ev.usage
                        for name in ("prompt_tokens", "completion_tokens", "audio_frames",
                                     "cached_tokens"):
                            self.served[name] += getattr(u, name)
                    yield ev
        except Exception:
            self.served["errors"] += 1
            raise
        except BaseException:  # cancelled: its client went away (the engine request aborted)
            self.served["cancelled"] += 1
            raise
        finally:
            self.running -= 1
            self.served["requests"] += 1

    async def open_prefix(self, messages: list[dict], kwargs: dict[str, Any],
                          replaces: str | None = None, home: str | None = None
                          ) -> tuple[str, str, int]:
        """`Omni.open_prefix` (`replaces`: a prefix id); returns (replica id, prefix id, its
        length in tokens)."""
        self._at_home(home)
        kwargs = dict(kwargs)
        if replaces is not None:
            kwargs["replaces"] = self.prefixes.pop(replaces, None)
        prefix = await asyncio.to_thread(self.omni.open_prefix, messages, **kwargs)
        pid = uuid.uuid4().hex
        self.prefixes[pid] = prefix
        while len(self.prefixes) > self.max_prefixes:  # an ingress that forgot its prefixes
            self.prefixes.popitem(last=False)[1].close()
        return self.id, pid, len(prefix)

    async def close_prefix(self, pid: str, home: str | None = None) -> None:
        if home and home != self.id:
            return  # its replica is gone, and its row with it
        prefix = self.prefixes.pop(pid, None)
        if prefix is not None:
            prefix.close()

    async def stats(self, home: str | None = None) -> dict[str, Any]:
        """Counters for /metrics and /health (a probe is not counted as a pinned call)."""
        if home and home != self.id:
            raise ReplicaGone(f"engine replica {home} is gone (this is {self.id})")
        return {"replica": self.id, "uptime_s": time.time() - self.started,
                "running": self.running, "prefixes": len(self.prefixes), **self.served,
                "engine": self.omni.engine_occupancy()}

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy (it is replaced)."""
        if not self.omni.alive():
            raise RuntimeError("the engine thread has stopped")
