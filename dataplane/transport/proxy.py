"""Dialing an edge's TLS/TCP tunnel port, directly or through an HTTP CONNECT proxy.

``dial_tls`` is the one way connector and client agent open a TLS/TCP tunnel. When an
egress proxy is configured (``FERRYMAN_HTTPS_PROXY``, else ``HTTPS_PROXY``/``https_proxy``)
and the edge is not exempted (``FERRYMAN_NO_PROXY``, else ``NO_PROXY``/``no_proxy``), it
connects to the proxy, sends ``CONNECT edge:port`` (with Proxy Basic authentication when
the URL carries credentials), reads the answer with h11 on the raw non-blocking socket
(the whole exchange bounded by the handshake timeout, the header section by
``MAX_RESPONSE_HEAD`` bytes) and then runs TLS over that socket, so the edge sees the
same mutual-TLS handshake as on a direct dial. Every refusal becomes a ``ProxyError``
whose text says what the proxy did (407, 403, 5xx, other status, not HTTP, silence,
oversized header, bytes before our ClientHello). QUIC never goes through the proxy.

``egress_proxy(settings)`` parses the configuration (``SettingsError`` for a malformed
URL or NO_PROXY entry); ``announce_egress`` logs once at start which proxy is used,
without its password.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import h11

from ..basics.settings import DialerSettings, SettingsError
from ..basics.version import SOFTWARE

log = logging.getLogger("ferryman.dial")

MAX_RESPONSE_HEAD = 16384  # bytes of status line + headers accepted from the proxy

P = TypeVar("P", bound=asyncio.BaseProtocol)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ProxyError(ConnectionError):
    """The proxy did not give us a tunnel to the edge; the text says why (log ``reason``)."""


# ---------------------------------------------------------------------------- configuration
def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _is_hostname(name: str) -> bool:
    return bool(name) and all(part and all(c.isalnum() or c in "-_" for c in part) for part in name.split("."))


@dataclass(frozen=True)
class NoProxyRule:
    """One NO_PROXY entry: everything (``*``), a domain (``corp.example`` or ``.corp.example``:
    the name and every name under it), an IP address or a CIDR; ``port`` 0 means any port."""

    domain: str = ""
    network: IPNetwork | None = None
    everything: bool = False
    port: int = 0

    def matches(self, host: str, port: int) -> bool:
        if self.port and self.port != port:
            return False
        if self.everything:
            return True
        if self.network is not None:
            ip = _ip(host)
            return ip is not None and ip.version == self.network.version and ip in self.network
        return host == self.domain or host.endswith("." + self.domain)


@dataclass(frozen=True)
class NoProxy:
    """The parsed NO_PROXY list; ``source`` names the variable it came from."""

    rules: tuple[NoProxyRule, ...] = ()
    source: str = ""

    def matches(self, host: str, port: int) -> bool:
        """True when ``host:port`` is dialed directly. Names are compared as written (no DNS),
        case-insensitively; IP and CIDR entries match IP-address hosts only."""
        host = host.strip("[]").rstrip(".").lower()
        ip = _ip(host)
        if ip is not None:
            host = str(ip)
        return any(rule.matches(host, port) for rule in self.rules)

    @classmethod
    def parse(cls, text: str, source: str = "NO_PROXY") -> "NoProxy":
        rules = []
        for raw in text.replace(" ", ",").replace("\t", ",").split(","):
            entry = raw.strip()
            if entry:
                rules.append(_no_proxy_rule(entry, source))
        return cls(tuple(rules), source)


def _no_proxy_rule(entry: str, source: str) -> NoProxyRule:
    def bad(why: str) -> SettingsError:
        return SettingsError(f"{source}: entry {entry!r} {why} (expected a host name, .domain, *, an IP "
                             f"address or a CIDR, optionally with :port)")

    body, port = entry, 0
    if body.startswith("["):  # [v6 address or CIDR]:port
        close = body.find("]")
        if close < 0:
            raise bad("has no closing ]")
        rest = body[close + 1:]
        body = body[1:close]
        if rest:
            if not rest.startswith(":"):
                raise bad("has text after ]")
            port = _port(rest[1:], bad)
    elif body.count(":") == 1:  # name:port or v4:port (a bare IPv6 address has several colons)
        body, _, port_text = body.partition(":")
        port = _port(port_text, bad)
    if body == "*":
        return NoProxyRule(everything=True, port=port)
    if "/" in body:
        try:
            return NoProxyRule(network=ipaddress.ip_network(body, strict=False), port=port)
        except ValueError:
            raise bad("is not a valid CIDR") from None
    ip = _ip(body)
    if ip is not None:
        return NoProxyRule(network=ipaddress.ip_network(ip), port=port)
    domain = body.lower().rstrip(".")
    domain = domain[2:] if domain.startswith("*.") else domain.lstrip(".")
    if not _is_hostname(domain):
        raise bad("is not a host name")
    return NoProxyRule(domain=domain, port=port)


def _port(text: str, bad: Callable[[str], SettingsError]) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise bad(f"has port {text!r}, not a number from 1 to 65535")
    return int(text)


@dataclass(frozen=True)
class EgressProxy:
    """An HTTP CONNECT proxy (``http://[user:password@]host:port``) and the NO_PROXY list."""

    host: str
    port: int
    username: str = ""
    password: str = field(default="", repr=False)
    no_proxy: NoProxy = NoProxy()
    source: str = "HTTPS_PROXY"

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def redacted_url(self) -> str:
        """The URL to log: the user name, never the password."""
        user = f"{self.username}:***@" if self.username else ""
        return f"http://{user}{self.address}"

    def authorization(self) -> str | None:
        """The Proxy-Authorization value (Basic, RFC 7617, UTF-8), or None without credentials."""
        if not self.username:
            return None
        token = base64.b64encode(f"{self.username}:{self.password}".encode("utf-8")).decode("ascii")
        return f"Basic {token}"

    def applies_to(self, host: str, port: int) -> bool:
        """True when a dial to ``host:port`` goes through this proxy (NO_PROXY does not exempt it)."""
        return not self.no_proxy.matches(host, port)

    @classmethod
    def parse(cls, url: str, source: str = "HTTPS_PROXY", no_proxy: NoProxy = NoProxy()) -> "EgressProxy":
        def bad(why: str) -> SettingsError:
            shown = url
            if "@" in url:  # never echo a password
                head, _, tail = url.rpartition("@")
                scheme, sep, userinfo = head.rpartition("://")
                shown = f"{scheme}{sep}{userinfo.split(':', 1)[0]}{':***' if ':' in userinfo else ''}@{tail}"
            return SettingsError(f"{source}={shown!r}: {why} (expected http://[user:password@]host:port)")

        text = url.strip()
        if "://" not in text:
            raise bad("no scheme")
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as exc:
            raise bad(f"not a valid URL: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme == "https":
            raise bad("TLS to the proxy (https://) is not supported; use http://")
        if scheme != "http":
            raise bad(f"scheme {parts.scheme!r} is not supported; use http://")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise bad("a proxy URL has no path, query or fragment")
        host = parts.hostname or ""
        if not host:
            raise bad("no host")
        if port is None or port == 0:
            raise bad("no port")
        if _ip(host) is None and not _is_hostname(host.rstrip(".")):
            raise bad(f"host {host!r} is not a host name or IP address")
        try:
            username = unquote(parts.username or "", errors="strict")
            password = unquote(parts.password or "", errors="strict")
        except UnicodeDecodeError:
            raise bad("the percent-encoded credentials are not UTF-8") from None
        if ":" in username:
            raise bad("the user name may not contain ':' (Basic authentication)")
        if password and not username:
            raise bad("a password without a user name")
        if any(ord(c) < 32 or ord(c) == 127 for c in username + password):
            raise bad("control characters in the credentials")
        return cls(host=host, port=port, username=username, password=password, no_proxy=no_proxy, source=source)


def _first(sources: list[tuple[str, str]]) -> tuple[str, str]:
    for name, value in sources:
        if value.strip():
            return name, value.strip()
    return "", ""


def egress_proxy(settings: DialerSettings, environ: Mapping[str, str] | None = None) -> EgressProxy | None:
    """The proxy that TLS/TCP tunnels dial through, or None for direct dials.

    ``FERRYMAN_HTTPS_PROXY`` (empty: ``HTTPS_PROXY``, then ``https_proxy``) and
    ``FERRYMAN_NO_PROXY`` (empty: ``NO_PROXY``, then ``no_proxy``). SettingsError when
    either cannot be used; the message names the variable it came from."""
    env = os.environ if environ is None else environ
    source, url = _first([("FERRYMAN_HTTPS_PROXY", settings.https_proxy),
                          ("HTTPS_PROXY", env.get("HTTPS_PROXY", "")), ("https_proxy", env.get("https_proxy", ""))])
    if not url:
        return None
    np_source, np_text = _first([("FERRYMAN_NO_PROXY", settings.no_proxy),
                                 ("NO_PROXY", env.get("NO_PROXY", "")), ("no_proxy", env.get("no_proxy", ""))])
    return EgressProxy.parse(url, source, NoProxy.parse(np_text, np_source or "NO_PROXY"))


def announce_egress(settings: DialerSettings, environ: Mapping[str, str] | None = None) -> EgressProxy | None:
    """Parse the egress proxy at node start (SettingsError if malformed) and log which one is used."""
    proxy = egress_proxy(settings, environ)
    if proxy is not None:
        log.info("TLS/TCP tunnels dial through an HTTP CONNECT proxy",
                 extra={"proxy": proxy.redacted_url, "from": proxy.source,
                        "no_proxy": ",".join(_rule_text(r) for r in proxy.no_proxy.rules) or "(none)"})
    return proxy


def _rule_text(rule: NoProxyRule) -> str:
    text = "*" if rule.everything else str(rule.network) if rule.network is not None else rule.domain
    return f"{text}:{rule.port}" if rule.port else text


# ---------------------------------------------------------------------------- dialing
async def dial_tls(
    protocol_factory: Callable[[], P],
    host: str,
    port: int,
    ssl_ctx: ssl.SSLContext,
    *,
    handshake_timeout: float,
    proxy: EgressProxy | None = None,
) -> tuple[asyncio.Transport, P]:
    """Open a TLS connection to ``host:port`` (directly, or through ``proxy`` unless NO_PROXY
    exempts the edge) and return ``(transport, protocol)`` as ``loop.create_connection`` does."""
    loop = asyncio.get_running_loop()
    if proxy is None or not proxy.applies_to(host, port):
        return await loop.create_connection(protocol_factory, host, port, ssl=ssl_ctx, server_hostname=host,
                                            ssl_handshake_timeout=handshake_timeout)
    sock = await connect_through(proxy, host, port, handshake_timeout)
    # The socket now belongs to the transport (closed by it on a failed handshake too).
    return await loop.create_connection(protocol_factory, sock=sock, ssl=ssl_ctx, server_hostname=host,
                                        ssl_handshake_timeout=handshake_timeout)


async def connect_through(proxy: EgressProxy, host: str, port: int, timeout: float) -> socket.socket:
    """A connected non-blocking socket on which ``proxy`` relays bytes to ``host:port``
    (TCP connect to the proxy + CONNECT exchange, all within ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    sock = await _connect_proxy(proxy, deadline)
    received = [0]  # bytes of the answer so far, for the timeout's message
    try:
        try:
            await asyncio.wait_for(_connect_exchange(sock, proxy, host, port, received),
                                   max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            what = (f"sent no answer to CONNECT {_target(host, port)}" if not received[0] else
                    f"sent only {received[0]} bytes of an answer to CONNECT {_target(host, port)}")
            raise ProxyError(f"proxy {proxy.address} {what} within {timeout:g}s") from None
    except BaseException:
        sock.close()
        raise
    return sock


def _target(host: str, port: int) -> str:
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _connect_proxy(proxy: EgressProxy, deadline: float) -> socket.socket:
    """A TCP connection to the proxy (its addresses tried in turn) before ``deadline`` (monotonic)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM),
                                       max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        raise ProxyError(f"proxy {proxy.address}: looking up {proxy.host!r} timed out") from None
    except OSError as exc:
        raise ProxyError(f"proxy {proxy.address}: cannot resolve {proxy.host!r}: {exc.strerror or exc}") from None
    errors = []
    for family, kind, proto, _, addr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.wait_for(loop.sock_connect(sock, addr), max(0.0, deadline - time.monotonic()))
            return sock
        except asyncio.TimeoutError:
            sock.close()
            errors.append("TCP connect timed out")
        except OSError as exc:
            sock.close()
            errors.append(os.strerror(exc.errno) if exc.errno else str(exc))
        except BaseException:
            sock.close()
            raise
    raise ProxyError(f"proxy {proxy.address} unreachable: {'; '.join(dict.fromkeys(errors)) or 'no address'}")


def _text(value: bytes, limit: int = 160) -> str:
    """Printable, bounded rendering of a proxy-supplied header value or reason phrase."""
    out = "".join(c if c.isprintable() else "?" for c in value.decode("latin-1"))
    return out if len(out) <= limit else out[:limit] + "..."


async def _connect_exchange(sock: socket.socket, proxy: EgressProxy, host: str, port: int,
                            progress: list[int]) -> None:
    """Send CONNECT and read the answer; return once the proxy relays, else ProxyError."""
    loop = asyncio.get_running_loop()
    target = _target(host, port)
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
    headers = [("Host", target), ("User-Agent", SOFTWARE)]
    auth = proxy.authorization()
    if auth is not None:
        headers.append(("Proxy-Authorization", auth))
    request = conn.send(h11.Request(method="CONNECT", target=target, headers=headers))
    request += conn.send(h11.EndOfMessage())
    where = f"proxy {proxy.address}"
    try:
        await loop.sock_sendall(sock, request)
    except OSError as exc:
        raise ProxyError(f"{where}: sending CONNECT failed: {exc.strerror or exc}") from None
    received = 0
    first = b""
    while True:
        try:
            event: Any = conn.next_event()
        except h11.RemoteProtocolError as exc:
            if received > MAX_RESPONSE_HEAD:
                raise ProxyError(f"{where} answered CONNECT {target} with a header section over "
                                 f"{MAX_RESPONSE_HEAD} bytes") from None
            if not first.startswith(b"HTTP/"):
                raise ProxyError(f"{where} did not answer CONNECT {target} with HTTP: it sent "
                                 f"{bytes(first[:32])!r}") from None
            raise ProxyError(f"{where} sent a malformed HTTP answer to CONNECT {target}: {exc}") from None
        if event is h11.NEED_DATA:
            if received > MAX_RESPONSE_HEAD:
                raise ProxyError(f"{where} answered CONNECT {target} with a header section over "
                                 f"{MAX_RESPONSE_HEAD} bytes")
            try:
                data = await loop.sock_recv(sock, 4096)
            except OSError as exc:
                raise ProxyError(f"{where}: connection lost while waiting for the answer to CONNECT {target}: "
                                 f"{exc.strerror or exc}") from None
            if not data:
                raise ProxyError(f"{where} closed the connection before answering CONNECT {target}"
                                 + (" completely" if received else ""))
            if len(first) < 64:
                first = (first + data)[:64]
            received += len(data)
            progress[0] = received
            conn.receive_data(data)
            continue
        if isinstance(event, h11.InformationalResponse):
            continue
        if isinstance(event, h11.Response):
            break
        raise ProxyError(f"{where}: unexpected {type(event).__name__} in the answer to CONNECT {target}")
    status = event.status_code
    if 200 <= status < 300:
        extra, _ = conn.trailing_data
        if extra:
            raise ProxyError(f"{where} sent {len(extra)} bytes after its {status} answer to CONNECT {target}, "
                             f"before our TLS handshake began: refusing the tunnel")
        return
    raise ProxyError(_refusal(where, target, proxy, status, event))


def _refusal(where: str, target: str, proxy: EgressProxy, status: int, response: h11.Response) -> str:
    answer = f"{status} {_text(response.reason)}".rstrip()
    detail = ""
    for name, value in response.headers:
        if name in (b"proxy-status", b"x-squid-error"):
            detail += f"; {name.decode()}: {_text(value)}"
    if status == 407:
        offered = [_text(v) for n, v in response.headers if n == b"proxy-authenticate"]
        schemes = {v.split(" ", 1)[0].lower() for v in offered}
        if not proxy.username:
            why = "proxy authentication required and the proxy URL has no user:password"
        elif offered and "basic" not in schemes:
            why = (f"proxy authentication required with {', '.join(sorted(schemes))}; only Basic is supported "
                   f"(the credentials for user {proxy.username!r} were not accepted)")
        else:
            why = f"proxy refused the credentials for user {proxy.username!r}"
        return f"{where}: {why} ({answer}{detail})"
    if status == 403:
        return f"{where} forbids CONNECT to {target}: its policy does not allow this destination ({answer}{detail})"
    if status in (502, 503, 504):
        return f"{where} could not reach the edge {target} ({answer}{detail})"
    return f"{where} refused CONNECT {target} ({answer}{detail})"
