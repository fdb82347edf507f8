"""Tests of the configuration snapshot: compiling it from a real (SQLite) store
(control/snapshot.py), its encoding and use at the edge (dataplane/snapshot.py: segment
matching with per-app before quick access, revocations), the on-disk cache a node restarts
from, and the long-poll hub that hands new versions to waiting nodes."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from control.store.audit import list_audit
from control.snapshot import SnapshotHub, TooManyWaiters, build_from_store, build_snapshot, follow_store, refresh
from control.store import (
    Store,
    admin_keys,
    applications,
    assignments,
    certificates,
    config_version,
    connector_groups,
    dns_suffixes,
    named_locations,
    nodes,
    open_store,
    policies,
)
from dataplane.access.apptable import AppTable
from dataplane.access.apptable import app_table
from dataplane.contract.snapshot import (
    ConfigSnapshot,
    SnapApp,
    SnapGroup,
    SnapSegment,
    SnapshotError,
    decode,
    encode,
    is_revoked,
    revoked_set,
)
from dataplane.controllink.snapshot_cache import SnapshotCache

pytestmark = pytest.mark.timeout(60)

ACTOR = "admin-key:tests"
EDGES = ["edge-a.example:8443", "edge-b.example:8443"]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(f"sqlite:///{tmp_path / 'data' / 'control.db'}") as opened:
        yield opened


def seg(destination: str, ports: Any = "1-65535", protocol: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"destination": destination, "ports": ports}
    if protocol is not None:
        out["protocol"] = protocol
    return out


def populate(store: Store) -> None:
    """Per-app apps (created out of name order), a quick access app whose name sorts first,
    an app without segments, groups, DNS suffixes and revocations."""
    with store.begin() as session:
        connector_groups.create_group(session, ACTOR, "branch", region="eu-west")
        applications.create_application(session, ACTOR, "all-private", kind="quick_access", segments=[
            seg("10.0.0.0/8"), seg("*.corp.example"), seg("10.1.1.5", "3389"), seg("10.9.0.53", "53", "udp"),
        ])
        applications.create_application(session, ACTOR, "rdp", connector_group="branch", segments=[
            seg("10.1.1.0/24", "3389"), seg("rdp.corp.example", "3389"),
        ])
        applications.create_application(session, ACTOR, "intranet", segments=[
            seg("*.intra.corp.example", "443,80"), seg("10.2.0.0/16", "8000-8100,22"),
        ])
        applications.create_application(session, ACTOR, "placeholder")
        dns_suffixes.add_dns_suffix(session, ACTOR, "corp.example")
        dns_suffixes.add_dns_suffix(session, ACTOR, ".branch.example")
        certificates.revoke_certificate(session, ACTOR, 0xBEEF, reason="lost laptop")
        certificates.revoke_certificate(session, ACTOR, 0x1F)


def snapshot_of(store: Store) -> ConfigSnapshot:
    return build_from_store(store, edges=EDGES)


def app_of(table: AppTable, host: str, port: int, protocol: str = "tcp") -> str | None:
    found = table.match(host, port, protocol)
    return found.app.name if found else None


# ---------------------------------------------------------------------------- building from the store


def test_build_from_a_store_gives_every_field_sorted(store: Store) -> None:
    populate(store)
    with store.read() as session:
        version = config_version.config_version(session)
        snap = build_snapshot(session, edges=EDGES)
    assert version == 9  # 1 group + 4 applications + 2 DNS suffixes + 2 revocations
    assert snap.version == version
    assert snap.issued_at.endswith("Z") and snap.issued_at.startswith("20")
    assert [(a.name, a.kind, a.connector_group) for a in snap.applications] == [
        ("all-private", "quick_access", "default"),
        ("intranet", "per_app", "default"),
        ("placeholder", "per_app", "default"),
        ("rdp", "per_app", "branch"),
    ]
    intranet = snap.applications[1]
    assert intranet.segments == [
        SnapSegment(destination="*.intra.corp.example", ports="80,443", protocol="tcp"),
        SnapSegment(destination="10.2.0.0/16", ports="22,8000-8100", protocol="tcp"),
    ]
    assert [(s.destination, s.ports, s.protocol) for s in snap.applications[0].segments] == [
        ("*.corp.example", "1-65535", "tcp"), ("10.0.0.0/8", "1-65535", "tcp"), ("10.1.1.5", "3389", "tcp"),
        ("10.9.0.53", "53", "udp"),
    ]
    assert snap.applications[2].segments == []
    assert snap.groups == [SnapGroup(name="branch", region="eu-west"), SnapGroup(name="default", region="")]
    assert snap.dns_suffixes == ["branch.example", "corp.example"]
    assert snap.revoked_serials == ["1f", "beef"]
    assert snap.edges == ["edge-a.example:8443", "edge-b.example:8443"]


def test_equal_configurations_encode_to_equal_bytes(store: Store) -> None:
    populate(store)
    first, second = snapshot_of(store), snapshot_of(store)
    assert first is not second
    assert encode(first) == encode(second)
    assert decode(encode(first)) == first
    # Edges keep the order given (nodes dial them in that order).
    assert build_from_store(store, edges=list(reversed(EDGES))).edges == list(reversed(EDGES))


def test_registered_edges_follow_the_public_ones_until_revoked(store: Store) -> None:
    not_after = datetime(2031, 1, 1, tzinfo=UTC)
    with store.begin() as session:
        edge = nodes.add_edge(session, ACTOR, "edge-r", "edge-r.example:8443", cert_serial=0xE1,
                              cert_not_after=not_after)
        nodes.add_edge(session, ACTOR, "edge-dup", EDGES[0], cert_serial=0xE2, cert_not_after=not_after)
    assert snapshot_of(store).edges == [*EDGES, "edge-r.example:8443"]
    with store.begin() as session:
        nodes.revoke_node(session, ACTOR, "edge", edge.id)
    snap = snapshot_of(store)
    assert snap.edges == EDGES and "e1" in snap.revoked_serials


def test_a_store_change_bumps_the_version_and_changes_the_snapshot(store: Store) -> None:
    populate(store)
    before = snapshot_of(store)
    with store.begin() as session:
        applications.add_segment(session, ACTOR, "intranet", seg("db.corp.example", "5432"))
    after = snapshot_of(store)
    assert after.version == before.version + 1
    assert after.issued_at >= before.issued_at
    assert encode(after) != encode(before)
    assert app_of(app_table(before), "db.corp.example", 5432) == "all-private"
    assert app_of(app_table(after), "db.corp.example", 5432) == "intranet"
    # A change that is not configuration (an admin key) leaves the snapshot alone.
    with store.begin() as session:
        admin_keys.create_admin_key(session, ACTOR, "ops")
    assert encode(snapshot_of(store)) == encode(after)


def test_a_new_store_gives_an_empty_snapshot_of_version_zero(store: Store) -> None:
    snap = build_from_store(store, edges=[])
    assert (snap.version, snap.applications, snap.dns_suffixes, snap.revoked_serials, snap.edges) == (0, [], [], [], [])
    assert snap.groups == [SnapGroup(name="default", region="")]
    assert app_table(snap).match("10.0.0.1", 22) is None


# ---------------------------------------------------------------------------- matching at the edge


def test_per_app_beats_quick_access_and_quick_access_catches_the_rest(store: Store) -> None:
    populate(store)
    table = app_table(snapshot_of(store))
    # "all-private" (quick access) sorts before "rdp" by name and covers 10.1.1.0/24 too.
    assert app_of(table, "10.1.1.7", 3389) == "rdp"
    # ... even where quick access names a narrower destination (a single address).
    assert app_of(table, "10.1.1.5", 3389) == "rdp"
    assert app_of(table, "rdp.corp.example", 3389) == "rdp"
    assert app_of(table, "git.intra.corp.example", 443) == "intranet"
    assert app_of(table, "10.2.3.4", 8050) == "intranet"
    # Quick access catches what no per-app segment covers.
    assert app_of(table, "10.1.1.7", 22) == "all-private"
    assert app_of(table, "10.2.3.4", 443) == "all-private"
    assert app_of(table, "rdp.corp.example", 443) == "all-private"
    assert app_of(table, "10.9.0.53", 53, "udp") == "all-private"
    # Nothing covers these.
    assert app_of(table, "192.168.1.1", 22) is None
    assert app_of(table, "www.example.com", 443) is None
    assert app_of(table, "10.1.1.7", 3389, "udp") is None
    # Applications without segments are left out; the rest keep their connector group.
    assert sorted(a.name for a in table.apps) == ["all-private", "intranet", "rdp"]
    assert table.groups() == {"default", "branch"}
    assert table.match("10.1.1.7", 3389).app.connector_group == "branch"  # type: ignore[union-attr]


def test_per_app_wins_over_an_identical_quick_access_segment() -> None:
    identical = [SnapSegment(destination="10.5.0.0/16", ports="22", protocol="tcp"),
                 SnapSegment(destination="ssh.corp.example", ports="22", protocol="tcp")]
    snap = ConfigSnapshot(version=3, issued_at="2030-01-01T00:00:00.000000Z", applications=[
        SnapApp(name="a-quick", kind="quick_access", connector_group="default", segments=list(identical)),
        SnapApp(name="b-ssh", kind="per_app", connector_group="default", segments=list(identical)),
    ])
    table = app_table(snap)
    assert app_of(table, "10.5.1.1", 22) == "b-ssh"
    assert app_of(table, "SSH.corp.example.", 22) == "b-ssh"
    # The same two applications in one plain table, in name order, go the other way.
    plain = AppTable.from_obj({"apps": [
        {"name": a.name, "segments": [{"destination": s.destination, "ports": s.ports} for s in a.segments]}
        for a in snap.applications]})
    assert app_of(plain, "10.5.1.1", 22) == "a-quick"


def test_invalid_segments_in_a_snapshot_are_reported() -> None:
    snap = ConfigSnapshot(version=9, issued_at="2030-01-01T00:00:00.000000Z", applications=[
        SnapApp(name="web", kind="per_app", connector_group="default",
                segments=[SnapSegment(destination="10.0.0.1/8", ports="443")]),
    ])
    with pytest.raises(SnapshotError) as info:
        app_table(snap)
    assert str(info.value) == "snapshot version 9: app 'web' segment 1: '10.0.0.1/8' has host bits set"


# ---------------------------------------------------------------------------- revocations


def test_connectors_are_listed_with_their_group_and_usable_certificates(store: Store) -> None:
    """What edges file connector tunnels by: the group each connector was registered into, keyed by
    its certificates; a connector's renewal is a configuration change (edges must learn the new serial)."""
    soon = datetime(2099, 1, 1, tzinfo=UTC)
    with store.begin() as session:
        connector_groups.create_group(session, ACTOR, "lab")
        lab = nodes.add_connector(session, ACTOR, "lab-1", group="lab", cert_serial=0xA1, cert_not_after=soon)
        other = nodes.add_connector(session, ACTOR, "prod-1", cert_serial=0xB1, cert_not_after=soon)
        nodes.add_connector(session, ACTOR, "gone-1", cert_serial=0xC1, cert_not_after=soon)
        nodes.add_connector(session, ACTOR, "expired-1", cert_serial=0xD1,
                            cert_not_after=datetime(2001, 1, 1, tzinfo=UTC))
        nodes.add_edge(session, ACTOR, "edge-1", "edge-1.example:8443", cert_serial=0xE1, cert_not_after=soon)
        lab_id, other_id = lab.id, other.id
    with store.begin() as session:
        gone = [c for c in nodes.list_connectors(session) if c.name == "gone-1"][0]
        nodes.revoke_node(session, ACTOR, "connector", gone.id)
    before = snapshot_of(store)
    assert [(c.name, c.group, c.serials) for c in before.connectors] == [
        ("lab-1", "lab", ["a1"]), ("prod-1", "default", ["b1"])]  # no edge, nothing revoked or expired
    with store.begin() as session:
        nodes.renew_certificate(session, nodes.get_connector(session, lab_id), 0x1A2, soon)
    after = snapshot_of(store)
    assert after.version == before.version + 1
    assert [(c.id, c.serials) for c in after.connectors] == [(lab_id, ["a1", "1a2"]), (other_id, ["b1"])]
    assert decode(encode(after)).connectors == after.connectors


