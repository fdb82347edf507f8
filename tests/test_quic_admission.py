"""The edge's QUIC listener under load and against peers that do not read, on both QUIC engines.

Handshakes in progress are capped (in all and per source address); past the Retry threshold a
new client must prove its address with a Retry token first; a tunnel whose peer does not take
what it is sent stops reading that peer. Real UDP on 127.0.0.1; a "half-open" client is a QUIC
client of the engine under test that sends its first Initial and nothing more, so its
handshake stays in progress on the edge.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
from typing import Any

import msgspec
import pytest

from dataplane.basics import pki
from dataplane.basics.settings import ConnectorSettings as Settings
from dataplane.transport.quic import (
    HandshakeLimits,
    QuicServer,
    RetryTokens,
    dial_quic,
    quic_configuration,
    serve_quic,
)
from dataplane.wire import events as ev
from dataplane.wire.connection import WireConfig
from dataplane.wire.frames import Open
from dataplane.wire.quic import ALPN
from dataplane.wire.quic_engine import QuicEngine, select_engine

from test_quic_transport import Dialer, Echo, creds, dial, run, use_engine

pytestmark = pytest.mark.timeout(30)

SETTINGS = Settings(keepalive_interval=10.0, handshake_timeout=5.0, quic_timeout=3.0)


@pytest.fixture(params=["qh3", "aioquic"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> QuicEngine:
    return use_engine(request.param, monkeypatch)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pki.NodeFiles]:
    return pki.init_pki(str(tmp_path_factory.mktemp("pki")), connectors=("connector-1",), clients=())


async def edge(certs: dict[str, pki.NodeFiles], handler: Any, limits: HandshakeLimits) -> QuicServer:
    return await serve_quic(handler, WireConfig(role="edge", node="edge-1"), "127.0.0.1", 0, SETTINGS,
                            creds(certs["edge-1"]), limits=limits)


def half_open(server: QuicServer, files: pki.NodeFiles, engine: QuicEngine, *, token: bytes = b"") -> socket.socket:
    """Send one client's first Initial (with ``token``, aioquic only) to the edge; keep its socket."""
    config = quic_configuration(creds(files), SETTINGS, client=True, server_name="127.0.0.1", engine=engine)
    if token:
        config = dataclasses.replace(config, token=token)
    conn = engine.connection(config, alpn=ALPN, max_streams=3, stream_window=65536, connection_window=131072)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    conn.connect(server.sockname, 0.0)
    for data, _addr in conn.datagrams_to_send(0.0):
        sock.sendto(data, server.sockname)
    return sock


async def settle(condition: Any) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def test_retry_token_names_the_address_and_connection_ids() -> None:
    tokens = RetryTokens()
    token = tokens.issue(("10.0.0.1", 4000), b"original", b"retrycid")
    assert tokens.check(("10.0.0.1", 4000), token, b"retrycid") == b"original"
    assert tokens.check(("10.0.0.2", 4000), token, b"retrycid") is None  # another address
    assert tokens.check(("10.0.0.1", 4001), token, b"retrycid") is None  # another port
    assert tokens.check(("10.0.0.1", 4000), token, b"othercid") is None  # another Retry
    assert tokens.check(("10.0.0.1", 4000), token[:-1] + bytes([token[-1] ^ 1]), b"retrycid") is None
    assert tokens.check(("10.0.0.1", 4000), b"short", b"retrycid") is None
    assert RetryTokens().check(("10.0.0.1", 4000), token, b"retrycid") is None  # another listener's key


def test_past_the_retry_threshold_clients_prove_their_address_first(certs: dict[str, pki.NodeFiles],
                                                                    engine: QuicEngine) -> None:
    async def main() -> None:
        echo, dialer = Echo(), Dialer()
        server = await edge(certs, echo, HandshakeLimits(max_handshakes=50, max_per_source=50, retry_threshold=3))
        socks = [half_open(server, certs["connector-1"], engine) for _ in range(3)]
        await settle(lambda: len(server.tunnels) == 3)
        assert server.retries_sent == 0
        # a fourth client without a token gets a Retry (one per Initial of its first flight) and no state
        socks.append(half_open(server, certs["connector-1"], engine))
        await settle(lambda: server.retries_sent >= 1)
        await asyncio.sleep(0.05)
        assert len(server.tunnels) == 3
        retries = server.retries_sent
        # a real client follows the Retry and gets its tunnel
        tunnel = await dial(server, certs["connector-1"], dialer, settings=SETTINGS)
        await tunnel.up_waiter
        assert server.retries_sent > retries and server.bad_tokens == 0 and len(server.tunnels) == 4
        fid = tunnel.conn.open_flow(Open(host="echo", port=7))
        tunnel.flush_soon()
        await dialer.next(ev.FlowAccepted)
        tunnel.send_data(fid, b"after retry")
        await settle(lambda: bytes(dialer.data.get(fid, b"")) == b"after retry")
        tunnel.close("shutdown", "test done")
        server.close()
        for sock in socks:
            sock.close()

    run(main())


