"""Video input: decode and sample frames as the official client does, then the reference's patches.

Legend: T frames, G frame groups (T / temporal_patch_size), H x W pixels, P patch size.

Two stages, as in the official pipeline: the client helper qwen-omni-utils 0.0.9 (`fetch_video`),
then transformers' `Qwen2VLVideoProcessor` as `Qwen3OmniMoeProcessor` calls it.

1. `load_video` (the client's job). A video file is decoded with PyAV and sampled at `fps`
   (default 2): k = total / video_fps * fps frames, clamped to [min_frames, min(max_frames,
   total)], rounded down to an even number (at least 2), taken at `linspace(0, total - 1, k)
   .round()`; the effective rate is k / total * video_fps. A list of frames (PIL images, HWC
   arrays or image sources) is taken as already sampled at `fps`: each frame is first fitted to
   the image budget (factor 28, Pillow bicubic) and the list padded to an even length by
   repeating the last frame. Then every frame is resized to a multiple of 28 with 128*28^2 ..
   min(768*28^2, total_pixels / k * 2) pixels (total_pixels = 128000 * 28^2 * 0.9, so a long
   video gets smaller frames) and rounded back to bytes, as the client's torchvision resize of
   byte frames does.
2. `preprocess_video` (the processor's job): resize to a multiple of patch*merge (32) with
   128*32^2 .. 768*32^2 pixels (the processor's own `videos_kwargs`), scale and normalise,
   pad to a multiple of temporal_patch_size by repeating the last frame, and cut into patches
   in merge-block order: pixel_values [G*h*w, 3*T*P*P], grid (G, h, w).

Resizing. Both stages resize with torchvision, which comes down to torch's
`interpolate(mode="bicubic", antialias=True)` on float32: the client's tensor resize casts its
byte frames to float and rounds the result back; the processor gets the client's float frames
and keeps the float result. We call that op, so no torchvision is needed and the pixels are the
reference pipeline's, not an approximation. (Handed byte frames directly, the processor's
resize on CPU would use torch's native uint8 kernel instead, which follows Pillow's bicubic to
+-1 and differs from the float kernel by up to ~20/255 at sharp edges.)

Q3, seconds per frame group. The reference processor sets video_second_per_grid =
temporal_patch_size / fps with the `fps` it is called with, and falls back to fps 1.0 (2 s per
group) when none is passed, even though the client samples at 2 fps; with that fallback, time
positions run twice as fast as the clip. We always use the real sampling rate: second_per_grid =
temporal_patch_size / fps (1.0 at 2 fps); the parity tests pass the same fps to the reference.

`load_video_audio` gives the sound track at 16 kHz mono for use_audio_in_video. A video without
one is an error (`MediaError`), as in the official client; the reference processor would instead
treat such a video as silent, which its own position code does not handle (see positions.py).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from qomni.multimodal.audio import load_audio
from qomni.multimodal.media import MediaError, MediaRef, resolve_media
from qomni.multimodal.vision import MAX_IMAGE_PIXELS, load_image, smart_resize

# The official client's defaults (qwen-omni-utils 0.0.9, image_patch_size 14 -> factor 28).
CLIENT_FACTOR = 28
FPS = 2.0
FRAME_FACTOR = 2
MIN_FRAMES = 4
MAX_FRAMES = 768
CLIENT_MIN_PIXELS = 128 * 28 * 28
CLIENT_MAX_PIXELS = 768 * 28 * 28
CLIENT_TOTAL_PIXELS = 128000 * 28 * 28 * 0.9
IMAGE_MIN_PIXELS = 4 * 28 * 28  # frames of a frame list are fetched as images first
IMAGE_MAX_PIXELS = 16384 * 28 * 28
# Qwen3OmniMoeProcessor's videos_kwargs size (shortest_edge / longest_edge are pixel counts).
VIDEO_MIN_PIXELS = 128 * 32 * 32
VIDEO_MAX_PIXELS = 768 * 32 * 32
# Frames resized per interpolate call: bounds the float32 working set for long videos.
CHUNK_FRAMES = 16
# A frame rate outside this range is a client error, not a video: it would put frame groups
# hours apart (or microseconds) on the time axis.
FPS_RANGE = (0.01, 240.0)

VideoSource = MediaRef | Sequence[Any] | np.ndarray


class LoadedVideo(NamedTuple):
    frames: torch.Tensor  # [T, H, W, 3] uint8, sampled and fitted to the client's pixel budget
    fps: float  # the rate the frames are sampled at (frames per second of the source)


def load_video(
    src: VideoSource,
    *,
    fps: float = FPS,
    min_frames: int = MIN_FRAMES,
    max_frames: int = MAX_FRAMES,
    min_pixels: int = CLIENT_MIN_PIXELS,
    max_pixels: int = CLIENT_MAX_PIXELS,
    total_pixels: float = CLIENT_TOTAL_PIXELS,
    max_seconds: float | None = None,
    name: str = "video",
    **source_options: Any,
) -> LoadedVideo:
    """Decode and sample a video (path, bytes, base64 / data URI, URL; see `media.resolve_media`,
    which gets `source_options`) or take a list of frames / a [T, H, W, C] array, then fit the
    frames to the pixel budget. Raises `MediaError` naming `name` for anything unusable."""
    fps = _check_fps(fps, name)

    def size_for(height: int, width: int, n: int) -> tuple[int, int]:
        # The per-frame budget shrinks as frames are added, so the whole clip fits total_pixels.
        budget = max(min(max_pixels, total_pixels / n * FRAME_FACTOR), int(min_pixels * 1.05))
        return _target_size(height, width, CLIENT_FACTOR, min_pixels, budget, name)

    if is_frame_list(src):
        frames = _frame_list(src, max_frames, name)
        height, width = size_for(*frames[0].shape[:2], len(frames))
        fitted = [_resize_bytes(f, height, width) for f in frames]
        rate = fps
    else:
        data = resolve_media(src, name=name, **source_options)
        fitted, rate = _decode(data, name, size_for, fps=fps, min_frames=min_frames,
                               max_frames=max_frames, max_seconds=max_seconds)
    return LoadedVideo(torch.stack(fitted), rate)


def load_video_audio(
    src: VideoSource,
    *,
    sampling_rate: int = 16000,
    max_seconds: float | None = None,
    name: str = "video",
    **source_options: Any,
) -> np.ndarray:
    """The sound track of a video file as mono float32 at `sampling_rate`; `MediaError` when the
    source is a list of frames or the file has no audio track."""
    if is_frame_list(src):
        raise MediaError(name, "a list of frames has no sound track; use_audio_in_video needs "
                               "a video file")
    data = resolve_media(src, name=name, **source_options)
    with _open(data, name) as container:
        if not container.streams.audio:
            raise MediaError(name, "the video has no audio track, which use_audio_in_video "
                                   "needs")
    return load_audio(data, sampling_rate=sampling_rate, max_seconds=max_seconds, name=name)


def preprocess_video(
    frames: torch.Tensor | np.ndarray,
    fps: float,
    *,
    patch_size: int = 16,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    image_mean: Sequence[float] = (0.5, 0.5, 0.5),
    image_std: Sequence[float] = (0.5, 0.5, 0.5),
    name: str = "video",
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Frames [T, H, W, 3] (uint8, or float in 0..255) sampled at `fps` -> (pixel_values
    FloatTensor [G*h*w, 3*T*P*P], grid_thw LongTensor [3] = (G, h, w), second_per_grid)."""
    x = torch.as_tensor(frames)
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[0] == 0:
        raise MediaError(name, f"frames must be [T, H, W, 3] with T >= 1, got {tuple(x.shape)}")
    fps = _check_fps(fps, name)
    height, width = _target_size(x.shape[1], x.shape[2], patch_size * merge_size, min_pixels,
                                 max_pixels, name)
    if pad := -x.shape[0] % temporal_patch_size:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
    t, p, m = temporal_patch_size, patch_size, merge_size
    groups, gh, gw = x.shape[0] // t, height // p, width // p
    mean = torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    out = torch.empty(groups * gh * gw, 3 * t * p * p)
    per_group = gh * gw
    step = max(1, CHUNK_FRAMES // t)
    for g0 in range(0, groups, step):
        g1 = min(groups, g0 + step)
        chunk = _resize_float(x[g0 * t: g1 * t], height, width)  # [n*t, 3, H', W']
        # The reference fuses rescale and normalise: (x - 255 * mean) / (255 * std), float32.
        chunk = (chunk - mean) / std
        blocks = chunk.view(g1 - g0, t, 3, gh // m, m, p, gw // m, m, p)
        out[g0 * per_group: g1 * per_group] = (
            blocks.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(-1, 3 * t * p * p))
    grid = torch.tensor([groups, gh, gw], dtype=torch.long)
    return out, grid, temporal_patch_size / fps


def is_frame_list(src: Any) -> bool:
    """A video given as frames (list / tuple, or a [T, H, W, C] array) rather than a file."""
    return isinstance(src, (list, tuple)) or (
        isinstance(src, (np.ndarray, torch.Tensor)) and src.ndim == 4)


# ------------------------------------------------------------------------------------------------
# Sizes and resizing


def _check_fps(fps: Any, name: str) -> float:
    lo, hi = FPS_RANGE
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not lo <= fps <= hi:
        raise MediaError(name, f"fps must be a number in [{lo:g}, {hi:g}], got {fps!r}")
    return float(fps)


def _target_size(height: int, width: int, factor: int, min_pixels: float, max_pixels: float,
                 name: str) -> tuple[int, int]:
    try:
        return smart_resize(int(height), int(width), factor, min_pixels, max_pixels)
    except ValueError as e:
        raise MediaError(name, str(e)) from None


def _resize_float(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[n, H, W, 3] -> float32 [n, 3, height, width], torchvision's bicubic resize of floats."""
    x = frames.permute(0, 3, 1, 2).float()
    if x.shape[-2:] == (height, width):
        return x  # interpolate to the same size is the identity; skip the work
    return F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False,
                         antialias=True)


def _resize_bytes(frame: np.ndarray, height: int, width: int) -> torch.Tensor:
    """One HWC uint8 frame resized as torchvision resizes byte tensors: in float, then clamped and
    rounded (half to even) back to bytes. [height, width, 3] uint8"""
    x = _resize_float(torch.from_numpy(frame)[None], height, width)
    return x.clamp_(0, 255).round_().to(torch.uint8)[0].permute(1, 2, 0).contiguous()


# ------------------------------------------------------------------------------------------------
# Frame lists


def _frame_list(src: Sequence[Any] | np.ndarray | torch.Tensor, max_frames: int,
                name: str) -> list[np.ndarray]:
    """Each frame fetched as the client fetches images (RGB, fitted to factor 28 within the image
    budget with Pillow bicubic), then padded to an even count with the last frame."""
    if isinstance(src, torch.Tensor):
        src = src.detach().cpu().numpy()
    n = len(src)
    if n == 0:
        raise MediaError(name, "the list of frames is empty")
    if n > max_frames:
        raise MediaError(name, f"{n} frames is over the limit of {max_frames}")
    frames = []
    for i, item in enumerate(src):
        image = load_image(item, name=f"{name} frame #{i + 1}")
        h, w = _target_size(image.height, image.width, CLIENT_FACTOR, IMAGE_MIN_PIXELS,
                            IMAGE_MAX_PIXELS, f"{name} frame #{i + 1}")
        frames.append(np.array(image.resize((w, h), Image.Resampling.BICUBIC)))
        if frames[-1].shape != frames[0].shape:
            raise MediaError(name, f"frame #{i + 1} is {image.width}x{image.height}, which does "
                                   "not fit the size of frame #1; all frames need one size")
    frames += [frames[-1]] * (-n % FRAME_FACTOR)
    return frames


# ------------------------------------------------------------------------------------------------
# Decoding (PyAV)


def _open(data: bytes | Path, name: str):
    import av  # imported lazily: only media decoding needs it

    try:
        return av.open(str(data) if isinstance(data, Path) else io.BytesIO(data), mode="r",
                       metadata_errors="ignore")
    except Exception as e:  # noqa: BLE001 - any open failure means a bad input
        raise MediaError(name, f"not a readable video file ({_reason(e)})") from None


def _reason(e: Exception) -> str:
    msg = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return msg.split(": '")[0]  # PyAV appends the (meaningless for in-memory data) file name


def _num_frames(total: int, video_fps: float, fps: float, min_frames: int, max_frames: int
                ) -> int:
    """The client's frame count: even, at least min_frames, at most max_frames and total."""
    lo = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
    hi = math.floor(min(max_frames, total) / FRAME_FACTOR) * FRAME_FACTOR
    n = min(max(total / video_fps * fps, lo), hi, total)
    return math.floor(n / FRAME_FACTOR) * FRAME_FACTOR


def _decode(data: bytes | Path, name: str, size_for: Callable[[int, int, int], tuple[int, int]],
            *, fps: float, min_frames: int, max_frames: int, max_seconds: float | None
            ) -> tuple[list[torch.Tensor], float]:
    """Sampled frames, each already fitted to size_for(height, width, frame count), and the
    effective sampling rate."""
    total, video_fps, height, width = _probe(data, name)
    if max_seconds is not None and total / video_fps > max_seconds:
        raise MediaError(name, f"video longer than the {max_seconds:g} s limit")
    # Frame counts in container headers can be wrong; if the stream ends early, sample again
    # from the frames it really has.
    for _ in range(2):
        n = _num_frames(total, video_fps, fps, min_frames, max_frames)
        if n < FRAME_FACTOR:
            raise MediaError(name, f"the video has {total} frame(s); at least {FRAME_FACTOR} "
                                   "are needed")
        wanted = torch.linspace(0, total - 1, n).round().long().tolist()
        frames, decoded = _read(data, name, wanted, size_for(height, width, n))
        if len(frames) == len(set(wanted)):
            return [frames[i] for i in wanted], n / total * video_fps
        total = decoded
    raise MediaError(name, "the video's frame count changes between reads")


def _probe(data: bytes | Path, name: str) -> tuple[int, float, int, int]:
    """(frame count, frames per second, height, width) of the first video stream, checked
    before anything is decoded."""
    with _open(data, name) as container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise MediaError(name, f"no video track (streams: {', '.join(kinds)})")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        _check_size(width, height, name)
        rate = stream.average_rate or stream.guessed_rate
        if not rate or rate <= 0:
            raise MediaError(name, "the video stream has no frame rate")
        try:
            total = stream.frames or sum(1 for p in container.demux(stream) if p.size)
        except Exception as e:  # noqa: BLE001 - a corrupt container can fail while demuxing
            raise MediaError(name, f"could not read the video ({_reason(e)})") from None
    if total == 0:
        raise MediaError(name, "the video track has no frames")
    return int(total), float(rate), height, width


def _read(data: bytes | Path, name: str, wanted: list[int], size: tuple[int, int]
          ) -> tuple[dict[int, torch.Tensor], int]:
    """Decode up to the last wanted frame; the wanted ones are converted to RGB and resized to
    `size` at once (the full-size frames never pile up). Returns them and the number of frames
    decoded."""
    keep, last = set(wanted), max(wanted)
    frames: dict[int, torch.Tensor] = {}
    count = 0
    with _open(data, name) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for i, frame in enumerate(container.decode(stream)):
                count = i + 1
                if i in keep:
                    _check_size(frame.width, frame.height, name)
                    frames[i] = _resize_bytes(frame.to_ndarray(format="rgb24"), *size)
                if i >= last:
                    break
        except MediaError:
            raise
        except Exception as e:  # noqa: BLE001 - no raw PyAV error may escape
            raise MediaError(name, f"could not decode the video ({_reason(e)})") from None
    if count == 0:
        raise MediaError(name, "no frame of the video could be decoded")
    return frames, count


def _check_size(width: int, height: int, name: str) -> None:
    if width < 1 or height < 1:
        raise MediaError(name, f"bad frame size {width}x{height}")
    if width * height > MAX_IMAGE_PIXELS:
        raise MediaError(name, f"{width}x{height} frames are over the "
                               f"{MAX_IMAGE_PIXELS // 1_000_000}-megapixel limit")
