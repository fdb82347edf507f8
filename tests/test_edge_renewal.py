"""An edge whose certificate is renewed asks the nodes that dialed it to move to the new one
before the control plane revokes the old one (``FERRYMAN_SUPERSEDED_CERT_GRACE``), which would
cut every tunnel still presenting it, with its flows.

The edge and a connector of two tunnel slots run in this process (so that the edge's renewal
can happen at a chosen moment and both sides' tunnels can be looked at); a real client agent
process dials the edge and forwards a port to an echo backend. After the renewal, over
``FERRYMAN_RENEWAL_SPREAD``: every tunnel gets GOAWAY ``renewed`` and is replaced by one that
presents the new certificate, the connector's two tunnels far apart (it never stands without
one), a connection open through the client agent before the renewal keeps echoing on its old
tunnel until it ends (however much longer than FERRYMAN_DRAIN_GRACE), new connections go
through meanwhile, and each old tunnel closes once its flows have ended.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataplane.access.apptable import AppTable
from dataplane.basics import pki
from dataplane.basics.settings import ConnectorSettings, EdgeSettings
from dataplane.connector.node import Connector
from dataplane.edge.node import Edge, renewal_schedule
from dataplane.fabric import free_port
from dataplane.basics.metrics import Stats
from dataplane.transport.credentials import NodeCredentials
from dataplane.transport.tunnel import Tunnel, TunnelHandler
from dataplane.wire.connection import WireConfig

pytestmark = pytest.mark.timeout(120)

SPREAD = 8.0  # the connector's two tunnels move 4 s apart: time for a loaded machine to redial
DRAIN_GRACE = 2.0  # what a drain leaves running flows; a move to a renewed certificate does not cut them


class _Tunnel:
    def __init__(self, peer: str, n: int) -> None:
        self.peer_name = peer
        self.n = n

    def __repr__(self) -> str:
        return f"{self.peer_name}#{self.n}"


@pytest.mark.parametrize("seed", range(20))
def test_a_renewed_edge_spreads_each_peers_tunnels_evenly(seed: int) -> None:
    """Every tunnel is asked once, within the spread; the ``n`` tunnels of one peer exactly
    ``spread / n`` apart (a connector never moves two at once); the peers start at random."""
    tunnels = [_Tunnel("connector-1", 1), _Tunnel("connector-1", 2), _Tunnel("connector-1", 3),
               *(_Tunnel(f"client-{i}", 1) for i in range(40)), _Tunnel("connector-2", 1), _Tunnel("connector-2", 2)]
    schedule = renewal_schedule(tunnels, 600.0, random.Random(seed))  # type: ignore[arg-type]
    assert sorted((t for _, t in schedule), key=id) == sorted(tunnels, key=id)  # each once
    assert [d for d, _ in schedule] == sorted(d for d, _ in schedule)
    assert all(0 <= d < 600 for d, _ in schedule)
    for peer, n in (("connector-1", 3), ("connector-2", 2)):
        times = sorted(d for d, t in schedule if t.peer_name == peer)
        assert all(abs(b - a - 600 / n) < 1e-9 for a, b in zip(times, times[1:])), times
    clients = [d for d, t in schedule if t.peer_name.startswith("client-")]
    assert max(clients) - min(clients) > 300  # spread out, not all at one moment
    assert renewal_schedule([], 600.0) == []


def test_the_workers_of_an_edge_ask_a_connectors_tunnels_apart() -> None:
    """Each worker schedules the tunnels it holds; a connector with one tunnel on each of two
    workers has them asked half the spread apart (the same start from its name in both)."""
    on_first = renewal_schedule([_Tunnel("connector-1", 1), _Tunnel("client-1", 1)], 600.0, worker=0, workers=2)
    on_second = renewal_schedule([_Tunnel("connector-1", 2)], 600.0, worker=1, workers=2)
    (first,) = [d for d, t in on_first if t.peer_name == "connector-1"]
    (second,) = [d for d, _ in on_second]
    assert abs(abs(second - first) - 300.0) < 1e-6, (first, second)
    assert renewal_schedule([_Tunnel("connector-1", 1)], 600.0, worker=0, workers=2)[0][0] == first  # no chance


def _echo(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        piece = sock.recv(65536)
        assert piece, "the connection through the fabric was closed"
        got += piece
    return got


@pytest.mark.parametrize("transport", ["tcp", "quic"])
def test_a_renewed_edge_moves_its_dialers_to_the_new_certificate(tmp_path: Path, backend, transport: str) -> None:
    certs = str(tmp_path / "pki")
    pki.init_pki(certs, edge_hosts=["127.0.0.1", "localhost"], edges=["edge-1"], connectors=["connector-1"],
                 clients=["client-1"])
    echo = backend("echo").port
    apps = tmp_path / "apps.json"
    apps.write_text(json.dumps({"apps": [{"name": "echo", "connector_group": "default", "segments": [
        {"destination": "127.0.0.1", "ports": str(echo), "protocol": "tcp"}]}]}))
    edge_port, forward = free_port("both"), free_port()
    ca = os.path.join(certs, pki.CA_CERT)
    edge_key, edge_cert = pki.node_paths(certs, "edge-1")
    edge_settings = EdgeSettings(tls_ca=ca, tls_cert=edge_cert, tls_key=edge_key, edge_listen=f"127.0.0.1:{edge_port}",
                                 apps_file=str(apps), edge_quic="on" if transport == "quic" else "off",
                                 renewal_spread=SPREAD, drain_grace=DRAIN_GRACE)
    connector_key, connector_cert = pki.node_paths(certs, "connector-1")
    connector_settings = ConnectorSettings(tls_ca=ca, tls_cert=connector_cert, tls_key=connector_key,
                                           edges=f"127.0.0.1:{edge_port}", connector_tunnels=2, transport=transport,
                                           apps_file=str(apps), drain_grace=DRAIN_GRACE)
    client_key, client_cert = pki.node_paths(certs, "client-1")
    log_path = tmp_path / "client.log"

    async def run() -> None:
        edge = Edge(edge_settings, NodeCredentials(edge_settings, "edge"), AppTable.load(str(apps)))
        connector = Connector(connector_settings, NodeCredentials(connector_settings, "connector"))
        stop = asyncio.Event()
        tasks = [asyncio.create_task(edge.run(stop))]
        await asyncio.sleep(0.2)
        tasks.append(asyncio.create_task(connector.run(stop)))
        with open(log_path, "wb") as log:
            client = subprocess.Popen(
                [sys.executable, "-m", "dataplane", "client", "--edges", f"127.0.0.1:{edge_port}",
                 "--forward", f"127.0.0.1:{forward}=127.0.0.1:{echo}"],
                env={**os.environ, "FERRYMAN_TLS_CA": ca, "FERRYMAN_TLS_CERT": client_cert,
                     "FERRYMAN_TLS_KEY": client_key, "FERRYMAN_TRANSPORT": transport,
                     "FERRYMAN_DRAIN_GRACE": str(DRAIN_GRACE)},
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def connector_tunnels() -> list:
            return [t for t in connector.tunnels if t.up and not t.closed and not t.draining]

        def client_tunnels() -> list:
            return [t for t in edge.clients if t.up and not t.closed and not t.draining]

        async def until(what, why: str, seconds: float = 20.0) -> None:
            deadline = time.monotonic() + seconds
            while not what():
                assert time.monotonic() < deadline, why
                await asyncio.sleep(0.02)

        async def connect() -> socket.socket:
            loop = asyncio.get_running_loop()
            sock = await loop.run_in_executor(None, lambda: socket.create_connection(("127.0.0.1", forward), 5))
            sock.settimeout(10)
            return sock

        try:
            await until(lambda: len(connector_tunnels()) == 2 and len(client_tunnels()) == 1,
                        "the connector's two tunnels and the client agent's tunnel did not come up")
            loop = asyncio.get_running_loop()
            old_serial = pki.read_node_certificate(edge_cert).serial
            assert {t.peer_certificate.serial for t in connector_tunnels()} == {old_serial}
            old_connector, (old_client,) = set(connector_tunnels()), client_tunnels()
            held = None
            deadline = time.monotonic() + 20
            while held is None:  # the forward answers once the client agent's tunnel took its probe
                try:
                    held = await connect()
                    assert await loop.run_in_executor(None, _echo, held, b"before") == b"before"
                except OSError:
                    assert time.monotonic() < deadline, "the forward did not answer"
                    held = None
                    await asyncio.sleep(0.1)

            # The renewal: a new key and certificate in the edge's files, then the edge's callback.
            pki.issue_node(certs, "edge", "edge-1", hosts=["127.0.0.1", "localhost"], force=True)
            new_serial = pki.read_node_certificate(edge_cert).serial
            assert new_serial != old_serial
            renewed_at = time.monotonic()
            edge._renewed()

            fewest, moved_at = 2, {}
            while len(moved_at) < 2 or len(connector_tunnels()) < 2 or not client_tunnels():
                assert time.monotonic() - renewed_at < SPREAD + 15, f"tunnels not moved: {moved_at}"
                for t in old_connector:
                    if (t.closed or t.draining) and t not in moved_at:
                        moved_at[t] = time.monotonic() - renewed_at
                fewest = min(fewest, len(connector_tunnels()))
                await asyncio.sleep(0.01)
            await until(lambda: old_client.draining and client_tunnels() and client_tunnels()[0] is not old_client,
                        "the client agent did not dial a new tunnel")
            # Every tunnel up now presents the new certificate; the connector always had one.
            assert {t.peer_certificate.serial for t in connector_tunnels()} == {new_serial}
            assert not set(connector_tunnels()) & old_connector
            assert {t.transport_name for t in connector_tunnels() + client_tunnels()} == {transport}
            assert fewest >= 1, "the connector stood without a tunnel while moving to the new certificate"
            first, second = sorted(moved_at.values())
            assert second - first >= SPREAD / 2 - 0.5, moved_at  # half the spread apart, not together

            # The connection opened before the renewal still echoes on its old tunnel, which stays
            # (draining) while it runs, longer than a drain would let it; a new connection goes
            # through the new tunnels meanwhile.
            await asyncio.sleep(DRAIN_GRACE + 1.5)
            assert not old_client.closed
            assert await loop.run_in_executor(None, _echo, held, b"after the renewal") == b"after the renewal"
            fresh = await connect()
            assert await loop.run_in_executor(None, _echo, fresh, b"fresh") == b"fresh"
            fresh.close()
            held.close()
            await until(lambda: old_client.closed, "the old client tunnel did not close after its last flow")
            await until(lambda: all(t.closed for t in old_connector), "the connector's old tunnels did not close")
            assert old_client.close_code in ("renewed", "peer_closed"), old_client.close_code  # whichever side was first
            # Moved once, not again and again.
            after = set(connector_tunnels()) | set(client_tunnels())
            await asyncio.sleep(SPREAD + 1)
            assert set(connector_tunnels()) | set(client_tunnels()) == after
        finally:
            client.terminate()
            try:
                client.wait(10)
            except subprocess.TimeoutExpired:
                client.kill()
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)

    asyncio.run(run())
    text = log_path.read_text(errors="replace")
    assert "renewed its certificate" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


class _GoawayEdge(TunnelHandler):
    """An edge that answers every connector tunnel with GOAWAY ``renewed`` and never renews."""

    def __init__(self) -> None:
        self.stats = Stats("edge", "edge-1")
        self.tunnels: list[Tunnel] = []

    def tunnel_up(self, tunnel: Tunnel) -> None:
        self.tunnels.append(tunnel)
        tunnel.goaway("renewed", "edge-1 renewed its certificate: dial again")

    def tunnel_down(self, tunnel: Tunnel) -> None:
        pass


def test_an_edge_asking_again_and_again_does_not_make_a_connector_dial_in_a_loop(tmp_path: Path) -> None:
    """A connector's slot follows GOAWAY ``renewed`` once per edge certificate it moved away from:
    an edge that asks again on a tunnel presenting the same certificate (it did not renew, or it
    lies) gets no new dial, where following it would have the slot redial twice a second."""
    certs = str(tmp_path / "pki")
    pki.init_pki(certs, edge_hosts=["127.0.0.1", "localhost"], edges=["edge-1"], connectors=["connector-1"],
                 clients=["client-1"])
    edge_port = free_port()
    apps = tmp_path / "apps.json"
    apps.write_text(json.dumps({"apps": [{"name": "echo", "segments": [
        {"destination": "127.0.0.1", "ports": "9", "protocol": "tcp"}]}]}))
    ca = os.path.join(certs, pki.CA_CERT)
    key, cert = pki.node_paths(certs, "connector-1")
    settings = ConnectorSettings(tls_ca=ca, tls_cert=cert, tls_key=key, edges=f"127.0.0.1:{edge_port}",
                                 connector_tunnels=2, transport="tcp", apps_file=str(apps), reconnect_min=0.1,
                                 drain_grace=1.0)

    async def run() -> None:
        edge = _GoawayEdge()
        edge_key, edge_cert = pki.node_paths(certs, "edge-1")
        ctx = pki.server_context(edge_cert, edge_key, ca)
        server = await asyncio.get_running_loop().create_server(
            lambda: Tunnel(edge, WireConfig(role="edge", node="edge-1"), dialer=False, accept_roles=("connector",),
                           keepalive=10, handshake_timeout=10, write_buffer_high=1 << 20), "127.0.0.1", edge_port,
            ssl=ctx)
        connector = Connector(settings, NodeCredentials(settings, "connector"))
        stop = asyncio.Event()
        task = asyncio.create_task(connector.run(stop))
        try:
            await asyncio.sleep(4.0)
            # Two slots: each dialed once, followed the first GOAWAY once, then stayed.
            assert len(edge.tunnels) == 4, [t.label for t in edge.tunnels]
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            server.close()

    asyncio.run(run())