def test_an_initial_with_a_forged_token_gets_nothing(certs: dict[str, pki.NodeFiles], engine: QuicEngine) -> None:
    async def main() -> None:
        server = await edge(certs, Echo(), HandshakeLimits(max_handshakes=50, max_per_source=50, retry_threshold=0))
        sock = half_open(server, certs["connector-1"], select_engine("aioquic"), token=os.urandom(40))
        await settle(lambda: server.bad_tokens == 1)
        assert server.tunnels == set() and server.retries_sent == 0
        sock.close()
        server.close()

    run(main())


def test_handshakes_in_progress_are_capped_per_source_and_in_all(certs: dict[str, pki.NodeFiles],
                                                                 engine: QuicEngine) -> None:
    async def main() -> None:
        echo = Echo()
        quick = msgspec.structs.replace(SETTINGS, quic_timeout=0.5)
        for limits in (HandshakeLimits(max_handshakes=50, max_per_source=2, retry_threshold=50),
                       HandshakeLimits(max_handshakes=2, max_per_source=50, retry_threshold=50)):
            server = await edge(certs, echo, limits)
            socks = [half_open(server, certs["connector-1"], engine) for _ in range(2)]
            await settle(lambda: len(server.tunnels) == 2)
            with pytest.raises(asyncio.TimeoutError):
                await dial(server, certs["connector-1"], Dialer(), settings=quick)
            assert server.refused_handshakes >= 1 and len(server.tunnels) == 2
            for tunnel in list(server.tunnels):  # the stalled handshakes end: room again
                tunnel.close("handshake_timeout", "test")
            tunnel = await dial(server, certs["connector-1"], Dialer(), settings=SETTINGS)
            await tunnel.up_waiter
            tunnel.close("shutdown", "test done")
            server.close()
            for sock in socks:
                sock.close()

    run(main())


class Sink(Echo):
    """An edge node that takes every flow and answers PINGs, like any edge."""

    def data_received(self, tunnel: Any, event: ev.DataReceived) -> None:
        tunnel.conn.acknowledge(event.flow_id, len(event.data))
        tunnel.flush_soon()


class Deaf(Dialer):
    """A dialer that reads nothing: its engine is held, so the edge gets no credit from it."""


def test_a_peer_that_does_not_read_is_not_read(certs: dict[str, pki.NodeFiles], engine: QuicEngine) -> None:
    async def main() -> None:
        sink = Sink()
        small = msgspec.structs.replace(SETTINGS, write_buffer_high=65536)
        server = await serve_quic(sink, WireConfig(role="edge", node="edge-1"), "127.0.0.1", 0, small,
                                  creds(certs["edge-1"]))
        # a small window: the edge's stream credit from the dialer is ~80 KB
        wire = WireConfig(role="connector", node="connector-1", window=4096, max_frame=4096)
        tunnel = await dial_quic(Deaf(), wire, "127.0.0.1", server.sockname[1], SETTINGS, creds(certs["connector-1"]))
        await tunnel.up_waiter
        await settle(lambda: bool(sink.up))
        inbound = sink.up[0]
        tunnel.conn.pause_reading()  # the dialer stops reading: the edge's PONGs pile up
        sent = 0
        while sent < 20_000 and inbound.conn.reading:
            for _ in range(200):
                tunnel.conn.ping(float(sent))
                sent += 1
            tunnel.flush_soon()
            await asyncio.sleep(0.005)
        # past the mark the edge stopped writing and reading: the PINGs it did not read got no credit
        assert inbound.conn.reading is False and inbound.writable is False
        assert 0 < inbound.conn.backlog
        held = inbound.conn.backlog
        for _ in range(20):
            for _ in range(200):
                tunnel.conn.ping(float(sent))
                sent += 1
            tunnel.flush_soon()
            await asyncio.sleep(0.005)
        assert inbound.conn.backlog == held  # no PING read meanwhile, so no PONG added
        # the dialer reads again: the edge's backlog drains and it reads the rest
        tunnel._resume_reading()
        await settle(lambda: inbound.conn.reading and inbound.writable)
        assert not inbound.closed and not tunnel.closed
        tunnel.close("shutdown", "test done")
        server.close()

    run(main())
