"""The Serve application: `build_app(...)` for Python, `app_builder` for `serve run`.

    Engine  N replicas, each one `Omni` (one GPU each with replica_gpus=1, or a CPU share),
            routed least-loaded, a realtime session's calls pinned to one (router.py)
    Talker  with talker_replicas=M: M replicas of the talker, code predictor and code2wav
            (talker.py); the engine replicas then load the thinker alone and hand each
            speaking request's thinker states to one of them, which streams the audio back
    Ingress the same FastAPI app as `qomni serve` (chat completions with SSE audio, the
            realtime WebSocket, the web demo, /metrics), calling the engine replicas through
            a DeploymentHandle, streaming; /health and /metrics probe the talker replicas too

Serve's own settings per deployment (num_replicas, autoscaling_config, ray_actor_options,
max_ongoing_requests, health checks, graceful shutdown) can be overridden by name ("Engine",
"Talker", "Ingress") in a `serve run` config file (deploy/ray-serve.yaml)."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from qomni.serve_ray.ingress import Ingress
from qomni.serve_ray.replica import EngineReplica
from qomni.serve_ray.router import ROUTER
from qomni.serve_ray.talker import TalkerReplica

ENGINE, TALKER, INGRESS = "Engine", "Talker", "Ingress"
# A speaking request holds one stream on its talker replica and sends its states in short calls
# beside it: a cap near the streams' count would hold those calls back behind the streams they
# feed. The talker engine queues what its cache rows cannot take yet.
TALKER_MAX_ONGOING = 1024
SHUTDOWN_TIMEOUT_S = 120.0  # a stopping replica lets its requests finish for this long


def build_app(model: str | None = None, *, replicas: int = 1,
              autoscaling: dict[str, Any] | None = None, replica_gpus: float = 0.0,
              replica_cpus: float = 1.0, dtype: str | None = None, device: str | None = None,
              audio_output: bool | None = None, quantization: str | None = None,
              engine_options: dict[str, Any] | None = None,
              max_ongoing_requests: int = 32, server: dict[str, Any] | None = None,
              talker_replicas: int = 0, talker_gpus: float | None = None,
              talker_cpus: float | None = None) -> Application:
    """`replicas` engine replicas of `model` behind one ingress. `autoscaling`: Serve's
    autoscaling_config (min_replicas, max_replicas, target_ongoing_requests, ...), instead of
    a fixed count. `quantization`: Omni.load's ("int8" | "int4"). `engine_options`:
    EngineConfig's fields (max_num_seqs, max_model_len, ...).
    `server`: create_app's keywords (model_name, api_key, allow_remote_media, reasoning, ...;
    `limits` as a dict of Limits fields). `talker_replicas`: speech on that many replicas of
    its own (0: each engine replica speaks itself), with `talker_gpus` / `talker_cpus` each
    (default: as an engine replica)."""
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    talker_gpus = replica_gpus if talker_gpus is None else talker_gpus
    talker_cpus = replica_cpus if talker_cpus is None else talker_cpus
    if min(replica_gpus, replica_cpus, talker_gpus, talker_cpus) < 0:
        raise ValueError("replica_gpus, replica_cpus, talker_gpus and talker_cpus must be >= 0")
    if talker_replicas < 0:
        raise ValueError(f"talker_replicas must be at least 0, got {talker_replicas}")
    if talker_replicas and audio_output is False:
        raise ValueError("talker_replicas speak for the engine replicas; with "
                         "audio_output=False there is nothing for them to do")
    talker = None
    if talker_replicas:
        talker = serve.deployment(TalkerReplica, name=TALKER).options(
            ray_actor_options={"num_cpus": talker_cpus, "num_gpus": talker_gpus},
            num_replicas=talker_replicas, max_ongoing_requests=TALKER_MAX_ONGOING,
            request_router_config=RequestRouterConfig(request_router_class=ROUTER),
            health_check_period_s=10.0, health_check_timeout_s=60.0,
            graceful_shutdown_wait_loop_s=1.0, graceful_shutdown_timeout_s=SHUTDOWN_TIMEOUT_S,
        ).bind(model, dtype=dtype, device=device, quantization=quantization,
               engine_options=engine_options)
    count: dict[str, Any] = ({"autoscaling_config": autoscaling} if autoscaling
                             else {"num_replicas": replicas})
    engine = serve.deployment(EngineReplica, name=ENGINE).options(
        ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus},
        max_ongoing_requests=max_ongoing_requests,
        request_router_config=RequestRouterConfig(request_router_class=ROUTER),
        health_check_period_s=10.0, health_check_timeout_s=60.0,
        graceful_shutdown_wait_loop_s=1.0, graceful_shutdown_timeout_s=SHUTDOWN_TIMEOUT_S,
        **count)
    ingress = serve.deployment(serve.ingress()(Ingress), name=INGRESS).options(
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024,
        graceful_shutdown_wait_loop_s=1.0, graceful_shutdown_timeout_s=SHUTDOWN_TIMEOUT_S)
    return ingress.bind(
        engine.bind(model, dtype=dtype, device=device, audio_output=audio_output,
                    quantization=quantization, engine_options=engine_options, talker=talker),
        dict(server or {}), talker)


def app_builder(args: dict[str, Any]) -> Application:
    """For `serve run qomni.serve_ray:app_builder model=DIR replicas=2` and config files:
    `args` are build_app's keywords (from the command line they arrive as strings)."""
    args = dict(args)
    for name in ("replicas", "max_ongoing_requests", "talker_replicas"):
        if name in args:
            args[name] = int(args[name])
    for name in ("replica_gpus", "replica_cpus", "talker_gpus", "talker_cpus"):
        if name in args:
            args[name] = float(args[name])
    return build_app(**args)
