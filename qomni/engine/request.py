"""A request and everything it holds while it runs: rows in the caches, tokens, speech state."""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import torch

from qomni.events import AudioChunk, Finished, TextDelta, Usage
from qomni.models.code2wav_stream import StreamingCode2Wav
from qomni.multimodal.chat import StreamDecoder
from qomni.multimodal.processor import ProcessedInputs
from qomni.sampling import Sampler, SamplingParams

_ids = itertools.count()


@dataclass(eq=False)
class SpeechState:
    speaker_id: int
    sampler: Sampler  # codebook 0
    code_sampler: Sampler  # codebooks 1..G-1
    max_frames: int
    row: int | None = None
    code0: torch.Tensor | None = None  # [] the frame's codebook-0 code, chosen, not yet expanded
    hidden: torch.Tensor | None = None  # [D] talker hidden that chose code0
    seen: torch.Tensor | None = None  # [V] codes generated so far (repetition penalty)
    rope_delta: float = 0.0
    frames: int = 0
    done: bool = False
    pending: list[torch.Tensor] = field(default_factory=list)  # frames [G] not yet vocoded
    vocoder: StreamingCode2Wav | None = None
    codes: list[torch.Tensor] = field(default_factory=list)


@dataclass(eq=False)  # identity: requests hold tensors
class Request:
    inputs: ProcessedInputs
    sampler: Sampler
    max_new_tokens: int
    decoder: StreamDecoder
    speech: SpeechState | None = None
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    row: int | None = None
    tokens: list[int] = field(default_factory=list)  # generated, including a final stop token
    finish_reason: str | None = None  # set when the thinker stops
    finished: bool = False  # everything (text and speech) is done and the rows are free
    embeds: torch.Tensor | None = None  # [S, Dt] prompt embeddings, kept for the talker prompt
    captured: torch.Tensor | None = None  # [S, Dt] hidden after accept_hidden_layer layers
    seen: torch.Tensor | None = None  # [V] tokens in the context (repetition penalty only)
    events: deque = field(default_factory=deque)
    _pending_ids: list[int] = field(default_factory=list)

    @property
    def thinker_done(self) -> bool:
        return self.finish_reason is not None

    def usage(self) -> Usage:
        frames = self.speech.frames if self.speech else 0
        return Usage(len(self.inputs), len(self.tokens), frames)

    def text_ids(self) -> list[int]:
        """Generated ids without the stop token."""
        return self.tokens[:-1] if self.finish_reason == "stop" else list(self.tokens)

    def emit_token(self, token: int, stop: bool) -> None:
        self.tokens.append(token)
        if stop:
            return
        self._pending_ids.append(token)
        text = self.decoder.push([token])
        if text:
            self.events.append(TextDelta(text, self._pending_ids))
            self._pending_ids = []

    def emit_text_end(self) -> None:
        tail = self.decoder.flush()
        if tail or self._pending_ids:
            self.events.append(TextDelta(tail, self._pending_ids))
            self._pending_ids = []

    def emit_audio(self, pcm: torch.Tensor, sample_rate: int) -> None:
        if pcm.numel():
            self.events.append(AudioChunk(pcm.cpu().numpy(), sample_rate))

    def emit_finished(self, reason: str) -> None:
        self.events.append(Finished(reason, self.usage()))


def new_speech(speaker_id: int, params: SamplingParams, code_params: SamplingParams,
               max_frames: int, device: torch.device) -> SpeechState:
    return SpeechState(speaker_id, Sampler([params], device), Sampler([code_params], device),
                       max_frames)
