"""Image preprocessing equals transformers' Qwen2VLImageProcessorPil (the backend transformers
uses without torchvision) on real CC0 / public-domain photos from the scikit-image wheel."""

from __future__ import annotations

import base64
import importlib.util
import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qomni.multimodal.media import MediaError
from qomni.multimodal.vision import load_image, preprocess_image, smart_resize

_SKIMAGE = importlib.util.find_spec("skimage")
if _SKIMAGE is None:
    pytest.skip("scikit-image (real test photos) is not installed", allow_module_level=True)
DATA = Path(_SKIMAGE.origin).parent / "data"

# The official checkpoint's preprocessor_config.json.
OFFICIAL = {
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "min_pixels": 3136,
    "max_pixels": 12845056, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
}


@pytest.fixture(scope="module")
def hf_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    return Qwen2VLImageProcessorPil(**OFFICIAL)


def photo(name: str):
    with Image.open(DATA / name) as img:
        img.load()
        return img


def reference(proc, image, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    out = proc(images=[image], return_tensors="pt", **kwargs)
    return out["pixel_values"], out["image_grid_thw"][0]


def assert_same(ours, ref) -> None:
    (pv, grid), (ref_pv, ref_grid) = ours, ref
    assert grid.dtype == torch.long and grid.tolist() == ref_grid.tolist()
    assert pv.dtype == torch.float32 and pv.shape == ref_pv.shape
    assert torch.equal(pv, ref_pv), f"max|Δ| = {(pv - ref_pv).abs().max().item()}"


@pytest.mark.parametrize(
    "name",
    [
        "astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "hubble_deep_field.jpg",
        "retina.jpg", "camera.png", "page.png", "horse.png", "logo.png",
        "no_time_for_that_tiny.gif",
    ],
)
def test_photos_match_reference(hf_processor, name):
    img = photo(name)  # RGB, grayscale (L), RGBA and palette (P) files
    assert_same(preprocess_image(img), reference(hf_processor, img))


@pytest.mark.parametrize(
    "width,height",
    [
        (10, 10), (1, 50), (50, 1), (1, 1), (200, 1), (31, 32), (70, 100), (448, 448),
        (1000, 300),
        (4200, 3300),  # 13.9 MP: shrunk under max_pixels
        (8000, 1000),
    ],
)
def test_sizes_match_reference(hf_processor, width, height):
    img = photo("retina.jpg" if width * height > 1e6 else "chelsea.png").convert("RGB")
    img = img.resize((width, height), Image.Resampling.BILINEAR)
    ours = preprocess_image(img)
    assert_same(ours, reference(hf_processor, img))
    assert ours[0].shape[0] * 16 * 16 <= OFFICIAL["max_pixels"]  # patches x pixels each


@pytest.mark.parametrize("width,height", [(300, 1), (1, 201)])
def test_extreme_aspect_ratio_is_refused_like_reference(hf_processor, width, height):
    img = Image.new("RGB", (width, height), (9, 99, 199))
    with pytest.raises(ValueError, match="aspect ratio"):
        reference(hf_processor, img)
    with pytest.raises(MediaError, match=r"^photo: aspect ratio .* over the limit of 200"):
        preprocess_image(img, name="photo")


def test_smart_resize_known_values():
    assert smart_resize(70, 100, 32, 3136, 12845056) == (64, 96)  # grid [1, 4, 6]
    assert smart_resize(448, 448, 32, 3136, 12845056) == (448, 448)
    assert smart_resize(10, 10, 32, 3136, 12845056) == (64, 64)
    with pytest.raises(ValueError, match="zero size"):
        smart_resize(0, 10, 32, 3136, 12845056)


def test_non_default_parameters_match_reference():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    params = {
        "patch_size": 14, "temporal_patch_size": 3, "merge_size": 2, "min_pixels": 56 * 56,
        "max_pixels": 28 * 28 * 64, "image_mean": [0.481, 0.458, 0.408],
        "image_std": [0.269, 0.261, 0.276],
    }
    img = photo("coffee.png")
    assert_same(preprocess_image(img, **params), reference(Qwen2VLImageProcessorPil(**params), img))


def test_cmyk_jpeg(hf_processor):
    buf = io.BytesIO()
    photo("rocket.jpg").convert("CMYK").save(buf, "JPEG")
    decoded = Image.open(io.BytesIO(buf.getvalue()))
    assert decoded.mode == "CMYK"
    assert_same(preprocess_image(buf.getvalue()), reference(hf_processor, decoded))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(hf_processor, tmp_path, orientation):
    from transformers.image_utils import load_image as hf_load_image

    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rotated.jpg"
    photo("rocket.jpg").save(path, "JPEG", exif=exif)
    pv, grid = preprocess_image(path)
    assert_same((pv, grid), reference(hf_processor, hf_load_image(str(path))))
    # Orientations 5..8 swap width and height: the 640x427 photo stands upright.
    assert grid.tolist() == ([1, 40, 26] if orientation >= 5 else [1, 26, 40])


def test_palette_with_transparency_composites_on_white(hf_processor):
    pal = photo("chelsea.png").convert("P")
    pal.info["transparency"] = 0
    buf = io.BytesIO()
    pal.save(buf, "PNG")
    decoded = Image.open(io.BytesIO(buf.getvalue()))
    assert decoded.info.get("transparency") == 0
    assert_same(preprocess_image(buf.getvalue()), reference(hf_processor, decoded))
    la = photo("horse.png").convert("LA")
    assert_same(preprocess_image(la), reference(hf_processor, la))


def test_numpy_inputs(hf_processor):
    rgb = np.asarray(photo("coffee.png"))
    assert_same(preprocess_image(rgb), reference(hf_processor, rgb))
    # Floats are taken in [0, 1]; the reference needs do_rescale=False for them.
    flt = np.random.default_rng(0).random((100, 120, 3))
    assert_same(preprocess_image(flt), reference(hf_processor, flt, do_rescale=False))
    gray = np.asarray(photo("camera.png"))
    assert_same(preprocess_image(gray), reference(hf_processor, gray[..., None]))
    rgba = np.asarray(photo("horse.png"))
    assert rgba.shape[-1] == 4
    assert_same(preprocess_image(rgba), reference(hf_processor, photo("horse.png")))


def test_every_source_kind_gives_the_same_image(tmp_path):
    path = DATA / "chelsea.png"
    data = path.read_bytes()
    b64 = base64.b64encode(data).decode()
    expected = np.asarray(photo("chelsea.png").convert("RGB"))
    for src in (path, str(path), data, b64, f"data:image/png;base64,{b64}"):
        img = load_image(src)
        assert img.mode == "RGB"
        assert np.array_equal(np.asarray(img), expected)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` and that holds no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


JPEG = (DATA / "rocket.jpg").read_bytes()


@pytest.mark.parametrize(
    "src,reason",
    [
        (b"definitely not an image " * 8, "not an image"),
        (JPEG[: len(JPEG) // 2], "cannot decode image data.*truncated"),
        (JPEG[:100], "cannot decode image data"),
        (_png_header(100, 100), "cannot decode image data"),
        (_png_header(11000, 10000), r"11000x10000 \(110 megapixels\) is over the 100-megapixel"),
        (_png_header(20000, 20000), "over the 100-megapixel limit"),
        (np.zeros((0, 10, 3), np.uint8), r"zero size \(10x0\)"),
        (np.full((4, 4, 3), 2.0), r"float pixel values .* \[0, 1\]"),
        (np.full((4, 4, 3), 300, np.int32), "integer pixel values"),
        (np.zeros((4, 4, 2), np.uint8), "HxW or HxWxC"),
        (b"", "empty data"),
        ("data:image/png;base64,@@@@", "invalid base64"),
    ],
)
def test_bad_input_is_a_clear_error(src, reason):
    with warnings.catch_warnings():
        # Pillow warns about its own (lower) bomb threshold before our limit refuses the image.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(MediaError, match=f"^image #2: .*{reason}") as err:
            load_image(src, name="image #2")
    assert isinstance(err.value, ValueError)


def test_zero_size_pil_image():
    with pytest.raises(MediaError, match=r"^image: zero size \(0x5\)"):
        preprocess_image(Image.new("RGB", (0, 5)))