def test_a_certificate_superseded_longer_than_the_grace_is_revoked_by_the_control_plane(store: Store) -> None:
    soon = datetime(2099, 1, 1, tzinfo=UTC)
    start = datetime.now(UTC)
    with store.begin() as session:
        lab_id = nodes.add_connector(session, ACTOR, "lab-1", cert_serial=0xA1, cert_not_after=soon).id
        edge_id = nodes.add_edge(session, ACTOR, "edge-1", "edge-1.example:8443", cert_serial=0xE1,
                                 cert_not_after=datetime(2001, 1, 1, tzinfo=UTC)).id
        nodes.renew_certificate(session, nodes.get_connector(session, lab_id), 0xA2, soon, start + timedelta(minutes=1))
        nodes.renew_certificate(session, nodes.get_edge(session, edge_id), 0xE2, soon, start + timedelta(minutes=1))
        certificates.mark_used(session, 0xA2, start + timedelta(minutes=2))
        certificates.mark_used(session, 0xE2, start + timedelta(minutes=2))
    assert [c.serials for c in snapshot_of(store).connectors] == [["a1", "a2"]]
    with store.begin() as session:
        # a2 in use for a day and an hour; e1 expired long before it was replaced (nothing to revoke).
        assert certificates.retire_superseded(session, timedelta(days=1), start + timedelta(days=1, hours=1)) == ["a1"]
    snap = snapshot_of(store)
    assert [c.serials for c in snap.connectors] == [["a2"]]  # the current one stays
    assert is_revoked(snap, 0xA1) and not is_revoked(snap, 0xA2) and not is_revoked(snap, 0xE1)
    with store.read() as session:
        (record,) = [r for r in list_audit(session, object_type="certificate") if r.object_id == "a1"]
    assert record.actor == "control-plane" and record.action == "certificate.revoke"


