"""Real-socket tests of ``dataplane.transport.quic`` on 127.0.0.1: mTLS identity, flows, datagrams.

An edge-like server (``serve_quic``) and connector/client dialers (``dial_quic``) with
certificates from ``pki.init_pki``; the server's handler echoes flows and datagrams.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest
import uvloop
from cryptography.hazmat.primitives.serialization import Encoding

from dataplane.basics import pki
from dataplane.basics.metrics import Stats
from dataplane.basics.pki import PeerCertificate
from dataplane.basics.settings import DialerSettings as Settings
from dataplane.transport.quic import (
    QuicCredentials,
    QuicServer,
    QuicTunnel,
    dial_quic,
    load_credentials,
    serve_quic,
)
from dataplane.transport import quic as quic_transport
from dataplane.transport.tunnel import TunnelHandler
from dataplane.wire.quic_engine import QuicEngine, select_engine
from dataplane.wire import events as ev
from dataplane.wire.connection import WireConfig
from dataplane.wire.frames import Open

pytestmark = pytest.mark.timeout(20)

SETTINGS = Settings(keepalive_interval=10.0, handshake_timeout=5.0, quic_timeout=3.0)


@pytest.fixture(autouse=True, params=["qh3", "aioquic"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> QuicEngine:
    """Every test runs on both QUIC engines (the edge and the dialer use the one given here)."""
    return use_engine(request.param, monkeypatch)


def use_engine(name: str, monkeypatch: pytest.MonkeyPatch) -> QuicEngine:
    """The QUIC engine ``name``, which the edge and the dialer use from now on (undone by ``monkeypatch``)."""
    chosen = select_engine(name)
    monkeypatch.setattr(quic_transport, "quic_engine_of", lambda settings: chosen)
    return chosen


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pki.NodeFiles]:
    return pki.init_pki(str(tmp_path_factory.mktemp("pki")), connectors=("connector-1",),
                        clients=("client-1",), edges=("edge-1",))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pki.NodeFiles]:
    return pki.init_pki(str(tmp_path_factory.mktemp("other-pki")))


def run(coro: Awaitable[None]) -> None:
    uvloop.run(asyncio.wait_for(coro, 15))  # type: ignore[arg-type]


def creds(files: pki.NodeFiles, trust: pki.NodeFiles | None = None) -> QuicCredentials:
    """``files``' credentials; with ``trust``, trusting that node's CA instead of its own."""
    own = load_credentials(files.cert, files.key, files.ca)
    if trust is None:
        return own
    other = load_credentials(trust.cert, trust.key, trust.ca)
    return dataclasses.replace(own, authorities=other.authorities, ca_pem=other.ca_pem)


class Echo(TunnelHandler):
    """Edge side: accepts every flow, echoes bytes, FIN and datagrams; records the tunnels' ends."""

    def __init__(self, revoked: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        self.stats = Stats("edge", "edge-1")
        self.revoked = revoked
        self.up: list[Any] = []
        self.down: list[Any] = []
        self.downed = asyncio.Event()
        self.goaways: list[ev.GoAwayReceived] = []

    def refuse_peer(self, identity: PeerCertificate) -> str | None:
        return f"certificate {identity.serial:x} is revoked" if identity.serial in self.revoked else None

    def tunnel_up(self, tunnel: Any) -> None:
        self.up.append(tunnel)

    def tunnel_down(self, tunnel: Any) -> None:
        self.down.append(tunnel)
        self.downed.set()

    def flow_requested(self, tunnel: Any, event: ev.FlowRequested) -> None:
        tunnel.conn.accept_flow(event.flow_id, "127.0.0.1:1", f"{event.open.host}:{event.open.port}")
        tunnel.flush_soon()

    def data_received(self, tunnel: Any, event: ev.DataReceived) -> None:
        taken = tunnel.conn.send_data(event.flow_id, bytes(event.data))
        assert taken == len(event.data), "echo test keeps within one window"
        tunnel.conn.acknowledge(event.flow_id, len(event.data))
        tunnel.flush_soon()

    def flow_ended(self, tunnel: Any, event: ev.FlowEnded) -> None:
        tunnel.conn.send_fin(event.flow_id)
        tunnel.flush_soon()

    def datagram_received(self, tunnel: Any, event: ev.DatagramReceived) -> None:
        tunnel.conn.send_datagram(event.flow_id, bytes(event.data)[::-1])
        tunnel.flush_soon()

    def goaway_received(self, tunnel: Any, event: ev.GoAwayReceived) -> None:
        self.goaways.append(event)


class Dialer(TunnelHandler):
    """Connector/client side: collects what comes back, per flow."""

    def __init__(self) -> None:
        self.stats = Stats("connector", "connector-1")
        self.data: dict[int, bytearray] = {}
        self.events: asyncio.Queue[ev.Event] = asyncio.Queue()
        self.writable: list[bool] = []
        self.on_credit: Callable[[Any], None] | None = None

    def _put(self, event: ev.Event) -> None:
        self.events.put_nowait(event)

    def flow_accepted(self, tunnel: Any, event: ev.FlowAccepted) -> None:
        self._put(event)

    def flow_rejected(self, tunnel: Any, event: ev.FlowRejected) -> None:
        self._put(event)

    def data_received(self, tunnel: Any, event: ev.DataReceived) -> None:
        self.data.setdefault(event.flow_id, bytearray()).extend(event.data)
        tunnel.conn.acknowledge(event.flow_id, len(event.data))
        tunnel.flush_soon()

    def flow_ended(self, tunnel: Any, event: ev.FlowEnded) -> None:
        self._put(event)

    def flow_closed(self, tunnel: Any, event: ev.FlowClosed) -> None:
        self._put(event)

    def datagram_received(self, tunnel: Any, event: ev.DatagramReceived) -> None:
        self._put(ev.DatagramReceived(event.flow_id, bytes(event.data)))

    def credit_available(self, tunnel: Any, event: ev.CreditAvailable) -> None:
        if self.on_credit is not None:
            self.on_credit(tunnel)

    def tunnel_writable(self, tunnel: Any, writable: bool) -> None:
        self.writable.append(writable)

    async def next(self, kind: type) -> Any:
        while True:
            event = await asyncio.wait_for(self.events.get(), 5)
            if isinstance(event, kind):
                return event


async def edge(certs: dict[str, pki.NodeFiles], handler: Echo, **kw: Any) -> QuicServer:
    return await serve_quic(handler, WireConfig(role="edge", node="edge-1"), "127.0.0.1", 0,
                            kw.pop("settings", SETTINGS), creds(certs["edge-1"]), **kw)


async def dial(server: QuicServer, files: pki.NodeFiles, handler: Dialer, *, trust: pki.NodeFiles | None = None,
               node: str | None = None, settings: Settings = SETTINGS) -> QuicTunnel:
    return await dial_quic(handler, WireConfig(role=files.role, node=node or files.name), "127.0.0.1",
                           server.sockname[1], settings, creds(files, trust))


def der(path: str) -> bytes:
    return pki.read_certificates(path)[0].public_bytes(Encoding.DER)


# ---------------------------------------------------------------------------- identity and flows


def test_tunnel_up_with_identities_and_an_echoed_flow(certs: dict[str, pki.NodeFiles]) -> None:
    async def main() -> None:
        echo, dialer = Echo(), Dialer()
        server = await edge(certs, echo)
        tunnel = await dial(server, certs["connector-1"], dialer)
        await tunnel.up_waiter
        assert (tunnel.peer_certificate.role, tunnel.peer_certificate.name) == ("edge", "edge-1")
        assert tunnel.peer_certificate_der() == der(certs["edge-1"].cert)
        assert tunnel.sockname[0] == "127.0.0.1" and tunnel.peer_addr == f"127.0.0.1:{server.sockname[1]}"
        while not echo.up:
            await asyncio.sleep(0.01)
        inbound = echo.up[0]
        assert (inbound.peer_certificate.role, inbound.peer_certificate.name) == ("connector", "connector-1")
        assert inbound.peer_certificate.serial == pki.read_node_certificate(certs["connector-1"].cert).serial
        assert inbound.peer_certificate_der() == der(certs["connector-1"].cert)

        fid = tunnel.conn.open_flow(Open(host="db.corp", port=5432))
        tunnel.flush_soon()
        assert await dialer.next(ev.FlowAccepted) == ev.FlowAccepted(fid, "127.0.0.1:1", "db.corp:5432")
        payload = os.urandom(300_000)
        assert tunnel.conn.send_data(fid, payload) == len(payload)
        tunnel.conn.send_fin(fid)
        tunnel.flush_soon()
        assert await dialer.next(ev.FlowClosed) == ev.FlowClosed(fid)
        assert hashlib.sha256(dialer.data[fid]).digest() == hashlib.sha256(payload).digest()
        assert tunnel.conn.flows == {} and inbound.conn.flows == {}

        tunnel.close("shutdown", "test done")
        await asyncio.wait_for(echo.downed.wait(), 5)
        assert echo.down[0].close_code == "peer_closed"
        server.close()

    run(main())


def test_bulk_flow_larger_than_the_window_under_credit(certs: dict[str, pki.NodeFiles]) -> None:
    async def main() -> None:
        echo, dialer = Echo(), Dialer()
        server = await edge(certs, echo)
        tunnel = await dial(server, certs["connector-1"], dialer)
        await tunnel.up_waiter
        fid = tunnel.conn.open_flow(Open(host="bulk", port=9))
        tunnel.flush_soon()
        await dialer.next(ev.FlowAccepted)
        payload = os.urandom(4_000_000)
        sent = 0

        def pump(t: Any) -> None:
            nonlocal sent
            while sent < len(payload):
                n = t.conn.send_data(fid, memoryview(payload)[sent:sent + 65536])
                if not n:
                    break
                sent += n
            if sent == len(payload) and not t.conn.flows[fid].sent_fin:
                t.conn.send_fin(fid)
            t.flush_soon()

        dialer.on_credit = pump
        pump(tunnel)
        assert await dialer.next(ev.FlowClosed) == ev.FlowClosed(fid)
        assert bytes(dialer.data[fid]) == payload
        tunnel.close("shutdown", "test done")
        server.close()

    run(main())


def test_udp_flow_datagrams_both_ways(certs: dict[str, pki.NodeFiles]) -> None:
    async def main() -> None:
        echo, dialer = Echo(), Dialer()
        server = await edge(certs, echo)
        tunnel = await dial(server, certs["client-1"], dialer)
        await tunnel.up_waiter
        fid = tunnel.conn.open_flow(Open(host="dns.corp", port=53, protocol="udp"))
        tunnel.flush_soon()
        await dialer.next(ev.FlowAccepted)
        for i in range(20):
            tunnel.conn.send_datagram(fid, b"query-%d" % i)
        tunnel.flush_soon()
        got = {(await dialer.next(ev.DatagramReceived)).data for _ in range(20)}
        assert got == {(b"query-%d" % i)[::-1] for i in range(20)}
        tunnel.conn.reset_flow(fid, "udp_idle", "idle")
        tunnel.close("shutdown", "test done")
        server.close()

    run(main())


def test_a_burst_past_the_pending_datagram_bound_goes_out_instead_of_being_refused(
        certs: dict[str, pki.NodeFiles]) -> None:
    """Four times FERRYMAN_QUIC_MAX_PENDING_DATAGRAMS sent in one go, as an edge passes on what
    one receive callback brought: the tunnel sends what waits when the bound is reached, so
    none is refused and every one arrives (the loopback congestion window has room)."""
    async def main() -> None:
        bounded = msgspec.structs.replace(SETTINGS, quic_max_pending_datagrams=64)
        echo, dialer = Echo(), Dialer()
        server = await edge(certs, echo)
        tunnel = await dial(server, certs["client-1"], dialer, settings=bounded)
        await tunnel.up_waiter
        assert tunnel.conn.max_pending_datagrams == 64
        fid = tunnel.conn.open_flow(Open(host="dns.corp", port=53, protocol="udp"))
        tunnel.flush_soon()
        await dialer.next(ev.FlowAccepted)
        sent = [b"burst-%04d" % i for i in range(256)]
        for data in sent:
            assert tunnel.send_datagram(fid, data)  # FlowError datagram_queue_full if refused
            assert tunnel.conn.quic.pending_datagrams() <= 64
        got = {(await dialer.next(ev.DatagramReceived)).data for _ in range(len(sent))}
        assert got == {data[::-1] for data in sent}
        assert dialer.stats.datagrams_dropped == {}
        tunnel.close("shutdown", "test done")
        server.close()

    run(main())


def test_an_idle_tunnel_waits_for_its_ack_timer_instead_of_polling_the_engine(
        certs: dict[str, pki.NodeFiles]) -> None:
    """After each small message an engine holds its ACK for about a millisecond. The tunnel
    sleeps on a loop timer until then: it does not poll the engine every loop iteration (a
    busy loop that held a CPU for that millisecond after every message, and on a machine
    with few cores delayed the very processes the answer waited for)."""
    async def main() -> None:
        echo, dialer = Echo(), Dialer()
        server = await edge(certs, echo)
        tunnel = await dial(server, certs["connector-1"], dialer)
        await tunnel.up_waiter
        while not echo.up:
            await asyncio.sleep(0.01)
        fid = tunnel.conn.open_flow(Open(host="db.corp", port=5432))
        tunnel.flush_soon()
        await dialer.next(ev.FlowAccepted)
        await asyncio.sleep(0.05)  # the handshake's timers settle
        polls = [0]
        for side in (tunnel, echo.up[0]):
            engine_timer = side.conn.handle_timer

            def counted(now: float, engine_timer: Any = engine_timer) -> list[ev.Event]:
                polls[0] += 1
                return engine_timer(now)

            side.conn.handle_timer = counted  # type: ignore[method-assign]
        rounds = 20
        for i in range(rounds):
            message = b"%064d" % i
            tunnel.conn.send_data(fid, message)
            tunnel.flush_soon()
            while bytes(dialer.data.get(fid, b""))[-64:] != message:
                await asyncio.sleep(0.0005)
            await asyncio.sleep(0.003)  # past each side's ACK delay
        assert len(dialer.data[fid]) == 64 * rounds
        # each side's ACK timer once per message and a loss-detection timer now and then;
        # polling until a deadline 1 ms away is hundreds of calls per message
        assert polls[0] <= 6 * rounds, polls[0]
        tunnel.close("shutdown", "test done")
        server.close()

    run(main())


def test_goaway_reaches_the_edge_and_keepalive_measures_rtt(certs: dict[str, pki.NodeFiles]) -> None:
    async def main() -> None:
        fast = Settings(keepalive_interval=0.2, handshake_timeout=5.0, quic_timeout=3.0)
        echo, dialer = Echo(), Dialer()
        server = await edge(certs, echo, settings=fast)
        tunnel = await dial(server, certs["connector-1"], dialer, settings=fast)
        await tunnel.up_waiter
        await asyncio.sleep(0.5)
        assert tunnel.rtt is not None and 0 <= tunnel.rtt < 0.5
        tunnel.goaway("draining", "connector stops")
        while not echo.goaways:
            await asyncio.sleep(0.01)
        assert echo.goaways == [ev.GoAwayReceived("draining", "connector stops")]
        assert echo.up[0].draining and tunnel.draining
        tunnel.close("shutdown", "test done")
        server.close()

    run(main())


def test_goaway_then_close_reaches_the_peer_in_that_order(certs: dict[str, pki.NodeFiles]) -> None:
    async def main() -> None:
        echo, dialer = Echo(), Dialer()
        server = await edge(certs, echo)
        tunnel = await dial(server, certs["connector-1"], dialer)
        await tunnel.up_waiter
        tunnel.goaway("shutdown", "connector stops")
        tunnel.close("shutdown", "connector stopped")
        await asyncio.wait_for(echo.downed.wait(), 5)
        assert echo.goaways == [ev.GoAwayReceived("shutdown", "connector stops")]
        assert echo.down[0].close_code == "peer_closed" and "connector stopped" in echo.down[0].close_reason
        server.close()

    run(main())


def test_back_pressure_turns_writable_off_and_on(certs: dict[str, pki.NodeFiles]) -> None:
    async def main() -> None:
        echo, dialer = Echo(), Dialer()
        server = await edge(certs, echo)
        small = Settings(write_buffer_high=65536, handshake_timeout=5.0, quic_timeout=3.0)
        tunnel = await dial(server, certs["connector-1"], dialer, settings=small)
        await tunnel.up_waiter
        fid = tunnel.conn.open_flow(Open(host="bulk", port=9))
        tunnel.flush_soon()
        await dialer.next(ev.FlowAccepted)
        tunnel.conn.send_data(fid, os.urandom(500_000))
        tunnel.flush_soon()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert tunnel.writable is False and dialer.writable == [False]
        while not tunnel.writable:
            await asyncio.sleep(0.01)
        assert dialer.writable == [False, True]
        tunnel.close("shutdown", "test done")
        server.close()

    run(main())


# ---------------------------------------------------------------------------- refused peers


async def refused(server: QuicServer, echo: Echo, tunnel_or_error: Any) -> tuple[str, str]:
    """Wait until the edge closed the dialed tunnel; returns what the dialer learned."""
    await asyncio.wait_for(echo.downed.wait(), 5)
    assert echo.up == []
    if isinstance(tunnel_or_error, BaseException):
        return "", str(tunnel_or_error)
    with pytest.raises(ConnectionError) as info:
        await tunnel_or_error.up_waiter
    return tunnel_or_error.close_code, str(info.value)


async def try_dial(server: QuicServer, files: pki.NodeFiles, **kw: Any) -> Any:
    try:
        return await dial(server, files, Dialer(), **kw)
    except ConnectionError as exc:
        return exc


def test_client_certificate_from_another_ca_is_refused(certs: dict[str, pki.NodeFiles],
                                                       other_ca: dict[str, pki.NodeFiles]) -> None:
    async def main() -> None:
        echo = Echo()
        server = await edge(certs, echo)
        result = await try_dial(server, other_ca["connector-1"], trust=certs["edge-1"])
        code, message = await refused(server, echo, result)
        assert echo.down[0].close_code == "bad_certificate"
        assert "not accepted" in echo.down[0].close_reason
        assert "bad_certificate" in message
        server.close()

    run(main())


def test_missing_client_certificate_is_refused(certs: dict[str, pki.NodeFiles]) -> None:
    async def main() -> None:
        echo = Echo()
        server = await edge(certs, echo)
        anonymous = dataclasses.replace(creds(certs["connector-1"]), certificate=None, private_key=None)
        try:
            result: Any = await dial_quic(Dialer(), WireConfig(role="connector", node="connector-1"), "127.0.0.1",
                                          server.sockname[1], SETTINGS, anonymous)
        except ConnectionError as exc:
            result = exc
        _code, message = await refused(server, echo, result)
        assert echo.down[0].close_code == "certificate_required"
        assert "certificate_required" in message
        server.close()

    run(main())


def test_server_certificate_from_another_ca_is_refused_by_the_dialer(certs: dict[str, pki.NodeFiles],
                                                                    other_ca: dict[str, pki.NodeFiles]) -> None:
    async def main() -> None:
        echo = Echo()
        server = await serve_quic(echo, WireConfig(role="edge", node="edge-1"), "127.0.0.1", 0, SETTINGS,
                                  creds(other_ca["edge-1"]))
        with pytest.raises(ConnectionError) as info:
            await dial(server, certs["connector-1"], Dialer())
        # aioquic checks the edge's chain itself (a TLS alert); with qh3 the dialer's own check refuses it
        assert "tls_error" in str(info.value) or "bad_certificate: peer certificate not accepted" in str(info.value)
        server.close()

    run(main())


def test_wrong_role_and_revoked_serial_are_refused(certs: dict[str, pki.NodeFiles]) -> None:
    async def main() -> None:
        echo = Echo()
        server = await edge(certs, echo, accept_roles=("connector",))
        code, message = await refused(server, echo, await try_dial(server, certs["client-1"]))
        assert echo.down[0].close_code == "role_refused" and "role_refused" in message

        revoked = pki.read_node_certificate(certs["connector-1"].cert).serial
        echo2 = Echo(revoked={revoked})
        server2 = await edge(certs, echo2)
        code, message = await refused(server2, echo2, await try_dial(server2, certs["connector-1"]))
        assert echo2.down[0].close_code == "certificate_revoked" and "revoked" in message
        server.close()
        server2.close()

    run(main())


def test_hello_naming_another_node_is_refused(certs: dict[str, pki.NodeFiles]) -> None:
    async def main() -> None:
        echo = Echo()
        server = await edge(certs, echo)
        tunnel = await dial(server, certs["connector-1"], Dialer(), node="connector-9")
        with pytest.raises(ConnectionError) as info:
            await tunnel.up_waiter
        assert "name_mismatch" in str(info.value)
        await asyncio.wait_for(echo.downed.wait(), 5)
        assert echo.down[0].close_code == "name_mismatch"
        server.close()

    run(main())


def test_dial_to_a_closed_port_fails_fast_and_a_silent_one_times_out(certs: dict[str, pki.NodeFiles]) -> None:
    async def main() -> None:
        closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(ConnectionError) as info:
            await dial_quic(Dialer(), WireConfig(role="connector", node="connector-1"), "127.0.0.1", port,
                            SETTINGS, creds(certs["connector-1"]))
        assert "unreachable" in str(info.value) and loop.time() - start < 2

        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 0))
        quick = Settings(quic_timeout=0.5)
        with pytest.raises(asyncio.TimeoutError):
            await dial_quic(Dialer(), WireConfig(role="connector", node="connector-1"), "127.0.0.1",
                            silent.getsockname()[1], quick, creds(certs["connector-1"]))
        silent.close()

    run(main())


