"""`Limits`: how much one client may ask of the server. A limit left None follows the model and
the engine it serves (`for_model`), so the defaults never contradict each other: no audio longer
than its tokens fit in `max_model_len`, no reply longer than a sequence. No web framework here:
the command line reads these defaults to write its flags."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qomni.multimodal.media import MediaPolicy

if TYPE_CHECKING:
    from qomni.omni import Omni

MiB = 1024 * 1024
# Tokens of a prompt that are not the audio: the chat template's and a short system prompt's.
PROMPT_OVERHEAD_TOKENS = 256


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 64 * MiB  # the whole HTTP body (base64 media included)
    max_media_items: int = 16  # media parts per request
    max_media_bytes: int = 48 * MiB  # one decoded media item
    # One audio or video item's duration (None: the longest audio whose tokens fit in
    # max_model_len beside PROMPT_OVERHEAD_TOKENS).
    max_media_seconds: float | None = None
    media_timeout_s: float = 30.0  # one remote download, redirects included
    # networks (CIDR) remote media may come from besides public addresses, e.g. "10.0.0.0/8"
    media_networks: tuple[str, ...] = ()
    max_tokens: int | None = None  # the largest max_tokens a request may ask (None: a sequence)
    default_max_tokens: int = 1024  # when the request gives none (Omni.generate's default)
    max_audio_frames: int | None = None  # speech per reply, 80 ms frames (None: the model's cap)
    max_pending: int = 64  # requests queued or running; more get 503
    max_realtime_sessions: int = 32  # open realtime sockets; more are refused with 503

    def for_model(self, omni: Omni) -> Limits:
        """These limits with each None made concrete for `omni` and its engine."""
        max_len = omni.max_model_len
        max_tokens = self.max_tokens or max_len - 1
        return dataclasses.replace(
            self, max_tokens=max_tokens,
            default_max_tokens=min(self.default_max_tokens, max_tokens),
            max_media_seconds=self.max_media_seconds or audio_seconds_that_fit(omni, max_len),
            max_audio_frames=self.max_audio_frames or omni.max_audio_frames)

    def media_policy(self, *, allow_remote: bool, local_root: Path | None) -> MediaPolicy:
        """The server's media rules: remote URLs only when allowed, local paths only under
        `local_root` (none at all without it), sizes and durations capped."""
        return MediaPolicy(allow_remote=allow_remote, allow_local=local_root is not None,
                           local_root=local_root, max_bytes=self.max_media_bytes,
                           timeout=self.media_timeout_s, max_seconds=self.max_media_seconds,
                           allowed_networks=self.media_networks)


def audio_seconds_that_fit(omni: Omni, max_model_len: int) -> float:
    """The longest audio, in whole seconds, whose tokens leave PROMPT_OVERHEAD_TOKENS of a
    `max_model_len` sequence (10 minutes of audio are ~7,800 tokens)."""
    from qomni.models.audio_encoder import audio_token_count

    pre, n_window = omni.processor.pre, omni.config.thinker.audio.n_window
    frames_per_second = pre.sampling_rate / pre.hop_length
    budget = max_model_len - PROMPT_OVERHEAD_TOKENS

    def tokens(seconds: int) -> int:
        return audio_token_count(math.ceil(seconds * frames_per_second), n_window)

    lo, hi = 1, 1
    while tokens(hi) <= budget:  # the count grows with the duration: search for the edge
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if tokens(mid) <= budget else (lo, mid)
    return float(lo)
