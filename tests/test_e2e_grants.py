"""A real connector refuses OPENs without a valid grant, and dials nothing for them.

The test plays a misbehaving edge: it holds the edge's certificate (so TLS and HELLO
succeed) and sends the connector OPENs whose grants are missing, signed by another key,
expired, for another destination, or replayed; and grants MAC'd under a made-up key, under
the key of the connector's other tunnel, or replayed. Each must come back as OPEN_FAIL with its
own code while the backend sees no connection at all; a valid grant, for contrast, is
dialled and its bytes flow (its application names the backend's loopback address, which the
connector reads from its application file), while the same grant signed for no application
is refused with ``destination_forbidden``, whatever the OPEN's unsigned ``app`` field says.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import subprocess
import sys
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from dataplane.access import grants
from dataplane.basics import pki
from dataplane.basics.metrics import Stats
from dataplane.transport.tunnel import Tunnel, TunnelHandler
from dataplane.wire import events as ev
from dataplane.wire.connection import WireConfig
from dataplane.wire.frames import Open

pytestmark = pytest.mark.timeout(60)


class RogueEdge(TunnelHandler):
    def __init__(self) -> None:
        self.stats = Stats("edge", "edge-1")
        self.up: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.tunnels: list[Tunnel] = []
        self.answers: dict[int, asyncio.Future[tuple[str, str]]] = {}

    def tunnel_up(self, tunnel: Tunnel) -> None:
        self.tunnels.append(tunnel)
        if len(self.tunnels) == 2 and not self.up.done():
            self.up.set_result(None)

    def tunnel_down(self, tunnel: Tunnel) -> None:
        pass

    def flow_accepted(self, tunnel: Tunnel, event: ev.FlowAccepted) -> None:
        self.answers[event.flow_id].set_result(("ok", event.bound))

    def flow_rejected(self, tunnel: Tunnel, event: ev.FlowRejected) -> None:
        self.answers[event.flow_id].set_result((event.code, event.reason))

    def data_received(self, tunnel: Tunnel, event: ev.DataReceived) -> None:
        tunnel.conn.acknowledge(event.flow_id, len(event.data))


def _key(path: str) -> ec.EllipticCurvePrivateKey:
    with open(path, "rb") as fh:
        return serialization.load_pem_private_key(fh.read(), password=None)  # type: ignore[return-value]


def test_connector_dials_only_flows_with_a_valid_grant(pki_cache: str, tmp_path) -> None:
    backend = socket.create_server(("127.0.0.1", 0))
    backend.setblocking(False)
    target = backend.getsockname()[1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        edge_port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRYMAN_")}
    env.update(FERRYMAN_TLS_CA=os.path.join(pki_cache, "ca.pem"),
               FERRYMAN_TLS_CERT=os.path.join(pki_cache, "connector-1.pem"),
               FERRYMAN_TLS_KEY=os.path.join(pki_cache, "connector-1.key"),
               FERRYMAN_CONNECTOR_TUNNELS="2", FERRYMAN_RECONNECT_MAX="0.5", FERRYMAN_DRAIN_GRACE="0")
    apps = tmp_path / "apps.json"
    apps.write_text(json.dumps({"apps": [{"name": "backend", "segments": [
        {"destination": "127.0.0.1", "ports": str(target)}]}]}))
    log = open(tmp_path / "connector.log", "wb")
    connector = subprocess.Popen([sys.executable, "-m", "dataplane", "connector", "--edges", f"127.0.0.1:{edge_port}",
                                  "--apps", str(apps)],
                                 env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    edge_key = _key(os.path.join(pki_cache, "edge-1.key"))
    other_key = ec.generate_private_key(ec.SECP256R1())

    async def scenario() -> dict[str, tuple[str, str]]:
        edge = RogueEdge()
        ctx = pki.server_context(os.path.join(pki_cache, "edge-1.pem"), os.path.join(pki_cache, "edge-1.key"),
                                 os.path.join(pki_cache, "ca.pem"))
        wire = WireConfig(role="edge", node="edge-1")
        server = await asyncio.get_running_loop().create_server(
            lambda: Tunnel(edge, wire, dialer=False, accept_roles=("connector",), keepalive=10,
                           handshake_timeout=10, write_buffer_high=1 << 20), "127.0.0.1", edge_port, ssl=ctx)
        await asyncio.wait_for(edge.up, 20)
        tunnel, other = edge.tunnels
        # The connector sent each tunnel its own grant key in HELLO.
        assert len(tunnel.hello.grant_key) == grants.KEY_SIZE
        assert len(other.hello.grant_key) == grants.KEY_SIZE and other.hello.grant_key != tunnel.hello.grant_key
        now = time.time()

        def signed(key: ec.EllipticCurvePrivateKey = edge_key, at: float = now, host: str = "127.0.0.1",
                   connection: str = "", app: str = "backend") -> bytes:
            return grants.sign(key, edge="edge-1", connector="connector-1", host=host, port=target, protocol="tcp",
                               connection=connection or os.urandom(4).hex(), user="alice@corp", device="dev-1",
                               now=at, app=app)

        def maced(key: bytes = tunnel.hello.grant_key, connection: str = "") -> bytes:
            return grants.mac(key, edge="edge-1", connector="connector-1", host="127.0.0.1", port=target,
                              protocol="tcp", connection=connection or os.urandom(4).hex(), user="alice@corp",
                              device="dev-1", now=now, app="backend")

        valid = signed(connection="valid-1")
        mac_valid = maced(connection="valid-2")
        cases = {
            "missing": b"",
            "forged": signed(other_key),
            "expired": signed(at=now - 120),
            "elsewhere": signed(host="127.0.0.2"),
            "valid": valid,
            "replayed": valid,
            # Signed for no application (the OPEN's own, unsigned app field is not believed): no
            # segment names the loopback backend for it.
            "unnamed": signed(app=""),
            "mac_made_up": maced(os.urandom(grants.KEY_SIZE)),
            "mac_other_tunnel": maced(other.hello.grant_key),
            "mac_valid": mac_valid,
            "mac_replayed": mac_valid,
        }
        results = {}
        for name, grant in cases.items():
            fid = tunnel.conn.open_flow(Open(host="127.0.0.1", port=target, grant=grant, user="alice@corp",
                                             app="backend"))
            edge.answers[fid] = asyncio.get_running_loop().create_future()
            tunnel.flush_soon()
            results[name] = await asyncio.wait_for(edge.answers[fid], 10)
        keys.extend(t.hello.grant_key for t in edge.tunnels)
        tunnel.close("shutdown", "test over")
        server.close()
        return results

    try:
        keys: list[bytes] = []
        results = asyncio.run(scenario())
        dialled = 0
        while select.select([backend], [], [], 0.5)[0]:
            conn, _ = backend.accept()
            conn.close()
            dialled += 1
    finally:
        connector.terminate()
        connector.wait(10)
        log.close()
        backend.close()
    codes = {name: code for name, (code, _) in results.items()}
    assert codes == {"missing": "grant_missing", "forged": "grant_forged", "expired": "grant_expired",
                     "elsewhere": "grant_mismatch", "valid": "ok", "replayed": "grant_replayed",
                     "unnamed": "destination_forbidden", "mac_made_up": "grant_forged",
                     "mac_other_tunnel": "grant_forged", "mac_valid": "ok", "mac_replayed": "grant_replayed"}, results
    assert results["forged"][1] == "connector connector-1: the grant does not verify with edge edge-1's certificate key"
    assert results["mac_other_tunnel"][1] == \
        "connector connector-1: the grant does not verify with this tunnel's grant key from edge edge-1"
    assert dialled == 2, "the connector dialled the backend for a flow without a valid grant"
    text = (tmp_path / "connector.log").read_text()
    for key in keys:  # the tunnels' grant keys are in no log line
        assert key.hex() not in text and repr(key)[2:-1] not in text
    assert text.count("OPEN refused: no valid grant") == 8
