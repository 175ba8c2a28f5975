"""Turn an untrusted media reference into bytes or a local path.

A reference may be a local path (str or PathLike, or a ``file://`` URI), raw bytes, a base64
string, a ``data:<mime>;base64,...`` URI, or an http(s) URL. URLs are fetched only with
``allow_remote=True``, with a byte cap, an overall deadline and an address policy (public
addresses only, unless ``allowed_networks`` names others; see fetch.py). Every failure is a
:class:`MediaError` whose message names the item ("audio #1") and the reason, so the server can
answer 4xx with it verbatim.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qomni.multimodal.fetch import FetchError, IPNetwork, fetch_url

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_TIMEOUT_S = 30.0

MediaRef = str | bytes | bytearray | memoryview | os.PathLike

# Standard and URL-safe alphabets; whitespace is removed before matching (MIME base64 wraps lines).
_B64_RE = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")
_WS_RE = re.compile(r"\s+")
# Real media is never this small, and short strings are far more likely to be mistyped paths.
_MIN_B64_CHARS = 64


class MediaError(ValueError):
    """A media item could not be read; ``str(err)`` is ``"<name>: <reason>"``."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


def _short(s: str, n: int = 80) -> str:
    return repr(s if len(s) <= n else s[:n] + "...")


def _decode_b64(text: str, name: str, max_bytes: int) -> bytes:
    compact = _WS_RE.sub("", text)
    if not compact:
        raise MediaError(name, "empty base64 data")
    if len(compact) * 3 // 4 > max_bytes:
        raise MediaError(name, f"data larger than the {max_bytes}-byte limit")
    if not _B64_RE.fullmatch(compact):
        raise MediaError(name, "invalid base64 data (unexpected characters)")
    # Accept missing '=' padding, which some clients strip.
    compact += "=" * (-len(compact) % 4)
    altchars = b"-_" if ("-" in compact or "_" in compact) else None
    try:
        data = base64.b64decode(compact, altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(name, f"invalid base64 data ({e})") from None
    if not data:
        raise MediaError(name, "empty data")
    return data


def _decode_data_uri(uri: str, name: str, max_bytes: int) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep:
        raise MediaError(name, "malformed data URI (no ',')")
    if not header.lower().endswith(";base64"):
        # Non-base64 data URIs are percent-encoded text; media is always binary, so refuse.
        raise MediaError(name, "data URI must be base64-encoded (';base64,')")
    return _decode_b64(payload, name, max_bytes)


def _check_path(
    path: Path, name: str, max_bytes: int, allow_local: bool, local_root: str | os.PathLike | None
) -> Path:
    if not allow_local:
        raise MediaError(name, "local file paths are not allowed")
    path = path.expanduser()
    if local_root is not None:
        root = Path(local_root).resolve()
        if not path.resolve().is_relative_to(root):
            raise MediaError(name, f"path {_short(str(path))} is outside the allowed media folder")
    try:
        if not path.is_file():
            raise MediaError(name, f"file not found: {_short(str(path))}")
        size = path.stat().st_size
    except OSError as e:
        raise MediaError(name, f"cannot read file {_short(str(path))} ({e.strerror})") from None
    if size == 0:
        raise MediaError(name, f"file is empty: {_short(str(path))}")
    if size > max_bytes:
        raise MediaError(name, f"file larger than the {max_bytes}-byte limit")
    return path


def resolve_media(
    src: MediaRef,
    *,
    name: str = "media",
    allow_remote: bool = False,
    allow_local: bool = True,
    local_root: str | os.PathLike | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = DEFAULT_TIMEOUT_S,
    allowed_networks: Iterable[str | IPNetwork] = (),
) -> bytes | Path:
    """Return the media's bytes, or a :class:`Path` for a local file (decoders can seek in it).

    ``local_root``: when set, local paths must resolve inside it (the server's allowed folder).
    ``timeout``: seconds for a whole URL fetch, redirects included. ``allowed_networks``: CIDR
    networks a URL may reach besides public addresses (e.g. "10.0.0.0/8", "127.0.0.1").
    Raises :class:`MediaError` for anything unreadable, empty, too large or not allowed.
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise MediaError(name, "empty data")
        if len(data) > max_bytes:
            raise MediaError(name, f"data larger than the {max_bytes}-byte limit")
        return data
    if isinstance(src, os.PathLike):
        return _check_path(Path(src), name, max_bytes, allow_local, local_root)
    if not isinstance(src, str):
        raise MediaError(name, f"unsupported media reference of type {type(src).__name__}")

    text = src.strip()
    if not text:
        raise MediaError(name, "empty media reference")
    lowered = text[:8].lower()
    if lowered.startswith("data:"):
        return _decode_data_uri(text, name, max_bytes)
    if lowered.startswith(("http://", "https://")):
        if not allow_remote:
            raise MediaError(name, "remote URLs are disabled (allow_remote=False)")
        try:
            return fetch_url(text, max_bytes=max_bytes, timeout=timeout,
                             allowed_networks=allowed_networks)
        except FetchError as e:
            raise MediaError(name, str(e)) from None
    if lowered.startswith("file://"):
        local = urllib.request.url2pathname(urllib.parse.urlsplit(text).path)
        return _check_path(Path(local), name, max_bytes, allow_local, local_root)
    # A bare string is a path when such a file exists; otherwise, if it is long and looks like
    # base64, it is inline data. Short leftovers are reported as missing files (likelier mistake).
    if len(text) < 4096 and os.path.exists(text):
        return _check_path(Path(text), name, max_bytes, allow_local, local_root)
    compact = _WS_RE.sub("", text)
    if len(compact) >= _MIN_B64_CHARS and "." not in compact[:64]:
        return _decode_b64(compact, name, max_bytes)
    if allow_local:
        raise MediaError(name, f"file not found (and not a URL or base64 data): {_short(text)}")
    raise MediaError(name, f"not a URL or base64 data: {_short(text)}")


def read_media_bytes(src: MediaRef, **kwargs) -> bytes:
    """Like :func:`resolve_media`, but always returns bytes (local files are read)."""
    got = resolve_media(src, **kwargs)
    return got.read_bytes() if isinstance(got, Path) else got


@dataclass(frozen=True)
class MediaPolicy:
    """What a caller's media references may name, and how large and long media may be.

    The library default reads local paths anywhere and never fetches URLs; a server builds a
    stricter one (local paths only under its folder, if any). `max_seconds` caps every audio
    clip, video and video sound track (None: no cap). `allowed_networks`: CIDR networks a URL
    may reach besides public addresses."""

    allow_remote: bool = False
    allow_local: bool = True
    local_root: Path | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    timeout: float = DEFAULT_TIMEOUT_S
    max_seconds: float | None = None
    allowed_networks: tuple[str, ...] = ()

    @property
    def source_options(self) -> dict[str, Any]:
        """The `resolve_media` keywords of this policy (what the loaders take)."""
        return {"allow_remote": self.allow_remote, "allow_local": self.allow_local,
                "local_root": self.local_root, "max_bytes": self.max_bytes,
                "timeout": self.timeout, "allowed_networks": self.allowed_networks}

    def read(self, src: MediaRef, name: str) -> bytes:
        """`read_media_bytes` under this policy."""
        return read_media_bytes(src, name=name, **self.source_options)