def test_the_control_planes_retirement_task_revokes_what_the_grace_let_pass(store: Store) -> None:
    from control.api.nodes import certificate_retirement

    soon, now = datetime(2099, 1, 1, tzinfo=UTC), datetime.now(UTC)
    with store.begin() as session:
        node = nodes.add_connector(session, ACTOR, "lab-1")
        certificates.record_certificate(session, "connector", node.id, 0xA1, soon, now - timedelta(hours=3))
        nodes.renew_certificate(session, node, 0xA2, soon, now - timedelta(hours=2))
        other = nodes.add_connector(session, ACTOR, "lab-2", cert_serial=0xB1, cert_not_after=soon)
        nodes.renew_certificate(session, other, 0xB2, soon, now - timedelta(hours=2))
        certificates.mark_used(session, 0xA2, now - timedelta(hours=2))
        certificates.mark_used(session, 0xB2, now - timedelta(minutes=30))

    async def sweep_a_while() -> None:
        task = asyncio.create_task(certificate_retirement(store, grace=3600.0, interval=0.05))
        await asyncio.sleep(0.5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(sweep_a_while())
    with store.read() as session:
        assert certificates.revoked_serials(session) == {"a1"}  # lab-2 has used b2 for 30 minutes only


def test_revocations_of_node_certificates_long_expired_are_no_longer_listed(store: Store) -> None:
    soon, start = datetime(2099, 1, 1, tzinfo=UTC), datetime.now(UTC)
    with store.begin() as session:
        node = nodes.add_connector(session, ACTOR, "lab-1", cert_serial=0xD1, cert_not_after=start + timedelta(days=1))
        nodes.renew_certificate(session, node, 0xD2, soon, start)
        certificates.mark_used(session, 0xD2, start)
        assert certificates.retire_superseded(session, timedelta(hours=1), start + timedelta(hours=2)) == ["d1"]
        late = nodes.add_connector(session, ACTOR, "late-1", cert_serial=0xE1,
                                   cert_not_after=datetime(2001, 1, 1, tzinfo=UTC))
        nodes.revoke_node(session, ACTOR, "connector", late.id)  # revoked long after it expired
        certificates.revoke_certificate(session, ACTOR, 0xBEEF)  # no node's: a device's, say
    with store.read() as session:
        listed = certificates.listed_revocations
        assert listed(session, start + timedelta(days=2)) == ["d1", "e1", "beef"]  # expired a day ago: still
        assert listed(session, start + timedelta(days=9)) == ["e1", "beef"]  # revoked while valid, long expired
    assert snapshot_of(store).revoked_serials == ["d1", "e1", "beef"]


def test_is_revoked(store: Store) -> None:
    populate(store)
    snap = decode(encode(snapshot_of(store)))
    assert is_revoked(snap, 0xBEEF) and is_revoked(snap, 31)
    assert not is_revoked(snap, 0xBEEE) and not is_revoked(snap, 0x1F0)
    assert revoked_set(snap) is revoked_set(snap)  # computed once per snapshot
    assert b"_revoked" not in encode(snap)  # the cache is never sent or stored
    with store.begin() as session:
        certificates.revoke_certificate(session, ACTOR, 0xBEEE)
    assert is_revoked(snapshot_of(store), 0xBEEE)
    assert not is_revoked(ConfigSnapshot(version=0, issued_at=""), 1)


# ---------------------------------------------------------------------------- encoding errors


@pytest.mark.parametrize(("data", "message"), [
    (b"", "configuration snapshot is not valid JSON: Input data was truncated"),
    (b"{not json", "configuration snapshot is not valid JSON: "),
    (b'{"version": "7", "issued_at": ""}', "invalid configuration snapshot: Expected `int`, got `str` - at `$.version`"),
    (b'{"issued_at": ""}', "invalid configuration snapshot: Object missing required field `version`"),
    (b'{"version": -1, "issued_at": ""}', "invalid configuration snapshot: Expected `int` >= 0 - at `$.version`"),
    (b'{"version": 1, "issued_at": "", "applications": [{"name": "x", "kind": "vpn", "connector_group": "d"}]}',
     "invalid configuration snapshot: Invalid enum value 'vpn' - at `$.applications[0].kind`"),
    (b'{"version": 1, "issued_at": "", "revoked_serials": ["xyz"]}',
     "invalid configuration snapshot: Expected `str` matching regex '^[0-9a-fA-F]{1,64}$' - at `$.revoked_serials[0]`"),
])
def test_decode_errors_say_what_is_wrong(data: bytes, message: str) -> None:
    with pytest.raises(SnapshotError) as info:
        decode(data)
    assert str(info.value).startswith(message)


def test_unknown_fields_from_a_newer_control_plane_are_ignored() -> None:
    snap = decode(b'{"version": 4, "issued_at": "t", "posture_checks": [1, 2], "edges": ["e:1"]}')
    assert (snap.version, snap.edges, snap.applications) == (4, ["e:1"], [])


# ---------------------------------------------------------------------------- the on-disk cache


def test_cache_round_trip_mode_and_node_restart(store: Store, tmp_path: Path) -> None:
    populate(store)
    snap = snapshot_of(store)
    path = tmp_path / "node" / "state" / "snapshot.json"
    cache = SnapshotCache(path)
    assert cache.load() is None
    assert cache.save(snap) is True
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["snapshot.json", "snapshot.json.lock"]
    # A node restarted while the control plane is down forwards with what it saved.
    restarted = SnapshotCache(str(path)).load()
    assert restarted == snap
    assert restarted is not None and app_of(app_table(restarted), "10.1.1.7", 3389) == "rdp"
    assert is_revoked(restarted, 0xBEEF)


def test_cache_keeps_the_newest_version(tmp_path: Path) -> None:
    path = tmp_path / "snapshot.json"
    cache = SnapshotCache(path)

    def snap(version: int, edge: str) -> ConfigSnapshot:
        return ConfigSnapshot(version=version, issued_at="2030-01-01T00:00:00.000000Z", edges=[edge])

    assert cache.save(snap(5, "five:1"))
    assert cache.save(snap(4, "four:1")) is False  # older: refused
    assert cache.save(snap(5, "other:1")) is False  # same version: refused
    assert cache.load() == snap(5, "five:1")
    assert cache.save(snap(6, "six:1")) is True
    assert SnapshotCache(path).load() == snap(6, "six:1")
    assert cache.stored_version() == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snapshot.json", "snapshot.json.lock"]  # no temp files


def test_a_corrupt_cache_is_reported_with_its_path_and_replaced_by_the_next_save(tmp_path: Path) -> None:
    path = tmp_path / "snapshot.json"
    path.write_bytes(b'{"version": 12, "issued_at": "2030-01-01T00:00:00.000000Z", "applications": [')
    cache = SnapshotCache(path)
    with pytest.raises(SnapshotError) as info:
        cache.load()
    assert str(info.value).startswith(f"snapshot cache {path} is corrupt: configuration snapshot is not valid JSON")
    assert cache.stored_version() is None
    assert cache.save(ConfigSnapshot(version=1, issued_at="t")) is True
    assert cache.load() == ConfigSnapshot(version=1, issued_at="t")
    path.write_bytes(b'{"version": 2}')
    with pytest.raises(SnapshotError, match=r"is corrupt: invalid configuration snapshot: Object missing required "
                                            r"field `issued_at`"):
        cache.load()


def test_an_unreadable_cache_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "snapshot.json"
    path.mkdir()
    with pytest.raises(SnapshotError) as info:
        SnapshotCache(path).load()
    assert str(info.value) == f"cannot read snapshot cache {path}: Is a directory"


# ---------------------------------------------------------------------------- the long-poll hub


def snap_v(version: int) -> ConfigSnapshot:
    return ConfigSnapshot(version=version, issued_at=f"v{version}")


def test_a_waiter_is_released_within_100ms_of_a_publish() -> None:
    async def main() -> None:
        hub = SnapshotHub(snap_v(1))
        released: list[tuple[float, ConfigSnapshot | None]] = []

        async def node() -> None:
            got = await hub.wait_newer(1, timeout=10)
            released.append((time.monotonic(), got))

        waiters = [asyncio.create_task(node()) for _ in range(50)]
        await asyncio.sleep(0.2)
        assert hub.waiters == 50 and released == []
        hub.publish(snap_v(1))  # not newer: ignored, nobody released
        await asyncio.sleep(0.05)
        assert released == [] and hub.current == snap_v(1)
        published = time.monotonic()
        assert hub.publish(snap_v(2)) is True
        await asyncio.wait_for(asyncio.gather(*waiters), 1)
        assert len(released) == 50
        assert all(got == snap_v(2) for _, got in released)
        assert max(at for at, _ in released) - published < 0.1
        assert hub.waiters == 0
        assert hub.encoded == encode(snap_v(2))

    asyncio.run(main())


def test_wait_newer_times_out_with_none_and_returns_at_once_when_behind() -> None:
    async def main() -> None:
        hub = SnapshotHub()
        start = time.monotonic()
        assert await hub.wait_newer(-1, timeout=0.2) is None  # nothing published yet
        assert 0.2 <= time.monotonic() - start < 1.0
        hub.publish(snap_v(7))
        start = time.monotonic()
        assert await hub.wait_newer(-1, timeout=10) == snap_v(7)  # a node holding nothing
        assert await hub.wait_newer(3, timeout=10) == snap_v(7)  # a node that is behind
        assert time.monotonic() - start < 0.1
        start = time.monotonic()
        assert await hub.wait_newer(7, timeout=0.1) is None  # up to date: waits, then None
        assert await hub.wait_newer(7, timeout=0) is None
        assert 0.1 <= time.monotonic() - start < 1.0
        assert hub.waiters == 0

    asyncio.run(main())


def test_a_node_ahead_of_a_publish_keeps_waiting() -> None:
    async def main() -> None:
        hub = SnapshotHub(snap_v(3))
        waiter = asyncio.create_task(hub.wait_newer(5, timeout=10))
        await asyncio.sleep(0.05)
        hub.publish(snap_v(4))
        await asyncio.sleep(0.05)
        assert not waiter.done() and hub.waiters == 1
        hub.publish(snap_v(6))
        assert await asyncio.wait_for(waiter, 1) == snap_v(6)

    asyncio.run(main())


def test_waiters_beyond_the_limit_are_refused() -> None:
    async def main() -> None:
        hub = SnapshotHub(snap_v(1), max_waiters=3)
        waiters = [asyncio.create_task(hub.wait_newer(1, timeout=10)) for _ in range(3)]
        await asyncio.sleep(0.05)
        with pytest.raises(TooManyWaiters) as info:
            await hub.wait_newer(1, timeout=10)
        assert str(info.value) == ("3 nodes are already waiting for a configuration change, the most this control "
                                   "plane accepts (max_waiters); retry later")
        assert await hub.wait_newer(0, timeout=10) == snap_v(1)  # a node that is behind needs no wait
        waiters[0].cancel()  # a node that hangs up frees its place
        await asyncio.gather(waiters[0], return_exceptions=True)
        assert hub.waiters == 2
        extra = asyncio.create_task(hub.wait_newer(1, timeout=10))
        await asyncio.sleep(0.05)
        assert hub.waiters == 3
        hub.close()  # shutdown releases everyone with None
        assert await asyncio.wait_for(asyncio.gather(*waiters[1:], extra), 1) == [None, None, None]
        assert await hub.wait_newer(1, timeout=10) is None
        assert hub.waiters == 0

    asyncio.run(main())
    with pytest.raises(ValueError, match="max_waiters must be at least 1, not 0"):
        SnapshotHub(max_waiters=0)


def test_a_store_change_reaches_a_waiting_node_within_2_seconds(store: Store) -> None:
    populate(store)

    async def main() -> None:
        hub = SnapshotHub()
        assert await refresh(store, hub, edges=EDGES) is True
        assert await refresh(store, hub, edges=EDGES) is False  # same version: nothing new
        held = hub.current
        assert held is not None
        follower = asyncio.create_task(follow_store(store, hub, edges=EDGES, interval=0.1))
        try:
            node = asyncio.create_task(hub.wait_newer(held.version, timeout=10))
            await asyncio.sleep(0.3)
            assert not node.done()

            def change() -> None:
                with store.begin() as session:
                    applications.create_application(session, ACTOR, "db", segments=[seg("db.corp.example", "5432")])

            await asyncio.to_thread(change)
            changed = time.monotonic()
            got = await asyncio.wait_for(node, 10)
            assert time.monotonic() - changed < 2.0
            assert got is not None and got.version == held.version + 1
            assert got == build_from_store(store, edges=EDGES)
            assert app_of(app_table(got), "db.corp.example", 5432) == "db"
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)

    asyncio.run(main())


