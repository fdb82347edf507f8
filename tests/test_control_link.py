"""Tests of a node's link to the control plane (``dataplane.controllink.ControlLink``) against a
real control plane: ``python -m dataplane control`` in a subprocess (SQLite in a temporary
data directory), stopped and restarted on the same port and data directory to simulate an
outage. Nodes are registered for real (``dataplane.controllink.registration.register``); each link runs on
its own asyncio event loop in a background thread while the test drives the control plane
over HTTP (admin API) or through its store.

Covered:

- following the configuration: the first snapshot, its on-disk cache (``config.json``,
  mode 0600), an admin change reaching the link within 2 seconds, heartbeats with the
  ``report()`` figures shown by the admin API;
- an outage: the link keeps its snapshot, logs the outage at most once per loop
  (configuration, heartbeat) rather than once per retry, catches up with a change made in
  the store while the control plane was down, and a fresh link started during the outage
  starts from the cache (``load_cached``);
- certificate renewal when the certificate is due: new certificate, key and ``node.json``,
  ``on_renewed`` called, the admin API showing the new serial;
- a corrupt cache: reported (naming the file) and replaced by a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import secrets
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from control.store import applications, certificates, database_url, nodes, open_store
from dataplane.basics import pki, settings, statefile
from dataplane.contract.flowrecord import MAX_BATCH, MAX_BATCH_BYTES, FlowRecord
from dataplane.controllink.link import CACHE_FILE, ControlLink, Report
from dataplane.controllink.traffic import TrafficQueue
from dataplane.controllink.registration import Registration, read_registration
from dataplane.contract.snapshot import ConfigSnapshot
from dataplane.controllink.snapshot_cache import SnapshotCache

import controlplane
from controlplane import PUBLIC_EDGE, free_port

pytestmark = pytest.mark.timeout(60)

LOGGER = "ferryman.control_link"


# ---------------------------------------------------------------------------- control plane process


@dataclass
class Control:
    """One control plane data directory, served by a subprocess that can be stopped and restarted."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def key(self) -> str:
        return (self.data_dir / "admin.key").read_text().strip()

    @property
    def api(self) -> controlplane.Control:
        """The shared handle of the running process (admin requests, node registration)."""
        assert self.proc is not None, "the control plane is not started"
        return controlplane.Control(self.url, self.data_dir, self.key, self.proc, self.log)

    def start(self) -> None:
        self.proc, _ = controlplane.start(self.data_dir, self.log, edges=[PUBLIC_EDGE], port=self.port,
                                          interval=0.05)

    def stop(self) -> None:
        if self.proc is not None:
            controlplane.stop(self.proc)

    def admin(self, method: str, target: str, body: Any = None) -> tuple[int, Any]:
        status, payload, _ = self.api.admin(method, target, body)
        return status, payload

    def add_application(self, name: str, destination: str) -> int:
        """Create an application through the admin API; return the new configuration version."""
        status, body = self.admin("POST", "/v1/applications",
                                  {"name": name, "segments": [{"destination": destination, "ports": 443}]})
        assert status == 201, body
        status, body = self.admin("GET", "/v1/config-version")
        return body["version"]

    def register(self, directory: Path, name: str | None = None) -> Registration:
        return self.api.register_node(directory, name=name or f"conn-{secrets.token_hex(3)}")


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Control]:
    """A control plane that stays up for the whole module (tests that stop one make their own)."""
    plane = Control(tmp_path_factory.mktemp("control"))
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


# ---------------------------------------------------------------------------- running a link


class LinkRunner:
    """A ``ControlLink`` whose ``run`` goes on in a thread of its own, with what it handed over."""

    def __init__(self, identity: Registration, overrides: dict[str, Any] | None = None,
                 report: Report | None = None, traffic: TrafficQueue | None = None) -> None:
        # config_wait is short so that stopping (which waits for the pending long-poll) is quick.
        self.settings = settings.load(settings.ConnectorSettings,
                                      {"heartbeat_interval": 0.2, "config_wait": 1.0, **(overrides or {})}, environ={})
        self.snapshots: list[ConfigSnapshot] = []
        self.renewed = 0
        figures = report or Report(tunnels=0, active_flows=0)
        self.link = ControlLink(self.settings, identity, self.snapshots.append, lambda: figures,
                                self._on_renewed, traffic=traffic)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _on_renewed(self) -> None:
        self.renewed += 1

    def start(self) -> LinkRunner:
        ready = threading.Event()

        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            ready.set()
            await self.link.run(self._stop)

        def thread() -> None:
            try:
                asyncio.run(main())
            except BaseException as exc:  # noqa: BLE001 - reported by stop()
                self.error = exc

        self._thread = threading.Thread(target=thread, name="control-link", daemon=True)
        self._thread.start()
        assert ready.wait(5), "the link's event loop did not start"
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        # asyncio.run waits for the worker thread of the pending long-poll (config_wait).
        self._thread.join(15)
        assert not self._thread.is_alive(), "the control link did not stop"
        self._thread = None
        assert self.error is None, f"the control link failed: {self.error!r}"

    @property
    def version(self) -> int | None:
        return self.link.version

    def __enter__(self) -> LinkRunner:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def app_names(snapshot: ConfigSnapshot | None) -> list[str]:
    return [] if snapshot is None else [a.name for a in snapshot.applications]


