"""Untrusted media: every bad input becomes a MediaError that names the item and the reason.

Covers the reference resolver (paths, bytes, base64, data URIs, URLs behind allow_remote) and
load_audio on broken, empty, non-audio and over-long inputs. Nothing here needs the network: URLs
are served by a throwaway local HTTP server.
"""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
import threading
import time
import wave
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from qomni.multimodal.audio import load_audio
from qomni.multimodal.media import MediaError, read_media_bytes, resolve_media

NAME = "audio #1"
needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg CLI")


def make_wav(n_samples: int, rate: int = 16000) -> bytes:
    """A 16-bit mono WAV of a 440 Hz tone, written with the standard library."""
    t = np.arange(n_samples) / rate
    pcm = (0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def ffmpeg(tmp_path: Path, out_name: str, *args: str) -> Path:
    out = tmp_path / out_name
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args, str(out)], check=True)
    return out


def raises_named(match: str, fn, *args, **kwargs) -> MediaError:
    """Call fn, expect a MediaError for NAME whose reason contains ``match``."""
    with pytest.raises(MediaError) as info:
        fn(*args, name=NAME, **kwargs)
    err = info.value
    assert isinstance(err, ValueError) and err.name == NAME
    assert str(err).startswith(f"{NAME}: ") and match in err.reason, str(err)
    return err


# ---------------------------------------------------------------- broken or non-audio inputs


def test_random_bytes():
    raises_named("not a readable audio", load_audio, np.random.default_rng(0).bytes(5000))


def test_text_file(tmp_path):
    p = tmp_path / "notes.wav"
    p.write_text("this is not audio\n" * 20)
    raises_named("not a readable audio", load_audio, str(p))


def test_truncated_header():
    raises_named("not a readable audio", load_audio, make_wav(16000)[:30])


def test_wav_cut_in_its_data_keeps_what_is_there():
    # Like ffmpeg and libsndfile, a file cut mid-data yields the samples that survive.
    wav = make_wav(16000)
    assert len(load_audio(wav[: 44 + 2 * 8000], name=NAME)) == 8000


@needs_ffmpeg
def test_truncated_m4a(tmp_path):
    # ffmpeg writes the mp4 index (moov) at the end, so a cut file cannot be demuxed.
    m4a = ffmpeg(tmp_path, "a.m4a", "-f", "lavfi", "-i", "sine=f=440:d=2", "-c:a", "aac")
    data = m4a.read_bytes()
    raises_named("not a readable audio", load_audio, data[: len(data) // 2])


def test_zero_length_audio():
    raises_named("no samples", load_audio, make_wav(0))
    raises_named("empty data", load_audio, b"")
    raises_named("no samples", load_audio, np.zeros(0, np.float32))
    raises_named("too short", load_audio, np.zeros(100, np.float32))


def test_empty_file(tmp_path):
    p = tmp_path / "empty.wav"
    p.write_bytes(b"")
    raises_named("file is empty", load_audio, p)


def test_wrong_base64():
    raises_named("invalid base64", load_audio, "data:audio/wav;base64,@@@not-base64@@@")
    raises_named("invalid base64", load_audio, "UklGR" * 20 + "!")
    raises_named("invalid base64", load_audio, "data:audio/wav;base64,QUJDRA" + "=" * 3)
    raises_named("must be base64", load_audio, "data:audio/wav,plain-text")


def test_valid_base64_that_is_not_audio():
    raises_named("not a readable audio", load_audio, base64.b64encode(b"x" * 300).decode())


@needs_ffmpeg
def test_video_without_audio_track(tmp_path):
    mp4 = ffmpeg(
        tmp_path,
        "silent.mp4",
        "-f",
        "lavfi",
        "-i",
        "testsrc=s=64x64:r=5:d=1",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
    )
    err = raises_named("no audio track", load_audio, mp4)
    assert "video" in err.reason


@needs_ffmpeg
def test_image_is_not_audio(tmp_path):
    png = ffmpeg(tmp_path, "red.png", "-f", "lavfi", "-i", "color=c=red:s=16x16", "-frames:v", "1")
    raises_named("no audio track", load_audio, png.read_bytes())


def test_over_duration_limit():
    raises_named("longer than the 1 s limit", load_audio, make_wav(3 * 16000), max_seconds=1.0)
    raises_named(
        "longer than the 2 s limit", load_audio, np.zeros(48000, np.float32), max_seconds=2
    )
    assert len(load_audio(make_wav(16000), max_seconds=1.0)) == 16000


def test_bad_arrays():
    raises_named("NaN", load_audio, np.full(1000, np.nan, np.float32))
    raises_named("1-D or 2-D", load_audio, np.zeros((2, 2, 1000), np.float32))
    raises_named("(samples, sampling_rate)", load_audio, (np.zeros(1000), 0))
    raises_named("unsupported", load_audio, 12345)


# ---------------------------------------------------------------- references: paths, base64, limits


def test_missing_file():
    raises_named("file not found", load_audio, "/no/such/dir/clip.wav")
    raises_named("file not found", load_audio, Path("/no/such/dir/clip.wav"))
    raises_named("file not found", load_audio, "file:///no/such/dir/clip.wav")


def test_local_path_policy(tmp_path):
    p = tmp_path / "a.wav"
    p.write_bytes(make_wav(1600))
    raises_named("not allowed", resolve_media, str(p), allow_local=False)
    raises_named("outside the allowed", resolve_media, p, local_root=tmp_path / "sub")
    assert resolve_media(p, local_root=tmp_path) == p
    raises_named("byte limit", resolve_media, p, max_bytes=100)


def test_base64_forms_and_byte_limits():
    data = make_wav(1600)
    b64 = base64.b64encode(data).decode()
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))  # MIME line wrapping
    urlsafe = base64.urlsafe_b64encode(data).decode().rstrip("=")
    for src in (data, b64, wrapped, urlsafe, f"data:audio/wav;base64,{b64}"):
        assert read_media_bytes(src) == data
    raises_named("byte limit", resolve_media, data, max_bytes=100)
    raises_named("byte limit", resolve_media, b64, max_bytes=100)
    raises_named("empty", resolve_media, "   ")


# ---------------------------------------------------------------- URLs (local server only)


class _Handler(BaseHTTPRequestHandler):
    payload = make_wav(16000)

    def do_GET(self):
        if self.path == "/slow.wav":
            time.sleep(1.5)
        if self.path in ("/a.wav", "/slow.wav"):
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.payload)))
            self.end_headers()
            self.wfile.write(self.payload)
        else:
            self.send_error(404)

    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_remote_urls(server):
    url = f"{server}/a.wav"
    raises_named("remote URLs are disabled", load_audio, url)
    raises_named("host refused or unreachable", load_audio, url, allow_remote=True)
    remote = {"allow_remote": True, "allowed_networks": ["127.0.0.1"]}  # the local test server
    assert len(load_audio(url, **remote)) == 16000
    raises_named("byte limit", load_audio, url, max_bytes=1000, **remote)
    raises_named("HTTP 404", load_audio, f"{server}/missing.wav", **remote)
    raises_named("could not fetch URL", load_audio, f"{server}/slow.wav", timeout=0.3, **remote)
