"""Sans-I/O tests of ``dataplane.wire.quic``: two QuicTunnelConnections exchanging datagrams in memory.

A real QUIC engine on both sides (every test runs on qh3 and on aioquic; the few that look
into aioquic's internals on aioquic only) with certificates from ``pki.init_pki``; the test
moves the datagrams and advances a fake clock to the engine's timers.
"""

from __future__ import annotations

import os

import msgspec
import pytest
from typing import Any

from dataplane.basics import pki
from dataplane.transport.quic import load_credentials
from dataplane.wire.quic_engine import EngineUnavailable, QuicEngine, select_engine
from dataplane.wire import events as ev
from dataplane.wire.connection import FlowError, ProtocolError, WireConfig
from dataplane.wire.frames import FrameType, Open, encode_control, encode_header, encode_preamble, encode_window
from dataplane.wire.quic import (
    DATAGRAM_OVERHEAD,
    MAX_PENDING_DATAGRAMS,
    HandshakeCompleted,
    QuicTunnelConnection,
    TunnelTerminated,
    flow_of,
    stream_of,
)

pytestmark = pytest.mark.timeout(20)

CLIENT_ADDR = ("10.0.0.1", 40000)
SERVER_ADDR = ("10.0.0.2", 443)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pki.NodeFiles]:
    files = pki.init_pki(str(tmp_path_factory.mktemp("pki")))
    _ANY[:] = [files["connector-1"]]
    return files


ENGINE: QuicEngine = select_engine("aioquic")


@pytest.fixture(autouse=True, params=["qh3", "aioquic"])
def engine(request: pytest.FixtureRequest) -> QuicEngine:
    chosen = select_engine(request.param)
    globals()["ENGINE"] = chosen
    if request.node.get_closest_marker("aioquic_only") and chosen.name != "aioquic":
        pytest.skip("looks into aioquic's internals")
    return chosen


aioquic_only = pytest.mark.aioquic_only


def quic_config(files: pki.NodeFiles | None, *, client: bool, ca: str, key_of: pki.NodeFiles | None = None) -> Any:
    own = load_credentials((files or _ANY[0]).cert, (files or _ANY[0]).key, ca)
    key = load_credentials(key_of.cert, key_of.key, ca).private_key if key_of else own.private_key
    return ENGINE.configuration(client=client, packet_size=1350, cid_length=8, idle_timeout=60.0,
                                server_name="localhost" if client else None,
                                certificate=own.certificate if files else None, chain=own.chain if files else [],
                                private_key=key if files else None, ca_pem=own.ca_pem)


_ANY: list[pki.NodeFiles] = []


