"""``GET /v1/node/presence``: the presence map edges relay flows by, from the edges' heartbeats.

A real control plane process; nodes sign their requests as the nodes do. The map lists every
active, unrevoked edge with its address and the connectors it reported; a change wakes a
waiting long-poll at once; it never changes the configuration version; only edges report
connectors and follow the map.
"""

from __future__ import annotations

import json
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dataplane.controllink.signer import NodeSigner

import controlplane
from controlplane import PUBLIC_EDGE, Control, Reply

pytestmark = pytest.mark.timeout(60)

HEARTBEAT = "/v1/node/heartbeat"
PRESENCE = "/v1/node/presence"


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Control]:
    with Control.running(tmp_path_factory.mktemp("control"), edges=[PUBLIC_EDGE]) as control:
        yield control


def _edge(control: Control, directory: Path) -> tuple[str, str, str, NodeSigner]:
    """(id, name, address, signer) of a newly registered edge."""
    address = f"127.0.0.1:{controlplane.free_port()}"
    identity = control.register_node(directory, "edge", None, [address])
    return identity.record.node_id, identity.record.name, address, NodeSigner(identity.cert, identity.key)


def _beat(control: Control, signer: NodeSigner, connectors: list[dict[str, str]] | None) -> None:
    body: dict[str, Any] = {"tunnels": len(connectors or ())}
    if connectors is not None:
        body["connectors"] = connectors
    status, answer, _ = control.node(signer, "POST", HEARTBEAT, body)
    assert status == 200, answer


def _entry(presence: dict, name: str) -> dict | None:
    return next((e for e in presence["edges"] if e["name"] == name), None)


def test_edges_report_connectors_and_follow_the_map(control: Control, tmp_path: Path) -> None:
    _, name_a, address_a, edge_a = _edge(control, tmp_path / "a")
    id_b, name_b, address_b, edge_b = _edge(control, tmp_path / "b")
    version = control.version()
    _beat(control, edge_a, [])
    _beat(control, edge_b, [{"name": "conn-1", "group": "default"}, {"name": "conn-2", "group": "eu"}])

    status, presence, _ = control.node(edge_a, "GET", PRESENCE)
    assert status == 200, presence
    assert _entry(presence, name_a) == {"name": name_a, "address": address_a, "connectors": []}
    assert _entry(presence, name_b) == {"name": name_b, "address": address_b, "connectors": [
        {"name": "conn-1", "group": "default"}, {"name": "conn-2", "group": "eu"}]}
    tag = presence["tag"]

    # Unchanged: the long-poll answers 204 after its wait.
    started = time.monotonic()
    status, _, _ = control.node(edge_a, "GET", f"{PRESENCE}?after={tag}&wait=0.3")
    assert status == 204 and time.monotonic() - started >= 0.3

    # A heartbeat that changes edge-b's connectors wakes the waiting request at once.
    answers: list[Reply] = []
    waiting = threading.Thread(target=lambda: answers.append(
        control.node(edge_a, "GET", f"{PRESENCE}?after={tag}&wait=20")))
    waiting.start()
    time.sleep(0.3)
    started = time.monotonic()
    _beat(control, edge_b, [{"name": "conn-2", "group": "eu"}])
    waiting.join(10)
    assert answers and answers[0][0] == 200
    assert time.monotonic() - started < 2
    assert _entry(answers[0][1], name_b)["connectors"] == [{"name": "conn-2", "group": "eu"}]
    assert answers[0][1]["tag"] != tag

    # Presence is not configuration: the version every node follows did not move.
    assert control.version() == version

    # A revoked edge leaves the map.
    status, body, _ = control.admin("POST", "/v1/revocations", {"node_type": "edge", "node_id": id_b})
    assert status in (200, 201), body
    status, presence, _ = control.node(edge_a, "GET", PRESENCE)
    assert _entry(presence, name_b) is None and _entry(presence, name_a) is not None


def test_a_presence_long_poll_waiting_when_its_edge_is_revoked_gets_403(control: Control, tmp_path: Path) -> None:
    """Revoking an edge changes the map (it leaves it), which wakes that edge's own waiting
    long-poll: the poll must refuse it, not hand it the new map."""
    edge_id, name, _, edge = _edge(control, tmp_path / "edge")
    _beat(control, edge, [])
    status, presence, _ = control.node(edge, "GET", PRESENCE)
    assert status == 200 and _entry(presence, name) is not None
    answers: list[Reply] = []
    waiting = threading.Thread(target=lambda: answers.append(
        control.node(edge, "GET", f"{PRESENCE}?after={presence['tag']}&wait=20")), daemon=True)
    waiting.start()
    time.sleep(0.3)
    assert waiting.is_alive()
    status, body, _ = control.admin("POST", "/v1/revocations", {"node_type": "edge", "node_id": edge_id})
    assert status in (200, 201), body
    waiting.join(10)
    assert answers, "the long-poll did not end"
    status, body, _ = answers[0]
    assert status == 403 and "is revoked" in json.dumps(body), body


def test_only_edges_report_connectors_and_read_the_map(control: Control, tmp_path: Path) -> None:
    identity = control.register_node(tmp_path / "connector", "connector")
    connector = NodeSigner(identity.cert, identity.key)
    status, body, _ = control.node(connector, "POST", HEARTBEAT, {"connectors": [{"name": "x", "group": "g"}]})
    assert status == 400 and "only edges report the connectors they hold tunnels to" in json.dumps(body)
    status, body, _ = control.node(connector, "GET", PRESENCE)
    assert status == 403 and "only edges follow the presence map" in json.dumps(body)
    _, _, _, edge = _edge(control, tmp_path / "edge")
    status, body, _ = control.node(edge, "POST", HEARTBEAT, {"connectors": [{"name": "", "group": "g"}]})
    assert status == 400, body


def test_waiting_requests_share_their_reads_of_the_map(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every waiting presence long-poll re-read and decoded the whole map each second, so one edge
    opening many of them made that the control plane's whole work: the requests of a process now
    share one read, reused for half a RECHECK unless a heartbeat changed the map."""
    import asyncio

    from control.api import presence as presence_api
    from dataplane.contract.presence import Presence

    reads: list[float] = []

    def counting_read(api: object) -> Presence:
        reads.append(time.monotonic())
        time.sleep(0.05)  # a read of a large map takes a while: requests arriving meanwhile share it
        return Presence(tag=f"t{len(reads)}", edges=[])

    monkeypatch.setattr(presence_api, "_read", counting_read)

    async def main() -> None:
        waiters = presence_api.PresenceWaiters()
        api = types.SimpleNamespace(hub=types.SimpleNamespace(current=types.SimpleNamespace(version=7)))
        maps = await asyncio.gather(*(waiters.current(api) for _ in range(200)))  # type: ignore[arg-type]
        assert len(reads) == 1 and {m.tag for m in maps} == {"t1"}
        assert (await waiters.current(api)).tag == "t1"  # type: ignore[arg-type]  # reused
        assert len(reads) == 1
        waiters.wake()  # a heartbeat changed the map: read again at once
        assert (await waiters.current(api)).tag == "t2"  # type: ignore[arg-type]
        api.hub.current.version = 8  # a configuration change (a revocation): read again at once
        assert (await waiters.current(api)).tag == "t3"  # type: ignore[arg-type]
        await asyncio.sleep(presence_api.RECHECK / 2 + 0.05)  # stale: read again
        assert (await waiters.current(api)).tag == "t4"  # type: ignore[arg-type]
        assert len(reads) == 4

    asyncio.run(main())
