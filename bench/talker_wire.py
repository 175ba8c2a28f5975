"""What crosses the wire between a thinker and its talker replica (qomni/serve_ray/talker.py),
in bytes, pickled as Ray sends them: a speaking request's prompt states once, then the states
of each step that makes tokens speakable, and back the audio of each codec frame.

    PYTHONPATH=. python bench/talker_wire.py                       # Qwen3-Omni-30B-A3B widths
    PYTHONPATH=. python bench/talker_wire.py --hidden 2048 --prompt-tokens 4000

The tensors are random at the given widths (the sizes do not depend on their values).
"""

from __future__ import annotations

import argparse
import pickle

import numpy as np
import torch

from qomni.engine.thinker_states import PromptStates, SpeechParams, StatesUpdate
from qomni.events import AudioChunk
from qomni.models.thinker import MediaInputs
from qomni.multimodal.processor import ProcessedInputs
from qomni.sampling import SamplingParams

SAMPLES_PER_FRAME = 1920  # code2wav: 80 ms at 24 kHz


def size(obj: object) -> int:
    return len(pickle.dumps(obj, protocol=5))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=2048, help="thinker hidden size (Dt)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompt-tokens", type=int, default=1000)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    s, d = args.prompt_tokens, args.hidden
    inputs = ProcessedInputs(torch.zeros(s, dtype=torch.long), torch.zeros(3, s), 0.0,
                             "x" * (4 * s), MediaInputs())  # ~4 characters a token
    params = SpeechParams(2301, SamplingParams(temperature=0.9, top_k=50, seed=1),
                          SamplingParams(temperature=1.0, top_k=50, top_p=0.8, seed=2), 4095)
    prompt = StatesUpdate(PromptStates(inputs, torch.randn(s, d).to(dtype),
                                       torch.randn(s, d).to(dtype), params))

    def step(k: int) -> StatesUpdate:
        return StatesUpdate(tokens=list(range(1000, 1000 + k)),
                            embeds=torch.randn(k, d).to(dtype))

    frame = AudioChunk(np.zeros(SAMPLES_PER_FRAME, np.float32), 24000)
    print(f"thinker hidden {d}, {args.dtype}; pickled bytes (protocol 5)")
    print("| what | bytes | per |")
    print("|---|---:|---|")
    print(f"| prompt states, {s} tokens | {size(prompt):,} | request (once) |")
    print(f"|  of which per prompt token | {size(prompt) / s:,.0f} | prompt token |")
    for k in (1, 4):
        print(f"| step states, {k} token{'s' if k > 1 else ''} | {size(step(k)):,} | "
              f"feed call |")
    print(f"| audio chunk, 1 frame | {size(frame):,} | 80 ms of speech |")
    chunk = AudioChunk(np.zeros(25 * SAMPLES_PER_FRAME, np.float32), 24000)
    print(f"| audio chunk, 25 frames | {size(chunk):,} | 2 s of speech |")


if __name__ == "__main__":
    main()