class Pair:
    """A dialer (QUIC client, a connector) and an acceptor (QUIC server, an edge) in memory."""

    def __init__(self, certs: dict[str, pki.NodeFiles], *, client_wire: WireConfig | None = None,
                 server_wire: WireConfig | None = None, client_cert: bool = True,
                 client_key_of: pki.NodeFiles | None = None) -> None:
        ca = certs["edge-1"].ca
        self.now = 1000.0
        self.client = QuicTunnelConnection(client_wire or WireConfig(role="connector", node="connector-1"),
                                           quic_config(certs["connector-1"] if client_cert else None, client=True,
                                                       ca=ca, key_of=client_key_of), dialer=True, engine=ENGINE)
        self.client.connect(SERVER_ADDR, self.now)
        first = self.client.datagrams_to_send(self.now)
        header = ENGINE.parse_header(first[0][0], 8)
        assert header is not None
        self.server = QuicTunnelConnection(server_wire or WireConfig(role="edge", node="edge-1"),
                                           quic_config(certs["edge-1"], client=False, ca=ca), dialer=False, engine=ENGINE,
                                           original_destination_connection_id=header.destination_cid)
        self.events: dict[int, list[ev.Event]] = {id(self.client): [], id(self.server): []}
        self.handshakes: dict[int, HandshakeCompleted] = {}
        self.hold: set[int] = set()  # ids of sides that wait for the test to initiate()
        for data, _addr in first:
            self._deliver(self.server, data, CLIENT_ADDR)

    def _deliver(self, dst: QuicTunnelConnection, data: bytes, addr: tuple) -> None:
        if dst.dead is None:
            try:
                self._record(dst, dst.receive_datagram(data, addr, self.now))
            except ProtocolError:
                pass  # dst.dead says why; it sends its CONNECTION_CLOSE on the next pass

    def _record(self, dst: QuicTunnelConnection, events: list[ev.Event]) -> None:
        for event in events:
            if isinstance(event, HandshakeCompleted):
                self.handshakes[id(dst)] = event
                if id(dst) not in self.hold:
                    dst.initiate()
                    self._record(dst, dst.events())
            else:
                self.events[id(dst)].append(event)

    def pump(self, *, rounds: int = 20000, lose_every: int = 0) -> None:
        """Move datagrams both ways (advancing the clock to timers) until both sides are quiet;
        with ``lose_every`` N, every Nth datagram is lost."""
        sent = 0
        for _ in range(rounds):
            moved = False
            for src, dst, addr in ((self.client, self.server, CLIENT_ADDR), (self.server, self.client, SERVER_ADDR)):
                for data, _addr in src.datagrams_to_send(self.now):
                    moved = True
                    sent += 1
                    if lose_every and sent % lose_every == 0:
                        continue
                    self._deliver(dst, data, addr)
            if moved:
                continue
            timers = [t for t in (c.get_timer() for c in (self.client, self.server) if c.dead is None) if t is not None]
            if not timers or min(timers) - self.now > 0.5:
                return
            self.now = max(self.now, min(timers))
            for conn in (self.client, self.server):
                at = conn.get_timer()
                if at is not None and at <= self.now and conn.dead is None:
                    self._record(conn, conn.handle_timer(self.now))

    def take(self, conn: QuicTunnelConnection) -> list[ev.Event]:
        out = [e for e in self.events[id(conn)] if not type(e).__name__.startswith("ConnectionId")]
        self.events[id(conn)] = []
        return out

    def up(self) -> Pair:
        self.pump()
        assert [type(e) for e in self.take(self.client)] == [ev.HelloReceived]
        assert [type(e) for e in self.take(self.server)] == [ev.HelloReceived]
        return self

    def open(self, request: Open | None = None) -> int:
        fid = self.client.open_flow(request or Open(host="db.corp", port=5432))
        self.pump()
        events = self.take(self.server)
        assert [type(e) for e in events] == [ev.FlowRequested]
        self.server.accept_flow(fid, "10.1.1.1:4000", "10.2.2.2:5432")
        self.pump()
        assert self.take(self.client) == [ev.FlowAccepted(fid, "10.1.1.1:4000", "10.2.2.2:5432")]
        return fid


def received(events: list[ev.Event], flow_id: int) -> bytes:
    return b"".join(bytes(e.data) for e in events if isinstance(e, ev.DataReceived) and e.flow_id == flow_id)


def terminated(events: list[ev.Event]) -> TunnelTerminated:
    ends = [e for e in events if isinstance(e, TunnelTerminated)]
    assert ends, events
    return ends[0]


def live_streams(conn: QuicTunnelConnection) -> list[int]:
    """The streams still open: aioquic's own, or for qh3 (which shows none) the tunnel's."""
    return sorted(conn.quic._streams if ENGINE.name == "aioquic" else conn._streams)


# ---------------------------------------------------------------------------- handshake


def test_handshake_carries_both_certificates_and_hellos(certs: dict[str, pki.NodeFiles]) -> None:
    pair = Pair(certs)
    pair.pump()
    client_hello = [e for e in pair.take(pair.server) if isinstance(e, ev.HelloReceived)][0].hello
    server_hello = [e for e in pair.take(pair.client) if isinstance(e, ev.HelloReceived)][0].hello
    assert (client_hello.role, client_hello.node) == ("connector", "connector-1")
    assert (server_hello.role, server_hello.node) == ("edge", "edge-1")
    connector_der = pki.read_certificates(certs["connector-1"].cert)[0].public_bytes(pki.serialization.Encoding.DER)
    edge_der = pki.read_certificates(certs["edge-1"].cert)[0].public_bytes(pki.serialization.Encoding.DER)
    assert pair.handshakes[id(pair.server)].certificate == connector_der
    assert pair.handshakes[id(pair.client)].certificate == edge_der


def test_events_wait_for_initiate_after_the_handshake(certs: dict[str, pki.NodeFiles]) -> None:
    pair = Pair(certs)
    pair.hold = {id(pair.client), id(pair.server)}
    pair.pump()
    assert id(pair.server) in pair.handshakes and id(pair.client) in pair.handshakes
    assert pair.take(pair.server) == [] and pair.take(pair.client) == []
    with pytest.raises(FlowError) as info:
        pair.client.open_flow(Open(host="h", port=1))
    assert info.value.code == "not_ready"
    pair.client.initiate()
    pair.server.initiate()
    pair._record(pair.client, pair.client.events())
    pair._record(pair.server, pair.server.events())
    pair.up()