# ---------------------------------------------------------------------------- identity and conditional access


JWKS = [{"kty": "OKP", "crv": "Ed25519", "x": "bbbb", "kid": "key-2", "use": "sig"},
        {"kty": "OKP", "crv": "Ed25519", "x": "aaaa", "kid": "key-1", "use": "sig"}]
ISSUER = "https://control.corp.example"


def populate_access(store: Store) -> dict[str, str]:
    """Users (created out of UPN order), groups, devices, sessions, locations, assignments and
    policies on top of ``populate``; returns the ids by name."""
    from datetime import timedelta

    from control.store.models import Device, GroupMember, SignInSession, User, UserGroup, utcnow

    populate(store)
    now = utcnow()
    ids = {"carol": "u-3", "alice": "u-1", "bob": "u-2", "staff": "g-2", "admins": "g-1"}
    with store.begin() as session:
        for name, user_id, risk, disabled in (("carol", "u-3", "none", True), ("alice", "u-1", "none", False),
                                              ("bob", "u-2", "high", False)):
            session.add(User(id=user_id, upn=f"{name}@corp.example", display_name=name.title(), disabled=disabled,
                             risk_level=risk, totp_enabled=False, created_at=now, updated_at=now))
        session.add_all([UserGroup(id="g-2", name="staff", created_at=now),
                         UserGroup(id="g-1", name="admins", created_at=now)])
        session.flush()
        session.add_all([GroupMember(group_id="g-2", user_id="u-2"), GroupMember(group_id="g-1", user_id="u-2"),
                         GroupMember(group_id="g-2", user_id="u-1")])
        session.add_all([
            Device(id="d-b", user_id="u-2", name="bob-laptop", os="Linux", os_version="6.8", compliant=False,
                   created_at=now),
            Device(id="d-a", user_id="u-1", name="alice-laptop", os="Windows", os_version="11", compliant=True,
                   created_at=now),
            Device(id="d-old", user_id="u-1", name="lost", os="Windows", os_version="10", compliant=True,
                   created_at=now, revoked_at=now),
        ])
        session.flush()
        for sid, revoked in (("s-live", None), ("s-gone-2", now), ("s-gone-1", now)):
            session.add(SignInSession(id=sid, user_id="u-1", device_id="d-a", amr="pwd", auth_time=now,
                                      created_at=now, expires_at=now + timedelta(hours=8),
                                      refresh_hash=sid.ljust(64, "0"), revoked_at=revoked))
        session.flush()
        named_locations.create_location(session, ACTOR, "office", ["198.51.100.0/24", "2001:db8::/32"])
        named_locations.create_location(session, ACTOR, "branch", ["192.0.2.0/24"])
        assignments.assign_application(session, ACTOR, "rdp", group="staff")
        assignments.assign_application(session, ACTOR, "rdp", user="carol@corp.example")
        assignments.assign_application(session, ACTOR, "rdp", user="alice@corp.example")
        assignments.assign_application(session, ACTOR, "intranet", group="admins")
        policies.create_policy(session, ACTOR, "zz-mfa-rdp", grant="require_mfa", applications=["rdp", "intranet"],
                               groups=["staff"], users=["bob@corp.example", "alice@corp.example"],
                               conditions={"locations": ["office", "branch"], "signin_older_than": 3600})
        policies.create_policy(session, ACTOR, "aa-block-risky", grant="block", state="report_only",
                               conditions={"user_risk_at_least": "high", "device_os": ["Linux", "ChromeOS"]})
    return ids