def warnings_logged(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING
            and r.getMessage().startswith(text)]


# ---------------------------------------------------------------------------- configuration, heartbeats


def test_link_follows_configuration_and_sends_heartbeats(control: Control, tmp_path: Path) -> None:
    identity = control.register(tmp_path / "identity")
    cache_path = Path(identity.directory) / CACHE_FILE
    runner = LinkRunner(identity, report=Report(tunnels=3, active_flows=5, addresses=["10.9.8.7"]))
    assert runner.link.load_cached() is None and not cache_path.exists()  # nothing cached yet
    with runner:
        first = wait_for(lambda: runner.link.snapshot, 5, "the first snapshot")
        assert runner.snapshots[0] is first
        assert first.edges[0] == PUBLIC_EDGE
        status, current = control.admin("GET", "/v1/config-version")
        assert first.version <= current["version"]

        # The snapshot is cached, privately, before it is handed over.
        wait_for(lambda: SnapshotCache(cache_path).stored_version() == runner.version, 2, "the cached snapshot")
        assert stat.S_IMODE(cache_path.stat().st_mode) == 0o600
        assert SnapshotCache(cache_path).load() == runner.link.snapshot

        # An admin change reaches the link within two seconds.
        name = f"app-{secrets.token_hex(3)}"
        version = control.add_application(name, f"{name}.corp.example")
        changed = time.monotonic()
        wait_for(lambda: name in app_names(runner.link.snapshot), 2.0, f"application {name} at the link")
        assert time.monotonic() - changed < 2.0
        assert runner.version >= version
        wait_for(lambda: SnapshotCache(cache_path).stored_version() == runner.version, 2, "the new cached snapshot")
        assert name in app_names(SnapshotCache(cache_path).load())
        assert [s.version for s in runner.snapshots] == sorted({s.version for s in runner.snapshots})

        # Heartbeats (every 0.2 s) carry report() and the configuration version the link holds.
        def shown() -> dict[str, Any] | None:
            _, connector = control.admin("GET", f"/v1/connectors/{identity.record.node_id}")
            return connector if connector["config_version"] == runner.version else None

        connector = wait_for(shown, 3, "a heartbeat with the new configuration version", interval=0.1)
        assert connector["status"] == "active" and connector["last_seen"] is not None
        assert (connector["tunnels"], connector["active_flows"]) == (3, 5)
        assert (connector["internal_addr"], connector["external_addr"]) == ("10.9.8.7", "127.0.0.1")
        assert runner.link.last_heartbeat is not None
    assert runner.renewed == 0  # a fresh certificate is not due


def test_an_edge_reports_the_traffic_records_its_queue_dropped_once(control: Control, tmp_path: Path) -> None:
    identity = control.api.register_node(tmp_path / "edge", "edge", f"edge-{secrets.token_hex(3)}",
                                         [f"127.0.0.1:{free_port()}"])
    queue = TrafficQueue(limit=2)
    now = time.time()
    for n in range(5):  # the control plane was away: 3 of 5 records dropped, the 2 newest kept
        queue.put(FlowRecord(connection_id=f"c{n}", transaction_id="t", start=now, end=now, action="allow"))
    assert queue.dropped == 3

    def edge() -> dict[str, Any]:
        return control.admin("GET", f"/v1/edges/{identity.record.node_id}")[1]

    assert (edge()["records_dropped"], edge()["records_dropped_at"]) == (0, None)
    with LinkRunner(identity, traffic=queue) as runner:
        wait_for(lambda: edge()["records_dropped"], 3, "the dropped records in a heartbeat", interval=0.1)
        wait_for(lambda: queue.shipped == 2, 3, "the kept records shipped")
        beat = runner.link.last_heartbeat
        wait_for(lambda: runner.link.last_heartbeat != beat, 2, "one more heartbeat")
        time.sleep(0.5)  # heartbeats every 0.2 s: each reports only what was dropped since the last
        shown = edge()
        assert shown["records_dropped"] == 3 and shown["records_dropped_at"] is not None, shown


