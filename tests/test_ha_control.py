"""Several control-plane processes on one PostgreSQL database (``TEST_POSTGRES_URL``): they serve
one configuration, share their keys and replay guards, and nodes fail over between them.

- a change made through node A reaches a node long-polling node B within 2 s (LISTEN/NOTIFY:
  the fallback re-check is 30 s away), also after the listening connections were killed;
- the CA and the access-token signing key are the same on both (sealed in the database under
  the secrets key both are given); a node started with another secrets key refuses to start;
- HTTPS: each node serves a certificate of its own, both from the shared CA, so both have the
  same CA hash (printed at start, carried by the registration tokens of either) and one
  context verifies both;
- a node request token used at A is refused at B (shared replay guard); failed sign-ins at
  either count towards the limits at both;
- ``GET /ready`` answers 200 on both, 503 naming the database once it is gone;
- a node's control link given "C,B" (registered through C: the CA pinned by the hash in C's
  token) follows C; C is killed (SIGKILL) mid long-poll: the link follows B, verifying B's
  certificate against that pinned CA, and gets a change made through B within a few seconds.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import controlplane
from databases import postgres_database
from controlplane import PUBLIC_EDGE, Control
from dataplane.basics.settings import EdgeSettings
from dataplane.contract.snapshot import ConfigSnapshot
from dataplane.controllink.link import ControlLink, Report
from dataplane.controllink.signer import NodeSigner

pytestmark = pytest.mark.timeout(60)

CONFIG = "/v1/node/config"
SIGN_IN_LIMIT = 3


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """A new PostgreSQL database on the ``TEST_POSTGRES_URL`` server; dropped afterwards."""
    with postgres_database("ferryman_ha", "the control-plane HA tests") as url:
        yield url


def _secrets_key(path: Path) -> Path:
    path.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    path.chmod(0o600)
    return path


def _launch(data_dir: Path, database: str, key_file: Path, admin_key: str | None = None) -> Control:
    """A control-plane process on ``database`` with the secrets key ``key_file``; the admin key is the
    first node's (``admin_key``) or its own bootstrap key."""
    env = {"FERRYMAN_DATABASE_URL": database, "FERRYMAN_SECRETS_KEY_FILE": str(key_file),
           "FERRYMAN_SIGN_IN_MAX_FAILURES": str(SIGN_IN_LIMIT)}
    if admin_key is None:
        return Control.launch(data_dir, edges=[PUBLIC_EDGE], env=env)
    log = data_dir.parent / f"{data_dir.name}.log"
    proc, url = controlplane.start(data_dir, log, edges=[PUBLIC_EDGE], env=env)
    return Control(url, data_dir, admin_key, proc, log)


@dataclass
class Cluster:
    a: Control
    b: Control
    database: str
    key_file: Path
    root: Path