def test_identity_and_access_are_compiled_sorted(store: Store) -> None:
    from dataplane.contract.snapshot import SnapConditions, SnapDevice, SnapLocation, SnapPolicy, SnapUser

    populate_access(store)
    with store.read() as session:
        snap = build_snapshot(session, edges=EDGES, token_keys=JWKS, token_issuer=ISSUER)
    assert snap.users == [
        SnapUser(id="u-1", upn="alice@corp.example", groups=["g-2"], disabled=False, risk="none"),
        SnapUser(id="u-2", upn="bob@corp.example", groups=["g-1", "g-2"], disabled=False, risk="high"),
        SnapUser(id="u-3", upn="carol@corp.example", groups=[], disabled=True, risk="none"),
    ]
    assert snap.devices == [
        SnapDevice(id="d-a", user_id="u-1", os="Windows", os_version="11", compliant=True, revoked=False),
        SnapDevice(id="d-b", user_id="u-2", os="Linux", os_version="6.8", compliant=False, revoked=False),
        SnapDevice(id="d-old", user_id="u-1", os="Windows", os_version="10", compliant=True, revoked=True),
    ]
    assert snap.revoked_sessions == ["s-gone-1", "s-gone-2"]
    assert snap.locations == [SnapLocation(name="branch", cidrs=["192.0.2.0/24"]),
                              SnapLocation(name="office", cidrs=["198.51.100.0/24", "2001:db8::/32"])]
    # Policies by id (creation order), application ids turned into names, targets sorted.
    assert snap.policies == [
        SnapPolicy(id=1, name="zz-mfa-rdp", state="on", grant="require_mfa", applications=["intranet", "rdp"],
                   users=["u-1", "u-2"], groups=["g-2"],
                   conditions=SnapConditions(locations=["office", "branch"], signin_older_than=3600)),
        SnapPolicy(id=2, name="aa-block-risky", state="report_only", grant="block",
                   conditions=SnapConditions(device_os=["Linux", "ChromeOS"], user_risk_at_least="high")),
    ]
    assigned = {a.name: (a.users, a.groups) for a in snap.applications}
    assert assigned == {"all-private": ([], []), "intranet": ([], ["g-1"]), "placeholder": ([], []),
                        "rdp": (["u-1", "u-3"], ["g-2"])}
    assert [k["kid"] for k in snap.token_keys] == ["key-1", "key-2"] and snap.token_keys[1] == JWKS[0]
    assert snap.token_issuer == ISSUER


