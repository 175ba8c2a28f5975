"""Streaming code2wav: audio for each chunk of codec frames as the talker produces them.

B batch, G code groups (quantizers), n frames in a chunk, S samples.

Receptive field, per layer, in the layer's own units. Every layer is causal, so this is exactly
the left context a stream must keep for its output to equal one whole decode:
- attention layer (sliding window W = 72): the W-1 = 71 previous frames' keys and values. Stacked,
  the transformer output at frame i depends on frames i - 71·L .. i, 568 frames for L = 8 layers.
- causal conv, kernel k, dilation d: (k-1)·d input samples at its rate: 6 for the ConvNeXt
  depthwise convs (at 2 and 4 samples/frame) and the k7 convs, 6·(1+3+9) = 78 in each residual
  stack (at 32, 160, 640, 1920 samples/frame).
- transposed conv, kernel 2r, stride r: 1 input (its output block i mixes inputs i and i+1).
In frames the conv stack looks back about 9.4 frames; with the transformer, 578 frames.

`StreamingCode2Wav` keeps that context as *state* (a `Code2WavState`: per-layer key/value windows
and per-conv tails, a few kB to a few MB, independent of the utterance length) instead of
re-decoding old frames: each chunk costs only its own frames, and since every layer sees exactly
what it would see in a whole decode, the concatenated output equals `Code2Wav.forward` of all
frames (to float rounding: same ops, different matmul shapes).

How this differs from HF `Qwen3OmniMoeCode2Wav.chunked_decode(codes, 300, 25)`:
- HF decodes each 300-frame chunk with only 25 frames of left context (its RoPE positions
  restarting at 0). The transformer alone looks back 568 frames, so after the first chunk its
  samples only approximate a whole decode; here every sample is the whole decode's.
- HF keeps `1920·n - 555` samples per chunk (the length law, applied per chunk) and never
  produces the 555 samples that end each chunk: a ~23 ms hole at every 300-frame (24 s) boundary,
  `555·(chunks - 1)` samples short of a whole decode overall. Here those samples are emitted by
  the push that brings the frame they were waiting for.
- HF gives nothing until all frames exist; here the caller picks the chunk sizes (a small first
  chunk for latency, then larger ones for throughput) and each push returns audio at once.

After frames 1..T have been pushed, exactly `num_samples(T)` = 1920·T - 555 samples have been
emitted. The final 555 samples of a whole decode's length law do not exist (no frame T+1 will come
to complete them), so `flush()` has nothing left to emit: it ends the stream and returns an empty
chunk, which lets callers treat the end like any other chunk.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qomni.models.code2wav import Code2Wav, Code2WavState


class StreamingCode2Wav:
    """One utterance's incremental decoder: `push` frames as they come, then `flush`.

    `push(codes [G, n])` returns float32 samples [S]; `push(codes [B, G, n])` returns [B, 1, S],
    as `Code2Wav.forward`. Keep one shape (and batch size) for the whole utterance.
    """

    def __init__(self, model: Code2Wav):
        self.model = model
        self.state: Code2WavState | None = Code2WavState()
        self._batch: int | None = None
        self._unbatched: bool | None = None

    @property
    def frames(self) -> int:
        """Frames pushed so far."""
        return 0 if self.state is None else self.state.frames

    @torch.inference_mode()
    def push(self, codes: Tensor) -> Tensor:
        """Decode the next frames and return the samples they make final (none for n = 0)."""
        if self.state is None:
            raise RuntimeError("push() after flush(): start a new StreamingCode2Wav")
        if not isinstance(codes, Tensor) or codes.dim() not in (2, 3):
            raise ValueError("codes must be a [groups, frames] or [batch, groups, frames] tensor, "
                             f"got {getattr(codes, 'shape', type(codes).__name__)}")
        unbatched = codes.dim() == 2
        batch = codes[None] if unbatched else codes
        started = (self._batch, self._unbatched)
        if self._batch is not None and (batch.shape[0], unbatched) != started:
            raise ValueError(f"codes of shape {list(codes.shape)} do not continue a stream "
                             f"started with batch {self._batch}, unbatched={self._unbatched}")
        if batch.shape[2] == 0:
            return self._empty(batch.shape[0], unbatched)
        wav = self.model(batch, self.state)  # validates the codes before touching the state
        self._batch, self._unbatched = batch.shape[0], unbatched
        return wav[0, 0] if unbatched else wav

    @torch.inference_mode()
    def flush(self) -> Tensor:
        """End the stream; every sample was already emitted by `push`, so this chunk is empty."""
        self.state = None
        return self._empty(self._batch or 1, self._unbatched in (True, None))

    def _empty(self, batch: int, unbatched: bool) -> Tensor:
        shape = (0,) if unbatched else (batch, 1, 0)
        device = self.model.code_embedding.weight.device
        return torch.zeros(shape, dtype=torch.float32, device=device)


def push_together(streams: list[StreamingCode2Wav], codes: Tensor) -> list[Tensor]:
    """Push one chunk to several single-utterance streams in one batched decode.

    codes [B, G, n]: row b continues `streams[b]`. The streams must stand at the same frame, so
    their states (RoPE position, key/value windows, conv tails) have equal shapes and stack
    along the batch; afterwards each stream keeps its own row. Returns each stream's samples [S].
    """
    if len(streams) != codes.shape[0]:
        raise ValueError(f"{len(streams)} streams for {codes.shape[0]} rows of codes")
    if len(streams) == 1:
        return [streams[0].push(codes[0])]
    states = [s.state for s in streams]
    if any(st is None for st in states) or len({st.frames for st in states}) != 1:
        raise ValueError("push_together needs open streams at the same frame")
    if any(s._batch not in (None, 1) or s._unbatched is False for s in streams):
        raise ValueError("push_together continues single-utterance ([groups, frames]) streams")
    model = streams[0].model
    with torch.inference_mode():
        merged = Code2WavState(states[0].frames, {
            key: _stack([st.tails[key] for st in states]) for key in states[0].tails})
        wav = model(codes, merged)  # [B, 1, S]; validates the codes first
    for b, stream in enumerate(streams):
        stream.state = Code2WavState(merged.frames,
                                     {key: _row(v, b) for key, v in merged.tails.items()})
        stream._batch, stream._unbatched = 1, True
    return list(wav[:, 0])


def _stack(values: list) -> Tensor | tuple:
    if isinstance(values[0], tuple):  # an attention layer's (keys, values)
        return tuple(torch.cat(parts) for parts in zip(*values))
    return torch.cat(values)


def _row(value: Tensor | tuple, b: int) -> Tensor | tuple:
    if isinstance(value, tuple):
        return tuple(v[b: b + 1] for v in value)
    return value[b: b + 1]

