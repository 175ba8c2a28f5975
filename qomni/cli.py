"""Command line: `qomni generate | make-tiny` (also `python -m qomni`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _generate(args: argparse.Namespace) -> int:
    from qomni import Finished, Omni, SamplingParams, TextDelta

    omni = Omni.load(args.model, dtype=args.dtype, device=args.device, progress=not args.quiet)
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": args.prompt})
    sampling = None
    if args.temperature is not None and args.temperature > 0:
        sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, repetition_penalty=args.repetition_penalty)
    for event in omni.stream(messages, max_new_tokens=args.max_new_tokens, sampling=sampling,
                             seed=args.seed):
        if isinstance(event, TextDelta):
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif isinstance(event, Finished):
            sys.stdout.write("\n")
            if not args.quiet:
                u = event.usage
                print(f"[{event.reason}: {u.prompt_tokens} prompt + {u.completion_tokens} "
                      "generated tokens]", file=sys.stderr)
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from qomni.tiny import make_tiny

    path = make_tiny(args.dir, seed=args.seed)
    print(f"wrote a tiny random-weight Qwen3-Omni checkpoint to {path}")
    return 0


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
    g.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: bf16 on GPU, "
                   "fp32 on CPU)")
    g.add_argument("--device", help="cpu | cuda | cuda:N")
    g.add_argument("--quiet", action="store_true", help="print only the answer")
    g.set_defaults(func=_generate)

    t = sub.add_parser("make-tiny", help="write a tiny random-weight checkpoint")
    t.add_argument("dir")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_make_tiny)
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