def test_a_batch_too_large_for_one_request_is_shipped_in_parts(control: Control, tmp_path: Path) -> None:
    """Web transactions carry a client's path and user agent (up to 1 KiB each, as the client
    chose them): a full batch of such records is larger than one request to the control plane
    may be. The link sends it in parts; sent whole, it was refused, put back, and sent again
    for ever while the queue dropped every newer record."""
    identity = control.api.register_node(tmp_path / "edge", "edge", f"edge-{secrets.token_hex(3)}",
                                         [f"127.0.0.1:{free_port()}"])
    app = f"big-{secrets.token_hex(3)}"
    queue = TrafficQueue(limit=100_000)
    now = time.time()
    quoted = '"\\' * 512  # each character doubles in JSON
    records = [FlowRecord(connection_id=f"c{n}", transaction_id="t", start=now, end=now, action="allow",
                          application=app, application_kind="web", http_path="/" + "p" * 1023,
                          user_agent=quoted, close_reason=quoted, http_host="h" * 1024) for n in range(MAX_BATCH)]
    assert len(msgspec.json.encode({"records": records})) > MAX_BATCH_BYTES
    for record in records:
        queue.put(record)

    def stored() -> int:
        count, before = 0, ""
        while True:
            status, rows = control.admin("GET", f"/v1/traffic?app={app}&limit=1000{before}")
            assert status == 200, rows
            count += len(rows)
            if len(rows) < 1000:
                return count
            before = f"&before={min(r['id'] for r in rows)}"

    with LinkRunner(identity, traffic=queue):
        wait_for(lambda: queue.shipped == MAX_BATCH, 30, "the batch shipped", interval=0.1)
    assert stored() == MAX_BATCH and queue.dropped == 0


# ---------------------------------------------------------------------------- outages


