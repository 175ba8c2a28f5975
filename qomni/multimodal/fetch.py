"""Fetch a media URL on behalf of an untrusted caller: a total deadline, a byte cap, and an
address policy.

Every request, and every redirect (followed here, never by the HTTP library), resolves its host,
keeps the addresses the policy allows, and connects to a checked address itself, so the name
cannot resolve elsewhere between the check and the connection. By default only globally
reachable unicast addresses are allowed: loopback, private, link-local, shared, multicast,
unspecified and reserved ranges are refused, in IPv4 and IPv6 (an IPv4-mapped, 6to4 or Teredo
address is also judged by the IPv4 address it carries). `allowed_networks` lets some non-public
networks through (an internal media host). A refused host and an unreachable one get the same
error, so a caller cannot map the server's network from the replies.

The deadline covers the whole fetch: name lookups, connections, headers, body and redirects. A
watchdog shuts the connection down when it passes, so a server trickling bytes cannot hold a
fetch open past it. Proxy settings from the environment are not used.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_REDIRECTS = 5
UNREACHABLE = "could not fetch URL (host refused or unreachable)"
_REDIRECTS = (301, 302, 303, 307, 308)


class FetchError(ValueError):
    """The URL could not be fetched; the message is the reason, fit to show the caller."""


def parse_networks(networks: Iterable[str | IPNetwork]) -> tuple[IPNetwork, ...]:
    """CIDR strings ("10.0.0.0/8", "fd00::/8", a bare address) as networks; ValueError names a
    bad one."""
    out = []
    for n in networks:
        try:
            out.append(ipaddress.ip_network(n, strict=False))
        except ValueError:
            raise ValueError(f"not an IP network: {n!r} (expected e.g. 10.0.0.0/8)") from None
    return tuple(out)


def address_allowed(ip: IPAddress, allowed_networks: Iterable[IPNetwork] = ()) -> bool:
    """Whether a fetch may connect to `ip`: a public unicast address, or one inside
    `allowed_networks`; never unspecified or multicast."""
    networks = tuple(allowed_networks)
    if ip.version == 6:
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d reaches a.b.c.d
            return address_allowed(ip.ipv4_mapped, networks)
        inner = ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if inner is not None and not address_allowed(inner, networks):
            return False
    if ip.is_unspecified or ip.is_multicast:
        return False
    if any(ip.version == net.version and ip in net for net in networks):
        return True
    site_local = ip.version == 6 and ip.is_site_local
    return ip.is_global and not ip.is_reserved and not site_local


def _open(ip: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to a literal address (socket.create_connection would look it up again)."""
    sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((ip, port))
    except BaseException:
        sock.close()
        raise
    return sock


class _Connection(http.client.HTTPConnection):
    """HTTP to `host` over a TCP connection to the already-checked address `ip`."""

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.ip = ip

    def connect(self) -> None:
        self.sock = _open(self.ip, self.port, self.timeout)


class _TLSConnection(http.client.HTTPSConnection):
    """HTTPS to `host` (certificate checked against `host`) over a connection to `ip`."""

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        self.tls = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self.tls)
        self.ip = ip

    def connect(self) -> None:
        sock = _open(self.ip, self.port, self.timeout)
        # Handshake after `self.sock` is set, so the watchdog can end a stalled one too.
        self.sock = self.tls.wrap_socket(sock, server_hostname=self.host,
                                         do_handshake_on_connect=False)
        self.sock.do_handshake()


