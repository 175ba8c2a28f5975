"""Command line: `qomni generate | serve | make-tiny | bench | quantize` (or `python -m qomni`)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence

from qomni.engine.config import EngineConfig


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per `EngineConfig` field (`--max-num-seqs`, ...), its help and default from
    the field."""
    group = parser.add_argument_group("engine")
    for f in dataclasses.fields(EngineConfig):
        if f.metadata.get("switch"):  # None / True / False
            group.add_argument("--" + f.name.replace("_", "-"), choices=list(_SWITCH),
                               default="auto", help=f.metadata["help"])
            continue
        default = "" if f.default is None else f" (default: {f.default})"
        group.add_argument("--" + f.name.replace("_", "-"), type=_at_least(f.metadata["least"]),
                           default=f.default, metavar="N", help=f.metadata["help"] + default)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)}
    for f in dataclasses.fields(EngineConfig):
        if f.metadata.get("switch"):
            values[f.name] = _SWITCH[values[f.name]]
    return EngineConfig(**values)


_SWITCH = {"auto": None, "on": True, "off": False}


def _at_least(least: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
        return value

    return parse

from qomni.server.limits import Limits, MiB


def _generate(args: argparse.Namespace) -> int:
    import numpy as np

    from qomni import AudioChunk, Finished, Omni, SamplingParams, TextDelta

    speak = args.output is not None
    omni = Omni.load(args.model, dtype=args.dtype, device=args.device, progress=not args.quiet,
                     audio_output=speak, quantization=args.quantization,
                     engine=engine_config(args), stage_devices=args.stage_devices)
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": args.prompt})
    sampling = None
    if args.temperature is not None and args.temperature > 0:
        sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, repetition_penalty=args.repetition_penalty)
    audio = []
    for event in omni.stream(messages, max_new_tokens=args.max_new_tokens, sampling=sampling,
                             seed=args.seed, return_audio=speak, speaker=args.speaker,
                             max_audio_frames=args.max_audio_frames):
        if isinstance(event, AudioChunk):
            audio.append(event.pcm)
        elif isinstance(event, TextDelta):
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif isinstance(event, Finished):
            sys.stdout.write("\n")
            if not args.quiet:
                u = event.usage
                print(f"[{event.reason}: {u.prompt_tokens} prompt + {u.completion_tokens} "
                      "generated tokens]", file=sys.stderr)
    if speak:
        from qomni.audio_out import write_wav

        pcm = np.concatenate(audio) if audio else np.zeros(0, np.float32)
        write_wav(args.output, pcm, omni.config.code2wav.sample_rate)
        if not args.quiet:
            print(f"[wrote {pcm.shape[0] / omni.config.code2wav.sample_rate:.2f} s of speech to "
                  f"{args.output}]", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from qomni.server import create_app, server_config
    except ImportError as e:
        raise RuntimeError(f"`qomni serve` needs the server packages ({e.name} is missing): "
                           "pip install 'qomni[serve]'") from None
    from qomni import Omni

    if args.model is None:
        print("qomni: no --model given: serving the tiny random demo checkpoint (its output is "
              "noise)", file=sys.stderr)
    if args.allowed_local_media_path and not os.path.isdir(args.allowed_local_media_path):
        raise FileNotFoundError(f"--allowed-local-media-path {args.allowed_local_media_path!r} "
                                "is not a directory")
    name = args.served_model_name or args.model or "qomni-tiny-demo"
    limits = Limits(max_request_bytes=args.max_request_mb * MiB,
                    max_media_items=args.max_media_items,
                    max_media_seconds=args.max_media_seconds,
                    max_realtime_sessions=args.max_realtime_sessions,
                    media_timeout_s=args.media_timeout,
                    media_networks=tuple(args.allow_media_network))
    server = {"model_name": name,
              "api_key": args.api_key or os.environ.get("QOMNI_API_KEY") or None,
              "allowed_local_media_path": args.allowed_local_media_path,
              "allow_remote_media": args.allow_remote_media, "limits": limits,
              "reasoning": {"auto": None, "on": True, "off": False}[args.reasoning],
              "allowed_origins": args.allowed_origins.split(",") if args.allowed_origins
              else None, "special_tokens_in_text": args.allow_special_tokens_in_text}
    if args.talker_replicas is not None and args.replicas is None:
        args.replicas = 1  # talker replicas speak for engine replicas: one, unless told
    if args.replicas is not None:
        if args.stage_devices:
            raise ValueError("--stage-devices places one engine's stages; it does not go with "
                             "--replicas")
        try:
            from qomni.serve_ray.run import serve_replicas
        except ImportError as e:
            raise RuntimeError(f"`qomni serve --replicas` needs Ray Serve ({e.name} is "
                               "missing): pip install 'qomni[ray]'") from None
        return serve_replicas(args, server)
    omni = Omni.load(args.model, dtype=args.dtype, device=args.device,
                     quantization=args.quantization, engine=engine_config(args),
                     stage_devices=args.stage_devices)
    app = create_app(omni, **server)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"qomni: serving {name!r} at http://{host}:{args.port}/v1 (OpenAI API: "
          "/v1/chat/completions, /v1/models, /v1/realtime; also /health, /metrics)",
          file=sys.stderr, flush=True)
    print(f"qomni: web demo at http://{host}:{args.port}/", file=sys.stderr, flush=True)
    uvicorn.Server(server_config(app, host=args.host, port=args.port,
                                 log_level=args.log_level)).run()
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from qomni.tiny import make_tiny

    path = make_tiny(args.dir, seed=args.seed, audible=True)
    print(f"wrote a tiny random-weight Qwen3-Omni checkpoint to {path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import json

    if args.vs_vllm:
        return _bench_vs_vllm(args)
    from qomni.bench import run
    from qomni.bench.report import format_report
    from qomni.bench.setup import CHUNK, DEFAULT, QUICK, Load, bench_config

    if args.print_config:
        print(json.dumps(bench_config(), indent=2))
        return 0
    settings = QUICK if args.quick else DEFAULT
    model, dtype = args.model, args.dtype
    if args.full_size:
        import dataclasses

        from qomni.bench.fullsize import full_size_checkpoint

        if args.model or args.vs_transformers:
            raise ValueError("--full-size builds its own checkpoint: no --model, and "
                             "transformers cannot hold the full-size model in this memory")
        from pathlib import Path

        config = (json.loads(Path(args.full_size_config).read_text()) if args.full_size_config
                  else None)
        model = str(full_size_checkpoint(args.quantization, config))
        # one turn, one KV cache row of 1024 tokens (the turn's prompt and reply take 454); its
        # reply streamed to the end (the turn's real-time factor); code2wav rows on one engine
        # chunk (the most the engine vocodes at once: a whole 50-frame decode's activations
        # were the run's peak, 0.8 GiB above the turn's); no calibration buffer beside the
        # model and its engine at the end
        settings = dataclasses.replace(settings, batches=(1,), reply_to_end=True,
                                       code2wav_frames=CHUNK, max_model_len=1024,
                                       calibrate_at_end=False)
        dtype = dtype or "bfloat16"  # the unquantized parts in fp32 would not fit 24 GiB
    settings = settings.changed(args.set)
    load = Load(dtype=dtype, device=args.device, quantization=args.quantization)
    results = run(model, settings=settings, load=load, vs_transformers=args.vs_transformers)
    print(format_report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    failed = [k for k in ("qomni", "transformers") if "error" in results.get(k, {})]
    return 1 if failed else 0


def _network(text: str) -> str:
    from qomni.multimodal.fetch import parse_networks

    try:
        parse_networks([text])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _quantize(args: argparse.Namespace) -> int:
    from qomni.quant.writer import quantize_checkpoint

    path = quantize_checkpoint(args.src, args.dst, scheme=args.scheme, group_size=args.group_size,
                               keep=args.keep, symmetric=not args.asymmetric,
                               progress=not args.quiet)
    print(f"wrote a {args.scheme} compressed-tensors checkpoint to {path}")
    return 0


QUANTIZATION_HELP = ("quantize weights while loading: int4 | int8 (the thinker, talker and code "
                     "predictor decoder layers), with overrides, e.g. "
                     "int4,code_predictor=int8,lm_heads=int8; checkpoints stored quantized need "
                     "no flag")
STAGE_DEVICES_HELP = ("put stages on their own devices, e.g. thinker=cuda:0,talker=cuda:1 (the "
                      "talker, code predictor and code2wav on the second GPU); stages not named "
                      "run on --device")


def _bench_vs_vllm(args: argparse.Namespace) -> int:
    import json

    from qomni.bench.vs_vllm import failed, format_report, run

    if args.vs_transformers:
        raise ValueError("--vs-vllm and --vs-transformers are separate runs: choose one")
    if args.device not in (None, "cpu"):
        raise ValueError(f"--vs-vllm runs vLLM's CPU build: --device must be cpu, got "
                         f"{args.device!r}")
    if args.model is not None and args.size is not None:
        raise ValueError("--size picks a random checkpoint; it does not go with --model")
    dtypes = [args.dtype] if args.dtype else ["float32", "bfloat16"]
    sizes = ["medium", "real"] if args.size in (None, "both") else [args.size]
    results = run(args.model, sizes=sizes, dtypes=dtypes, quick=args.quick,
                  venv=args.vllm_venv)
    print(format_report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 1 if failed(results) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qomni", description="Fast inference for Qwen3-Omni")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer one prompt, streaming text to the terminal")
    g.add_argument("--model", help="checkpoint directory or cached hub id "
                   "(default: a tiny random demo checkpoint)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--system", help="system prompt")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, help="sampling temperature (default: greedy)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--output", help="also speak the answer and write it to this WAV file")
    g.add_argument("--speaker", help="voice for --output: Ethan (default), Chelsie, Aiden")
    g.add_argument("--max-audio-frames", type=int,
                   help="cap on speech length in 80 ms frames (default: the checkpoint's)")
    g.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: bf16 on GPU and on "
                   "CPUs with bf16 matrix instructions, else fp32)")
    g.add_argument("--device", help="cpu | cuda | cuda:N")
    g.add_argument("--stage-devices", metavar="SPEC", help=STAGE_DEVICES_HELP)
    g.add_argument("--quantization", help=QUANTIZATION_HELP)
    g.add_argument("--quiet", action="store_true", help="print only the answer")
    add_engine_arguments(g)
    g.set_defaults(func=_generate)

    s = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    s.add_argument("--model", help="checkpoint directory or cached hub id "
                   "(default: a tiny random demo checkpoint)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", help="the model id clients send (default: --model)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set QOMNI_API_KEY)")
    s.add_argument("--allowed-local-media-path", metavar="DIR",
                   help="let requests name local media files under DIR (default: none)")
    s.add_argument("--allow-remote-media", action="store_true",
                   help="let requests name http(s) media URLs, which the server fetches")
    s.add_argument("--allowed-origins", metavar="ORIGINS",
                   help="comma-separated web origins (https://app.example) whose pages may call "
                        "the server, or '*' for any page (default: only the server's own pages)")
    s.add_argument("--allow-special-tokens-in-text", action="store_true",
                   help="read control-token strings in message text (<|im_start|>, ...) as "
                        "control tokens, as the reference does (default: as plain text)")
    s.add_argument("--max-request-mb", type=int, default=Limits.max_request_bytes // MiB,
                   help="largest request body and realtime message")
    s.add_argument("--max-media-items", type=int, default=Limits.max_media_items,
                   help="media parts per request")
    s.add_argument("--max-media-seconds", type=_positive, default=Limits.max_media_seconds,
                   help="longest audio or video input (default: the longest audio whose "
                        "tokens fit in a sequence of max_model_len)")
    s.add_argument("--media-timeout", type=_positive, default=Limits.media_timeout_s,
                   metavar="SECONDS",
                   help="deadline for fetching one remote media URL, redirects included")
    s.add_argument("--allow-media-network", action="append", default=[], type=_network,
                   metavar="CIDR", help="let remote media URLs reach this network besides "
                   "public addresses (repeatable; e.g. 10.0.0.0/8 for an internal media host; "
                   "loopback, private and link-local addresses are refused otherwise)")
    s.add_argument("--max-realtime-sessions", type=int, default=Limits.max_realtime_sessions,
                   help="open realtime sockets at once; more are refused (503)")
    s.add_argument("--reasoning", choices=("auto", "on", "off"), default="auto",
                   help="answer with reasoning_content apart from content (auto: on for a "
                        "Thinking checkpoint)")
    s.add_argument("--dtype", help="float32 | bfloat16 | float16")
    s.add_argument("--device", help="cpu | cuda | cuda:N")
    s.add_argument("--stage-devices", metavar="SPEC", help=STAGE_DEVICES_HELP)
    s.add_argument("--quantization", help=QUANTIZATION_HELP)
    s.add_argument("--log-level", default="info")
    add_engine_arguments(s)
    r = s.add_argument_group("scaling out on Ray Serve (pip install 'qomni[ray]'; "
                             "docs/scaling.md)")
    r.add_argument("--replicas", type=int, metavar="N",
                   help="serve N engine replicas behind one endpoint (least-loaded routing, "
                        "realtime sessions pinned to a replica)")
    r.add_argument("--ray-address", metavar="ADDR",
                   help="join this Ray cluster (e.g. ray://head:10001 or auto) instead of "
                        "starting a local one")
    r.add_argument("--max-replicas", type=int, metavar="M",
                   help="autoscale between --replicas and M replicas")
    r.add_argument("--target-ongoing-requests", type=float, default=4.0,
                   help="with --max-replicas: requests per replica the autoscaler aims at")
    r.add_argument("--replica-gpus", type=float,
                   help="GPUs per replica (default: 1 if the cluster has GPUs, else 0)")
    r.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per replica")
    r.add_argument("--talker-replicas", type=int, metavar="M",
                   help="run the talker, code predictor and code2wav on M replicas of their "
                        "own (--replica-gpus / --replica-cpus each); the engine replicas (1 "
                        "without --replicas) then hold the thinker alone and hand each "
                        "speaking request to one of them")
    s.set_defaults(func=_serve)

    t = sub.add_parser("make-tiny", help="write a tiny random-weight checkpoint")
    t.add_argument("dir")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_make_tiny)

    b = sub.add_parser("bench", help="time every stage against its hardware floor")
    b.add_argument("--model", help="checkpoint directory or cached hub id (default: a random "
                   "checkpoint with the real widths and a shallow depth, built once and cached)")
    b.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: bf16 on GPU and on "
                   "CPUs with bf16 matrix instructions, else fp32)")
    b.add_argument("--device", help="cpu | cuda | cuda:N")
    b.add_argument("--quantization", help=QUANTIZATION_HELP)
    b.add_argument("--quick", action="store_true", help="small prompt, few steps (a smoke run)")
    b.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="change one setting of the run, e.g. --set decode_tokens=32 or "
                        "--set batches=1,2 (an unknown NAME lists them all)")
    b.add_argument("--vs-transformers", action="store_true",
                   help="also run the same checkpoint through transformers and print ratios")
    b.add_argument("--vs-vllm", action="store_true",
                   help="instead: the thinker (text out) against vLLM's CPU build on the same "
                        "prompts, on random checkpoints at a medium and the real widths (or "
                        "--model); fp32 and bf16 unless --dtype")
    b.add_argument("--size", choices=("medium", "real", "both"),
                   help="--vs-vllm: which random checkpoint (default: both)")
    b.add_argument("--vllm-venv", metavar="DIR", help="vLLM's venv for --vs-vllm (default: "
                   "what scripts/setup-vllm-cpu.sh made, ~/.cache/qomni/vllm-venv)")
    b.add_argument("--json", metavar="PATH", help="also save all results as JSON")
    b.add_argument("--full-size", action="store_true",
                   help="the published Qwen3-Omni-30B-A3B-Instruct at full depth, random weights "
                        "written quantized by --quantization (built once into ~/.cache/qomni, "
                        "20 GB for int4); bf16 by default, one request")
    # The same run on a smaller config.json (for tests).
    b.add_argument("--full-size-config", metavar="PATH", help=argparse.SUPPRESS)
    b.add_argument("--print-config", action="store_true",
                   help="print the default benchmark model's config.json and exit")
    b.set_defaults(func=_bench)

    q = sub.add_parser("quantize", help="write a compressed-tensors (W4A16/W8A16) checkpoint")
    q.add_argument("src", help="full-precision checkpoint directory")
    q.add_argument("dst", help="where to write the quantized checkpoint")
    q.add_argument("--scheme", choices=("w4a16", "w8a16"), default="w4a16")
    q.add_argument("--group-size", type=int,
                   help="inputs per scale (default: 128 for w4a16, per channel for w8a16; "
                        "0: per channel)")
    q.add_argument("--keep", nargs="+", default=[], metavar="COMPONENT",
                   choices=("thinker", "talker", "code_predictor"),
                   help="components left in full precision, e.g. --keep code_predictor")
    q.add_argument("--asymmetric", action="store_true", help="zero points as well as scales")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_quantize)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"qomni: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
