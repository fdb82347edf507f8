"""HTTP CONNECT proxy egress of the TLS/TCP tunnels (``dataplane/transport/proxy.py``).

- proxy URL and NO_PROXY parsing, and where each comes from (FERRYMAN_* first, then the
  standard variables), with errors that name the variable and never echo a password;
- ``dial_tls`` against small scripted CONNECT responders on 127.0.0.1: a 200 relaying to a
  real mutual-TLS echo server carries real bytes; every refusal (407 with and without
  credentials, 403, 502/503/504, another status, not HTTP, malformed HTTP, an oversized
  header section, silence, half an answer, an early close, bytes after the 200, nothing
  listening) gives its exact error text; the Basic credentials are checked at the responder;
  NO_PROXY sends the dial direct;
- a real connector process: a malformed proxy URL stops it at start with one clear line; a
  refusing proxy shows up as ``edge unreachable`` with that reason, again and again (the
  reconnect loop goes on), and the start log names the proxy without its password.

The real-squid tests are in ``tests/test_proxy_squid.py``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from dataplane.basics import pki
from dataplane.basics.settings import DialerSettings as Settings, SettingsError
from dataplane.transport.proxy import (
    MAX_RESPONSE_HEAD,
    EgressProxy,
    NoProxy,
    ProxyError,
    announce_egress,
    dial_tls,
    egress_proxy,
)

pytestmark = pytest.mark.timeout(60)


def run(coro_factory: Callable[[], Awaitable[object]], timeout: float = 20.0) -> object:
    async def bounded() -> object:
        return await asyncio.wait_for(coro_factory(), timeout)

    return uvloop.run(bounded())


# ---------------------------------------------------------------------------- URL parsing
def test_proxy_url_with_percent_encoded_credentials() -> None:
    proxy = EgressProxy.parse("http://al%20ice:p%40ss%3Aw%2Frd%20%C3%A9@Proxy.Corp.Example:3128/")
    assert (proxy.host, proxy.port, proxy.username, proxy.password) == (
        "proxy.corp.example", 3128, "al ice", "p@ss:w/rd é")
    assert proxy.authorization() == "Basic " + base64.b64encode("al ice:p@ss:w/rd é".encode()).decode()
    assert proxy.redacted_url == "http://al ice:***@proxy.corp.example:3128"
    assert "p@ss" not in repr(proxy)


def test_proxy_url_without_credentials_and_ipv6() -> None:
    proxy = EgressProxy.parse("http://[2001:db8::1]:8080")
    assert (proxy.host, proxy.port, proxy.authorization()) == ("2001:db8::1", 8080, None)
    assert proxy.address == "[2001:db8::1]:8080"
    user_only = EgressProxy.parse("http://bob@10.0.0.1:3128")
    assert user_only.authorization() == "Basic " + base64.b64encode(b"bob:").decode()


@pytest.mark.parametrize("url, why", [
    ("proxy.example:3128", "no scheme"),
    ("https://proxy.example:3128", "TLS to the proxy (https://) is not supported; use http://"),
    ("socks5://proxy.example:1080", "scheme 'socks5' is not supported; use http://"),
    ("http://proxy.example", "no port"),
    ("http://proxy.example:0", "no port"),
    ("http://proxy.example:99999", "not a valid URL: Port out of range 0-65535"),
    ("http://proxy.example:31x8", "not a valid URL: Port could not be cast to integer value as '31x8'"),
    ("http://proxy.example:3128/path", "a proxy URL has no path, query or fragment"),
    ("http://proxy.example:3128?x=1", "a proxy URL has no path, query or fragment"),
    ("http://:3128", "no host"),
    ("http://pro xy:3128", "host 'pro xy' is not a host name or IP address"),
    ("http://:pw@proxy.example:3128", "a password without a user name"),
    ("http://a%3Ab:pw@proxy.example:3128", "the user name may not contain ':' (Basic authentication)"),
    ("http://a%0Ab:pw@proxy.example:3128", "control characters in the credentials"),
    ("http://a:%FF@proxy.example:3128", "the percent-encoded credentials are not UTF-8"),
])
def test_malformed_proxy_url(url: str, why: str) -> None:
    with pytest.raises(SettingsError) as info:
        EgressProxy.parse(url, "FERRYMAN_HTTPS_PROXY")
    shown = url.replace(":pw@", ":***@").replace(":%FF@", ":***@")
    assert str(info.value) == f"FERRYMAN_HTTPS_PROXY={shown!r}: {why} (expected http://[user:password@]host:port)"


def test_malformed_url_error_never_shows_the_password() -> None:
    with pytest.raises(SettingsError) as info:
        EgressProxy.parse("http://alice:hunter2@proxy.example", "HTTPS_PROXY")
    assert "hunter2" not in str(info.value)
    assert str(info.value).startswith("HTTPS_PROXY='http://alice:***@proxy.example': no port")


def test_settings_win_over_the_standard_variables() -> None:
    env = {"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:2", "NO_PROXY": "a.example",
           "no_proxy": "b.example"}
    chosen = egress_proxy(Settings(https_proxy="http://mine:3", no_proxy=".corp.example"), env)
    assert chosen is not None
    assert (chosen.host, chosen.source, chosen.no_proxy.source) == ("mine", "FERRYMAN_HTTPS_PROXY", "FERRYMAN_NO_PROXY")
    assert chosen.no_proxy.matches("x.corp.example", 1) and not chosen.no_proxy.matches("a.example", 1)
    upper = egress_proxy(Settings(), env)
    assert upper is not None and (upper.host, upper.source, upper.no_proxy.source) == ("upper", "HTTPS_PROXY", "NO_PROXY")
    lower = egress_proxy(Settings(), {"https_proxy": "http://lower:2", "no_proxy": "b.example"})
    assert lower is not None and (lower.host, lower.no_proxy.source) == ("lower", "no_proxy")
    assert lower.no_proxy.matches("b.example", 443)
    assert egress_proxy(Settings(), {"NO_PROXY": "*"}) is None
    assert egress_proxy(Settings(), {"HTTPS_PROXY": "  "}) is None
    with pytest.raises(SettingsError, match=r"^https_proxy='ftp://x:1': scheme 'ftp'"):
        egress_proxy(Settings(), {"https_proxy": "ftp://x:1"})


def test_start_log_names_the_proxy_without_its_password(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "ferryman.dial")
    settings = Settings(https_proxy="http://alice:hunter2@proxy.example:3128", no_proxy="10.0.0.0/8,.corp.example:443")
    assert announce_egress(settings, {}) is not None
    (record,) = [r for r in caplog.records if r.name == "ferryman.dial"]
    assert record.getMessage() == "TLS/TCP tunnels dial through an HTTP CONNECT proxy"
    assert record.proxy == "http://alice:***@proxy.example:3128"  # type: ignore[attr-defined]
    assert record.no_proxy == "10.0.0.0/8,corp.example:443"  # type: ignore[attr-defined]
    assert "hunter2" not in caplog.text and "hunter2" not in str(record.__dict__)
    caplog.clear()
    assert announce_egress(Settings(), {}) is None
    assert not [r for r in caplog.records if r.name == "ferryman.dial"]


# ---------------------------------------------------------------------------- NO_PROXY
@pytest.mark.parametrize("no_proxy, host, port, direct", [
    ("*", "edge.example.com", 8443, True),
    ("edge.example.com", "edge.example.com", 8443, True),
    ("edge.example.com", "EDGE.Example.com.", 8443, True),
    ("example.com", "edge.example.com", 8443, True),  # a name covers the names under it
    ("example.com", "badexample.com", 8443, False),
    (".example.com", "edge.example.com", 8443, True),
    (".example.com", "example.com", 8443, True),
    ("*.example.com", "edge.example.com", 8443, True),
    ("other.example", "edge.example.com", 8443, False),
    ("edge.example.com:8443", "edge.example.com", 8443, True),
    ("edge.example.com:443", "edge.example.com", 8443, False),
    ("10.1.2.3", "10.1.2.3", 8443, True),
    ("10.1.2.3", "10.1.2.4", 8443, False),
    ("10.0.0.0/8", "10.200.3.4", 8443, True),
    ("10.0.0.0/8", "11.0.0.1", 8443, False),
    ("10.0.0.0/8", "ten.example", 8443, False),  # CIDRs match addresses, names are not resolved
    ("192.168.0.0/16:8443", "192.168.7.7", 8443, True),
    ("192.168.0.0/16:8443", "192.168.7.7", 443, False),
    ("127.0.0.1:8443", "127.0.0.1", 8443, True),
    ("::1", "::1", 8443, True),
    ("[::1]:8443", "[::1]", 8443, True),
    ("[::1]:8443", "::1", 9443, False),
    ("2001:db8::/32", "2001:db8:0:0::7", 8443, True),
    ("2001:db8::/32", "10.0.0.1", 8443, False),
    ("localhost, 10.0.0.0/8 ,,edge.example.com", "edge.example.com", 1, True),
    ("", "edge.example.com", 1, False),
])
def test_no_proxy_matching(no_proxy: str, host: str, port: int, direct: bool) -> None:
    assert NoProxy.parse(no_proxy).matches(host, port) is direct


@pytest.mark.parametrize("entry, why", [
    ("10.0.0.0/33", "is not a valid CIDR"),
    ("edge.example.com:port", "has port 'port', not a number from 1 to 65535"),
    ("edge.example.com:70000", "has port '70000', not a number from 1 to 65535"),
    ("[::1", "has no closing ]"),
    ("[::1]x", "has text after ]"),
    ("edge/x", "is not a valid CIDR"),
    ("a..b", "is not a host name"),
    ("http://x", "has port '//x', not a number from 1 to 65535"),
])
def test_no_proxy_errors(entry: str, why: str) -> None:
    with pytest.raises(SettingsError) as info:
        NoProxy.parse(f"ok.example,{entry}", "FERRYMAN_NO_PROXY")
    assert str(info.value) == (f"FERRYMAN_NO_PROXY: entry {entry!r} {why} "
                               f"(expected a host name, .domain, *, an IP address or a CIDR, optionally with :port)")


# ---------------------------------------------------------------------------- responders
class Responder:
    """A scripted CONNECT proxy on 127.0.0.1: records every request head, answers ``answer``
    (None: stays silent), then relays to ``relay`` (a port), closes (``close``) or holds."""

    def __init__(self, answer: bytes | None, relay: int = 0, close: bool = False) -> None:
        self.answer = answer
        self.relay = relay
        self.close = close
        self.requests: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def __aenter__(self) -> "Responder":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    def proxy(self, credentials: str = "", no_proxy: str = "") -> EgressProxy:
        return EgressProxy.parse(f"http://{credentials}127.0.0.1:{self.port}", no_proxy=NoProxy.parse(no_proxy))

    def header(self, name: str) -> list[str]:
        """Values of header ``name`` in every request seen."""
        found = []
        for head in self.requests:
            for line in head.decode("latin-1").split("\r\n")[1:]:
                key, _, value = line.partition(":")
                if key.strip().lower() == name.lower():
                    found.append(value.strip())
        return found

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.requests.append(await reader.readuntil(b"\r\n\r\n"))
            if self.answer is None:
                await asyncio.sleep(3600)
            writer.write(self.answer)
            await writer.drain()
            if self.relay:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.relay)
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            elif self.close:
                writer.close()
            else:
                await asyncio.sleep(3600)
        except (OSError, asyncio.IncompleteReadError):
            writer.close()
        except asyncio.CancelledError:  # the test's loop is closing
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    except OSError:
        writer.close()


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


class Collect(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.more = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.more.set()


def _paths(pki_dir: str, name: str) -> tuple[str, str, str]:
    return (os.path.join(pki_dir, f"{name}.pem"), os.path.join(pki_dir, f"{name}.key"),
            os.path.join(pki_dir, "ca.pem"))


async def tls_echo_server(pki_dir: str) -> asyncio.AbstractServer:
    """A mutual-TLS echo server with the edge's certificate (stands in for an edge)."""
    ctx = pki.server_context(*_paths(pki_dir, "edge-1"))
    return await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", 0, ssl=ctx)