@pytest.fixture(scope="module")
def cluster(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("ha")
    key_file = _secrets_key(root / "secrets.key")
    a = _launch(root / "a", database, key_file)
    try:
        b = _launch(root / "b", database, key_file, a.key)
        try:
            yield Cluster(a, b, database, key_file, root)
        finally:
            controlplane.stop(b.proc)
    finally:
        controlplane.stop(a.proc)


def _node_call(control: Control, signer: NodeSigner, method: str, target: str, **kw: Any) -> controlplane.Reply:
    return control.request(method, target, authorization=f"Bearer {signer.token(method, target, b'')}", **kw)


def _served_version(control: Control, signer: NodeSigner) -> int:
    status, snapshot, _ = _node_call(control, signer, "GET", f"{CONFIG}?after=-1")
    assert status == 200, snapshot
    return snapshot["version"]


def test_a_change_through_one_node_reaches_a_node_following_the_other_within_two_seconds(
        cluster: Cluster, tmp_path: Path) -> None:
    edge = cluster.a.register_node(tmp_path / "edge", "edge", addresses=[f"127.0.0.1:{controlplane.free_port()}"])
    signer = NodeSigner(edge.cert, edge.key)
    deadline = time.monotonic() + 5
    while (version := _served_version(cluster.b, signer)) < cluster.b.version():  # B caught up with the registration
        assert time.monotonic() < deadline
        time.sleep(0.05)
    answer: dict[str, Any] = {}

    def poll() -> None:
        answer["reply"] = _node_call(cluster.b, signer, "GET", f"{CONFIG}?after={version}&wait=20", timeout=30)
        answer["at"] = time.monotonic()

    waiter = threading.Thread(target=poll, daemon=True)
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive(), answer
    status, body, _ = cluster.a.admin("POST", "/v1/applications",
                                      {"name": "ha-app", "segments": [{"destination": "10.91.0.0/16", "ports": 22}]})
    changed = time.monotonic()
    assert status == 201, body
    waiter.join(10)
    status, snapshot, _ = answer["reply"]
    assert status == 200, snapshot
    assert answer["at"] - changed < 2.0, f"answered {answer['at'] - changed:.2f}s after the change"
    assert "ha-app" in [app["name"] for app in snapshot["applications"]]


def _listeners(database: str) -> set[int]:
    """The backend pids of the connections listening for configuration changes on ``database``."""
    engine = sa.create_engine(sa.make_url(database), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            return set(conn.execute(sa.text(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN %' "
                "AND pid <> pg_backend_pid()")).scalars())
    finally:
        engine.dispose()


def test_a_broken_listening_connection_is_made_again_and_changes_still_arrive(cluster: Cluster,
                                                                             tmp_path: Path) -> None:
    edge = cluster.b.register_node(tmp_path / "edge", "edge", addresses=[f"127.0.0.1:{controlplane.free_port()}"])
    signer = NodeSigner(edge.cert, edge.key)
    before = _listeners(cluster.database)
    assert len(before) == 2, before  # one per control-plane node
    engine = sa.create_engine(sa.make_url(cluster.database), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            for pid in before:
                conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    finally:
        engine.dispose()
    deadline = time.monotonic() + 10
    while len(now := _listeners(cluster.database)) < 2 or now & before:
        assert time.monotonic() < deadline, f"listeners not back: {now} (were {before})"
        time.sleep(0.1)
    assert cluster.b.request("GET", "/ready")[0] == 200
    deadline = time.monotonic() + 5
    while (version := _served_version(cluster.b, signer)) < cluster.a.version():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    answer: dict[str, Any] = {}

    def poll() -> None:
        answer["reply"] = _node_call(cluster.b, signer, "GET", f"{CONFIG}?after={version}&wait=20", timeout=30)
        answer["at"] = time.monotonic()

    waiter = threading.Thread(target=poll, daemon=True)
    waiter.start()
    time.sleep(0.3)
    status, body, _ = cluster.a.admin("POST", "/v1/applications",
                                      {"name": "after-reconnect", "segments": [{"destination": "10.93.0.0/16",
                                                                                "ports": 22}]})
    changed = time.monotonic()
    assert status == 201, body
    waiter.join(10)
    assert answer["reply"][0] == 200 and answer["at"] - changed < 2.0


def test_keys_are_shared_and_a_node_with_another_secrets_key_refuses_to_start(cluster: Cluster,
                                                                               tmp_path: Path) -> None:
    assert cluster.a.request("GET", "/v1/auth/keys")[1] == cluster.b.request("GET", "/v1/auth/keys")[1]
    on_a = cluster.a.register_node(tmp_path / "via-a")
    on_b = cluster.b.register_node(tmp_path / "via-b")
    assert Path(on_a.ca).read_bytes() == Path(on_b.ca).read_bytes()  # one CA signs for both
    # A node registered through A is a known node at B: its certificate chains to the shared CA.
    assert _served_version(cluster.b, NodeSigner(on_a.cert, on_a.key)) >= 0
    # Secrets key on disk only; no CA or signing key files written by the nodes that share them.
    assert not (cluster.b.data_dir / "ca").exists() and not (cluster.b.data_dir / "token-signing.key").exists()

    # HTTPS: one CA, one hash; a certificate of each node's own, each verified with the shared CA
    assert cluster.a.ca_hash == cluster.b.ca_hash
    assert cluster.a.ca_pem == cluster.b.ca_pem == Path(on_a.ca).read_bytes()
    assert cluster.a.token().rsplit(".", 1)[1] == cluster.b.token().rsplit(".", 1)[1] \
        == cluster.a.ca_hash.removeprefix("sha256:")
    served = [(control.data_dir / "tls" / "control.pem").read_bytes() for control in (cluster.a, cluster.b)]
    assert served[0] != served[1]
    shared = controlplane.tls_context(cluster.a.data_dir)
    for control in (cluster.a, cluster.b):
        with urllib.request.urlopen(control.url + "/health", timeout=10, context=shared) as answer:
            assert answer.status == 200
        assert f"CA hash {cluster.a.ca_hash}" in control.log.read_text()

    other_key = _secrets_key(tmp_path / "other.key")
    log = tmp_path / "wrong-key.log"
    env = controlplane.environment(tmp_path / "c", FERRYMAN_DATABASE_URL=cluster.database,
                                   FERRYMAN_SECRETS_KEY_FILE=str(other_key))
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "dataplane", "control", "--listen",
                           f"127.0.0.1:{controlplane.free_port()}"], cwd=controlplane.ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    log.write_text(done.stdout + done.stderr)
    assert done.returncode != 0
    assert "does not open" in done.stderr and "FERRYMAN_SECRETS_KEY_FILE" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr

    missing = tmp_path / "missing.key"
    env["FERRYMAN_SECRETS_KEY_FILE"] = str(missing)
    done = subprocess.run([sys.executable, "-m", "dataplane", "control", "--listen",
                           f"127.0.0.1:{controlplane.free_port()}"], cwd=controlplane.ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "file not found" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_node_request_token_used_at_one_node_is_refused_at_the_other(cluster: Cluster, tmp_path: Path) -> None:
    node = cluster.a.register_node(tmp_path / "connector")
    signer = NodeSigner(node.cert, node.key)
    target = f"{CONFIG}?after=-1"
    authorization = f"Bearer {signer.token('GET', target, b'')}"
    assert cluster.a.request("GET", target, authorization=authorization)[0] == 200
    status, body, _ = cluster.b.request("GET", target, authorization=authorization)
    assert status == 401 and "already used" in body["error"], body


def test_failed_sign_ins_count_on_every_node(cluster: Cluster) -> None:
    guess = {"upn": f"nobody-{secrets.token_hex(3)}@example.test", "password": "not the password"}
    for number in range(SIGN_IN_LIMIT):  # spread over both nodes
        status, body, _ = (cluster.a if number % 2 else cluster.b).request("POST", "/v1/auth/sign-in", guess)
        assert status == 401, body
    for control in (cluster.a, cluster.b):
        status, body, headers = control.request("POST", "/v1/auth/sign-in", guess)
        assert status == 429, body
        assert f"({SIGN_IN_LIMIT} within" in body["error"] and int(headers["Retry-After"]) >= 1, body
    # another account from the same address is not held back by this pair's failures
    other = {**guess, "upn": f"other-{secrets.token_hex(3)}@example.test"}
    assert cluster.a.request("POST", "/v1/auth/sign-in", other)[0] == 401


def test_both_nodes_are_ready(cluster: Cluster) -> None:
    for control in (cluster.a, cluster.b):
        status, body, _ = control.request("GET", "/ready")
        assert (status, body) == (200, {"status": "ready", "problems": []})


def test_a_node_fails_over_to_another_control_node_when_its_node_is_killed(cluster: Cluster, tmp_path: Path) -> None:
    c = _launch(cluster.root / "c", cluster.database, cluster.key_file, cluster.a.key)
    try:
        edge = c.register_node(tmp_path / "edge", "edge", addresses=[f"127.0.0.1:{controlplane.free_port()}"])
        settings = EdgeSettings(control_url=f"{c.url},{cluster.b.url}", config_wait=20.0, heartbeat_interval=30.0)
        seen: list[ConfigSnapshot] = []
        got = threading.Event()

        def on_snapshot(snapshot: ConfigSnapshot) -> None:
            seen.append(snapshot)
            if any(app.name == "after-failover" for app in snapshot.applications):
                got.set()

        async def follow() -> float:
            link = ControlLink(settings, edge, on_snapshot, lambda: Report(tunnels=0, active_flows=0))
            stop = asyncio.Event()
            task = asyncio.create_task(link.run(stop))
            try:
                assert link.client.tls is not None  # HTTPS, verified against the CA pinned through C
                while not seen:  # the first snapshot, from C
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)  # the link's long-poll now waits at C
                c.proc.kill()
                c.proc.wait(5)
                killed = time.monotonic()
                status, body, _ = await asyncio.to_thread(
                    cluster.b.admin, "POST", "/v1/applications",
                    {"name": "after-failover", "segments": [{"destination": "10.92.0.0/16", "ports": 443}]})
                assert status == 201, body
                while not got.is_set():
                    assert time.monotonic() - killed < 10, f"no failover; versions seen {[s.version for s in seen]}"
                    await asyncio.sleep(0.05)
                return time.monotonic() - killed
            finally:
                stop.set()
                await task

        took = asyncio.run(asyncio.wait_for(follow(), 30))
        assert took < 5, f"the change through B reached the node {took:.1f}s after C was killed"
    finally:
        controlplane.stop(c.proc)


def test_ready_says_not_ready_when_the_database_is_gone(database: str, tmp_path: Path) -> None:
    """A node of its own (not the cluster's), whose database is dropped under it."""
    server_url = sa.make_url(database)
    admin = sa.create_engine(server_url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    name = f"ferryman_ha_gone_{secrets.token_hex(4)}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        own = _launch(tmp_path / "d", server_url.set(database=name).render_as_string(hide_password=False),
                      _secrets_key(tmp_path / "d.key"))
        try:
            assert own.request("GET", "/ready")[0] == 200
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
            status, body, _ = own.request("GET", "/ready")
            assert status == 503 and body["status"] == "not ready", body
            assert any("database" in problem for problem in body["problems"]), body
            assert json.dumps(body).find(name) == -1  # no database names or URLs in the answer
        finally:
            controlplane.stop(own.proc)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