def test_tls_tunnel_offers_the_same_certificate_and_sockname_accessors(certs: dict[str, pki.NodeFiles]) -> None:
    """Nodes read the peer certificate and local address the same way from either transport."""
    from dataplane.transport.tunnel import Tunnel

    async def main() -> None:
        loop = asyncio.get_running_loop()
        edge_files, connector_files = certs["edge-1"], certs["connector-1"]
        accepted: list[Tunnel] = []

        def accept() -> Tunnel:
            tunnel = Tunnel(Echo(), WireConfig(role="edge", node="edge-1"), dialer=False,
                            accept_roles=("connector",), keepalive=10, handshake_timeout=5, write_buffer_high=1 << 20)
            accepted.append(tunnel)
            return tunnel

        server = await loop.create_server(accept, "127.0.0.1", 0, ssl=pki.server_context(
            edge_files.cert, edge_files.key, edge_files.ca))
        port = server.sockets[0].getsockname()[1]
        _, tunnel = await loop.create_connection(
            lambda: Tunnel(Dialer(), WireConfig(role="connector", node="connector-1"), dialer=True,
                           accept_roles=("edge",), keepalive=10, handshake_timeout=5, write_buffer_high=1 << 20),
            "127.0.0.1", port, ssl=pki.client_context(connector_files.cert, connector_files.key, connector_files.ca),
            server_hostname="127.0.0.1")
        await tunnel.up_waiter
        assert tunnel.peer_certificate_der() == der(edge_files.cert)
        assert accepted[0].peer_certificate_der() == der(connector_files.cert)
        assert tunnel.sockname[0] == "127.0.0.1" and accepted[0].sockname == ("127.0.0.1", port)
        tunnel.close("shutdown", "test done")
        server.close()

    run(main())


def test_dialer_notices_at_once_when_the_edge_socket_is_gone(certs: dict[str, pki.NodeFiles]) -> None:
    async def main() -> None:
        echo, dialer = Echo(), Dialer()
        server = await edge(certs, echo)
        tunnel = await dial(server, certs["connector-1"], dialer)
        await tunnel.up_waiter
        assert server.transport is not None
        server.transport.abort()  # the edge process dies: no CONNECTION_CLOSE, the port is closed
        tunnel.conn.ping(0.0)
        tunnel.flush_soon()
        await asyncio.wait_for(tunnel.done_waiter, 5)
        assert tunnel.close_code == "connection_lost" and "port unreachable" in tunnel.close_reason

    run(main())