def client_ctx(pki_dir: str) -> ssl.SSLContext:
    return pki.client_context(*_paths(pki_dir, "connector-1"))


async def echo_through(transport: asyncio.Transport, proto: Collect, payload: bytes) -> bytes:
    transport.write(payload)
    while len(proto.data) < len(payload):
        proto.more.clear()
        await asyncio.wait_for(proto.more.wait(), 10)
    transport.close()
    return bytes(proto.data)


def test_dial_through_a_200_carries_mutual_tls_bytes_and_basic_credentials(pki_cache: str) -> None:
    payload = os.urandom(300_000)

    async def main() -> None:
        edge = await tls_echo_server(pki_cache)
        edge_port = edge.sockets[0].getsockname()[1]
        async with Responder(b"HTTP/1.1 200 Connection established\r\n\r\n", relay=edge_port) as resp:
            proxy = resp.proxy("al%20ice:p%40ss%3Aw%2Frd%20%C3%A9@")
            transport, proto = await dial_tls(Collect, "127.0.0.1", edge_port, client_ctx(pki_cache),
                                              handshake_timeout=5, proxy=proxy)
            assert transport.get_extra_info("ssl_object").version() == "TLSv1.3"
            assert transport.get_extra_info("peercert") is not None
            assert await echo_through(transport, proto, payload) == payload
            (head,) = resp.requests
            assert head.split(b"\r\n")[0] == f"CONNECT 127.0.0.1:{edge_port} HTTP/1.1".encode()
            assert resp.header("Host") == [f"127.0.0.1:{edge_port}"]
            assert resp.header("Proxy-Authorization") == [
                "Basic " + base64.b64encode("al ice:p@ss:w/rd é".encode("utf-8")).decode()]
            assert base64.b64decode(resp.header("Proxy-Authorization")[0].split()[1]) == b"al ice:p@ss:w/rd \xc3\xa9"
        edge.close()

    run(main)