def test_client_without_certificate_reaches_handshake_with_none(certs: dict[str, pki.NodeFiles]) -> None:
    pair = Pair(certs, client_cert=False)
    pair.hold = {id(pair.server)}
    pair.pump()
    assert pair.handshakes[id(pair.server)].certificate is None
    pair.server.refuse("certificate_required", "peer presented no certificate", 116)
    pair.pump()
    end = terminated(pair.take(pair.client))
    assert (end.code, end.error_code) == ("certificate_required", 0x100 + 116)


def test_client_certificate_signed_with_another_key_fails_the_handshake(certs: dict[str, pki.NodeFiles]) -> None:
    """The client's CertificateVerify must be made with its certificate's key (proof of possession)."""
    pair = Pair(certs, client_key_of=certs["edge-1"])
    pair.pump()
    assert id(pair.server) not in pair.handshakes  # never reached the certificate checks
    end = terminated(pair.take(pair.client))
    assert end.code == "tls_error" and end.reason.startswith("TLS alert 51")  # decrypt_error


def test_engines_are_chosen_by_name() -> None:
    assert select_engine("aioquic").name == "aioquic"
    assert select_engine("qh3").name == "qh3"
    assert select_engine("auto").name == "qh3"  # installed here: the default
    with pytest.raises(ValueError):
        select_engine("quiche")


