"""What `Omni.generate` returns and `Omni.stream` yields."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    audio_frames: int = 0
    cached_tokens: int = 0  # prompt tokens continued from a prefilled prefix, not prefilled again

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class TextDelta:
    text: str
    token_ids: list[int]


@dataclass
class AudioChunk:
    pcm: np.ndarray  # float32 mono
    sample_rate: int


@dataclass
class Finished:
    reason: str  # "stop" (end of turn) | "length" (max_new_tokens) | "abort"
    usage: Usage


@dataclass
class GenerateOutput:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    audio: np.ndarray | None = None
    codes: object | None = None  # int64 tensor [num_code_groups, frames]
    sample_rate: int = 24000
