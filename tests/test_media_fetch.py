"""The remote media fetcher: its address policy (on every request and every redirect), its total
deadline against a server that trickles bytes, its byte cap while reading, and one error for
refused and unreachable hosts. Only local servers: 127.0.0.1 (and 127.0.0.2, ::1 where the
machine has them) stand in for hosts the policy allows or refuses."""

from __future__ import annotations

import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from qomni.multimodal.fetch import (
    UNREACHABLE,
    FetchError,
    address_allowed,
    fetch_url,
    parse_networks,
)
from qomni.multimodal.media import MediaError, read_media_bytes

PAYLOAD = bytes(range(256)) * 40
LOCAL = ["127.0.0.1"]


class _Handler(BaseHTTPRequestHandler):
    seen_hosts: ClassVar[list[str]] = []

    def do_GET(self):
        type(self).seen_hosts.append(self.headers.get("Host", ""))
        path, _, query = self.path.partition("?")
        try:
            if path == "/a":
                self._send(PAYLOAD)
            elif path == "/to":  # a redirect to ?url=...
                self.send_response(302)
                self.send_header("Location", urllib.parse.unquote(query))
                self.end_headers()
            elif path == "/loop":
                self.send_response(307)
                self.send_header("Location", "/loop")
                self.end_headers()
            elif path == "/trickle-body":  # one byte every 0.1 s of a long body
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                for _ in range(100):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
            elif path == "/trickle-headers":  # the status line itself, one byte at a time
                for byte in b"HTTP/1.0 200 OK\r\n" * 10:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.1)
            elif path == "/unbounded":  # no Content-Length, the body ends when the socket does
                self.send_response(200)
                self.end_headers()
                for _ in range(100):
                    self.wfile.write(b"y" * 10000)
            else:
                self.send_error(404)
        except OSError:  # the client hung up, as the fetcher does at its limits
            pass

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _serve(host: str, tls: ssl.SSLContext | None = None):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family})
    try:
        httpd = server_class((host, 0), _Handler)
    except OSError as e:
        pytest.skip(f"cannot listen on {host}: {e}")
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, httpd.server_address[1]


@pytest.fixture(scope="module")
def server():
    httpd, port = _serve("127.0.0.1")
    yield f"http://127.0.0.1:{port}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def second_server():
    """127.0.0.2: a host the tests allow (as if it were public) while 127.0.0.1 stays refused."""
    httpd, port = _serve("127.0.0.2")
    yield f"http://127.0.0.2:{port}"
    httpd.shutdown()
    httpd.server_close()


def _refused(url: str, **kwargs) -> None:
    with pytest.raises(FetchError) as info:
        fetch_url(url, max_bytes=1 << 20, timeout=5, **kwargs)
    assert str(info.value) == UNREACHABLE


# ---------------------------------------------------------------- the address policy


