"""Images -> vision-encoder patches, equal to transformers' `Qwen2VLImageProcessorPil`.

`load_image` turns any accepted source into an upright RGB PIL image; `preprocess_image` resizes it
(Pillow bicubic, to a multiple of patch_size * merge_size within [min_pixels, max_pixels]), scales
to [0, 1], normalises, repeats it over temporal_patch_size frames and cuts it into flat patches in
merge-block order: pixel_values [h*w, 3*T*P*P] and grid_thw [1, h, w] (h, w in patches).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from qomni.multimodal.media import MediaError, MediaRef, resolve_media

ImageSource = MediaRef | Image.Image | np.ndarray

# Checked from the header, before any pixel is decoded. 100 MP is far above what the model uses
# (max_pixels is 12.8 MP) and keeps one decoded RGB image under ~300 MB.
MAX_IMAGE_PIXELS = 100_000_000
# Longer-than-wide ratios the reference's smart_resize refuses; so do we, with the same bound.
MAX_ASPECT_RATIO = 200


def load_image(src: ImageSource, *, name: str = "image", **source_options: Any) -> Image.Image:
    """Decode `src` into an RGB PIL image with its EXIF orientation applied.

    `src`: a path, bytes, base64 / data URI, URL (see `media.resolve_media`, which gets
    `source_options` such as `allow_remote` or `local_root`), a PIL image, or an HWC / HW numpy
    array (uint8, other integers in 0..255, or floats in [0, 1]). Transparency is composited onto
    white, as the reference processor does. Raises `MediaError` naming `name` and the reason.
    """
    if isinstance(src, Image.Image):
        image = _decoded(src, name)
    elif isinstance(src, np.ndarray):
        image = _from_array(src, name)
    else:
        data = resolve_media(src, name=name, **source_options)
        image = _open(data, name)
    return _to_rgb(image, name)


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """The reference's target size: both sides multiples of `factor`, area within
    [min_pixels, max_pixels] (shrinking rounds down, growing rounds up), aspect kept."""
    if height < 1 or width < 1:
        raise ValueError(f"zero size ({width}x{height})")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"aspect ratio {max(height, width) / min(height, width):.1f} ({width}x{height}) "
            f"is over the limit of {MAX_ASPECT_RATIO}"
        )
    # Python's round (half to even) and this exact float arithmetic decide the grid: keep both.
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def preprocess_image(
    image: ImageSource,
    *,
    patch_size: int = 16,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    min_pixels: int = 3136,
    max_pixels: int = 12845056,
    image_mean: Sequence[float] = (0.5, 0.5, 0.5),
    image_std: Sequence[float] = (0.5, 0.5, 0.5),
    name: str = "image",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image -> (pixel_values FloatTensor [h*w, 3*T*P*P], grid_thw LongTensor [3] = (1, h, w))."""
    img = load_image(image, name=name)
    factor = patch_size * merge_size
    try:
        height, width = smart_resize(img.height, img.width, factor, min_pixels, max_pixels)
    except ValueError as e:
        raise MediaError(name, str(e)) from None
    # The same Pillow op as the reference (bicubic, no reducing_gap), so pixels match bit for bit.
    resized = np.asarray(img.resize((width, height), Image.Resampling.BICUBIC))  # [H, W, 3] uint8
    lut = _normalize_table(image_mean, image_std)
    chw = torch.from_numpy(lut[np.arange(3)[:, None, None], resized.transpose(2, 0, 1)])
    gh, gw = height // patch_size, width // patch_size
    m, p = merge_size, patch_size
    blocks = chw.view(3, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
    # A still image is its own temporal_patch_size frames: every patch repeats along T.
    frames = blocks.unsqueeze(5).expand(*blocks.shape[:5], temporal_patch_size, p, p)
    pixel_values = frames.reshape(gh * gw, 3 * temporal_patch_size * p * p)
    return pixel_values, torch.tensor([1, gh, gw], dtype=torch.long)


def _normalize_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[3, 256] float32: byte value -> normalised value, with the reference's exact float steps
    (x * (1/255) in float64, cast to float32, then (x - mean) / std in float32)."""
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"image_mean and image_std need 3 values, got {mean} and {std}")
    scaled = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None]
    return (scaled[None] - mean32) / std32


def _check_size(width: int, height: int, name: str) -> None:
    if width < 1 or height < 1:
        raise MediaError(name, f"zero size ({width}x{height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise MediaError(
            name,
            f"{width}x{height} ({width * height / 1e6:.0f} megapixels) is over the "
            f"{MAX_IMAGE_PIXELS // 1_000_000}-megapixel limit",
        )


def _open(data: bytes | Path, name: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            return _decoded(img, name)
    except MediaError:
        raise
    except Image.DecompressionBombError:
        raise MediaError(
            name, f"over the {MAX_IMAGE_PIXELS // 1_000_000}-megapixel limit"
        ) from None
    except Image.UnidentifiedImageError:
        raise MediaError(name, "not an image in a format Pillow can read") from None
    # Pillow's parsers raise many exception types on hostile input; all mean "cannot decode".
    except Exception as e:  # noqa: BLE001
        raise MediaError(name, f"cannot decode image data ({type(e).__name__}: {e})") from None


def _decoded(img: Image.Image, name: str) -> Image.Image:
    """Fully decoded copy of `img`, upright: the size is checked before decoding starts."""
    _check_size(img.width, img.height, name)
    try:
        return ImageOps.exif_transpose(img)
    # Truncated or corrupt pixel data surfaces only here, at decode time, as any exception type.
    except Exception as e:  # noqa: BLE001
        raise MediaError(name, f"cannot decode image data ({type(e).__name__}: {e})") from None


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    """Any mode -> RGB; transparent pixels are composited onto white, like the reference."""
    try:
        if "A" in img.getbands() or img.info.get("transparency") is not None:
            white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
        return img if img.mode == "RGB" else img.convert("RGB")
    except ValueError as e:
        raise MediaError(name, f"cannot convert image mode {img.mode} to RGB ({e})") from None


def _from_array(arr: np.ndarray, name: str) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise MediaError(name, f"array must be HxW or HxWxC with C in 1, 3, 4; got {arr.shape}")
    _check_size(arr.shape[1], arr.shape[0], name)
    if np.issubdtype(arr.dtype, np.floating):
        if not (np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1):
            raise MediaError(name, "float pixel values must be finite and lie in [0, 1]")
        # The reference's float -> byte step: x * 255 in float64, cast to float32, truncated.
        arr = (arr.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.integer):
        if arr.dtype != np.uint8 and (arr.min() < 0 or arr.max() > 255):
            raise MediaError(name, "integer pixel values must lie in 0..255")
        arr = arr.astype(np.uint8)
    else:
        raise MediaError(name, f"unsupported array dtype {arr.dtype}")
    return Image.fromarray(np.ascontiguousarray(arr))
