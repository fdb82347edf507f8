"""A connector's dials: an OPEN the edge resets before the answer stops its dial (resolution or
connection, its socket closed), at most ``FERRYMAN_MAX_PENDING_OPENS`` dials run per tunnel however
fast OPENs come and go, and a refused address is logged under who the grant names.

A real ``Connector`` handles a real connector-side ``Tunnel`` fed with what an edge's
``TunnelConnection`` sends (grants MAC'd with the tunnel's grant key); only the tunnel's socket is
absent. A destination that never answers is a loopback listener whose accept queue is full: the
kernel drops further SYNs, so a connection to it stays in SYN_SENT (what ``/proc/net/tcp`` shows).
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from cryptography.hazmat.primitives import serialization

from dataplane.access import grants
from dataplane.access.destinations import DialPolicy
from dataplane.basics import pki
from dataplane.basics.settings import ConnectorSettings
from dataplane.connector import dial
from dataplane.connector import node as connector_node
from dataplane.connector.node import Connector
from dataplane.contract.apps import Applications
from dataplane.transport.credentials import NodeCredentials
from dataplane.transport.tunnel import Tunnel
from dataplane.wire import events as ev
from dataplane.wire.connection import TunnelConnection
from dataplane.wire.frames import Open

from edge_peer import tunnel_to_edge, written

pytestmark = pytest.mark.timeout(60)

_connections = itertools.count()


def make_connector(pki_dir: str, **settings: object) -> Connector:
    key, cert = pki.node_paths(pki_dir, "connector-1")
    s = ConnectorSettings(tls_ca=os.path.join(pki_dir, pki.CA_CERT), tls_cert=cert, tls_key=key,
                          edges="127.0.0.1:1", **settings)  # type: ignore[arg-type]
    return Connector(s, NodeCredentials(s, "connector"))


def open_flow(tunnel: Tunnel, edge: TunnelConnection, host: str, port: int, protocol: str = "tcp", *,
              connection: str = "", unsigned: dict[str, str] | None = None, device: str = "dev-1") -> int:
    """Queue an OPEN with a valid grant for alice@corp's device ``device``, application ``stall``
    (``unsigned``: the OPEN's own user, device or connection fields, when they say something else)."""
    connection = connection or f"c{next(_connections)}"
    grant = grants.mac(tunnel.conn.grant_key, edge="edge-1", connector="connector-1", host=host, port=port,
                       protocol=protocol, connection=connection, user="alice@corp", device=device,
                       now=time.time(), app="stall")
    said = {"user": "alice@corp", "device": device, "connection": connection, **(unsigned or {})}
    return edge.open_flow(Open(host=host, port=port, protocol=protocol, grant=grant, user=said["user"],
                               device=said["device"], connection=said["connection"]))


def deliver(tunnel: Tunnel, edge: TunnelConnection) -> list[ev.Event]:
    """What the edge queued, read by the connector in one read; the connector's answers so far."""
    tunnel.data_received(edge.data_to_send())
    return edge.receive_data(written(tunnel))


def refusals(events: list[ev.Event]) -> list[str]:
    return [e.code for e in events if isinstance(e, ev.FlowRejected)]


def dials() -> set[asyncio.Task[object]]:
    """The tasks running besides the test's own: the connector's dials."""
    return asyncio.all_tasks() - {asyncio.current_task()}


@contextmanager
def never_answering() -> Iterator[int]:
    """A loopback port whose listener never accepts and whose accept queue is full: SYNs to it are
    dropped, so a connection attempt waits for its timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):  # fills the queue
            yield port


def syn_sent(port: int) -> int:
    """Connections to 127.0.0.1:``port`` still waiting for an answer to their SYN."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.read().splitlines()[1:]]
    return sum(1 for row in rows if row[3] == "02" and int(row[2].split(":")[1], 16) == port)


def allowing(port: int) -> DialPolicy:
    """Application ``stall``: 127.0.0.1:``port`` (loopback needs a segment of its own)."""
    return DialPolicy("default", apps=Applications.from_obj({"apps": [{"name": "stall", "segments": [
        {"destination": "127.0.0.1", "ports": str(port), "protocol": "tcp"}]}]}).apps)


async def until(predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def test_an_open_the_edge_resets_stops_its_connection_attempt(pki_cache: str) -> None:
    async def run() -> None:
        node = make_connector(pki_cache)
        with never_answering() as port:
            node.policy = allowing(port)
            tunnel, edge = tunnel_to_edge(node)
            fid = open_flow(tunnel, edge, "127.0.0.1", port)
            assert deliver(tunnel, edge) == []
            assert await until(lambda: syn_sent(port) == 1), "the connector never dialed"
            (dial,) = dials()
            edge.reset_flow(fid, "cancelled", "the client gave up")  # e.g. the edge's open timeout
            deliver(tunnel, edge)
            # The socket is closed at once, not after FERRYMAN_DIAL_TIMEOUT (10 s).
            assert await until(lambda: syn_sent(port) == 0), "the reset OPEN's connection attempt goes on"
            assert dial.cancelled() and node.dialing == {}
            assert tunnel.routes == {} and tunnel.conn.pending_opens == 0
            tunnel.close("shutdown", "test over")

    asyncio.run(run())


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_an_open_the_edge_resets_stops_its_name_resolution(pki_cache: str, protocol: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    abandoned: list[str] = []

    async def stalled(host: str, port: int, protocol: str, *, timeout: float, limit: int, key: str = "") -> None:
        asked.append(host)
        try:
            await asyncio.Event().wait()  # a name server that never answers
        finally:
            abandoned.append(host)

    async def run() -> None:
        node = make_connector(pki_cache)
        monkeypatch.setattr(node.resolver, "resolve", stalled)
        tunnel, edge = tunnel_to_edge(node)
        fid = open_flow(tunnel, edge, "slow.corp.example", 5000, protocol)
        deliver(tunnel, edge)
        assert await until(lambda: asked == ["slow.corp.example"])
        edge.reset_flow(fid, "cancelled", "the client gave up")
        deliver(tunnel, edge)
        assert await until(lambda: abandoned == ["slow.corp.example"]), "the reset OPEN's resolution goes on"
        assert await until(lambda: node.dialing == {})
        assert node.udp_flows == set() and tunnel.routes == {}
        tunnel.close("shutdown", "test over")

    asyncio.run(run())


def test_open_then_reset_at_any_rate_keeps_the_dials_in_flight_bounded(pki_cache: str) -> None:
    """An edge (or a client through it) resetting each OPEN and sending new ones in the same read frees
    every pending slot at once: the connector still runs no more than FERRYMAN_MAX_PENDING_OPENS dials
    (the rest are answered ``too_many_dials``) and never holds more sockets than that."""
    async def run() -> None:
        node = make_connector(pki_cache, max_pending_opens=4)
        with never_answering() as port:
            node.policy = allowing(port)
            tunnel, edge = tunnel_to_edge(node)
            dialing: list[int] = []
            peak = refused = 0
            for _ in range(50):  # 200 OPENs, each reset (if it was dialed) by the next read
                for fid in dialing:
                    edge.reset_flow(fid, "cancelled", "the client gave up")
                fids = [open_flow(tunnel, edge, "127.0.0.1", port) for _ in range(4)]
                events = deliver(tunnel, edge)
                assert set(refusals(events)) <= {"too_many_dials"}
                rejected = {e.flow_id for e in events if isinstance(e, ev.FlowRejected)}
                refused += len(rejected)
                dialing = [fid for fid in fids if fid not in rejected]
                peak = max(peak, len(dials()))  # the reset OPENs' dials end only once the loop runs them
                for _ in range(5):  # the loop runs: new dials connect, cancelled ones close their sockets
                    await asyncio.sleep(0)
                    peak = max(peak, syn_sent(port), len(dials()))
            assert peak == 4, f"{peak} dials in flight at once (FERRYMAN_MAX_PENDING_OPENS=4)"
            assert refused > 0  # the bound did refuse: the RSTs had freed every pending slot
            for fid in dialing:
                edge.reset_flow(fid, "cancelled", "the client gave up")
            deliver(tunnel, edge)
            assert await until(lambda: syn_sent(port) == 0 and node.dialing == {})
            # With the dials gone, OPENs are dialed again.
            open_flow(tunnel, edge, "127.0.0.1", port)
            assert refusals(deliver(tunnel, edge)) == []
            assert await until(lambda: syn_sent(port) == 1)
            tunnel.close("shutdown", "test over")
            assert await until(lambda: syn_sent(port) == 0 and node.dialing == {})

    asyncio.run(run())


def test_a_refused_address_is_logged_and_limited_by_the_grants_user_and_device(
        pki_cache: str, caplog: pytest.LogCaptureFixture) -> None:
    """The OPEN's user, device and connection fields are not signed (a relaying edge passes them on and
    could change them): the log line names who the grant names, and its rate limit counts per device of
    the grant, so a new device string per OPEN buys no new lines."""
    async def run() -> None:
        node = make_connector(pki_cache, log_limit=2)
        tunnel, edge = tunnel_to_edge(node)
        for i in range(5):
            open_flow(tunnel, edge, "127.0.0.1", 22, connection=f"granted-{i}",
                      unsigned={"user": "mallory@corp", "device": f"forged-{i}", "connection": f"forged-{i}"})
        assert refusals(deliver(tunnel, edge)) == [] and await until(lambda: not dials())
        assert refusals(edge.receive_data(written(tunnel))) == ["destination_forbidden"] * 5
        tunnel.close("shutdown", "test over")

    with caplog.at_level(logging.WARNING, logger="ferryman.connector"):
        asyncio.run(run())
    lines = [vars(r) for r in caplog.records if r.getMessage().startswith("destination address refused")]
    # FERRYMAN_LOG_LIMIT (2) lines for the grant's device, whatever device each OPEN named
    assert [(line["user"], line["connection"], line["address"], line["rule"]) for line in lines] == [
        ("alice@corp", "granted-0", "127.0.0.1", "loopback"), ("alice@corp", "granted-1", "127.0.0.1", "loopback")]


def test_stalled_lookups_of_one_device_leave_the_resolver_to_the_others() -> None:
    """A lookup the system resolver never answers holds its thread (it cannot be interrupted).
    One device may hold a quarter of the resolver's threads: beyond, and when none is free, a
    lookup fails at once (too_many_lookups) instead of queueing behind the stalled ones, so other
    devices' names (here localhost, from /etc/hosts) still resolve; freed threads are taken again."""
    release = threading.Event()

    def system_resolver(host: str, port: int, type: int = 0) -> list:  # noqa: A002 - getaddrinfo's name
        if host.startswith("stall"):
            release.wait(30)  # a name server that never answers
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return socket.getaddrinfo(host, port, type=type)

    async def run() -> None:
        resolver = dial.Resolver(8, lookup=system_resolver)
        assert resolver.share == 2

        async def ask(host: str, key: str, timeout: float = 0.3) -> str:
            try:
                targets, _ = await resolver.resolve(host, 80, "tcp", timeout=timeout, limit=8, key=key)
            except dial.DialError as exc:
                return exc.code
            return "ok" if targets else "none"

        assert await asyncio.gather(ask("stall-1.corp.example", "dev-a"), ask("stall-2.corp.example", "dev-a")) == [
            "dns_timeout", "dns_timeout"]
        assert await ask("stall-3.corp.example", "dev-a") == "too_many_lookups"  # its two threads are still held
        started = time.monotonic()
        assert await ask("localhost", "dev-b", timeout=5) == "ok"  # another device is not held up
        assert time.monotonic() - started < 1
        for device in ("dev-c", "dev-d", "dev-e"):
            assert await asyncio.gather(ask("stall-x.corp.example", device, 0.05),
                                        ask("stall-y.corp.example", device, 0.05)) == ["dns_timeout"] * 2
        assert resolver.running == 8
        assert await ask("localhost", "dev-f") == "too_many_lookups"  # every thread is stalled: refused at once
        release.set()
        assert await until(lambda: resolver.running == 0 and resolver.per_key == {})
        assert await ask("localhost", "dev-a", timeout=5) == "ok"
        resolver.close()

    asyncio.run(run())


def test_one_device_holds_at_most_a_quarter_of_the_udp_and_dns_flows(pki_cache: str) -> None:
    """Private DNS and UDP flows share FERRYMAN_MAX_UDP_FLOWS at a connector: one device that
    opens them and leaves them idle gets a quarter (here 2 of 8), the others still get theirs;
    a private DNS flow ends after 10 s idle at most, not FERRYMAN_UDP_IDLE_TIMEOUT."""
    async def run() -> None:
        node = make_connector(pki_cache, max_udp_flows=8, dns_server="127.0.0.1:5353")
        tunnel, edge = tunnel_to_edge(node)
        for _ in range(3):
            open_flow(tunnel, edge, "rdp.corp.example", 53, "dns", device="dev-a")
        open_flow(tunnel, edge, "rdp.corp.example", 53, "dns", device="dev-b")
        answers: list[ev.Event] = deliver(tunnel, edge)

        def answered() -> bool:
            answers.extend(edge.receive_data(written(tunnel)))
            return sum(isinstance(e, (ev.FlowAccepted, ev.FlowRejected)) for e in answers) == 4

        assert await until(answered), answers
        rejected = [e for e in answers if isinstance(e, ev.FlowRejected)]
        assert [e.code for e in rejected] == ["too_many_udp_flows"]
        assert "dev-a, the most one device may have" in rejected[0].reason
        assert sum(isinstance(e, ev.FlowAccepted) for e in answers) == 3
        assert node.udp_per_owner == {"dev-a": 2, "dev-b": 1}
        assert {flow.idle for flow in node.udp_flows} == {connector_node.DNS_FLOW_IDLE}
        for flow in list(node.udp_flows):
            flow.close("test", "over")
        assert node.udp_per_owner == {} and node.udp_owner == {}
        tunnel.close("shutdown", "test over")

    asyncio.run(run())


def test_the_dial_lists_are_the_recorded_groups_whatever_the_local_setting(pki_cache: str,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The control plane assigns groups: a connector run with another FERRYMAN_CONNECTOR_GROUP
    (here none) than its record still applies its recorded group's dial lists, which used to be
    skipped (no lists at all) while the edges sent it that group's flows."""
    from dataplane.contract.snapshot import ConfigSnapshot, SnapConnector, SnapGroup

    node = make_connector(pki_cache, connector_group="")
    snapshot = ConfigSnapshot(version=3, issued_at="2026-12-06T00:00:00Z",
                              groups=[SnapGroup(name="lab", denied_addresses=["10.0.0.0/8"])],
                              connectors=[SnapConnector(id="c-1", name="connector-1", group="lab")])
    with caplog.at_level(logging.WARNING, logger="ferryman.connector"):
        node._configure(snapshot)
        node._configure(snapshot)
    assert node.policy.group == "lab" and [str(n) for n in node.policy.deny] == ["10.0.0.0/8"]
    refusal = node.policy.check(ipaddress.ip_address("10.1.2.3"), app="", port=22, protocol="tcp")
    assert refusal is not None and refusal.rule == "group_deny"
    warned = [r for r in caplog.records if "records this connector in another group" in r.getMessage()]
    assert len(warned) == 1  # once, not at every configuration


def test_a_grant_outside_the_groups_applications_is_refused(pki_cache: str, tmp_path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The edge decides a flow, but only within what this connector's group serves: a grant (from
    any edge, valid) naming an application the group does not serve, or a destination outside its
    application's segments, is refused destination_forbidden, while the application's own
    destination is dialed. An application the connector learns from a configuration arriving
    while the flow waits (it reached the edge first) is served."""
    monkeypatch.setattr(connector_node, "CONFIG_CATCH_UP", 0.3)
    with socket.socket() as backend:
        backend.bind(("127.0.0.1", 0))
        backend.listen(8)
        port = backend.getsockname()[1]
        apps = tmp_path / "apps.json"
        apps.write_text(json.dumps({"apps": [
            {"name": "stall", "segments": [{"destination": "127.0.0.1", "ports": str(port)}]},
            {"name": "other", "connector_group": "lab", "segments": [{"destination": "127.0.0.2", "ports": "1-65535"}]},
        ]}))

        async def run() -> None:
            node = make_connector(pki_cache, apps_file=str(apps))
            assert sorted(node.served or ()) == ["stall"]  # its group's applications only
            tunnel, edge = tunnel_to_edge(node)
            answers: list[ev.Event] = []

            def answered(count: int) -> Callable[[], bool]:
                def check() -> bool:
                    answers.extend(edge.receive_data(written(tunnel)))
                    return sum(isinstance(e, (ev.FlowAccepted, ev.FlowRejected)) for e in answers) >= count
                return check

            inside = open_flow(tunnel, edge, "127.0.0.1", port)
            other_port = open_flow(tunnel, edge, "127.0.0.1", port + 1 if port < 65535 else port - 1)
            deliver(tunnel, edge)
            assert await until(answered(2), 3)
            by_flow = {e.flow_id: e for e in answers}
            assert isinstance(by_flow[inside], ev.FlowAccepted)
            refused = by_flow[other_port]
            assert isinstance(refused, ev.FlowRejected) and refused.code == "destination_forbidden"
            assert "is outside the segments of application 'stall'" in refused.reason
            assert node.stats.dial_refused == {"not_served": 1}

            # A grant naming another group's application (valid, from an edge that knows it).
            grant = grants.mac(tunnel.conn.grant_key, edge="edge-1", connector="connector-1", host="127.0.0.2",
                               port=80, protocol="tcp", connection="c-other", user="alice@corp", device="dev-1",
                               now=time.time(), app="other")
            foreign = edge.open_flow(Open(host="127.0.0.2", port=80, protocol="tcp", grant=grant, user="alice@corp",
                                          device="dev-1", connection="c-other"))
            deliver(tunnel, edge)
            assert await until(answered(3), 3)
            refused = next(e for e in answers if e.flow_id == foreign)
            assert isinstance(refused, ev.FlowRejected) and refused.code == "destination_forbidden"
            assert "application 'other' is not one this connector's group serves" in refused.reason

            # An application that reaches this connector while the flow waits for it.
            grant = grants.mac(tunnel.conn.grant_key, edge="edge-1", connector="connector-1", host="127.0.0.1",
                               port=port, protocol="tcp", connection="c-new", user="alice@corp", device="dev-1",
                               now=time.time(), app="new-app")
            late = edge.open_flow(Open(host="127.0.0.1", port=port, protocol="tcp", grant=grant, user="alice@corp",
                                       device="dev-1", connection="c-new"))
            deliver(tunnel, edge)
            await asyncio.sleep(0.05)
            learned = Applications.from_obj({"apps": [
                {"name": "new-app", "segments": [{"destination": "127.0.0.1", "ports": str(port)}]}]}).apps
            node.policy = DialPolicy("default", apps=learned)  # as a configuration sets both
            node._serve(learned, "default")
            assert await until(answered(4), 3)
            assert isinstance(next(e for e in answers if e.flow_id == late), ev.FlowAccepted)
            tunnel.close("shutdown", "test over")

        asyncio.run(run())



def test_a_grant_signed_with_the_edges_renewed_key_is_taken_with_its_certificate(pki_cache: str,
                                                                                  tmp_path) -> None:
    """A web flow's grant is signed with the edge's current key and carries its certificate: after
    the edge renewed, a connector tunnel set up before (which knows the old key) still takes it,
    while the same grant without the certificate is refused as forged."""
    renewed = str(tmp_path / "pki")
    shutil.copytree(pki_cache, renewed)
    pki.issue_node(renewed, "edge", "edge-1", force=True)  # same CA and name, a new key
    key_path, cert_path = pki.node_paths(renewed, "edge-1")
    with open(key_path, "rb") as fh:
        new_key = serialization.load_pem_private_key(fh.read(), None)
    new_der = pki.read_certificates(cert_path)[0].public_bytes(serialization.Encoding.DER)

    async def run() -> None:
        node = make_connector(pki_cache)
        with never_answering() as port:
            node.policy = allowing(port)
            tunnel, edge = tunnel_to_edge(node)
            tunnel.state = pki.read_certificates(pki.node_paths(pki_cache, "edge-1")[1])[0].public_key()

            def web_open(signer: bytes) -> None:
                grant = grants.sign(new_key, edge="edge-1", connector="connector-1", host="127.0.0.1", port=port,
                                    protocol="tcp", connection=f"c{next(_connections)}", user="alice@corp",
                                    device="", now=time.time(), app="stall")
                edge.open_flow(Open(host="127.0.0.1", port=port, protocol="tcp", grant=grant, user="alice@corp",
                                    connection="web", signer=signer))

            web_open(b"")
            assert refusals(deliver(tunnel, edge)) == ["grant_forged"]
            web_open(new_der)
            assert refusals(deliver(tunnel, edge)) == []
            assert await until(lambda: syn_sent(port) == 1), "the connector did not dial the granted flow"
            tunnel.close("shutdown", "test over")

    asyncio.run(run())
