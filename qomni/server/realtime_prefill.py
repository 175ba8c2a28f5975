"""The model reading along while the user speaks: a realtime session's prompt prefix.

When speech starts (or the first audio of a manual turn arrives) the conversation so far is
prefilled (`Omni.open_prefix`), and every time an audio-encoder window of the turn has all its
samples, the turn so far is prefilled up to that window, continuing the last prefix. The
response then prefills only what is left (the last, unfinished window and the assistant
header); the engine checks that what it continues is exactly what the whole turn gives (see
docs/architecture.md, item 4).

A session builds one prefix at a time. A build wanted while one runs waits, and only the newest
waits: it reads the turn's audio when it starts, so a client sending audio faster than builds
finish gets a build per finished build, not one per window. The session's `MelCache` keeps the
log-mel blocks of its audio, so each build transforms only the windows that are new. Closing
the session stops the build under way at its next log-mel block, starts no other, and frees
the prefix's row and the cached blocks.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

from qomni.cancel import Cancelled
from qomni.multimodal.audio import MelCache
from qomni.multimodal.chat import PromptTooLong
from qomni.multimodal.media import MediaPolicy
from qomni.omni import Omni
from qomni.prefix import PromptPrefix

log = logging.getLogger("qomni.server.realtime")

Messages = list[dict[str, Any]]
Build = Callable[[], Messages | None]  # the prompt to prefill, made when the build starts


class TurnPrefill:
    def __init__(self, omni: Omni, media: MediaPolicy, literal_text: bool, mel: MelCache):
        self.omni, self.media, self.literal_text, self.mel = omni, media, literal_text, mel
        self.prefix: PromptPrefix | None = None  # the newest prefix built
        self.windows = 0  # finished windows of the current turn asked for
        self.opened = False  # a prefix was asked for since the last take()
        self.full = False  # the turn no longer fits the engine: grow no more
        self.closed = False
        self._wanted: tuple[Build, bool] | None = None  # (build, partial) waiting to start
        self._task: asyncio.Task | None = None  # the builds' driver, while one runs
        self._cancel = threading.Event()  # set when the session closes

    @property
    def active(self) -> bool:
        return self.opened

    @property
    def building(self) -> bool:
        return self._task is not None and not self._task.done()

    def open(self, messages: Messages) -> None:
        """Prefill the conversation so far (a turn is starting)."""
        self.windows, self.opened, self.full = 0, True, False
        self._want(lambda: messages, partial=False)

    def grow(self, turn_length: int, turn: Build) -> None:
        """The turn being spoken is `turn_length` samples long: when a new encoder window has
        all its audio, prefill `turn()` (the conversation, then the turn so far; None when no
        turn is under way), made when the build starts."""
        processor = self.omni.processor
        windows = processor.finished_audio_windows(turn_length // processor.pre.hop_length)
        if windows > self.windows and not self.full:
            self.windows = windows
            self._want(turn, partial=True)

    def forget_turn(self) -> None:
        """The turn's audio was cleared: the next prefix replaces one that holds it."""
        self.windows, self.full = 0, False

    async def take(self) -> PromptPrefix | None:
        """The newest prefix (waiting for the build under way), for a request to continue; None
        if there is none. A build not started yet is dropped: the turn is over."""
        self._wanted, self.windows, self.opened, self.full = None, 0, False, False
        if self._task is not None:
            await asyncio.wait([self._task])  # the request being cancelled leaves it running
        prefix, self.prefix = self.prefix, None
        return prefix

    async def close(self) -> None:
        """The session is over: stop the build under way, start no other, free the prefix."""
        self.closed, self._wanted = True, None
        self._cancel.set()
        if self._task is not None:
            await asyncio.wait([self._task])
        self._drop()

    # -- builds -------------------------------------------------------------------------------

    def _want(self, build: Build, partial: bool) -> None:
        if self.closed:
            return
        self._wanted = (build, partial)
        if not self.building:
            self._task = asyncio.ensure_future(self._drive())

    async def _drive(self) -> None:
        try:
            while self._wanted is not None and not self.closed:
                (build, partial), self._wanted = self._wanted, None
                messages = build()
                if messages is not None:
                    await self._build(messages, partial)
        finally:
            if self.closed:
                self._drop()

    async def _build(self, messages: Messages, partial: bool) -> None:
        call = functools.partial(self.omni.open_prefix, messages, partial=partial,
                                 replaces=self.prefix, media=self.media,
                                 literal_text=self.literal_text, mel_cache=self.mel,
                                 cancel=self._cancel)
        self.prefix = None  # handed over: replaced, or closed if the build fails
        # The worker runs in this task's context (as asyncio.to_thread would): what a context
        # variable says of the session (e.g. the replica it is pinned to) holds there too.
        context = contextvars.copy_context()
        done = asyncio.get_running_loop().run_in_executor(None, context.run, call)
        try:
            self.prefix = await asyncio.shield(done)
        except asyncio.CancelledError:  # the event loop is going away: free what it makes
            done.add_done_callback(_close_result)
            raise
        except Cancelled:
            pass
        except PromptTooLong:  # the turn outgrew the engine: the request will say so
            self.full = partial
        except Exception:  # a prefix only saves time: the request goes without it
            log.warning("could not prefill the conversation ahead", exc_info=True)

    def _drop(self) -> None:
        if self.prefix is not None:
            self.prefix.close()
            self.prefix = None
        self.mel.clear()


def _close_result(done: asyncio.Future) -> None:
    if not done.cancelled() and done.exception() is None:
        done.result().close()
