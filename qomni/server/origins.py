"""The Origin policy. A browser names the page that makes a request in its `Origin` header (every
cross-origin request, every POST and every WebSocket handshake); clients that are not browsers
send none and are not concerned. By default only the server's own pages (the web demo) may call
it: any other page the user opens could otherwise drive a server on localhost and read its
answers. `allowed` adds origins (`https://app.example`), `null` (sandboxed frames, file://
pages), or `*` allows all.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Sequence

from qomni.server.wire import APIError

log = logging.getLogger("qomni.server")

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _origin_key(origin: str) -> tuple[str, int] | None:
    """(host, port) of an origin `scheme://host[:port]`; None for "null" or anything else."""
    try:
        url = urllib.parse.urlsplit(origin.strip())
        port = url.port or _DEFAULT_PORTS.get(url.scheme.lower())
    except ValueError:
        return None
    if not url.hostname or port is None or url.path not in ("", "/"):
        return None
    return url.hostname.lower(), port


class OriginPolicy:
    """Which web origins may call the server: its own (same host and port as the request's
    `Host`), those listed, or all with `*`."""

    def __init__(self, allowed: Sequence[str] | None = None):
        allowed = [a.strip() for a in allowed or () if a.strip()]
        self.any = "*" in allowed
        self.null = "null" in allowed  # sandboxed frames and file:// pages
        self.listed: set[tuple[str, int]] = set()
        for origin in allowed:
            if origin in ("*", "null"):
                continue
            key = _origin_key(origin)
            if key is None:
                raise ValueError(f"allowed origin {origin!r} is not scheme://host[:port], "
                                 "'null' or '*'")
            self.listed.add(key)

    def same_origin(self, origin: str, host: str | None) -> bool:
        key = _origin_key(origin)
        if key is None or not host:
            return False
        scheme = urllib.parse.urlsplit(origin.strip()).scheme.lower()
        try:
            served = urllib.parse.urlsplit(f"{scheme}://{host.strip()}")
            port = served.port or _DEFAULT_PORTS[scheme]
        except (ValueError, KeyError):
            return False
        return (served.hostname or "").lower() == key[0] and port == key[1]

    def allows(self, origin: str | None, host: str | None) -> bool:
        """Whether a request with this `Origin` (None: not from a browser page) and `Host`
        header may go on."""
        if origin is None or self.any or self.same_origin(origin, host):
            return True
        if origin.strip() == "null":
            return self.null
        return _origin_key(origin) in self.listed

    def refusal(self, origin: str) -> APIError:
        log.warning("refused a request from the web origin %r (see --allowed-origins)",
                    origin[:200])
        return APIError(403, f"requests from the web origin {origin[:200]!r} are not allowed "
                        "(the server's --allowed-origins)", code="origin_not_allowed")
