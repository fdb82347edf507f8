"""HTTP CONNECT proxy front end of the client agent (FERRYMAN_HTTP_LISTEN, localhost only).

An app configured with ``https_proxy=http://127.0.0.1:PORT`` (browsers, curl, git, most
HTTP libraries) asks ``CONNECT host:port HTTP/1.1``. The request head is parsed with h11,
bounded: at most ``MAX_HEAD`` bytes (431 beyond). Only CONNECT to an authority-form
``host:port`` target is served (405 with ``Allow: CONNECT`` for any other method, 400 for a
malformed request or target). The destination is routed by the agent like SOCKS5
(``capture.connect``):

- ``"tunnel"``: a ``ClientFlow`` through the edge; ``HTTP/1.1 200 Connection established``
  once the edge answers OPEN_OK. A refusal is an HTTP error whose body is the edge's reason
  and whose ``X-Ferryman-Reason`` header is its code: 403 for access denials (no
  application, not assigned, a policy: MFA, block, device compliance, sign-in), 502 when
  the backend could not be reached (dial refused / error, DNS), 503 when no path exists
  now (edge unreachable, no connector, tunnel lost), 504 for timeouts.
- ``"direct"``: dialed from this device (``direct.DirectRelay``), answered the same way.

Bytes the app sent right after the head (early data, e.g. a TLS ClientHello sent without
waiting for the 200) are kept and sent first once the flow is open.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re

import h11

from ..basics.hostport import is_host_name
from .capture import connect, local_user_refusal
from .opener import FlowOpener

log = logging.getLogger("ferryman.httpconnect")

MAX_HEAD = 8192
_HEAD_END = re.compile(rb"\r?\n\r?\n")

DENIED = frozenset({
    "no_application", "not_allowed", "not_assigned", "mfa_required", "blocked", "blocked_by_policy",
    "device_not_compliant", "sign_in_required", "user_unknown", "user_disabled", "device_unknown",
    "device_revoked", "session_revoked", "token_expired", "policy_denied", "unsupported_protocol",
    "destination_forbidden",
})
BAD_GATEWAY = frozenset({"dial_refused", "dial_error", "dns_error"})
UNAVAILABLE = frozenset({"edge_unreachable", "no_connector", "tunnel_lost", "connector_lost", "draining",
                         "no_config", "too_many_flows", "too_many_pending", "too_many_dials", "too_many_lookups",
                         "shutdown"})
TIMEOUT = frozenset({"open_timeout", "dial_timeout", "dns_timeout"})

REASONS = {400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed", 408: "Request Timeout",
           431: "Request Header Fields Too Large", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


def status_for(code: str) -> int:
    """The HTTP status answering an OPEN refused with ``code``."""
    if code in DENIED:
        return 403
    if code in TIMEOUT:
        return 504
    if code in UNAVAILABLE:
        return 503
    if code in BAD_GATEWAY:
        return 502
    return 502


_NOT_IN_A_HEADER = re.compile(r"[^\x20-\x7e]")  # what an edge's code must not bring into a header line


def response(status: int, body: str = "", headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 response that closes the connection (error answers). Header values
    come from an edge's OPEN_FAIL (its code): anything but printable ASCII in them (a CR or LF
    would start a header or a body of the edge's choosing) becomes ``?``."""
    payload = (body + "\n").encode("utf-8", "replace") if body else b""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}", "Connection: close",
             "Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(payload)}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {_NOT_IN_A_HEADER.sub('?', value)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + payload


ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


def parse_target(target: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` → (host, port); ValueError with the reason otherwise."""
    if target.startswith("["):
        host, sep, port = target[1:].partition("]:")
        if not sep:
            raise ValueError(f"CONNECT target {target!r}: expected [IPv6]:PORT")
        ipaddress.IPv6Address(host)  # ValueError when not one
    else:
        host, sep, port = target.rpartition(":")
        if not sep or not host:
            raise ValueError(f"CONNECT target {target!r}: expected HOST:PORT")
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if not is_host_name(host):
                raise ValueError(f"CONNECT target {target!r}: {host!r} is not a host name or address") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"CONNECT target {target!r}: port must be 1-65535")
    return host, int(port)


class HttpConnect(asyncio.Protocol):
    def __init__(self, client: FlowOpener) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.peer = ""
        self.done = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        why = local_user_refusal(self.client, transport)
        if why:  # another local account (logged there, at a limited rate)
            self.done = True
            self.transport.write(response(403, why))
            self.transport.close()
            return
        # A request head that never completes would hold a file descriptor for ever.
        self.timer = asyncio.get_running_loop().call_later(self.client.settings.handshake_timeout, self._expired)

    def _expired(self) -> None:
        self.timer = None
        if not self.done:
            self._refuse(408, f"no complete request within {self.client.settings.handshake_timeout:g} seconds")

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        self.buf += data
        match = _HEAD_END.search(self.buf, 0, MAX_HEAD + 4)
        if match is None:
            if len(self.buf) > MAX_HEAD:
                self._refuse(431, f"request head larger than {MAX_HEAD} bytes")
            return
        if match.end() > MAX_HEAD + 4 or match.start() > MAX_HEAD:
            self._refuse(431, f"request head larger than {MAX_HEAD} bytes")
            return
        head, early = bytes(self.buf[:match.end()]), bytes(self.buf[match.end():])
        self.done = True
        self._stop_timer()
        self.buf.clear()
        self._request(head, early)

    def eof_received(self) -> bool | None:
        if not self.done:
            log.info("http connect: client closed before a complete request", extra={"source": self.peer})
        return None

    def _request(self, head: bytes, early: bytes) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD + 4)
        try:
            conn.receive_data(head)
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            self._refuse(exc.error_status_hint if exc.error_status_hint in (400, 431) else 400,
                         f"malformed request: {exc}")
            return
        if not isinstance(event, h11.Request):
            self._refuse(400, "malformed request head")
            return
        method = event.method.decode("ascii", "replace")
        if method != "CONNECT":
            self._refuse(405, f"method {method} not allowed: this is an HTTP CONNECT proxy",
                         {"Allow": "CONNECT"})
            return
        target = event.target.decode("ascii", "replace")
        try:
            host, port = parse_target(target)
        except ValueError as exc:
            self._refuse(400, str(exc) if "CONNECT target" in str(exc) else f"CONNECT target {target!r}: {exc}")
            return
        self._connect(host, port, early)

    def _connect(self, host: str, port: int, early: bytes) -> None:
        """Through the tunnel or directly (``capture.connect``); answered 200 or with the refusal."""
        transport = self.transport
        assert transport is not None

        def result(code: str, reason: str) -> None:
            if code:
                transport.write(response(status_for(code), reason or code, {"X-Ferryman-Reason": code}))
            else:
                transport.write(ESTABLISHED)

        connect(self.client, transport, (host, port), early, result)

    def _refuse(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self.done = True
        log.warning("http connect request refused", extra={"source": self.peer, "status": status, "reason": message})
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(response(status, message, headers))
            transport.close()
