"""A request and everything it holds while it runs: rows in the caches, tokens, speech state."""

from __future__ import annotations

import itertools
from bisect import bisect_right
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qomni.engine.prefill import Prompt
from qomni.engine.speech import SpeechText
from qomni.engine.static_vocoder import PooledStream
from qomni.engine.thinker_states import StatesSender, StatesUpdate, ThinkerStates
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
    code0: torch.Tensor | None = None  # [] the frame's codebook-0 code, chosen, not yet expanded
    hidden: torch.Tensor | None = None  # [D] talker hidden that chose code0
    seen: torch.Tensor | None = None  # [V] codes generated so far (repetition penalty)
    rope_delta: float = 0.0
    header: int = 0  # prompt tokens of the assistant segment the talker reads
    tail: torch.Tensor | None = None  # [header - 4, D] of them, read as trailing text
    frames: int = 0
    done: bool = False
    pending: list[torch.Tensor] = field(default_factory=list)  # frames [G] not yet vocoded
    vocoder: StreamingCode2Wav | PooledStream | None = None  # the runner's kind
    codes: list[torch.Tensor] = field(default_factory=list)


@dataclass(eq=False)
class Prefix:
    """The beginning of a prompt, prefilled into a thinker cache row ahead of its request (for
    example the conversation so far, while the user is still speaking). A request that starts
    with exactly these embeddings takes the row over and prefills only the rest."""

    inputs: ProcessedInputs
    capture: bool  # keep what the talker prompt needs (embeds, accept-layer hidden)
    row: int | None = None
    ready: bool = False
    closed: bool = False  # used, released or evicted: it holds nothing
    embeds: torch.Tensor | None = None  # [P, Dt], once ready
    captured: torch.Tensor | None = None  # [P, Dt] (so far), when capture
    prompt: Prompt | None = None  # embedded, while it is prefilled in pieces
    prefilled: int = 0  # tokens in its row
    # An earlier prefix this one replaces (the same turn, less of its audio): when that one is
    # prefilled, this one takes its row and keeps the tokens they share.
    base: Prefix | None = None
    continued: int = 0  # tokens kept from its base (0: prefilled whole)

    def free(self) -> None:
        self.embeds = self.captured = self.prompt = None


