"""Audio input: decode any container to 16 kHz mono float32, and Whisper-style log-mel features.

``load_audio`` decodes with PyAV (so wav/flac/mp3/ogg/opus/m4a and the audio track of a video all
work), downmixes by averaging channels and resamples with soxr "HQ" (what librosa does, which the
reference's loaders use). ``log_mel_features`` reproduces transformers' ``WhisperFeatureExtractor``
as Qwen3-Omni's processor calls it (pad to the longest, no truncation), batched in torch.
"""

from __future__ import annotations

import hashlib
import io
import math
import threading
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qomni.cancel import check_cancelled

from .media import MediaError, resolve_media

# The reflect padding of a centred STFT (n_fft // 2 = 200 samples) needs more samples than that;
# one 25 ms window is the least that makes a meaningful frame.
MIN_SAMPLES = 400

# Full-scale divisors for integer sample formats (PyAV names and numpy kinds).
_INT_SCALE = {"s16": 32768.0, "s32": 2147483648.0, "s64": 9223372036854775808.0}


def _to_mono_f32(arr: np.ndarray, name: str) -> np.ndarray:
    """Integer PCM -> [-1, 1) float32; 2-D -> mean over the channel axis (the shorter one)."""
    if arr.dtype.kind not in "iuf":
        raise MediaError(name, f"unsupported array dtype {arr.dtype}")
    if arr.dtype.kind == "u":
        half = float(1 << (8 * arr.dtype.itemsize - 1))
        arr = (arr.astype(np.float64) - half) / half
    elif arr.dtype.kind == "i":
        arr = arr.astype(np.float64) / float(1 << (8 * arr.dtype.itemsize - 1))
    if arr.ndim == 2:
        # soundfile gives (samples, channels), librosa/torchaudio (channels, samples).
        arr = arr.mean(axis=0 if arr.shape[0] <= arr.shape[1] else 1)
    elif arr.ndim != 1:
        raise MediaError(name, f"audio array must be 1-D or 2-D, got shape {tuple(arr.shape)}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise MediaError(name, "audio contains NaN or infinite samples")
    return arr


def _frame_to_mono(frame: Any) -> np.ndarray:
    """One decoded PyAV frame -> mono float32 samples, whatever its sample format."""
    fmt = frame.format
    arr = frame.to_ndarray()
    channels = frame.layout.nb_channels
    if not fmt.is_planar:
        arr = arr.reshape(-1, channels).T  # packed: interleaved samples in one row
    base = fmt.name.rstrip("p")
    if base == "u8":
        arr = (arr.astype(np.float32) - 128.0) / 128.0
    elif base in _INT_SCALE:
        arr = (arr.astype(np.float64) / _INT_SCALE[base]).astype(np.float32)
    else:
        arr = arr.astype(np.float32, copy=False)
    return arr.mean(axis=0) if channels > 1 else arr[0]


def _decode(source: bytes | Path, name: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    import av  # imported lazily: only media decoding needs it

    f = str(source) if isinstance(source, Path) else io.BytesIO(source)
    try:
        container = av.open(f, mode="r", metadata_errors="ignore")
    except Exception as e:  # noqa: BLE001 - any open failure means a bad input
        raise MediaError(name, f"not a readable audio or video file ({_why(e)})") from None
    with container:
        if not container.streams.audio:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise MediaError(
                name,
                f"no audio track (format '{container.format.name}', streams: {', '.join(kinds)})",
            )
        stream = container.streams.audio[0]
        chunks: list[np.ndarray] = []
        rate, total = 0, 0
        try:
            for frame in container.decode(stream):
                if frame.samples == 0:
                    continue
                if rate == 0:
                    rate = frame.sample_rate
                elif frame.sample_rate != rate:
                    raise MediaError(name, "sample rate changes within the stream")
                chunks.append(_frame_to_mono(frame))
                total += frame.samples
                # Stop as soon as the limit is passed: never decode an hour to reject it.
                if max_seconds is not None and total > max_seconds * rate:
                    raise MediaError(name, f"audio longer than the {max_seconds:g} s limit")
        except MediaError:
            raise
        except Exception as e:  # noqa: BLE001 - no raw PyAV error may escape
            raise MediaError(name, f"could not decode audio ({_why(e)})") from None
    if total == 0:
        raise MediaError(name, "audio track has no samples")
    return np.concatenate(chunks), rate


def _why(e: Exception) -> str:
    msg = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return msg.split(": '")[0]  # PyAV appends the (meaningless for BytesIO) file name


def _resample(wav: np.ndarray, orig_sr: int, sampling_rate: int) -> np.ndarray:
    if orig_sr == sampling_rate:
        return wav
    import soxr

    return soxr.resample(wav, orig_sr, sampling_rate, quality="HQ").astype(np.float32, copy=False)


def load_audio(
    src: Any,
    *,
    sampling_rate: int = 16000,
    max_seconds: float | None = None,
    name: str = "audio",
    **media_kwargs: Any,
) -> np.ndarray:
    """Decode ``src`` to mono float32 samples at ``sampling_rate``.

    ``src``: a path, bytes, base64 string, data URI, URL (needs ``allow_remote=True``), a numpy
    array / torch tensor (1-D mono or 2-D with channels; taken to be at ``sampling_rate``), or an
    ``(array, sr)`` tuple. ``media_kwargs`` go to :func:`resolve_media` (``allow_remote``,
    ``max_bytes``, ``timeout``, ``local_root``...). Any problem raises :class:`MediaError`.
    """
    if isinstance(src, tuple):
        if len(src) != 2 or not isinstance(src[1], (int, np.integer)) or src[1] <= 0:
            raise MediaError(name, "a tuple must be (samples, sampling_rate)")
        arr, orig_sr = src[0], int(src[1])
        if not isinstance(arr, (np.ndarray, torch.Tensor)):
            raise MediaError(name, f"unsupported audio samples of type {type(arr).__name__}")
    elif isinstance(src, (np.ndarray, torch.Tensor)):
        arr, orig_sr = src, sampling_rate
    else:
        arr = None
    if arr is not None:
        if isinstance(arr, torch.Tensor):
            arr = arr.detach().to("cpu", torch.float32).numpy()
        wav = _to_mono_f32(np.asarray(arr), name)
        if max_seconds is not None and wav.size > max_seconds * orig_sr:
            raise MediaError(name, f"audio longer than the {max_seconds:g} s limit")
    else:
        wav, orig_sr = _decode(resolve_media(src, name=name, **media_kwargs), name, max_seconds)
    if wav.size == 0:
        raise MediaError(name, "audio has no samples")
    wav = _resample(wav, orig_sr, sampling_rate)
    if wav.size < MIN_SAMPLES * sampling_rate // 16000:
        raise MediaError(name, f"audio too short ({wav.size / sampling_rate * 1000:.1f} ms)")
    return wav


# ---------------------------------------------------------------- log-mel features


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    log_step = 27.0 / np.log(6.4)
    return np.where(
        f < 1000.0, 3.0 * f / 200.0, 15.0 + np.log(np.maximum(f, 1e-9) / 1000.0) * log_step
    )


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return np.where(m < 15.0, 200.0 * m / 3.0, 1000.0 * np.exp((m - 15.0) * np.log(6.4) / 27.0))


@lru_cache(maxsize=8)
def mel_filter_bank(n_fft: int, n_mels: int, sampling_rate: int, f_max: float) -> np.ndarray:
    """Slaney-normalised triangles on the Slaney mel scale: float64 [n_mels, n_fft // 2 + 1]."""
    fft_hz = np.linspace(0.0, sampling_rate // 2, n_fft // 2 + 1)
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(f_max), n_mels + 2))
    lower, center, upper = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (fft_hz[None] - lower) / (center - lower)
    falling = (upper - fft_hz[None]) / (upper - center)
    tri = np.clip(np.minimum(rising, falling), 0.0, None)
    # Slaney norm: each filter has unit area in Hz, so energy per band is roughly constant.
    bank = tri * (2.0 / (upper - lower))
    bank.setflags(write=False)  # shared by the cache
    return bank


def log_mel_features(
    waveforms: Sequence[np.ndarray | torch.Tensor],
    *,
    n_fft: int = 400,
    hop_length: int = 160,
    n_mels: int = 128,
    sampling_rate: int = 16000,
    f_max: float = 8000.0,
    block_frames: int | None = None,
    device: torch.device | str | None = None,
    cache: MelCache | None = None,
    cancel: threading.Event | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whisper log-mel features of a batch, as Qwen3-Omni's processor computes them.

    Returns ``features`` float32 [B, n_mels, L] and ``lengths`` int64 [B], where
    ``L = floor(max_len / hop)``. Like the reference, shorter clips are zero-padded *before* the
    STFT, the -8 floor uses each row's max over all L frames, and ``lengths`` equals the
    reference's ``feature_attention_mask.sum(-1)``: ``floor(n / hop)`` for the longest clip but
    ``ceil(n / hop)`` for shorter ones (its mask is the sample mask sampled every hop).

    ``block_frames``: frames are computed in blocks of this many from each clip's start, every
    block by calls of the same shapes whatever comes after it. So a block's values (before the
    floor) are bit for bit the same for the first seconds of a clip as for the whole clip: what
    lets audio still arriving be encoded window by window (the processor passes the audio
    encoder's window). None: one block per clip.

    ``cache``: a `MelCache` whose blocks are reused (audio seen before is not transformed again).
    ``cancel``: checked before each block; once set, `Cancelled` is raised.
    """
    if len(waveforms) == 0:
        raise ValueError("log_mel_features needs at least one waveform")
    if device is None:
        first = waveforms[0]
        device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    rows = [
        torch.as_tensor(w).to(device=device, dtype=torch.float32).reshape(-1) for w in waveforms
    ]
    n = [r.numel() for r in rows]
    n_max = max(n)
    if n_max <= n_fft // 2:
        raise ValueError(f"audio too short for the STFT: {n_max} samples, need > {n_fft // 2}")
    batch = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # zero pad: [B, N]
    # A centred STFT: frame t covers padded[t*hop : t*hop + n_fft]. The reference keeps
    # floor(N / hop) frames (it drops the last centred one).
    padded = torch.nn.functional.pad(batch[:, None], (n_fft // 2, n_fft // 2), mode="reflect")[:, 0]
    n_frames = n_max // hop_length

    window = torch.hann_window(n_fft, periodic=True, device=device)
    # Mel projection and log in float64: immune to TF32 matmul settings that an engine may enable.
    filters = torch.tensor(mel_filter_bank(n_fft, n_mels, sampling_rate, f_max), device=device)
    silent = torch.tensor(1e-10, dtype=torch.float64, device=device).log10()

    transform = (n_fft, hop_length, n_mels, sampling_rate, f_max)  # what a block depends on

    def block(segment: torch.Tensor) -> torch.Tensor:  # samples -> [M, frames] log10 power
        spec = torch.stft(segment, n_fft, hop_length, window=window, center=False,
                          return_complex=True)  # [F, frames]
        power = torch.view_as_real(spec).pow(2).sum(-1)
        return torch.matmul(filters, power.double()).clamp_min(1e-10).log10()

    log_mel = silent.expand(len(rows), n_mels, n_frames).clone()  # [B, M, L]
    for i, k in enumerate(n):
        # Frames past these see only the zero padding: their power is 0, i.e. `silent`.
        touched = min(n_frames, -(-(k + n_fft // 2) // hop_length))
        step = block_frames or touched
        for a in range(0, touched, step):
            check_cancelled(cancel)
            b = min(a + step, touched)
            segment = padded[i, a * hop_length:(b - 1) * hop_length + n_fft]
            log_mel[i, :, a:b] = (block(segment) if cache is None
                                  else cache.get(segment, block, transform))
    if cache is not None:
        cache.keep_only_used()
    peak = log_mel.amax(dim=(1, 2), keepdim=True)
    feats = ((torch.maximum(log_mel, peak - 8.0) + 4.0) / 4.0).float()

    lengths = [min(math.ceil(k / hop_length), n_frames) for k in n]
    return feats, torch.tensor(lengths, dtype=torch.long, device=device)


class MelCache:
    """Log-mel blocks (before the floor) of audio seen before, found by their samples: a caller
    that sends the same audio again (a conversation's earlier turns at every request, a turn
    still arriving at every encoder window) transforms only the blocks it has not seen. A block
    is a function of its samples alone (`log_mel_features`' blocks), so a hit is exactly what
    computing it gives. Only the blocks the last call used are kept; `clear()` frees them."""

    def __init__(self) -> None:
        self._blocks: dict[tuple, torch.Tensor] = {}
        self._used: dict[tuple, torch.Tensor] = {}
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, segment: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor],
            transform: tuple) -> torch.Tensor:
        """The block of `segment`'s samples under `transform` (the STFT and mel settings),
        from the cache or `compute(segment)`."""
        samples = segment.detach().contiguous().cpu().numpy()
        # A 512-bit cryptographic digest: equal digests are equal samples.
        key = (transform, segment.numel(), segment.device,
               hashlib.blake2b(samples.data).digest())
        with self._lock:
            got = self._used.get(key)
            if got is None:
                got = self._blocks.get(key)
            if got is not None:
                self.hits += 1
                self._used[key] = got
                return got
        got = compute(segment)
        with self._lock:
            self.misses += 1
            self._used[key] = got
        return got

    def keep_only_used(self) -> None:
        """A call is over: drop the blocks it did not use."""
        with self._lock:
            self._blocks, self._used = self._used, {}

    def clear(self) -> None:
        with self._lock:
            self._blocks, self._used = {}, {}

    def __len__(self) -> int:
        return len(self._blocks)
