"""Target ``httpconnect``: the client agent's HTTP CONNECT proxy request head (``dataplane.client.httpconnect``).

The bytes a local app sends, in reads of fuzzed sizes, into ``HttpConnect``. Contract:
``data_received`` raises nothing; at most ``MAX_HEAD`` (+ one read) bytes are buffered; the
request ends in exactly one outcome — handed on to a flow with a host name or address and a port
1-65535 that the agent can dial and put in an OPEN (at most 255 characters), or an HTTP error
answer (400, 405, 431) and a closed connection — or is still incomplete.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import types

from dataplane.client import httpconnect
from dataplane.client.process import LocalUsers
from dataplane.wire.frames import Open

from . import Finding, Reader, RecordingTransport

_ANSWER = re.compile(rb"HTTP/1\.1 (400|405|431) [A-Za-z ]+\r\n")


# What the front end asks of the agent before the handshake: who may use it (everyone here) and
# the handshake's time limit, whose timer needs the running loop the front end lives on.
_CLIENT = types.SimpleNamespace(local_users=LocalUsers("*"), settings=types.SimpleNamespace(handshake_timeout=10.0))
_LOOP = asyncio.new_event_loop()


class _HttpConnect(httpconnect.HttpConnect):
    def __init__(self) -> None:
        super().__init__(client=_CLIENT)  # type: ignore[arg-type]  # used only past the head
        self.outcome: tuple[str, int, bytes] | None = None

    def _connect(self, host: str, port: int, early: bytes) -> None:
        if self.outcome is not None:
            raise Finding("second request handed on")
        self.outcome = (host, port, early)


def _check_destination(host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise Finding(f"port {port} handed on")
    if not host or len(host) > 255:
        raise Finding(f"host of {len(host)} characters handed on")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            host.encode("idna")
        except UnicodeError as exc:
            raise Finding(f"host {host!r} handed on is not a name the agent can dial: {exc}") from exc
    Open(host=host, port=port)


def one_input(data: bytes) -> None:
    _LOOP.run_until_complete(_one_input(data))


async def _one_input(data: bytes) -> None:
    r = Reader(data)
    splits = r.take(r.byte() % 16)
    stream = r.rest()
    proto = _HttpConnect()
    transport = RecordingTransport(local=("127.0.0.1", 3128))
    proto.connection_made(transport)  # type: ignore[arg-type]
    try:
        for chunk in Reader(splits).chunks(stream):
            if transport.closed or proto.outcome is not None:
                break  # answered, or the connection now belongs to its flow
            proto.data_received(chunk)
            if len(proto.buf) > httpconnect.MAX_HEAD + 256:
                raise Finding(f"{len(proto.buf)} bytes of request head buffered")
        if proto.outcome is not None:
            if transport.written or transport.closed:
                raise Finding("request handed on and also answered")
            _check_destination(proto.outcome[0], proto.outcome[1])
        elif transport.closed:
            if not _ANSWER.match(transport.written):
                raise Finding(f"connection closed with {bytes(transport.written[:60])!r}")
        elif transport.written:
            raise Finding("answered without closing")
    finally:
        proto._stop_timer()  # its handshake timer: the loop runs no further than this input