class _Fetch:
    """One fetch and its deadline; `expire()` (the watchdog) ends whatever it is waiting on."""

    def __init__(self, timeout: float, max_bytes: int, networks: tuple[IPNetwork, ...]):
        self.timeout, self.max_bytes, self.networks = timeout, max_bytes, networks
        self.deadline = time.monotonic() + timeout
        self.expired = False
        self.conn: http.client.HTTPConnection | None = None
        self.lock = threading.Lock()

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0 or self.expired:
            raise self.late()
        return left

    def late(self) -> FetchError:
        return FetchError(f"could not fetch URL (no complete answer within {self.timeout:g} s)")

    def expire(self) -> None:
        with self.lock:
            self.expired = True
            sock = self.conn.sock if self.conn is not None else None
            if sock is not None:
                try:
                    # The plain socket's shutdown, also under TLS: it wakes a blocked read at
                    # once, from this thread, without touching the TLS state the reader uses.
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass

    def run(self, url: str) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            status, location, body = self.request(url)
            if status not in _REDIRECTS:
                return body
            if not location:
                raise FetchError(f"could not fetch URL (HTTP {status} without a Location)")
            url = urllib.parse.urljoin(url, location)
            if urllib.parse.urlsplit(url).scheme.lower() not in ("http", "https"):
                raise FetchError("URL redirected to a non-http(s) location")
        raise FetchError(f"could not fetch URL (more than {MAX_REDIRECTS} redirects)")

    def request(self, url: str) -> tuple[int, str | None, bytes]:
        """(status, Location, body) of one GET; the body only for a 2xx answer."""
        parts = urllib.parse.urlsplit(url)
        tls = parts.scheme.lower() == "https"
        try:
            host = (parts.hostname or "").encode("idna").decode("ascii")
            port = parts.port or (443 if tls else 80)
        except (UnicodeError, ValueError):
            raise FetchError("invalid URL (bad host or port)") from None
        if not host:
            raise FetchError("invalid URL (no host)")
        path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        for ip in self.addresses(host, port):
            conn = (_TLSConnection if tls else _Connection)(host, port, ip, self.remaining())
            with self.lock:
                self.conn = conn
            try:
                try:
                    conn.connect()
                except ssl.SSLCertVerificationError as e:
                    reason = e.verify_message or "not trusted"
                    raise FetchError(f"could not fetch URL (TLS certificate: {reason})") from None
                except OSError:
                    if self.expired:
                        raise self.late() from None
                    continue  # the next address, if any
                return self.exchange(conn, path)
            finally:
                with self.lock:
                    self.conn = None
                conn.close()
        raise FetchError(UNREACHABLE)

    def addresses(self, host: str, port: int) -> list[str]:
        """The host's addresses that the policy allows, in resolver order."""
        try:
            found = [ipaddress.ip_address(host)]
        except ValueError:
            found = [ipaddress.ip_address(a.split("%", 1)[0]) for a in self.resolve(host, port)]
        return [str(ip) for ip in dict.fromkeys(found) if address_allowed(ip, self.networks)]

    def resolve(self, host: str, port: int) -> list[str]:
        """getaddrinfo in a thread of its own: the resolver takes no timeout, the deadline
        still holds."""
        out: dict[str, list[str]] = {}

        def lookup() -> None:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                out["addresses"] = [str(info[4][0]) for info in infos]
            except (OSError, UnicodeError):
                out["addresses"] = []

        thread = threading.Thread(target=lookup, daemon=True)
        thread.start()
        thread.join(self.remaining())
        if thread.is_alive():
            raise self.late()
        return out["addresses"]

    def exchange(self, conn: http.client.HTTPConnection, path: str) -> tuple[int, str | None,
                                                                             bytes]:
        try:
            conn.request("GET", path, headers={"User-Agent": "qomni", "Accept-Encoding":
                                               "identity"})
            resp = conn.getresponse()
        except http.client.InvalidURL:
            raise FetchError("invalid URL (characters not allowed in a request)") from None
        except (OSError, http.client.HTTPException):
            # Connected, but no HTTP answer: said like an unreachable host (no port probing).
            if self.expired:
                raise self.late() from None
            raise FetchError(UNREACHABLE) from None
        if resp.status in _REDIRECTS:
            return resp.status, resp.getheader("Location"), b""
        if not 200 <= resp.status < 300:
            raise FetchError(f"could not fetch URL (HTTP {resp.status})")
        return resp.status, None, self.body(resp)

    def body(self, resp: http.client.HTTPResponse) -> bytes:
        too_large = FetchError(f"URL content larger than the {self.max_bytes}-byte limit")
        declared = resp.getheader("Content-Length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise too_large
        chunks, total = [], 0
        try:
            while True:
                self.remaining()
                chunk = resp.read1(min(1 << 16, self.max_bytes + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > self.max_bytes:
                    raise too_large
        except (OSError, http.client.HTTPException) as e:
            if self.expired:
                raise self.late() from None
            raise FetchError(f"could not fetch URL (connection lost: {type(e).__name__})") from None
        if self.expired:  # the watchdog's shutdown reads as the end of the body
            raise self.late()
        if not chunks:
            raise FetchError("URL returned empty data")
        return b"".join(chunks)


def fetch_url(url: str, *, max_bytes: int, timeout: float,
              allowed_networks: Iterable[str | IPNetwork] = ()) -> bytes:
    """GET an http(s) URL's body, following up to MAX_REDIRECTS redirects, within `timeout`
    seconds in all and `max_bytes` bytes; raises FetchError."""
    if not 0 < timeout < float("inf"):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if urllib.parse.urlsplit(url).scheme.lower() not in ("http", "https"):
        raise FetchError("not an http(s) URL")
    fetch = _Fetch(timeout, max_bytes, parse_networks(allowed_networks))
    watchdog = threading.Timer(timeout, fetch.expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        return fetch.run(url)
    finally:
        watchdog.cancel()
