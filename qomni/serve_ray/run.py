"""`qomni serve --replicas N [--talker-replicas M] [--ray-address ADDR]`: the Serve application
on a Ray cluster (a local one, started here, without an address), until Ctrl-C; then in-flight
requests finish (each replica waits up to app.SHUTDOWN_TIMEOUT_S) before the replicas stop."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any

import ray
from ray import serve

from qomni.cli import engine_config
from qomni.serve_ray.app import build_app

APP_NAME = "qomni"


def serve_replicas(args: argparse.Namespace, server: dict[str, Any]) -> int:
    if args.replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {args.replicas}")
    talkers = args.talker_replicas or 0
    if talkers < 0:
        raise ValueError(f"--talker-replicas must be at least 0, got {talkers}")
    if args.max_replicas is not None and args.max_replicas < args.replicas:
        raise ValueError(f"--max-replicas {args.max_replicas} is below --replicas "
                         f"{args.replicas}")
    ray.init(address=args.ray_address)
    gpus = args.replica_gpus
    if gpus is None:  # a GPU per replica when the cluster has GPUs
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    autoscaling = None
    if args.max_replicas is not None and args.max_replicas > args.replicas:
        autoscaling = {"min_replicas": args.replicas, "max_replicas": args.max_replicas,
                       "target_ongoing_requests": args.target_ongoing_requests}
    app = build_app(args.model, replicas=args.replicas, autoscaling=autoscaling,
                    replica_gpus=gpus, replica_cpus=args.replica_cpus, dtype=args.dtype,
                    device=args.device, quantization=args.quantization,
                    engine_options=dataclasses.asdict(engine_config(args)), server=server,
                    talker_replicas=talkers)
    serve.start(http_options={"host": args.host, "port": args.port})
    try:
        serve.run(app, name=APP_NAME, route_prefix="/")
        host = f"[{args.host}]" if ":" in args.host else args.host
        scale = (f"{args.replicas}-{args.max_replicas} autoscaled" if autoscaling
                 else str(args.replicas))
        apart = f" and {talkers} talker replicas" if talkers else ""
        print(f"qomni: serving {server['model_name']!r} at http://{host}:{args.port}/v1 on "
              f"Ray Serve: {scale} engine replicas{apart}, {gpus:g} GPU each (web demo at /, "
              "/health and /metrics cover every engine replica)", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 130
    finally:
        # Our own cluster goes with us; on a shared one only our application does.
        if args.ray_address is None:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        ray.shutdown()