def test_access_snapshots_are_deterministic(store: Store) -> None:
    populate_access(store)
    first = build_from_store(store, edges=EDGES, token_keys=JWKS, token_issuer=ISSUER)
    second = build_from_store(store, edges=EDGES, token_keys=list(reversed(JWKS)), token_issuer=ISSUER)
    assert encode(first) == encode(second)
    assert decode(encode(first)) == first
    # Without keys (current callers), the access fields are still there, the key fields empty.
    bare = build_from_store(store, edges=EDGES)
    assert (bare.token_keys, bare.token_issuer) == ([], "")
    assert (bare.users, bare.policies) == (first.users, first.policies)
    with open_store_like(store) as other:
        empty = build_from_store(other, edges=[])
    assert (empty.users, empty.devices, empty.locations, empty.policies, empty.revoked_sessions) == ([], [], [], [], [])


def open_store_like(store: Store) -> Store:
    """A new, empty store next to ``store``'s database file."""
    path = Path(store.engine.url.database or "").parent / "empty.db"
    return open_store(f"sqlite:///{path}")


def test_policy_targets_follow_renames_and_deleted_targets_never_widen_a_policy(store: Store) -> None:
    from control.store.models import User, UserGroup

    populate_access(store)
    with store.begin() as session:
        applications.update_application(session, ACTOR, "rdp", new_name="rdp-finance")
        policies.create_policy(session, ACTOR, "only-carol", grant="block", users=["carol@corp.example"])
        policies.create_policy(session, ACTOR, "admins-or-carol", grant="block", users=["carol@corp.example"],
                               groups=["admins"])
    before = snapshot_of(store)
    assert before.policies[0].applications == ["intranet", "rdp-finance"]
    assert [a.name for a in before.applications if a.users] == ["rdp-finance"]
    # Deleting users and groups (identity side) leaves dangling ids in the stored policy.
    with store.begin() as session:
        session.delete(session.get(User, "u-3"))
        session.delete(session.get(UserGroup, "g-1"))
        connector_groups.create_group(session, ACTOR, "bump")  # a configuration change, for a new version
    after = snapshot_of(store)
    names = [p.name for p in after.policies]
    assert "only-carol" not in names and "admins-or-carol" not in names  # they target nobody now, not everyone
    assert names == ["zz-mfa-rdp", "aa-block-risky"]
    rdp = next(a for a in after.applications if a.name == "rdp-finance")
    assert (rdp.users, rdp.groups) == (["u-1"], ["g-2"])  # assignments went with the user (foreign key cascade)