def test_no_credentials_no_authorization_header_and_informational_answers_skipped(pki_cache: str) -> None:
    async def main() -> None:
        edge = await tls_echo_server(pki_cache)
        edge_port = edge.sockets[0].getsockname()[1]
        answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\nProxy-Agent: test\r\n\r\n"
        async with Responder(answer, relay=edge_port) as resp:
            transport, proto = await dial_tls(Collect, "127.0.0.1", edge_port, client_ctx(pki_cache),
                                              handshake_timeout=5, proxy=resp.proxy())
            assert await echo_through(transport, proto, b"ping") == b"ping"
            assert resp.header("Proxy-Authorization") == []
            assert resp.header("User-Agent") == ["ferryman/0.1.0"]
        edge.close()

    run(main)


def test_no_proxy_dials_direct(pki_cache: str) -> None:
    async def main() -> None:
        edge = await tls_echo_server(pki_cache)
        edge_port = edge.sockets[0].getsockname()[1]
        async with Responder(b"HTTP/1.1 403 Forbidden\r\n\r\n", close=True) as resp:
            transport, proto = await dial_tls(Collect, "127.0.0.1", edge_port, client_ctx(pki_cache),
                                              handshake_timeout=5, proxy=resp.proxy(no_proxy="127.0.0.0/8"))
            assert await echo_through(transport, proto, b"direct") == b"direct"
            assert resp.requests == []
        edge.close()

    run(main)


