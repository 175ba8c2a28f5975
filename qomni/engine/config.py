"""`EngineConfig`: how the engine is sized. Each field's default and help are written here once;
`qomni serve` and `qomni generate` make their flags from these fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# The talker holds a prompt's user turns, 9 assistant positions and the speech frames: by
# default as many tokens as the thinker, and 512 more (about 40 s of speech after a prompt that
# fills the thinker).
TALKER_EXTRA_LEN = 512


def _setting(default: int | None, help: str, least: int = 1) -> dataclasses.Field:
    return field(default=default, metadata={"help": help, "least": least})


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = _setting(
        8, "requests (and prefilled prompt prefixes) running at once: one KV cache row each")
    max_model_len: int = _setting(
        4096, "thinker tokens per sequence, prompt and reply together")
    max_talker_len: int | None = _setting(
        None, "talker tokens per sequence: the prompt's user turns, 9 assistant positions and "
        f"the speech frames (default: max_model_len + {TALKER_EXTRA_LEN})", least=10)
    first_chunk_frames: int = _setting(
        1, "codec frames (80 ms each) in the first audio chunk of a reply: its latency")
    chunk_frames: int = _setting(
        25, "the longest audio chunk, in codec frames; chunks grow to it from the first")
    max_prefill_tokens: int = _setting(
        2048, "prompt tokens prefilled per engine step, over all requests: a longer prompt is "
        "prefilled in pieces over several steps, so running requests keep decoding")
    audio_cache_windows: int = _setting(
        64, "audio-encoder windows (8 s) kept encoded, so a conversation's earlier audio is not "
        "encoded again at every turn (0: no cache)", least=0)
    cuda_graphs: bool | None = field(default=None, metadata={"help": (
        "decode steps (thinker token, talker frame with the code predictor, vocoder chunk) on "
        "static buffers per batch bucket, captured as CUDA graphs: auto (default) on a CUDA "
        "device unless a stage cannot be captured (quantized MoE experts); on (on the CPU the "
        "static steps run uncaptured); off"), "switch": True})

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("switch"):
                if value is not None and not isinstance(value, bool):
                    raise ValueError(f"{f.name} must be True, False or None (auto), "
                                     f"got {value!r}")
                continue
            if value is None and f.default is None:
                continue
            integer = isinstance(value, int) and not isinstance(value, bool)
            if not integer or value < f.metadata["least"]:
                raise ValueError(f"{f.name} must be an integer >= {f.metadata['least']}, "
                                 f"got {value!r}")
        if self.first_chunk_frames > self.chunk_frames:
            raise ValueError(f"first_chunk_frames ({self.first_chunk_frames}) must not exceed "
                             f"chunk_frames ({self.chunk_frames})")

    @property
    def talker_len(self) -> int:
        """max_talker_len, or its default."""
        if self.max_talker_len is not None:
            return self.max_talker_len
        return self.max_model_len + TALKER_EXTRA_LEN
