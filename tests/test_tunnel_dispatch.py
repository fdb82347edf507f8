"""One flow's trouble stays in that flow, at the two places it is decided.

- The sans-I/O wire core: frames and local calls for a flow that has just ended (its RST,
  FIN or OPEN_FAIL crossed them) are harmless by design: late frames are counted and
  dropped, and local calls naming an ended flow get a "flow gone" result (0 / False)
  instead of an error; only an id that never named a flow is a ``FlowError``.
- The tunnel's dispatch (``TunnelBase``): an exception a node's handler raises while
  handling one flow's event resets that flow (RST to the peer, and the node's own reset
  path for its side), is logged with its traceback and counted
  (``ferryman_handler_errors_total``), and never closes the tunnel.

The tunnel here is a real ``transport.tunnel.Tunnel`` fed with the bytes a real peer
``TunnelConnection`` produces; only the socket is absent (what the tunnel writes stays in
its connection's queue and is pumped to the peer by hand).
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import generate_latest

from dataplane.basics.metrics import Stats, make_registry
from dataplane.basics.pki import PeerCertificate
from dataplane.transport import tunnel as tunnel_module
from dataplane.transport.tunnel import Tunnel, TunnelHandler
from dataplane.wire import events as ev
from dataplane.wire.connection import FlowError, TunnelConnection, WireConfig
from dataplane.wire.frames import Open

REQ = Open(host="db.corp", port=5432)
UDP = Open(host="dns.corp", port=53, protocol="udp")


def pump(src: TunnelConnection, dst: TunnelConnection) -> list[ev.Event]:
    return dst.receive_data(src.data_to_send())


def pair() -> tuple[TunnelConnection, TunnelConnection]:
    d = TunnelConnection(WireConfig(role="client", node="c", window=65536), dialer=True)
    a = TunnelConnection(WireConfig(role="edge", node="e", window=65536), dialer=False)
    d.initiate()
    a.initiate()
    pump(d, a)
    pump(a, d)
    return d, a


def opened(d: TunnelConnection, a: TunnelConnection, request: Open = REQ) -> int:
    fid = d.open_flow(request)
    pump(d, a)
    a.accept_flow(fid)
    pump(a, d)
    return fid


# --------------------------------------------------------------------------- the wire core


@pytest.mark.timeout(10)
def test_window_and_rst_in_one_read_then_sending_is_harmless() -> None:
    """The bug that took tunnels down: WINDOW then RST of one flow in one read. The node sees
    CreditAvailable while the flow is already gone; sending on it must not raise."""
    d, a = pair()
    fid = opened(d, a)
    a.send_data(fid, b"x" * 65536)
    pump(a, d)
    d.acknowledge(fid, 65536)  # WINDOW ...
    d.reset_flow(fid, "reset", "app reset")  # ... and RST, in the same bytes
    events = pump(d, a)
    assert [type(e) for e in events] == [ev.CreditAvailable, ev.FlowReset]
    assert a.send_data(fid, b"more") == 0  # the node answers CreditAvailable: flow gone, nothing queued
    assert a.send_fin(fid) is False
    assert a.acknowledge(fid, 100) is False
    a.reset_flow(fid, "reset")
    assert not a.has_output
    assert a.dead is None and d.dead is None


@pytest.mark.timeout(10)
def test_late_frames_of_every_kind_are_counted_not_fatal() -> None:
    d, a = pair()
    tcp = opened(d, a)
    udp = opened(d, a, UDP)
    d.send_data(tcp, b"y" * 20000)
    pump(d, a)
    # The peer ends both flows while our DATA, WINDOW, DATAGRAM and FIN are on the way.
    d.reset_flow(tcp, "reset")
    d.reset_flow(udp, "idle_timeout")
    a.send_data(tcp, b"z" * 100)
    assert a.acknowledge(tcp, 20000)  # a quarter window: WINDOW queued
    a.send_datagram(udp, b"query")
    a.send_fin(tcp)
    crossing = a.data_to_send()
    assert [type(e) for e in pump(d, a)] == [ev.FlowReset, ev.FlowReset]
    assert d.receive_data(crossing) == []
    assert d.late_frames == 4 and d.dead is None  # DATA, WINDOW, DATAGRAM and FIN: dropped and counted
    # and what the node does next about them is a "flow gone" answer
    assert a.send_datagram(udp, b"again") is False
    assert a.send_data(tcp, b"again") == 0
    with pytest.raises(FlowError) as info:
        a.send_data(tcp + 100, b"x")  # never a flow of this tunnel: the node's bug
    assert info.value.code == "no_flow"


@pytest.mark.timeout(10)
def test_open_cancelled_before_the_answer() -> None:
    d, a = pair()
    fid = d.open_flow(REQ)
    d.reset_flow(fid, "cancelled")
    assert [type(e) for e in pump(d, a)] == [ev.FlowRequested, ev.FlowReset]
    assert a.accept_flow(fid) is False and a.reject_flow(fid, "denied", "no") is False
    assert a.pending_opens == 0 and not a.has_output


# --------------------------------------------------------------------------- the tunnel's dispatch


class Node(TunnelHandler[object, None]):
    """A node whose handlers break on purpose: ``broken`` names the events whose handler raises."""

    def __init__(self, broken: set[type]) -> None:
        self.stats = Stats("edge", "e")
        self.broken = broken
        self.requested: list[int] = []
        self.reset: list[tuple[int, str]] = []
        self.down = 0

    def _maybe_break(self, event: ev.Event) -> None:
        if type(event) in self.broken:
            raise RuntimeError(f"bug handling {type(event).__name__}")

    def tunnel_up(self, tunnel) -> None:  # type: ignore[no-untyped-def]
        pass

    def tunnel_down(self, tunnel) -> None:  # type: ignore[no-untyped-def]
        self.down += 1

    def flow_requested(self, tunnel, event: ev.FlowRequested) -> None:  # type: ignore[no-untyped-def]
        tunnel.routes[event.flow_id] = object()
        self._maybe_break(event)
        self.requested.append(event.flow_id)
        tunnel.accept(event.flow_id)

    def data_received(self, tunnel, event: ev.DataReceived) -> None:  # type: ignore[no-untyped-def]
        self._maybe_break(event)
        tunnel.acknowledge(event.flow_id, len(event.data))

    def flow_reset(self, tunnel, event: ev.FlowReset) -> None:  # type: ignore[no-untyped-def]
        tunnel.routes.pop(event.flow_id, None)
        self.reset.append((event.flow_id, event.code))

    def goaway_received(self, tunnel, event: ev.GoAwayReceived) -> None:  # type: ignore[no-untyped-def]
        self._maybe_break(event)


def make_tunnel(node: Node) -> tuple[Tunnel, TunnelConnection]:
    """An edge-side tunnel up with a client peer (HELLO exchanged through the tunnel)."""
    tunnel: Tunnel = Tunnel(node, WireConfig(role="edge", node="e"), dialer=False, accept_roles=("client",),
                            keepalive=30.0, handshake_timeout=30.0, write_buffer_high=1 << 20, label="t")
    tunnel.peer_certificate = PeerCertificate(role="client", name="c", serial=1, not_after=0.0, fingerprint="")
    tunnel.conn.initiate()
    peer = TunnelConnection(WireConfig(role="client", node="c"), dialer=True)
    peer.initiate()
    tunnel.data_received(peer.data_to_send())
    peer.receive_data(tunnel.conn.data_to_send())
    assert tunnel.up and peer.peer is not None
    return tunnel, peer


def exchange(tunnel: Tunnel, peer: TunnelConnection) -> list[ev.Event]:
    tunnel.data_received(peer.data_to_send())
    return peer.receive_data(tunnel.conn.data_to_send())


@pytest.mark.timeout(10)
def test_handler_error_resets_only_that_flow(caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> None:
        node = Node({ev.DataReceived})
        tunnel, peer = make_tunnel(node)
        first = peer.open_flow(REQ)
        second = peer.open_flow(REQ)
        assert [type(e) for e in exchange(tunnel, peer)] == [ev.FlowAccepted, ev.FlowAccepted]
        with caplog.at_level(logging.ERROR, logger="ferryman.tunnel"):
            peer.send_data(first, b"boom")
            got = exchange(tunnel, peer)
        assert got == [ev.FlowReset(first, "internal_error", "internal error handling DataReceived")]
        assert node.reset == [(first, "internal_error")]  # the node cleaned up its side
        assert first not in tunnel.routes and second in tunnel.routes
        assert not tunnel.closed and node.down == 0
        assert node.stats.handler_errors == {"DataReceived": 1}
        [record] = [r for r in caplog.records if "unexpected error handling a flow event" in r.getMessage()]
        assert record.exc_info is not None and "bug handling DataReceived" in str(record.exc_info[1])
        # the other flow and new ones go on
        node.broken.clear()
        peer.send_data(second, b"fine")
        third = peer.open_flow(REQ)
        assert [type(e) for e in exchange(tunnel, peer)] == [ev.FlowAccepted]
        assert node.requested[-1] == third and not tunnel.closed
        tunnel.close("shutdown", "test over")

    asyncio.run(run())


@pytest.mark.timeout(10)
def test_handler_error_on_open_and_on_a_tunnel_event() -> None:
    async def run() -> None:
        node = Node({ev.FlowRequested, ev.GoAwayReceived})
        tunnel, peer = make_tunnel(node)
        fid = peer.open_flow(REQ)
        peer.goaway("draining", "client leaves")
        got = exchange(tunnel, peer)
        assert got == [ev.FlowReset(fid, "internal_error", "internal error handling FlowRequested")]
        assert tunnel.conn.pending_opens == 0 and fid not in tunnel.routes
        assert node.stats.handler_errors == {"FlowRequested": 1, "GoAwayReceived": 1}
        assert not tunnel.closed
        tunnel.close("shutdown", "test over")

    asyncio.run(run())


@pytest.mark.timeout(10)
def test_handler_error_logs_are_bounded_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> None:
        node = Node({ev.FlowRequested})
        tunnel, peer = make_tunnel(node)
        many = tunnel_module.HANDLER_ERRORS_LOGGED + 20
        with caplog.at_level(logging.ERROR, logger="ferryman.tunnel"):
            for _ in range(many):
                peer.open_flow(REQ)
            exchange(tunnel, peer)
        logged = [r for r in caplog.records if "unexpected error handling" in r.getMessage()]
        assert len(logged) == tunnel_module.HANDLER_ERRORS_LOGGED
        assert node.stats.handler_errors == {"FlowRequested": many}
        text = make_registry(node.stats)
        assert f'ferryman_handler_errors_total{{event="FlowRequested",node="e",role="edge"}} {many}.0' \
            in generate_latest(text).decode()
        assert not tunnel.closed
        tunnel.close("shutdown", "test over")

    asyncio.run(run())


# --------------------------------------------------------------------------- flushing at the end of a read


class Written:
    """What a tunnel writes, in place of its socket: the bytes, and how many writes carried them."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.writes = 0

    def write(self, data: bytes | memoryview) -> None:
        self.data += data
        self.writes += 1

    def writelines(self, chunks: list[bytes | memoryview]) -> None:
        for chunk in chunks:
            self.data += chunk
        self.writes += 1

    def is_closing(self) -> bool:
        return False