EDGE = 48443  # nothing needs to listen there: the responders never relay


def refusal(answer: bytes | None, credentials: str = "", *, close: bool = False, timeout: float = 5.0) -> tuple[str, int]:
    """The ProxyError text of a dial through a responder answering ``answer``, and its port."""

    async def main() -> tuple[str, int]:
        async with Responder(answer, close=close) as resp:
            with pytest.raises(ProxyError) as info:
                await dial_tls(Collect, "127.0.0.1", EDGE, ssl.create_default_context(), handshake_timeout=timeout,
                               proxy=resp.proxy(credentials))
            return str(info.value), resp.port

    return run(main)  # type: ignore[return-value]


def test_407_without_credentials() -> None:
    text, port = refusal(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"corp\"\r\n"
                         b"Content-Length: 0\r\n\r\n")
    assert text == (f"proxy 127.0.0.1:{port}: proxy authentication required and the proxy URL has no user:password "
                    f"(407 Proxy Authentication Required)")


def test_407_with_refused_credentials() -> None:
    text, port = refusal(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"corp\"\r\n"
                         b"\r\n", "alice:wrong@")
    assert text == (f"proxy 127.0.0.1:{port}: proxy refused the credentials for user 'alice' "
                    f"(407 Proxy Authentication Required)")