@pytest.mark.parametrize("address", [
    "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "2002:808:808::1"])
def test_public_addresses_are_allowed(address):
    assert address_allowed(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.1.2.3", "10.0.0.1", "172.16.5.4", "192.168.1.1",  # loopback, private
    "169.254.169.254", "100.64.0.1", "0.0.0.0", "192.0.2.1", "198.18.0.1",  # link-local, shared
    "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255",  # multicast, reserved
    "::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "fec0::1", "ff02::1", "ff0e::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",  # IPv4-mapped
    "2002:7f00:1::1", "2002:a00:1::1", "::127.0.0.1", "64:ff9b::7f00:1", "2001::1",
])
def test_non_public_addresses_are_refused(address):
    assert not address_allowed(ipaddress.ip_address(address))


def test_allowed_networks_let_some_through():
    nets = parse_networks(["10.0.0.0/8", "127.0.0.1", "fd00::/8"])
    for address in ("10.1.2.3", "127.0.0.1", "::ffff:127.0.0.1", "fd00::5", "8.8.8.8"):
        assert address_allowed(ipaddress.ip_address(address), nets), address
    for address in ("127.0.0.2", "192.168.1.1", "::1", "0.0.0.0", "224.0.0.1"):
        assert not address_allowed(ipaddress.ip_address(address), nets), address
    everything = parse_networks(["0.0.0.0/0", "::/0"])
    assert not address_allowed(ipaddress.ip_address("0.0.0.0"), everything)  # never
    assert not address_allowed(ipaddress.ip_address("ff02::1"), everything)
    with pytest.raises(ValueError, match="not an IP network"):
        parse_networks(["10.0.0.0/33"])


# ---------------------------------------------------------------- requests and redirects


def test_local_server_refused_by_default_and_allowed_by_opt_in(server):
    _refused(f"{server}/a")
    assert fetch_url(f"{server}/a", max_bytes=1 << 20, timeout=5, allowed_networks=LOCAL) == PAYLOAD
    port = urllib.parse.urlsplit(server).port
    _refused(f"http://localhost:{port}/a")  # a name is judged by what it resolves to
    # the same words through the media resolver, named by item
    with pytest.raises(MediaError, match=r"^image #2: could not fetch URL \(host refused"):
        read_media_bytes(f"{server}/a", name="image #2", allow_remote=True)


def test_refused_and_unreachable_read_the_same(server, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    _refused(f"http://127.0.0.1:{closed}/a")  # refused by the policy
    _refused(f"http://127.0.0.1:{closed}/a", allowed_networks=LOCAL)  # connection refused

    def no_such_host(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    _refused("http://no-such-host.example/a")


def test_every_redirect_is_checked(server, second_server):
    allowed = ["127.0.0.2"]  # the second server plays a public host; 127.0.0.1 is refused
    to_local = f"{second_server}/to?{urllib.parse.quote(server + '/a')}"
    _refused(to_local, allowed_networks=allowed)
    assert fetch_url(to_local, max_bytes=1 << 20, timeout=5,
                     allowed_networks=["127.0.0.1", "127.0.0.2"]) == PAYLOAD
    relative = f"{second_server}/to?{urllib.parse.quote('/a')}"
    assert fetch_url(relative, max_bytes=1 << 20, timeout=5, allowed_networks=allowed) == PAYLOAD
    with pytest.raises(FetchError, match="non-http"):
        fetch_url(f"{second_server}/to?file:///etc/passwd", max_bytes=1 << 20, timeout=5,
                  allowed_networks=allowed)
    with pytest.raises(FetchError, match="more than 5 redirects"):
        fetch_url(f"{second_server}/loop", max_bytes=1 << 20, timeout=5, allowed_networks=allowed)


def test_connects_to_the_address_it_checked(second_server, monkeypatch):
    """A name resolved once per request: a second answer (DNS rebinding to 127.0.0.1) is never
    asked for, and the request still names the host."""
    port = urllib.parse.urlsplit(second_server).port
    answers = ["127.0.0.2", "127.0.0.1"]
    lookups = []

    def rebinding(host, *args, **kwargs):
        lookups.append(host)
        address = answers[min(len(lookups), 2) - 1]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    _Handler.seen_hosts.clear()
    got = fetch_url(f"http://media.example:{port}/a", max_bytes=1 << 20, timeout=5,
                    allowed_networks=["127.0.0.2"])
    assert got == PAYLOAD and lookups == ["media.example"]
    assert _Handler.seen_hosts == [f"media.example:{port}"]


def test_ipv6_loopback_refused_by_default():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    httpd, port = _serve("::1")
    try:
        _refused(f"http://[::1]:{port}/a")
        got = fetch_url(f"http://[::1]:{port}/a", max_bytes=1 << 20, timeout=5,
                        allowed_networks=["::1"])
        assert got == PAYLOAD
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """HTTPS on 127.0.0.1 with a self-signed certificate for the name media.example."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=media.example",
                    "-addext", "subjectAltName=DNS:media.example"],
                   check=True, capture_output=True)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    httpd, port = _serve("127.0.0.1", tls)
    yield port, cert
    httpd.shutdown()
    httpd.server_close()


def test_https_checks_the_certificate_against_the_name(tls_server, monkeypatch):
    port, cert = tls_server
    url = f"https://media.example:{port}/a"
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))])
    with pytest.raises(FetchError, match="TLS certificate"):  # self-signed: not trusted
        fetch_url(url, max_bytes=1 << 20, timeout=5, allowed_networks=LOCAL)
    default_context = ssl.create_default_context
    monkeypatch.setattr(ssl, "create_default_context", lambda: default_context(cafile=cert))
    assert fetch_url(url, max_bytes=1 << 20, timeout=5, allowed_networks=LOCAL) == PAYLOAD
    with pytest.raises(FetchError, match="TLS certificate"):  # trusted, but not for this name
        fetch_url(f"https://127.0.0.1:{port}/a", max_bytes=1 << 20, timeout=5,
                  allowed_networks=LOCAL)


# ---------------------------------------------------------------- deadline and size


@pytest.mark.parametrize("path", ["/trickle-body", "/trickle-headers"])
def test_total_deadline_holds_against_a_trickling_server(server, path):
    start = time.monotonic()
    with pytest.raises(FetchError, match=r"no complete answer within 1 s"):
        fetch_url(server + path, max_bytes=1 << 20, timeout=1.0, allowed_networks=LOCAL)
    elapsed = time.monotonic() - start
    assert 0.9 <= elapsed < 1.6, elapsed  # at the deadline, not per socket read


def test_byte_cap_enforced_while_reading(server):
    start = time.monotonic()
    with pytest.raises(FetchError, match="larger than the 50000-byte limit"):
        fetch_url(f"{server}/unbounded", max_bytes=50000, timeout=5, allowed_networks=LOCAL)
    with pytest.raises(FetchError, match="larger than the 100-byte limit"):  # Content-Length
        fetch_url(f"{server}/a", max_bytes=100, timeout=5, allowed_networks=LOCAL)
    assert time.monotonic() - start < 2


def test_bad_urls():
    for url, message in [("ftp://example.com/a", "not an http"),
                         ("http:///a", "no host"), ("http://example.com:99999/a", "bad host")]:
        with pytest.raises(FetchError, match=message):
            fetch_url(url, max_bytes=100, timeout=1)


# ---------------------------------------------------------------- the server's settings


def test_serve_flags_set_the_media_policy(server):
    pytest.importorskip("fastapi")
    from qomni.cli import build_parser
    from qomni.server import Limits

    parse = build_parser().parse_args
    args = parse(["serve", "--allow-remote-media", "--allow-media-network", "127.0.0.1",
                  "--allow-media-network", "fd00::/8", "--media-timeout", "5"])
    assert args.allow_media_network == ["127.0.0.1", "fd00::/8"] and args.media_timeout == 5.0
    assert parse(["serve"]).allow_media_network == [] and parse(["serve"]).media_timeout == 30.0
    for bad in (["--allow-media-network", "10.0.0.0/33"], ["--media-timeout", "0"],
                ["--media-timeout", "inf"]):
        with pytest.raises(SystemExit):
            parse(["serve", *bad])
    # what `qomni serve` builds from them
    strict = Limits().media_policy(allow_remote=True, local_root=None)
    opened = Limits(media_networks=tuple(args.allow_media_network),
                    media_timeout_s=args.media_timeout).media_policy(allow_remote=True,
                                                                     local_root=None)
    assert opened.timeout == 5.0 and strict.timeout == 30.0
    with pytest.raises(MediaError, match="host refused or unreachable"):
        strict.read(f"{server}/a", name="audio #1")
    assert opened.read(f"{server}/a", name="audio #1") == PAYLOAD


def test_timeout_must_be_positive():
    for timeout in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="positive number of seconds"):
            fetch_url("http://example.com/a", max_bytes=100, timeout=timeout)