class Splicer(Node):
    """Forwards each flow's DATA to a flow of another tunnel, as an edge's splice does."""

    def __init__(self) -> None:
        super().__init__(set())
        self.to: dict[int, tuple[Tunnel, int]] = {}

    def data_received(self, tunnel, event: ev.DataReceived) -> None:  # type: ignore[no-untyped-def]
        out, ofid = self.to[event.flow_id]
        sent = out.send_data(ofid, event.data)
        tunnel.acknowledge(event.flow_id, sent)


@pytest.mark.timeout(10)
def test_frames_a_read_hands_to_another_tunnel_are_written_when_that_read_ends() -> None:
    async def run() -> None:
        node = Splicer()
        inbound, client = make_tunnel(node)
        outbound, connector = make_tunnel(node)
        cfid = client.open_flow(REQ)
        kfid = connector.open_flow(REQ)
        exchange(inbound, client)
        exchange(outbound, connector)
        node.to[cfid] = (outbound, kfid)
        written = Written()
        outbound.transport = written  # type: ignore[assignment]
        client.send_data(cfid, b"one")
        client.send_data(cfid, b"two")
        inbound.data_received(client.data_to_send())
        # written once, before the loop ran again (no call_soon pass in between)
        assert written.writes == 1
        assert [(type(e), e.flow_id, bytes(e.data)) for e in connector.receive_data(bytes(written.data))] == [
            (ev.DataReceived, kfid, b"one"), (ev.DataReceived, kfid, b"two")]
        assert node.flush_batch is None and not outbound._flush_scheduled
        # outside a read, a send still waits for the end of the loop iteration
        outbound.send_data(kfid, b"three")
        assert written.writes == 1
        await asyncio.sleep(0)
        assert written.writes == 2
        outbound.transport = None
        inbound.close("shutdown", "test over")
        outbound.close("shutdown", "test over")

    asyncio.run(run())
