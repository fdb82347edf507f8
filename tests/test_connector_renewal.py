"""A connector whose certificate is renewed moves its running tunnels to the new certificate, slot
by slot, before the control plane revokes the old one (``FERRYMAN_SUPERSEDED_CERT_GRACE``).

A real edge process (``Fabric``) and a connector run in this process against it, so that its
renewal callback can be called at a chosen moment: each tunnel gets GOAWAY ``moved`` and is
replaced, the slots ``RENEWAL_STAGGER`` apart, and the connector never stands without a tunnel.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from dataplane.basics import pki
from dataplane.basics.settings import ConnectorSettings
from dataplane.connector import node as connector_node
from dataplane.connector.node import Connector
from dataplane.fabric import Fabric
from dataplane.transport.credentials import NodeCredentials

pytestmark = pytest.mark.timeout(90)


def _fabric(tmp_path: Path, backend) -> Fabric:
    """A real edge process (and an echo backend) for a connector run in this process."""
    return Fabric(str(tmp_path / "fabric"), [("127.0.0.1", 0, "127.0.0.1", backend("echo").port)],
                  env={"FERRYMAN_TRANSPORT": "tcp"})


def _settings(fabric: Fabric, **more: object) -> ConnectorSettings:
    """connector-1's settings against ``fabric``'s edge, with its certificate and application file."""
    certs = os.path.join(fabric.workdir, "pki")
    key, cert = pki.node_paths(certs, "connector-1")
    return ConnectorSettings(tls_ca=os.path.join(certs, pki.CA_CERT), tls_cert=cert, tls_key=key,
                             edges=f"127.0.0.1:{fabric.edge_port}",
                             apps_file=os.path.join(fabric.workdir, "apps.json"), **more)  # type: ignore[arg-type]


@pytest.mark.parametrize("transport", ["tcp", "quic"])
def test_a_renewed_connector_moves_its_tunnels_to_the_new_certificate_one_slot_at_a_time(
        tmp_path: Path, backend, monkeypatch: pytest.MonkeyPatch, transport: str) -> None:
    monkeypatch.setattr(connector_node, "RENEWAL_STAGGER", 2.0)
    fabric = _fabric(tmp_path, backend)
    with fabric:
        settings = _settings(fabric, connector_tunnels=2, transport=transport, drain_grace=5.0)

        async def run() -> None:
            connector = Connector(settings, NodeCredentials(settings, "connector"))
            stop = asyncio.Event()
            task = asyncio.create_task(connector.run(stop))

            def up() -> list:
                return sorted((t for t in connector.tunnels if t.up and not t.closed), key=lambda t: t.label)

            try:
                deadline = time.monotonic() + 20
                while len(up()) < 2:
                    assert time.monotonic() < deadline, "the connector's two tunnels did not come up"
                    await asyncio.sleep(0.05)
                before = up()
                connector._renewed()
                moved_at: dict[str, float] = {}
                fewest = 2
                start = time.monotonic()
                while len(moved_at) < 2 or len(up()) < 2:
                    assert time.monotonic() - start < 20, f"tunnels not replaced: {moved_at}"
                    for old in before:
                        if old.closed and old.label not in moved_at:
                            moved_at[old.label] = time.monotonic() - start
                    fewest = min(fewest, len(up()))
                    await asyncio.sleep(0.01)
                assert not set(up()) & set(before)  # both replaced
                assert {t.transport_name for t in up()} == {transport}
                after = set(up())
                await asyncio.sleep(2 * connector_node.RENEWAL_STAGGER)  # replaced once, not again and again
                assert set(up()) == after
                assert all(old.closed for old in before)
                first, second = sorted(moved_at.values())
                assert first < 1.8 and second >= 1.8, moved_at  # one slot now, the other a stagger later
                assert fewest >= 1, "the connector stood without a tunnel while moving to the new certificate"
            finally:
                stop.set()
                await asyncio.wait_for(task, 30)

        asyncio.run(run())
        with open(fabric.logs["edge-1"], errors="replace") as fh:
            log = fh.read()
        assert log.count("moves this tunnel to its renewed certificate") >= 2, log[-3000:]


def test_a_connector_of_one_slot_dials_its_successor_tunnel_at_once(tmp_path: Path, backend) -> None:
    """A move is no reconnect: the slot whose tunnel drains (a renewal here) dials its successor
    without the reconnect backoff, which would leave a connector of one tunnel slot unreachable
    for FERRYMAN_RECONNECT_MIN (here 10 s) — and a tunnel that ended still backs off."""
    fabric = _fabric(tmp_path, backend)
    with fabric:
        settings = _settings(fabric, connector_tunnels=1, transport="tcp", reconnect_min=10.0, reconnect_max=10.0)

        async def run() -> None:
            connector = Connector(settings, NodeCredentials(settings, "connector"))
            stop = asyncio.Event()
            task = asyncio.create_task(connector.run(stop))

            def up() -> list:
                return [t for t in connector.tunnels if t.up and not t.closed and not t.draining]

            try:
                deadline = time.monotonic() + 20
                while not up():
                    assert time.monotonic() < deadline, "the connector's tunnel did not come up"
                    await asyncio.sleep(0.05)
                (old,) = up()
                connector._renewed()
                start = time.monotonic()
                while not up() or up() == [old]:
                    assert time.monotonic() - start < 4.0, "the successor waited for the reconnect backoff"
                    await asyncio.sleep(0.01)
                assert old.draining or old.closed
                (new,) = up()
                new.close("test", "an ended tunnel")  # not a move: the slot backs off before dialing again
                await asyncio.sleep(3.0)
                assert not up(), "a tunnel that ended was dialed again without the backoff"
            finally:
                stop.set()
                await asyncio.wait_for(task, 30)

        asyncio.run(run())
