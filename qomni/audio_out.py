"""Speech out: float32 PCM as the bytes of a file or a stream (wav, mp3, flac, opus, pcm16).

The one encoder of the project: `qomni generate --output` writes its WAV with it and the server
answers with it. numpy and the standard library for wav/pcm16; PyAV (a core dependency, its
wheels ship the encoders) for the compressed formats.
"""

from __future__ import annotations

import io
import wave
from os import PathLike
from typing import Literal, get_args

import numpy as np

AudioFormat = Literal["wav", "mp3", "flac", "opus", "pcm16"]
AUDIO_FORMATS: tuple[str, ...] = get_args(AudioFormat)
_AV_CODECS = {"mp3": ("libmp3lame", "mp3"), "flac": ("flac", "flac"), "opus": ("libopus", "ogg")}


def pcm16(pcm: np.ndarray) -> np.ndarray:
    """float32 [-1, 1] -> little-endian int16 (rounded, clipped)."""
    return np.clip(np.round(np.asarray(pcm, np.float32) * 32767.0), -32768, 32767).astype("<i2")


def encode_audio(pcm: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """Mono float32 samples -> bytes of `fmt` (one of AUDIO_FORMATS)."""
    samples = pcm16(pcm)
    if fmt == "pcm16":
        return samples.tobytes()
    if fmt == "wav":
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(sample_rate)
            w.writeframes(samples.tobytes())
        return buf.getvalue()
    if fmt not in _AV_CODECS:
        raise ValueError(f"unknown audio format {fmt!r}; choose one of {', '.join(AUDIO_FORMATS)}")
    import av

    codec, container = _AV_CODECS[fmt]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=sample_rate, layout="mono")
        if samples.size:
            frame = av.AudioFrame.from_ndarray(samples[None, :], format="s16", layout="mono")
            frame.sample_rate = sample_rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def write_wav(path: str | PathLike, pcm: np.ndarray, sample_rate: int) -> None:
    """Mono float32 samples -> a 16-bit PCM WAV file."""
    with open(path, "wb") as f:
        f.write(encode_audio(pcm, sample_rate, "wav"))
