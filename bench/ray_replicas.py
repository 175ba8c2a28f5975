"""Throughput of qomni on Ray Serve with 1 and with 2 engine replicas, the same requests (and,
with `--talker-replicas T`, each run with its speech on T talker replicas of their own).

Each run starts a local Ray instance with `--cpus` CPUs, serves `--model` (default: a tiny
random checkpoint) with R replicas of `--replica-cpus` CPUs each (a CPU core standing in for a
GPU: torch runs one thread per CPU a replica holds), and sends `--requests` streaming chat
completions, `--concurrency` at a time, through the openai client. Printed per R: wall time,
requests/s, time to first token and to first audio, request latency (median and p90).

    PYTHONPATH=. python bench/ray_replicas.py                            # tiny, text + speech
    PYTHONPATH=. python bench/ray_replicas.py --model DIR --max-tokens 64 --no-speech
    PYTHONPATH=. python bench/ray_replicas.py --replicas 1 --talker-replicas 1  # stages apart
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import threading
import time


def run(model: str, replicas: int, args: argparse.Namespace) -> dict[str, float]:
    import openai
    import ray
    from ray import serve

    from qomni.serve_ray import build_app

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(model, replicas=replicas, replica_cpus=args.replica_cpus,
                            dtype="float32", device="cpu", server={"model_name": "m"},
                            talker_replicas=args.talker_replicas),
                  name="qomni", route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                               max_retries=0, timeout=600)
        extra = {} if args.no_speech else {
            "modalities": ["text", "audio"], "audio": {"voice": "Ethan", "format": "pcm16"},
            "extra_body": {"max_audio_frames": args.audio_frames}}

        def one(i: int) -> tuple[float, float, float]:
            t0 = time.perf_counter()
            first = audio = None
            for chunk in client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": f"Request {i}"}],
                    max_tokens=args.max_tokens, stream=True, seed=i, **extra):
                delta = chunk.choices[0].delta if chunk.choices else None
                if first is None and delta is not None and delta.content:
                    first = time.perf_counter() - t0
                sound = getattr(delta, "audio", None) or {}  # (its text comes as transcript)
                if audio is None and (sound.get("data") if isinstance(sound, dict)
                                      else getattr(sound, "data", None)):
                    audio = time.perf_counter() - t0
            return first or 0.0, audio or 0.0, time.perf_counter() - t0

        one(-1)  # warm up: the engines start their threads on the first request
        results: list[tuple[float, float, float]] = []
        todo = list(range(args.requests))
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop()
                r = one(i)
                with lock:
                    results.append(r)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        serve.shutdown()
        ray.shutdown()
    ttft = sorted(r[0] for r in results)
    lat = sorted(r[2] for r in results)
    return {"wall_s": wall, "req_s": len(results) / wall,
            "ttft_p50": statistics.median(ttft),
            "ttfa_p50": statistics.median(r[1] for r in results),
            "lat_p50": statistics.median(lat),
            "lat_p90": lat[int(0.9 * (len(lat) - 1))]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: a tiny random one)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--audio-frames", type=int, default=24)
    p.add_argument("--no-speech", action="store_true")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    p.add_argument("--replica-cpus", type=float, default=1.0)
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--talker-replicas", type=int, default=0,
                   help="talker replicas (of --replica-cpus each) beside every run's engine "
                        "replicas (0: each engine replica speaks itself)")
    args = p.parse_args()
    model = args.model
    if model is None:
        from qomni.tiny import make_tiny

        model = str(make_tiny(tempfile.mkdtemp(prefix="qomni-tiny-")))
    print(f"{args.requests} streaming requests, {args.concurrency} at a time, max_tokens "
          f"{args.max_tokens}, speech {'off' if args.no_speech else f'{args.audio_frames} frames'}"
          f"; replicas of {args.replica_cpus:g} CPU on a {args.cpus}-CPU Ray instance")
    print("| replicas | talker replicas | wall s | req/s | TTFT p50 s | TTFA p50 s | "
          "latency p50 s | latency p90 s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in args.replicas:
        m = run(model, r, args)
        print(f"| {r} | {args.talker_replicas} | {m['wall_s']:.1f} | {m['req_s']:.2f} | "
              f"{m['ttft_p50']:.3f} | {m['ttfa_p50']:.3f} | "
              f"{m['lat_p50']:.2f} | {m['lat_p90']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
