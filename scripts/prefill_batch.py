"""Prefill of a batch of short prompts: one thinker forward per prompt (how the engine admitted
requests before) against one forward for all of them (how it does now), interleaved in one run,
best of several. Each includes the prompts' embedding and the first token's logits.

    PYTHONPATH=. python scripts/prefill_batch.py [--model DIR] [--dtype float32] [--repeats 7]

Without --model: the random "medium" checkpoint of `qomni bench --vs-vllm` (thinker hidden 512,
4 layers, 16 experts top-4), built once and cached.
"""

from __future__ import annotations

import argparse
import time

import torch

from qomni import EngineConfig, Omni
from qomni.bench.setup import bench_checkpoint
from qomni.bench.vs_vllm import conversations, medium_config
from qomni.engine.runner import Chunk, ModelRunner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = args.model or bench_checkpoint(medium_config())
    omni = Omni.load(path, dtype=args.dtype, device="cpu", audio_output=False, progress=False)
    convs = conversations()
    inputs = [omni.process(c) for c in convs]
    runner = ModelRunner(omni.model, EngineConfig(max_num_seqs=len(convs), max_model_len=512))

    def run(batched: bool) -> torch.Tensor:
        chunks = [Chunk(row, p, 0, len(p), False)
                  for row, p in enumerate(runner.embed(x) for x in inputs)]
        if batched:
            return runner.logits(runner.prefill(chunks)[0])
        return torch.cat([runner.logits(runner.prefill([c])[0]) for c in chunks])

    best = {False: float("inf"), True: float("inf")}
    first = {}
    with torch.inference_mode():
        for mode in (False, True):
            first[mode] = run(mode).argmax(-1)  # warm-up
        for _ in range(args.repeats):
            for mode in (False, True):
                start = time.perf_counter()
                run(mode)
                best[mode] = min(best[mode], time.perf_counter() - start)
    lengths = [len(x) for x in inputs]
    print(f"{len(inputs)} prompts of {min(lengths)}-{max(lengths)} tokens, {args.dtype}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}:")
    print(f"  one forward per prompt: {best[False] * 1000:7.1f} ms")
    print(f"  one forward for all:    {best[True] * 1000:7.1f} ms "
          f"({best[False] / best[True]:.2f}x)")
    print(f"  same first tokens: {torch.equal(first[False], first[True])}")


if __name__ == "__main__":
    main()