def test_407_asking_for_another_scheme() -> None:
    text, port = refusal(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Negotiate\r\n"
                         b"Proxy-Authenticate: NTLM\r\n\r\n", "alice:pw@")
    assert text == (f"proxy 127.0.0.1:{port}: proxy authentication required with negotiate, ntlm; only Basic is "
                    f"supported (the credentials for user 'alice' were not accepted) (407 Proxy Authentication Required)")


def test_403_forbidden_by_policy() -> None:
    text, port = refusal(b"HTTP/1.1 403 Forbidden\r\nX-Squid-Error: ERR_ACCESS_DENIED 0\r\n\r\n")
    assert text == (f"proxy 127.0.0.1:{port} forbids CONNECT to 127.0.0.1:{EDGE}: its policy does not allow this "
                    f"destination (403 Forbidden; x-squid-error: ERR_ACCESS_DENIED 0)")


@pytest.mark.parametrize("status, reason", [(502, "Bad Gateway"), (503, "Service Unavailable"),
                                            (504, "Gateway Timeout")])
def test_5xx_proxy_could_not_reach_the_edge(status: int, reason: str) -> None:
    text, port = refusal(f"HTTP/1.1 {status} {reason}\r\nProxy-Status: corp-proxy; error=connection_refused\r\n"
                         f"\r\n".encode())
    assert text == (f"proxy 127.0.0.1:{port} could not reach the edge 127.0.0.1:{EDGE} "
                    f"({status} {reason}; proxy-status: corp-proxy; error=connection_refused)")


def test_other_status() -> None:
    text, port = refusal(b"HTTP/1.1 418 I'm a \x01teapot\r\n\r\n")
    assert text == f"proxy 127.0.0.1:{port} refused CONNECT 127.0.0.1:{EDGE} (418 I'm a ?teapot)"