def test_link_survives_an_outage_and_catches_up(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    plane = Control(tmp_path / "control")
    plane.start()
    try:
        identity = plane.register(tmp_path / "identity")
        plane.add_application("before-outage", "10.31.0.0/16")
        with LinkRunner(identity) as runner:
            wait_for(lambda: "before-outage" in app_names(runner.link.snapshot), 5, "the first snapshot")
            held = runner.link.snapshot

            plane.stop()
            wait_for(lambda: warnings_logged(caplog, "control plane unreachable"), 5, "the outage warning")
            time.sleep(2.0)  # several heartbeat (0.2 s) and configuration (backoff from 0.5 s) retries fail
            assert runner.link.snapshot is held  # still running on what it had
            outage = warnings_logged(caplog, "control plane unreachable")
            # Once for the outage: not once per retry, nor once per loop that saw it.
            assert len(outage) == 1, [r.during for r in outage]
            assert outage[0].during in {"configuration", "heartbeat"}
            assert all(r.getMessage() == f"control plane unreachable; running on configuration version "
                                         f"{held.version}" for r in outage)
            assert all("cannot reach the control plane" in r.reason for r in outage)

            # A fresh link on the same identity starts from the cache while the control plane is down.
            fresh = LinkRunner(identity)
            cached = fresh.link.load_cached()
            assert cached is not None and cached.version == held.version
            assert fresh.snapshots == [cached] and fresh.link.snapshot is cached
            assert "before-outage" in app_names(cached)
            assert any(r.getMessage() == "configuration loaded from the cache" for r in caplog.records)

            # A change made meanwhile, in the store itself, reaches the link once the control plane is back.
            with open_store(database_url(str(plane.data_dir), env={})) as store, store.begin() as session:
                applications.create_application(session, "test", "during-outage",
                                                segments=[{"destination": "10.32.0.0/16", "ports": "22"}])
            plane.start()  # same port, same data directory
            wait_for(lambda: "during-outage" in app_names(runner.link.snapshot), 15, "the change made meanwhile")
            assert runner.version > held.version
            wait_for(lambda: any(r.getMessage() == "control plane reachable again" for r in caplog.records),
                     5, "the recovery message")
            time.sleep(0.5)  # every loop has been through a successful call by now
            assert sum(r.getMessage() == "control plane reachable again" for r in caplog.records) == 1
            assert len(warnings_logged(caplog, "control plane unreachable")) == len(outage)  # nothing more
    finally:
        plane.stop()


# ---------------------------------------------------------------------------- renewal


def _due_certificate(control: Control, identity: Registration) -> tuple[x509.Certificate, bytes, bytes]:
    """A certificate of ``identity``'s node with 10 of 110 days left (due at renew_at 1/3), and its key."""
    ca_cert, ca_key = pki.load_ca(str(control.data_dir / "ca"))
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "connector"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, identity.record.name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=100))
        .not_valid_after(now + datetime.timedelta(days=10))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(pki.key_usage(digital_signature=True), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(identity.record.name)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, cert.public_bytes(serialization.Encoding.PEM), pki.key_pem(key)


def test_link_renews_a_certificate_that_is_due(control: Control, tmp_path: Path) -> None:
    identity = control.register(tmp_path / "identity")
    node_id = identity.record.node_id
    due, cert_pem, key_pem = _due_certificate(control, identity)
    with open_store(database_url(str(control.data_dir), env={})) as store, store.begin() as session:
        certificates.record_certificate(session, "connector", node_id, due.serial_number, due.not_valid_after_utc)
        # It is the node's current certificate (only the current one may renew).
        connector = nodes.get_connector(session, node_id)
        connector.cert_serial, connector.cert_not_after = format(due.serial_number, "x"), due.not_valid_after_utc
    statefile.write_file(identity.cert, cert_pem, 0o644)
    statefile.write_file(identity.key, key_pem, 0o600)

    with LinkRunner(identity, {"renew_at": 0.3333}) as runner:
        assert runner.link.signer.serial == due.serial_number
        wait_for(lambda: runner.renewed, 10, "on_renewed")
        wait_for(lambda: runner.link.snapshot, 5, "a snapshot")
    assert runner.renewed == 1

    renewed = pki.read_certificates(identity.cert)[0]
    assert renewed.serial_number not in (due.serial_number, int(identity.record.serial, 16))
    left = renewed.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    assert datetime.timedelta(days=179) < left <= datetime.timedelta(days=180)  # cert_lifetime_days
    assert (pki.read_node_certificate(identity.cert).role, pki.read_node_certificate(identity.cert).name) == (
        "connector", identity.record.name)
    new_key = Path(identity.key).read_bytes()
    assert new_key != key_pem
    assert serialization.load_pem_private_key(new_key, None).public_key() == renewed.public_key()
    assert stat.S_IMODE(os.stat(identity.key).st_mode) == 0o600
    renewed.verify_directly_issued_by(pki.read_certificates(identity.ca)[0])

    record = read_registration(identity.directory)
    assert record is not None and record.record.serial == format(renewed.serial_number, "x")
    assert runner.link.registration.record.serial == record.record.serial
    assert runner.link.signer.serial == renewed.serial_number  # later requests use the new certificate
    _, connector = control.admin("GET", f"/v1/connectors/{node_id}")
    assert connector["cert_serial"] == format(renewed.serial_number, "x")


# ---------------------------------------------------------------------------- corrupt cache


def test_corrupt_cache_is_reported_and_replaced(control: Control, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    identity = control.register(tmp_path / "identity")
    cache_path = Path(identity.directory) / CACHE_FILE
    cache_path.write_bytes(b'{"version": 7, "issued_at": ')  # torn
    runner = LinkRunner(identity)
    assert runner.link.load_cached() is None
    assert runner.snapshots == [] and runner.link.snapshot is None
    (error,) = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.ERROR]
    assert error.getMessage().startswith(f"snapshot cache {cache_path} is corrupt: ")
    assert error.getMessage().endswith("; waiting for the control plane")

    with runner:
        wait_for(lambda: runner.link.snapshot, 5, "a fresh snapshot")
        # A newly registered node's configuration can move on right after its first
        # snapshot; the cache must hold whatever the link holds now.
        def rewritten() -> bool:
            stored = SnapshotCache(cache_path).stored_version()  # None while the torn file is there
            return stored is not None and SnapshotCache(cache_path).load() == runner.link.snapshot

        wait_for(rewritten, 2, "the cache rewritten")
        snapshot = runner.link.snapshot
    assert stat.S_IMODE(cache_path.stat().st_mode) == 0o600
    assert snapshot.edges[0] == PUBLIC_EDGE
