"""Target ``socks5``: the client agent's SOCKS5 front end (``dataplane.client.socks``).

Two inputs a local app controls: the TCP handshake (greeting, then a CONNECT or UDP ASSOCIATE
request), fed to ``Socks5`` in reads of fuzzed sizes, and a UDP relay datagram's SOCKS header
(``parse_address``, as ``UdpAssociation.datagram_received`` reads it). Contract:

- ``data_received`` raises nothing; a connection still waiting for its request holds at most
  ``MAX_HANDSHAKE`` bytes;
- the handshake ends in exactly one outcome: a request handed on (CONNECT: a host and a port
  1-65535; UDP ASSOCIATE), or a SOCKS reply and a closed connection, or a close (not SOCKS5);
- ``parse_address`` returns None (truncated) or an address, or raises ``ValueError``; an address it
  returns can be written back into a SOCKS header (``pack_address``: the UDP relay's answers and
  the replies do exactly that).
"""

from __future__ import annotations

import asyncio
import types

from dataplane.client import socks
from dataplane.client.process import LocalUsers

from . import Finding, Reader, RecordingTransport


# What the front end asks of the agent before the handshake: who may use it (everyone here) and
# the handshake's time limit, whose timer needs the running loop the front end lives on.
_CLIENT = types.SimpleNamespace(local_users=LocalUsers("*"), settings=types.SimpleNamespace(handshake_timeout=10.0))
_LOOP = asyncio.new_event_loop()


class _Socks5(socks.Socks5):
    """The real handshake; what it hands on (to the agent's flow opener) is recorded instead."""

    def __init__(self) -> None:
        super().__init__(client=_CLIENT)  # type: ignore[arg-type]  # used only past the handshake
        self.outcome: tuple | None = None

    def _connect(self, host: str, port: int, rest: bytes) -> None:
        self._hand_on(("connect", host, port, rest))  # the real one moves the socket to a flow (set_protocol)

    def _associate(self, host: str, port: int) -> None:
        self._hand_on(("associate", host, port))
        self.association = object()  # type: ignore[assignment]  # later bytes are ignored, as for a real one

    def _hand_on(self, outcome: tuple) -> None:
        if self.outcome is not None:
            raise Finding(f"second request handed on: {outcome!r} after {self.outcome!r}")
        self.outcome = outcome
        _check_address(outcome[1], outcome[2])
        if outcome[0] == "connect" and (not outcome[1] or not 0 < outcome[2] < 65536):
            raise Finding(f"CONNECT handed on with host {outcome[1]!r} port {outcome[2]}")


def _check_address(host: str, port: int) -> None:
    if not 0 <= port < 65536:
        raise Finding(f"port {port}")
    try:
        packed = socks.pack_address(host)
    except (UnicodeError, ValueError) as exc:
        raise Finding(f"parsed host {host!r} cannot be written back into a SOCKS header: {exc}") from exc
    if packed[0] == 3 and len(packed) - 2 != packed[1]:
        raise Finding(f"host {host!r} packs to a name of {len(packed) - 2} bytes")


def one_input(data: bytes) -> None:
    _LOOP.run_until_complete(_one_input(data))


async def _one_input(data: bytes) -> None:
    r = Reader(data)
    mode = r.byte()
    if mode & 1:  # a UDP relay datagram's header
        datagram = r.rest()
        try:
            parsed = socks.parse_address(datagram, 3)
        except ValueError:
            return
        if parsed is not None:
            _check_address(parsed[0], parsed[1])
        return
    splits = r.take(r.byte() % 16)
    stream = r.rest()
    proto = _Socks5()
    transport = RecordingTransport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    try:
        for chunk in Reader(splits).chunks(stream):
            if transport.closed or (proto.outcome is not None and proto.outcome[0] == "connect"):
                break  # closed, or the connection now belongs to its flow
            proto.data_received(chunk)
            if not transport.closed and proto.outcome is None and len(proto.buf) > socks.MAX_HANDSHAKE:
                raise Finding(f"{len(proto.buf)} handshake bytes buffered")
        if proto.outcome is not None and transport.closed:
            raise Finding(f"request handed on ({proto.outcome[0]}) and the connection closed")
    finally:
        proto._stop_timer()  # its handshake timer: the loop runs no further than this input