def test_auto_falls_back_to_aioquic_without_qh3(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    monkeypatch.setitem(sys.modules, "dataplane.wire.qh3_engine", None)  # import fails as if not installed
    assert select_engine("auto").name == "aioquic"
    with pytest.raises(EngineUnavailable):
        select_engine("qh3")


# ---------------------------------------------------------------------------- flows


def test_flows_beyond_a_hundred_streams_at_once(certs: dict[str, pki.NodeFiles]) -> None:
    """The stream limit follows the flow limit (qh3's own is 100 bidirectional streams)."""
    pair = Pair(certs).up()
    fids = [pair.client.open_flow(Open(host="h", port=i)) for i in range(1, 301)]
    pair.pump()
    requested = [e for e in pair.take(pair.server) if isinstance(e, ev.FlowRequested)]
    assert len(requested) == 300
    for event in requested:
        pair.server.accept_flow(event.flow_id)
    pair.pump()
    assert len(pair.take(pair.client)) == 300
    for fid in fids:
        pair.client.send_data(fid, b"%d" % fid)
    pair.pump()
    events = pair.take(pair.server)
    assert all(received(events, fid) == b"%d" % fid for fid in fids)



def test_data_within_credit_and_window_returns_credit(certs: dict[str, pki.NodeFiles]) -> None:
    pair = Pair(certs, server_wire=WireConfig(role="edge", node="edge-1", window=65536)).up()
    fid = pair.open()
    payload = os.urandom(200_000)
    taken = pair.client.send_data(fid, payload)
    assert taken == 65536
    assert pair.client.send_data(fid, payload[taken:]) == 0
    pair.pump()
    assert received(pair.take(pair.server), fid) == payload[:taken]
    pair.server.acknowledge(fid, taken)
    pair.pump()
    assert pair.take(pair.client) == [ev.CreditAvailable(fid, 65536)]
    assert pair.client.credit(fid) == 65536
    assert pair.client.send_data(fid, payload[taken:]) == 65536
    pair.pump()
    assert received(pair.take(pair.server), fid) == payload[taken:2 * taken]


def test_large_send_is_split_in_frames_of_the_peer_max_frame(certs: dict[str, pki.NodeFiles]) -> None:
    pair = Pair(certs, server_wire=WireConfig(role="edge", node="edge-1", max_frame=4096)).up()
    fid = pair.open()
    payload = os.urandom(100_000)
    assert pair.client.send_data(fid, payload) == len(payload)
    pair.pump()
    assert received(pair.take(pair.server), fid) == payload


def test_half_close_both_ways_closes_the_flow_and_its_stream(certs: dict[str, pki.NodeFiles]) -> None:
    pair = Pair(certs).up()
    fid = pair.open()
    assert pair.client.send_fin(fid) is False
    pair.pump()
    assert pair.take(pair.server) == [ev.FlowEnded(fid)]
    pair.server.send_data(fid, b"last words")  # the other direction still works
    assert pair.server.send_fin(fid) is True
    pair.pump()
    events = pair.take(pair.client)
    assert received(events, fid) == b"last words"
    assert events[-2:] == [ev.FlowEnded(fid), ev.FlowClosed(fid)]
    assert pair.client.flows == {} and pair.server.flows == {}
    assert live_streams(pair.client) == [0] and live_streams(pair.server) == [0]


def test_reset_reaches_the_peer_and_frees_the_stream(certs: dict[str, pki.NodeFiles]) -> None:
    pair = Pair(certs).up()
    fid = pair.open()
    pair.server.send_data(fid, b"in flight")
    pair.client.reset_flow(fid, "app_closed", "the application went away")
    pair.pump()
    assert pair.take(pair.server) == [ev.FlowReset(fid, "app_closed", "the application went away")]
    assert pair.client.late_frames == 1  # the DATA that crossed the RST
    assert pair.take(pair.client) == []
    assert live_streams(pair.client) == [0] and live_streams(pair.server) == [0]


def test_reject_answers_open_fail_and_frees_the_stream(certs: dict[str, pki.NodeFiles]) -> None:
    pair = Pair(certs).up()
    fid = pair.client.open_flow(Open(host="nowhere", port=1))
    pair.pump()
    assert [type(e) for e in pair.take(pair.server)] == [ev.FlowRequested]
    pair.server.reject_flow(fid, "connect_failed", "connection refused")
    pair.pump()
    assert pair.take(pair.client) == [ev.FlowRejected(fid, "connect_failed", "connection refused")]
    assert live_streams(pair.client) == [0] and live_streams(pair.server) == [0]


def test_acceptor_opened_flows_use_even_ids_on_server_streams(certs: dict[str, pki.NodeFiles]) -> None:
    pair = Pair(certs).up()
    fid = pair.server.open_flow(Open(host="client.local", port=80))
    assert fid == 2 and stream_of(fid) == 1 and flow_of(1) == 2
    pair.pump()
    assert [type(e) for e in pair.take(pair.client)] == [ev.FlowRequested]
    pair.client.accept_flow(fid)
    pair.pump()
    assert pair.take(pair.server) == [ev.FlowAccepted(fid, "", "")]
    pair.client.send_data(fid, b"hello edge")
    pair.pump()
    assert received(pair.take(pair.server), fid) == b"hello edge"
    assert [stream_of(f) for f in (1, 3, 5)] == [4, 8, 12] and [flow_of(s) for s in (4, 8, 12)] == [1, 3, 5]


@pytest.mark.timeout(60)
def test_ten_thousand_concurrent_flows_on_one_tunnel(certs: dict[str, pki.NodeFiles]) -> None:
    if ENGINE.name != "qh3":
        pytest.skip("aioquic's per-packet cost makes this a 20 s test; the 300-stream test covers its limit")
    pair = Pair(certs).up()
    fids: list[int] = []
    for _ in range(10):  # (at most max_pending_opens unanswered at a time)
        batch = [pair.client.open_flow(Open(host="h", port=1 + i)) for i in range(1000)]
        fids += batch
        pair.pump()
        requested = [e for e in pair.take(pair.server) if isinstance(e, ev.FlowRequested)]
        assert len(requested) == 1000
        for event in requested:
            pair.server.accept_flow(event.flow_id)
        pair.pump()
        assert pair.take(pair.client) == [ev.FlowAccepted(fid, "", "") for fid in batch]
    assert len(pair.client.flows) == len(pair.server.flows) == 10_000
    for fid in fids:
        pair.client.send_data(fid, b"%d" % fid)
    pair.pump()
    events = pair.take(pair.server)
    got = {e.flow_id: bytes(e.data) for e in events if isinstance(e, ev.DataReceived)}
    assert got == {fid: b"%d" % fid for fid in fids}


def test_many_flows_in_parallel_keep_their_bytes_apart(certs: dict[str, pki.NodeFiles]) -> None:
    pair = Pair(certs).up()
    fids = [pair.client.open_flow(Open(host="h", port=i)) for i in range(1, 41)]
    pair.pump()
    for event in pair.take(pair.server):
        assert isinstance(event, ev.FlowRequested)
        pair.server.accept_flow(event.flow_id)
    pair.pump()
    assert len(pair.take(pair.client)) == 40
    payloads = {fid: os.urandom(5000 + fid) for fid in fids}
    for fid, data in payloads.items():
        pair.client.send_data(fid, data)
        pair.client.send_fin(fid)
    pair.pump()
    events = pair.take(pair.server)
    for fid, data in payloads.items():
        assert received(events, fid) == data
    for fid in fids:
        pair.server.send_fin(fid)
    pair.pump()
    assert live_streams(pair.client) == [0] and live_streams(pair.server) == [0]


def test_lost_packets_are_resent_for_busy_and_idle_flows(certs: dict[str, pki.NodeFiles]) -> None:
    """Packets are built from the streams with something in flight: losses must still be repaired
    on every stream, including ones that went quiet, and finished streams must still be discarded."""
    pair = Pair(certs, server_wire=WireConfig(role="edge", node="edge-1", window=65536)).up()
    fids = [pair.open(Open(host="h", port=i)) for i in range(1, 31)]
    payloads = {fid: os.urandom(3000 if fid % 3 else 200_000) for fid in fids}
    received_by_flow: dict[int, bytearray] = {fid: bytearray() for fid in fids}
    offsets = dict.fromkeys(fids, 0)
    for _ in range(200):
        for fid in fids:
            data = payloads[fid]
            if offsets[fid] < len(data):
                offsets[fid] += pair.client.send_data(fid, memoryview(data)[offsets[fid]:])
                if offsets[fid] == len(data):
                    pair.client.send_fin(fid)
        pair.pump(lose_every=7)
        for event in pair.take(pair.server):
            if isinstance(event, ev.DataReceived):
                received_by_flow[event.flow_id] += event.data
                pair.server.acknowledge(event.flow_id, len(event.data))
            elif isinstance(event, ev.FlowEnded):
                pair.server.send_fin(event.flow_id)
        pair.take(pair.client)
        if not pair.server.flows and not pair.client.flows:
            break
    for fid in fids:
        assert bytes(received_by_flow[fid]) == payloads[fid]
    pair.pump()
    assert live_streams(pair.client) == [0] and live_streams(pair.server) == [0]


@aioquic_only
def test_idle_streams_are_not_visited_per_packet(certs: dict[str, pki.NodeFiles]) -> None:
    pair = Pair(certs).up()
    for i in range(200):
        pair.open(Open(host="idle", port=i + 1))
    busy = pair.open()
    pair.pump()
    assert len(pair.client.quic._active) <= 2  # nothing in flight on the idle ones
    pair.client.send_data(busy, b"x" * 50_000)
    pair.client.datagrams_to_send(pair.now)
    assert set(pair.client.quic._active) <= {0, stream_of(busy)}
    pair.pump()
    assert received(pair.take(pair.server), busy) == b"x" * 50_000


# ---------------------------------------------------------------------------- datagrams


def test_udp_flow_carries_quic_datagrams(certs: dict[str, pki.NodeFiles]) -> None:
    pair = Pair(certs).up()
    fid = pair.open(Open(host="dns.corp", port=53, protocol="udp"))
    biggest = 1350 - DATAGRAM_OVERHEAD
    for payload in (b"query", os.urandom(biggest)):
        pair.client.send_datagram(fid, payload)
    pair.pump()
    got = [bytes(e.data) for e in pair.take(pair.server) if isinstance(e, ev.DatagramReceived)]
    assert got[0] == b"query" and got[1:] == [got[1]] and len(got[1]) == biggest
    with pytest.raises(FlowError) as info:
        pair.client.send_datagram(fid, b"x" * (biggest + 1))
    assert info.value.code == "datagram_too_large"
    with pytest.raises(FlowError) as info:
        pair.client.send_data(fid, b"tcp bytes")
    assert info.value.code == "flow_state"
    pair.server.send_datagram(fid, b"answer")
    pair.pump()
    assert [bytes(e.data) for e in pair.take(pair.client)] == [b"answer"]


@aioquic_only
def test_datagram_overtaking_open_ok_is_dropped_and_counted(certs: dict[str, pki.NodeFiles]) -> None:
    pair = Pair(certs).up()
    fid = pair.client.open_flow(Open(host="dns.corp", port=53, protocol="udp"))
    pair.pump()
    pair.take(pair.server)
    pair.server.accept_flow(fid)
    pair.server.send_datagram(fid, b"unsolicited")  # aioquic puts DATAGRAM frames ahead of stream frames
    pair.pump()
    assert pair.take(pair.client) == [ev.FlowAccepted(fid, "", "")]
    assert pair.client.early_datagrams == 1 and pair.client.dead is None
    pair.server.send_datagram(fid, b"answer")
    pair.pump()
    assert [bytes(e.data) for e in pair.take(pair.client)] == [b"answer"]


def test_datagram_queue_is_bounded(certs: dict[str, pki.NodeFiles]) -> None:
    pair = Pair(certs).up()
    fid = pair.open(Open(host="dns.corp", port=53, protocol="udp"))
    for _ in range(MAX_PENDING_DATAGRAMS):
        pair.client.send_datagram(fid, b"d" * 1000)
    with pytest.raises(FlowError) as info:
        pair.client.send_datagram(fid, b"one more")
    assert info.value.code == "datagram_queue_full"
    pair.client.datagrams_to_send(pair.now)
    assert pair.client.backlog > 0  # congestion-limited: what waits is reported


def test_send_backlog_is_reported_until_sent(certs: dict[str, pki.NodeFiles]) -> None:
    pair = Pair(certs).up()
    fid = pair.open()
    pair.client.send_data(fid, os.urandom(400_000))
    pair.client.datagrams_to_send(pair.now)
    assert pair.client.backlog > 100_000
    pair.pump()
    pair.client.datagrams_to_send(pair.now)
    assert pair.client.backlog == 0


def test_an_engine_failing_while_sending_ends_the_tunnel_with_its_reason(certs: dict[str, pki.NodeFiles]) -> None:
    """The native core raising while it builds packets (qh3 reports its own failures so) is a
    protocol error naming the engine, not an exception out of the send path."""
    if ENGINE.name != "qh3":
        pytest.skip("qh3's native core")
    pair = Pair(certs).up()
    fid = pair.open()

    class Failing:
        def __init__(self, core: Any) -> None:
            self._core = core

        def __getattr__(self, name: str) -> Any:
            return getattr(self._core, name)

        def poll_transmit(self, now: float) -> Any:
            raise RuntimeError("packet number space exhausted")

    pair.client.quic._core = Failing(pair.client.quic._core)
    pair.client.send_data(fid, b"x" * 100)
    with pytest.raises(ProtocolError) as info:
        pair.client.datagrams_to_send(pair.now)
    assert info.value.code == "quic_error" and "packet number space exhausted" in info.value.message
    assert pair.client.dead is info.value


# ---------------------------------------------------------------------------- limits and bad peers


def test_pending_opens_beyond_the_limit_are_refused(certs: dict[str, pki.NodeFiles]) -> None:
    pair = Pair(certs, server_wire=WireConfig(role="edge", node="edge-1", max_pending_opens=1)).up()
    first = pair.client.open_flow(Open(host="h", port=1))
    second = pair.client.open_flow(Open(host="h", port=2))
    pair.pump()
    events = pair.take(pair.server)
    assert [type(e) for e in events] == [ev.FlowRequested, ev.OpenRefused]
    assert events[1].flow_id == second and events[1].code == "too_many_pending"
    assert pair.take(pair.client) == [ev.FlowRejected(second, "too_many_pending",
                                                       "at most 1 pending OPENs per tunnel")]
    assert first in pair.server.flows


def test_dialer_respects_the_peer_flow_limit(certs: dict[str, pki.NodeFiles]) -> None:
    pair = Pair(certs, server_wire=WireConfig(role="edge", node="edge-1", max_flows=2)).up()
    pair.client.open_flow(Open(host="h", port=1))
    pair.client.open_flow(Open(host="h", port=2))
    with pytest.raises(FlowError) as info:
        pair.client.open_flow(Open(host="h", port=3))
    assert info.value.code == "too_many_flows"


def test_flows_beyond_max_flows_are_refused_by_the_acceptor(certs: dict[str, pki.NodeFiles]) -> None:
    pair = Pair(certs, server_wire=WireConfig(role="edge", node="edge-1", max_flows=1)).up()
    pair.client.peer = msgspec.structs.replace(pair.client.peer, max_flows=10)  # a dialer that ignores the limit
    pair.client.open_flow(Open(host="h", port=1))
    second = pair.client.open_flow(Open(host="h", port=2))
    pair.pump()
    assert [e.code for e in pair.take(pair.server) if isinstance(e, ev.OpenRefused)] == ["too_many_flows"]
    assert [type(e) for e in pair.take(pair.client)] == [ev.FlowRejected]
    assert second not in pair.client.flows


def bad_peer(pair: Pair, code: str) -> None:
    """The server must fail with ``code`` and the client read it in the CONNECTION_CLOSE."""
    pair.pump()
    assert pair.server.dead is not None and pair.server.dead.code == code
    end = terminated(pair.take(pair.client))
    assert end.code == code and end.error_code == 1


def test_data_beyond_credit_closes_the_tunnel(certs: dict[str, pki.NodeFiles]) -> None:
    pair = Pair(certs, server_wire=WireConfig(role="edge", node="edge-1", window=4096)).up()
    fid = pair.open()
    pair.client.flows[fid].send_credit = 100_000  # a peer that ignores credit
    pair.client.send_data(fid, b"x" * 10_000)
    bad_peer(pair, "flow_control")


def test_oversized_frame_closes_the_tunnel(certs: dict[str, pki.NodeFiles]) -> None:
    pair = Pair(certs, server_wire=WireConfig(role="edge", node="edge-1", max_frame=4096)).up()
    fid = pair.open()
    pair.client.peer = msgspec.structs.replace(pair.client.peer, max_frame=65536)
    pair.client.send_data(fid, b"x" * 8000)
    bad_peer(pair, "frame_too_large")


def test_data_frame_on_the_control_stream_closes_the_tunnel(certs: dict[str, pki.NodeFiles]) -> None:
    pair = Pair(certs).up()
    pair.client._queue(pair.client._control(), encode_header(FrameType.DATA, 1, 3) + b"abc")
    bad_peer(pair, "bad_frame")


def test_unknown_frame_type_closes_the_tunnel(certs: dict[str, pki.NodeFiles]) -> None:
    pair = Pair(certs).up()
    pair.client._queue(pair.client._control(), encode_header(99, 0, 0))
    bad_peer(pair, "unknown_frame")


def test_frame_for_another_flow_on_a_flow_stream_closes_the_tunnel(certs: dict[str, pki.NodeFiles]) -> None:
    pair = Pair(certs).up()
    fid = pair.open()
    pair.client._queue(pair.client._streams[stream_of(fid)], encode_window(fid + 2, 100))
    bad_peer(pair, "bad_flow_id")


def test_stream_that_ends_without_fin_closes_the_tunnel(certs: dict[str, pki.NodeFiles]) -> None:
    pair = Pair(certs).up()
    fid = pair.open()
    pair.client.quic.send(stream_of(fid), b"", end_stream=True)
    bad_peer(pair, "stream_state")


def test_data_before_open_ok_closes_the_tunnel(certs: dict[str, pki.NodeFiles]) -> None:
    pair = Pair(certs).up()
    fid = pair.client.open_flow(Open(host="h", port=1))
    pair.client._queue(pair.client._streams[stream_of(fid)], encode_header(FrameType.DATA, fid, 2) + b"hi")
    bad_peer(pair, "stream_state")


def test_stream_without_open_closes_the_tunnel(certs: dict[str, pki.NodeFiles]) -> None:
    pair = Pair(certs).up()
    pair.client.quic.send(4, encode_window(1, 10), end_stream=False)
    bad_peer(pair, "stream_state")


def test_unsupported_version_closes_the_tunnel_naming_it(certs: dict[str, pki.NodeFiles]) -> None:
    pair = Pair(certs)
    pair.hold = {id(pair.client), id(pair.server)}
    pair.pump()
    pair.server.initiate()
    pair.client._queue(pair.client._control(), encode_preamble(version=7))
    pair._record(pair.server, pair.server.events())
    pair.pump()
    assert pair.server.dead is not None and pair.server.dead.code == "unsupported_version"
    pair.client.initiate()
    pair._record(pair.client, pair.client.events())
    end = terminated(pair.take(pair.client))
    assert end.code == "unsupported_version" and "version 7" in end.reason


def test_open_before_hello_is_held_until_hello(certs: dict[str, pki.NodeFiles]) -> None:
    """QUIC may deliver a flow stream before all of the control stream: the OPEN waits for HELLO."""
    big_hello = WireConfig(role="connector", node="connector-1", token="t" * 2000)  # HELLO over two packets
    pair = Pair(certs, client_wire=big_hello)
    pair.hold = {id(pair.client), id(pair.server)}
    pair.pump()
    pair.server.initiate()  # held until the dialer opens the control stream
    pair._record(pair.server, pair.server.events())
    assert pair.server.datagrams_to_send(pair.now) == []
    pair.client.initiate()
    pair._record(pair.client, pair.client.events())
    first, *rest = pair.client.datagrams_to_send(pair.now)
    assert rest
    pair._deliver(pair.server, first[0], CLIENT_ADDR)
    for data, _addr in pair.server.datagrams_to_send(pair.now):
        pair._deliver(pair.client, data, SERVER_ADDR)
    assert [type(e) for e in pair.take(pair.client)] == [ev.HelloReceived]
    fid = pair.client.open_flow(Open(host="h", port=1))
    pair.now += 0.005  # past the pacer, before any loss timer
    opening = pair.client.datagrams_to_send(pair.now)
    assert opening
    for data, _addr in opening:  # the OPEN overtakes the rest of the HELLO
        pair._deliver(pair.server, data, CLIENT_ADDR)
    assert pair.take(pair.server) == []
    for data, _addr in rest:
        pair._deliver(pair.server, data, CLIENT_ADDR)
    events = pair.take(pair.server)
    assert [type(e) for e in events] == [ev.HelloReceived, ev.FlowRequested]
    assert events[0].hello.token == "t" * 2000 and pair.server.flows[fid].local is False


def test_goaway_drains_and_close_names_the_reason(certs: dict[str, pki.NodeFiles]) -> None:
    pair = Pair(certs).up()
    pair.server.goaway("draining", "edge restarts")
    pair.pump()
    assert pair.take(pair.client) == [ev.GoAwayReceived("draining", "edge restarts")]
    with pytest.raises(FlowError) as info:
        pair.client.open_flow(Open(host="h", port=1))
    assert info.value.code == "draining"
    pair.server.close("shutdown", "edge stopped")
    pair.pump()
    end = terminated(pair.take(pair.client))
    assert (end.code, end.reason, end.error_code) == ("shutdown", "edge stopped", 0)


def test_ping_is_answered_on_the_control_stream(certs: dict[str, pki.NodeFiles]) -> None:
    pair = Pair(certs).up()
    pair.client.ping(1234.5)
    pair.client.send_auth("new-token")
    pair.pump()
    assert pair.take(pair.client) == [ev.PongReceived(1234.5)]
    assert pair.take(pair.server) == [ev.AuthReceived("new-token")]


# ---------------------------------------------------------------------------- reading back-pressure


def test_a_tunnel_that_stops_reading_gives_its_peer_no_credit(certs: dict[str, pki.NodeFiles]) -> None:
    small = WireConfig(role="edge", node="edge-1", window=4096, max_frame=4096)  # stream windows of 80 KB
    pair = Pair(certs, server_wire=small).up()
    pair.server.pause_reading()
    for i in range(8000):  # PINGs on the control stream: nothing the server reads, no credit back
        pair.client.ping(float(i))
    pair.pump()
    assert pair.take(pair.server) == [] and pair.take(pair.client) == []
    stuck = pair.client.backlog
    assert stuck > 0  # the client's PINGs wait: the server's engine holds the ones it took
    for i in range(2000):
        pair.client.ping(float(i))
    pair.pump()
    assert pair.client.backlog > stuck and pair.take(pair.server) == []
    pair._record(pair.server, pair.server.resume_reading())
    pair.pump()
    pongs = [e for e in pair.take(pair.client) if isinstance(e, ev.PongReceived)]
    assert len(pongs) == 10_000 and pair.client.backlog == 0


def test_a_close_reaches_a_tunnel_that_is_not_reading(certs: dict[str, pki.NodeFiles]) -> None:
    pair = Pair(certs).up()
    pair.server.pause_reading()
    pair.client.close("shutdown", "dialer stops")
    pair.pump()
    end = terminated(pair.take(pair.server))
    assert (end.code, end.reason) == ("shutdown", "dialer stops")


def test_streams_without_their_open_are_bounded(certs: dict[str, pki.NodeFiles]) -> None:
    """A peer opening streams that each hold an unfinished OPEN (the edge buffers up to a frame
    per stream, and none of them is a flow yet) is refused past ``max_pending_opens`` of them,
    and a stream ending before its OPEN is a protocol error too."""
    pair = Pair(certs, server_wire=WireConfig(role="edge", node="edge-1", max_pending_opens=8)).up()
    partial = encode_control(0, Open(host="h", port=1))[:-1]  # one byte short
    for n in range(9):
        pair.client.quic.send(stream_of(1 + 2 * n), partial, False)
    pair.pump()
    assert pair.server.dead is not None and pair.server.dead.code == "too_many_pending", pair.server.dead
    other = Pair(certs).up()
    other.client.quic.send(stream_of(1), b"", True)
    other.pump()
    assert other.server.dead is not None and other.server.dead.code == "stream_state"
    assert "ended before its OPEN" in other.server.dead.message