def test_the_edge_decides_from_a_compiled_snapshot(store: Store) -> None:
    from dataplane.access.policy import AccessIndex, Principal

    populate_access(store)
    index = AccessIndex(build_from_store(store, edges=EDGES, token_keys=JWKS, token_issuer=ISSUER))
    now = 2_000_000_000

    def who(user: str, upn: str, device: str, amr: tuple[str, ...] = ("pwd",), age: int = 7200) -> Principal:
        return Principal(user_id=user, upn=upn, session_id="s-live", device_id=device, amr=amr, auth_time=now - age,
                         expires=now + 600)

    alice = who("u-1", "alice@corp.example", "d-a")
    assert index.decide(alice, "rdp", "192.0.2.10:50000", now).code == "mfa_required"  # branch, old sign-in
    assert index.decide(alice, "rdp", "203.0.113.9:50000", now).allowed  # not from a named location
    assert index.decide(who("u-1", "alice@corp.example", "d-a", ("pwd", "mfa")), "rdp", "192.0.2.10:1", now).allowed
    assert index.decide(alice, "intranet", "203.0.113.9:1", now).code == "not_assigned"
    bob = index.decide(who("u-2", "bob@corp.example", "d-b"), "intranet", "203.0.113.9:1", now)
    assert bob.allowed and [r.policy for r in bob.report] == ["aa-block-risky"]  # report-only: logged, not denied


def test_refresh_and_follow_store_pass_the_token_keys(store: Store) -> None:
    populate(store)

    async def main() -> None:
        hub = SnapshotHub()
        assert await refresh(store, hub, edges=EDGES, token_keys=JWKS, token_issuer=ISSUER)
        assert hub.current is not None and hub.current.token_issuer == ISSUER
        assert [k["kid"] for k in hub.current.token_keys] == ["key-1", "key-2"]
        follower = asyncio.create_task(follow_store(store, hub, edges=EDGES, token_keys=JWKS[:1],
                                                    token_issuer=ISSUER, interval=0.05))
        try:
            await asyncio.to_thread(lambda: _add_suffix(store, "new.example"))
            got = await asyncio.wait_for(hub.wait_newer(hub.current.version, timeout=5), 6)
            assert got is not None and [k["kid"] for k in got.token_keys] == ["key-2"]
            assert got.token_issuer == ISSUER and "new.example" in got.dns_suffixes
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)

    asyncio.run(main())


def _add_suffix(store: Store, suffix: str) -> None:
    with store.begin() as session:
        dns_suffixes.add_dns_suffix(session, ACTOR, suffix)