def test_not_http() -> None:
    text, port = refusal(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n\r\n")
    assert text == (f"proxy 127.0.0.1:{port} did not answer CONNECT 127.0.0.1:{EDGE} with HTTP: it sent "
                    f"b'SSH-2.0-OpenSSH_9.2p1 Debian-2\\r\\n'")  # the first 32 bytes


def test_malformed_http() -> None:
    text, port = refusal(b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n")
    assert text.startswith(f"proxy 127.0.0.1:{port} sent a malformed HTTP answer to CONNECT 127.0.0.1:{EDGE}: "
                           f"illegal header line")


def test_oversized_header_section() -> None:
    big = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-Pad-%05d: %s\r\n" % (i, b"a" * 100) for i in range(400)) + b"\r\n"
    assert len(big) > MAX_RESPONSE_HEAD
    text, port = refusal(big)
    assert text == (f"proxy 127.0.0.1:{port} answered CONNECT 127.0.0.1:{EDGE} with a header section over "
                    f"{MAX_RESPONSE_HEAD} bytes")


def test_endless_header_line_is_bounded_too() -> None:
    text, port = refusal(b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * (MAX_RESPONSE_HEAD * 4))
    assert text == (f"proxy 127.0.0.1:{port} answered CONNECT 127.0.0.1:{EDGE} with a header section over "
                    f"{MAX_RESPONSE_HEAD} bytes")


def test_silence_times_out_within_the_handshake_timeout() -> None:
    started = time.monotonic()
    text, port = refusal(None, timeout=0.5)
    assert text == f"proxy 127.0.0.1:{port} sent no answer to CONNECT 127.0.0.1:{EDGE} within 0.5s"
    assert time.monotonic() - started < 3


def test_half_an_answer_times_out() -> None:
    text, port = refusal(b"HTTP/1.1 200 OK\r\n", timeout=0.5)
    assert text == f"proxy 127.0.0.1:{port} sent only 17 bytes of an answer to CONNECT 127.0.0.1:{EDGE} within 0.5s"


def test_closed_before_answering() -> None:
    text, port = refusal(b"", close=True)
    assert text == f"proxy 127.0.0.1:{port} closed the connection before answering CONNECT 127.0.0.1:{EDGE}"
    text, port = refusal(b"HTTP/1.1 200 OK\r\n", close=True)
    assert text == (f"proxy 127.0.0.1:{port} closed the connection before answering CONNECT 127.0.0.1:{EDGE} "
                    f"completely")


def test_bytes_after_the_200_are_refused() -> None:
    text, port = refusal(b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03\x03junk")
    assert text == (f"proxy 127.0.0.1:{port} sent 7 bytes after its 200 answer to CONNECT 127.0.0.1:{EDGE}, "
                    f"before our TLS handshake began: refusing the tunnel")


def test_nothing_listening_at_the_proxy() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main() -> str:
        with pytest.raises(ProxyError) as info:
            await dial_tls(Collect, "127.0.0.1", EDGE, ssl.create_default_context(), handshake_timeout=5,
                           proxy=EgressProxy.parse(f"http://127.0.0.1:{port}"))
        return str(info.value)

    assert run(main) == f"proxy 127.0.0.1:{port} unreachable: Connection refused"


# ---------------------------------------------------------------------------- a real connector process
class ThreadedResponder:
    """A blocking CONNECT responder in a thread that answers every request with ``answer``."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.count = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(5)
                head = b""
                try:
                    while b"\r\n\r\n" not in head:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        head += chunk
                    if head.startswith(b"CONNECT "):
                        self.count += 1
                    conn.sendall(self.answer)
                except OSError:
                    pass

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.sock.close()


def _node_env(pki_dir: str, name: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FERRYMAN_") and k.lower() not in ("https_proxy", "no_proxy")}
    cert, key, ca = _paths(pki_dir, name)
    env.update(FERRYMAN_TLS_CA=ca, FERRYMAN_TLS_CERT=cert, FERRYMAN_TLS_KEY=key, FERRYMAN_LOG_FORMAT="json",
               FERRYMAN_DATA_DIR=os.path.join(pki_dir, "..", "data"), **extra)
    return env


@pytest.mark.parametrize("role, env_name", [("connector", "FERRYMAN_HTTPS_PROXY"), ("client", "https_proxy")])
def test_malformed_proxy_url_stops_the_node_at_start(pki_cache: str, role: str, env_name: str) -> None:
    name = "connector-1" if role == "connector" else "client-1"
    env = _node_env(pki_cache, name, **{env_name: "http://alice:hunter2@proxy.example"})
    done = subprocess.run([sys.executable, "-m", "dataplane", role, "--edges", "127.0.0.1:1"], env=env,
                          capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    assert done.stderr.decode().splitlines()[-1] == (
        f"ferryman {role}: {env_name}='http://alice:***@proxy.example': no port "
        f"(expected http://[user:password@]host:port)")
    assert b"hunter2" not in done.stderr + done.stdout


def test_a_refusing_proxy_is_logged_as_edge_unreachable_and_the_connector_keeps_trying(pki_cache: str) -> None:
    responder = ThreadedResponder(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    env = _node_env(pki_cache, "connector-1", FERRYMAN_HTTPS_PROXY=f"http://alice:hunter2@127.0.0.1:{responder.port}",
                    FERRYMAN_CONNECTOR_TUNNELS="1", FERRYMAN_RECONNECT_MIN="0.05", FERRYMAN_RECONNECT_MAX="0.2")
    proc = subprocess.Popen([sys.executable, "-m", "dataplane", "connector", "--edges", f"127.0.0.1:{EDGE}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while responder.count < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert responder.count >= 3, f"only {responder.count} CONNECTs reached the proxy"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
        responder.stop()
    lines = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    start = [r for r in lines if r["msg"] == "TLS/TCP tunnels dial through an HTTP CONNECT proxy"]
    assert len(start) == 1
    assert start[0]["proxy"] == f"http://alice:***@127.0.0.1:{responder.port}"
    assert start[0]["from"] == "FERRYMAN_HTTPS_PROXY"
    unreachable = [r for r in lines if r["msg"] == "edge unreachable"]
    assert len(unreachable) >= 2
    assert {r["reason"] for r in unreachable} == {
        f"proxy 127.0.0.1:{responder.port} forbids CONNECT to 127.0.0.1:{EDGE}: its policy does not allow this "
        f"destination (403 Forbidden)"}
    assert all(r["edge"] == f"127.0.0.1:{EDGE}" and r["retry_in_s"] <= 0.2 for r in unreachable)
    assert b"hunter2" not in out
