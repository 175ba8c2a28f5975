"""The model reading along while the user speaks: a realtime session's prompt prefix.

When speech starts (or the first audio of a manual turn arrives) the conversation so far is
prefilled (`Omni.open_prefix`), and every time an audio-encoder window of the turn has all its
samples, the turn so far is prefilled up to that window, continuing the last prefix. The
response then prefills only what is left (the last, unfinished window and the assistant
header); the engine checks that what it continues is exactly what the whole turn gives (see
docs/architecture.md, item 4).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from qomni.multimodal.media import MediaPolicy
from qomni.omni import Omni
from qomni.prefix import PromptPrefix
from qomni.server.realtime_conversation import user_turn

log = logging.getLogger("qomni.server.realtime")


class TurnPrefill:
    """At most one prefix being built at a time; each new one replaces the last (continuing its
    row when it starts with it)."""

    def __init__(self, omni: Omni, media: MediaPolicy, literal_text: bool):
        self.omni, self.media, self.literal_text = omni, media, literal_text
        self.task: asyncio.Future[PromptPrefix] | None = None
        self.windows = 0  # finished windows of the current turn in the prefix

    @property
    def active(self) -> bool:
        return self.task is not None

    def open(self, messages: list[dict[str, Any]], images: Sequence[bytes] = (),
             audio: np.ndarray | None = None) -> None:
        """Start prefilling `messages`, and with `audio` the turn being spoken (its images,
        then the audio so far) up to its finished windows."""
        old = self.task
        if audio is None:
            self.windows = 0
        else:
            messages = [*messages, {"role": "user", "content": user_turn(images, [audio])}]

        async def open_() -> PromptPrefix:
            replaces = None
            if old is not None:
                with contextlib.suppress(BaseException):
                    replaces = await old
            return await asyncio.to_thread(self.omni.open_prefix, messages,
                                           partial=audio is not None, replaces=replaces,
                                           media=self.media, literal_text=self.literal_text)

        self.task = asyncio.ensure_future(open_())

    def grow(self, messages: Callable[[], list[dict[str, Any]]], images: Sequence[bytes],
             turn_length: int, turn_so_far: Callable[[], np.ndarray | None]) -> None:
        """The turn being spoken is `turn_length` samples long: when a new encoder window has
        all its audio, prefill the conversation (`messages()`) and the turn up to that window
        (`turn_so_far()` copies the samples)."""
        processor = self.omni.processor
        windows = processor.finished_audio_windows(turn_length // processor.pre.hop_length)
        if windows > self.windows:
            audio = turn_so_far()
            if audio is not None:
                self.windows = windows
                self.open(messages(), images, audio)

    def forget_turn(self) -> None:
        """The turn's audio was cleared: the next prefix replaces one that holds it."""
        self.windows = 0

    async def take(self) -> PromptPrefix | None:
        """The prefix built so far (waiting for it), for a request to continue; None if there
        is none or it failed."""
        task, self.task, self.windows = self.task, None, 0
        if task is None:
            return None
        try:
            return await task
        except Exception:  # a prefix only saves time; the request goes without it
            log.warning("could not prefill the conversation ahead", exc_info=True)
            return None

    async def close(self) -> None:
        """Free the row of the prefix (the session is over)."""
        prefix = await self.take()
        if prefix is not None:
            prefix.close()