@dataclass(eq=False)  # identity: requests hold tensors
class Request:
    inputs: ProcessedInputs
    sampler: Sampler
    max_new_tokens: int
    decoder: StreamDecoder
    speech: SpeechState | None = None
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    row: int | None = None  # thinker cache row
    talker_row: int | None = None
    tokens: list[int] = field(default_factory=list)  # generated, including a final stop token
    finish_reason: str | None = None  # set when the thinker stops
    finished: bool = False  # everything (text and speech) is done and the rows are free
    prompt: Prompt | None = None  # embedded, while prefilled
    prefilled: int = 0  # prompt tokens in its row; the first token comes once all are
    captured: torch.Tensor | None = None  # [S, Dt] hidden after accept_hidden_layer layers
    seen: torch.Tensor | None = None  # [V] tokens in the context (repetition penalty only)
    counts: torch.Tensor | None = None  # [V] float: how often each token was generated
    events: deque = field(default_factory=deque)
    prefix: Prefix | None = None  # a prefilled prompt beginning to continue from
    cached_tokens: int = 0  # prompt tokens its prefix held: only the rest was prefilled
    stop_strings: tuple[str, ...] = ()  # the text ends before the first of these
    speech_stops: tuple[str, ...] = ()  # speech ends before these; the text goes on (tool calls)
    text: str = ""  # decoded so far; text[:sent] has gone out as TextDelta, the rest is held
    sent: int = 0
    stopped_by_string: bool = False
    speech_end: int | None = None  # speech covers tokens[:speech_end] (set by a stop match)
    # Where its thinker states go: a talker elsewhere (this engine runs none for it), else
    # `states`, which this engine's talker stage reads.
    states_out: Callable[[StatesUpdate], None] | None = None
    states: ThinkerStates | None = None
    sender: StatesSender | None = None  # what of them has been sent, once admitted
    _token_ends: list[int] = field(default_factory=list)  # len(text) after each token
    _pending_ids: list[int] = field(default_factory=list)

    @property
    def params(self) -> SamplingParams:
        """The thinker's sampling settings."""
        return self.sampler.params[0]

    @property
    def speaks(self) -> bool:
        """It wants speech: its prompt's talker states are captured."""
        return self.speech is not None

    @property
    def talks(self) -> bool:
        """Its talker runs in this engine (it needs a talker row)."""
        return self.speech is not None and self.states_out is None

    def send_states(self, update: StatesUpdate) -> None:
        if self.states_out is not None:
            self.states_out(update)
        else:
            self.states.apply(update)

    @property
    def thinker_done(self) -> bool:
        return self.finish_reason is not None

    def usage(self) -> Usage:
        frames = self.speech.frames if self.speech else 0
        return Usage(len(self.inputs), len(self.tokens), frames, self.cached_tokens)

    def text_ids(self) -> list[int]:
        """Generated ids without the stop token."""
        return self.tokens[:-1] if self.finish_reason == "stop" else list(self.tokens)

    def emit_token(self, token: int, stop: bool) -> bool:
        """Record a generated token and send the text it decides. Returns True when the text now
        contains a stop string: it is cut there, and the request must end with reason "stop".
        Text that could still become the start of a stop string or speech stop is held back,
        and so are the tokens that make it (the talker must not speak them yet)."""
        self.tokens.append(token)
        if not stop:
            self._pending_ids.append(token)
            before = len(self.text)
            self.text += self.decoder.push([token])
            self._token_ends.append(len(self.text))
            if self.speech is not None and self.speech_end is None:
                at = _find(self.text, self.speech_stops, before)
                if at is not None:
                    self.speech_end = bisect_right(self._token_ends, at)
            # min_tokens: stop strings count from then on, as stop tokens do
            early = len(self.tokens) < self.params.min_tokens
            at = None if early else _find(self.text, self.stop_strings, before)
            if at is not None:
                self.text, self.stopped_by_string = self.text[:at], True
                if self.speech_end is None:
                    self.speech_end = bisect_right(self._token_ends, at)
                self._send(len(self.text))
                return True
            self._send(len(self.text) - _held(self.text, self.stop_strings + self.speech_stops))
        else:
            self._token_ends.append(len(self.text))
        return False

    def emit_text_end(self) -> None:
        """The text is over: send what was held back (nothing after a stop string)."""
        if not self.stopped_by_string:
            self.text += self.decoder.flush()
        self._send(len(self.text), force=True)

    def _send(self, upto: int, force: bool = False) -> None:
        if upto > self.sent or (force and self._pending_ids):
            self.events.append(TextDelta(self.text[self.sent:upto], self._pending_ids))
            self.sent, self._pending_ids = max(upto, self.sent), []

    def speech_text(self) -> SpeechText:
        """The tokens the talker may read so far, and whether that is all of them (the last
        one then ends the text and is never spoken, as the reference's stop token)."""
        if self.speech_end is not None:  # -1 stands where a stop string begins
            return SpeechText(self.tokens[: self.speech_end] + [-1], True, True, False)
        if self.thinker_done:
            eos = self.finish_reason == "stop"  # by a stop token: stop strings set speech_end
            return SpeechText(self.tokens, True, eos, eos)
        if not (self.stop_strings or self.speech_stops):
            return SpeechText(self.tokens, False, False, False)
        return SpeechText(self.tokens[: bisect_right(self._token_ends, self.sent)], False,
                          False, False)

    def emit_audio(self, pcm: torch.Tensor, sample_rate: int) -> None:
        if pcm.numel():
            self.events.append(AudioChunk(pcm.cpu().numpy(), sample_rate))

    def emit_finished(self, reason: str) -> None:
        self.events.append(Finished(reason, self.usage()))


def _find(text: str, markers: tuple[str, ...], new_from: int) -> int | None:
    """Where the first marker starts in `text`, searching only matches that end after
    `new_from` (earlier text was searched before)."""
    hits = [i for m in markers
            if (i := text.find(m, max(0, new_from - len(m) + 1))) >= 0]
    return min(hits, default=None)


def _held(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that could still grow into a marker."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


def new_speech(speaker_id: int, params: SamplingParams, code_params: SamplingParams,
               max_frames: int, device: torch.device) -> SpeechState:
    return SpeechState(speaker_id, Sampler([params], device), Sampler([code_params], device),
                       max_frames)
