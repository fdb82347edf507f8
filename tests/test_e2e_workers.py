"""Edge workers, with real processes on loopback: a control plane, one edge running 2 workers
under its supervisor, a connector and two client agents.

The edge steers new TCP connections by CPU (FERRYMAN_EDGE_WORKER_STEERING=cpu: the receiving
CPU modulo the workers) and every node but the edge is pinned to one CPU with ``taskset``, so
which worker holds which tunnel is known: on loopback a connection is received on the CPU that
sent it. client-1 (CPU 1) lands on worker 1, client-2 (CPU 0) on worker 0.

- the connector's tunnels on worker 0: client-1's flows, accepted by worker 1, are relayed
  to worker 0 over the workers' Unix sockets; then the connector moves to worker 1 and
  client-2's flows, accepted by worker 0, are relayed to worker 1 (bytes sha256-checked both
  ways, the hop counted in the edge's one metrics endpoint);
- the control plane sees one edge holding the connector, whichever worker holds it;
- SIGKILL worker 0 while both clients stream through echo flows: only client-2's flow (worker
  0's) ends; client-1's (worker 1's) carries on to a clean, checked end; worker 0 is started
  again (counted), takes client-2 back, and relays its new flows.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import socket
import time

import pytest

from dataplane.fabric import WEB_DOMAIN

pytestmark = pytest.mark.timeout(120)

CPU0, CPU1 = ["taskset", "-c", "0"], ["taskset", "-c", "1"]


def _workers(supervisor: int) -> dict[int, int]:
    """Worker index -> pid, for the supervisor's children."""
    out = {}
    with open(f"/proc/{supervisor}/task/{supervisor}/children") as fh:
        children = [int(p) for p in fh.read().split()]
    for pid in children:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                args = fh.read().split(b"\0")
        except FileNotFoundError:
            continue
        if b"--worker-of" in args:
            spec = args[args.index(b"--worker-of") + 1]
            out[int(spec.split(b'"index":')[1].split(b",")[0])] = pid
    return out


def _exchange(sock: socket.socket, data: bytes, into: bytearray | None = None) -> None:
    sock.sendall(data)
    received = b""
    while len(received) < len(data):
        chunk = sock.recv(len(data) - len(received))
        assert chunk, "flow ended"
        received += chunk
    assert received == data
    if into is not None:
        into.extend(received)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to pin nodes to")
def test_two_workers_relay_to_each_other_and_a_dead_worker_loses_only_its_flows(fabric, backend, xfer) -> None:
    sha, source, echo = backend("sha"), backend("source"), backend("echo")
    fab = fabric([sha, source, echo], managed=True, workers=2, more_clients={"client-2": ["edge-1"]},
                 env={"FERRYMAN_EDGE_WORKER_STEERING": "cpu", "FERRYMAN_TRANSPORT": "tcp",
                      "FERRYMAN_EDGE_WORKER_RESTART_MAX": "1", "FERRYMAN_DRAIN_GRACE": "20"},
                 prefix={"connector-1": CPU0, "client-1": CPU1, "client-2": CPU0}, timeout=40)
    edge = fab.metrics["edge-1"]
    c1 = fab.forward_ports
    c2 = fab.client_ports["client-2"]

    def per_worker(name: str, worker: int) -> float:
        return xfer.metric(xfer.scrape(edge), name, worker=str(worker))

    xfer.wait_for(lambda: per_worker("ferryman_edge_worker_connector_tunnels", 0) == 2
                  and per_worker("ferryman_edge_worker_clients", 0) == 1
                  and per_worker("ferryman_edge_worker_clients", 1) == 1, 10,
                  "the connector and client-2 on worker 0, client-1 on worker 1")
    assert per_worker("ferryman_edge_worker_connector_tunnels", 1) == 0

    # Worker 1 -> worker 0: client-1's flows reach the connector only worker 0 holds.
    out_before = xfer.metric(xfer.scrape(edge), "ferryman_relayed_flows_total", direction="out")
    upload = os.urandom(2 << 20)
    assert xfer.upload_sha(c1[0], upload) == xfer.sha256_hex(upload)
    seed = b"workers".ljust(32, b".")
    down = xfer.download(c1[1], 2 << 20, seed)
    assert xfer.sha256_hex(down) == xfer.sha256_hex(xfer.source_bytes(2 << 20, seed))
    samples = xfer.scrape(edge)
    assert xfer.metric(samples, "ferryman_relayed_flows_total", direction="out") >= out_before + 2
    assert xfer.metric(samples, "ferryman_relayed_flows_total", direction="in") >= out_before + 2
    assert xfer.metric(samples, "ferryman_edge_workers") == 2
    # merged over the workers: 2 client tunnels, 2 connector tunnels, and a relay tunnel each worker
    # dialed to the other (counted at both ends)
    assert xfer.metric(samples, "ferryman_edge_clients") == 2
    assert xfer.metric(samples, "ferryman_edge_connector_tunnels") == 2
    assert xfer.metric(samples, "ferryman_edge_relay_tunnels") == 4

    # The control plane sees one edge holding the connector (what its heartbeats reported).
    def presence() -> list:
        with contextlib.closing(sqlite3.connect(os.path.join(fab.workdir, "control", "control.db"))) as db:
            rows = db.execute("SELECT name, presence FROM edges").fetchall()
        return [(name, [c["name"] for c in json.loads(text or "[]")]) for name, text in rows]

    xfer.wait_for(lambda: presence() == [("edge-1", ["connector-1"])], 10, "the presence map to name edge-1")

    # The connector moves to worker 1; worker 0 -> worker 1: client-2's flows.
    fab.kill("connector-1")
    xfer.wait_for(lambda: xfer.metric(xfer.scrape(edge), "ferryman_edge_connector_tunnels") == 0, 10,
                  "the connector's tunnels gone")
    fab.prefix["connector-1"] = CPU1
    fab.restart("connector-1")
    xfer.wait_for(lambda: per_worker("ferryman_edge_worker_connector_tunnels", 1) == 2, 10,
                  "the connector on worker 1")
    out_before = xfer.metric(xfer.scrape(edge), "ferryman_relayed_flows_total", direction="out")
    xfer.wait_for(lambda: xfer.upload_intact(c2[0]), 10, "a flow of client-2 relayed to worker 1")
    upload = os.urandom(2 << 20)
    assert xfer.upload_sha(c2[0], upload) == xfer.sha256_hex(upload)
    down = xfer.download(c2[1], 2 << 20, seed)
    assert xfer.sha256_hex(down) == xfer.sha256_hex(xfer.source_bytes(2 << 20, seed))
    assert xfer.metric(xfer.scrape(edge), "ferryman_relayed_flows_total", direction="out") >= out_before + 2
    xfer.wait_for(lambda: presence() == [("edge-1", ["connector-1"])], 10, "the presence map to name edge-1")

    # SIGKILL worker 0 mid-transfer: only its flow (client-2's, relayed to worker 1) is lost.
    on_1 = xfer.connect(c1[2], timeout=10)  # worker 1, local connector
    on_0 = xfer.connect(c2[2], timeout=10)  # worker 0, relayed to worker 1
    sent_1, got_1 = bytearray(), bytearray()
    for _ in range(4):
        chunk = os.urandom(65536)
        sent_1.extend(chunk)
        _exchange(on_1, chunk, got_1)
        _exchange(on_0, os.urandom(65536))
    workers = _workers(fab.pids["edge-1"])
    assert sorted(workers) == [0, 1]
    # what the edge carried so far, most of it through worker 0 (client-2's 2 MiB upload, relayed)
    carried = xfer.metric(xfer.scrape(edge), "ferryman_bytes_total", direction="rx")
    os.kill(workers[0], signal.SIGKILL)

    on_0.settimeout(10)
    try:
        ended = on_0.recv(1) == b""
    except ConnectionResetError:
        ended = True
    assert ended, "the flow of the killed worker did not end"
    on_0.close()
    for _ in range(4):  # worker 1's flow is untouched
        chunk = os.urandom(65536)
        sent_1.extend(chunk)
        _exchange(on_1, chunk, got_1)
    on_1.shutdown(socket.SHUT_WR)
    assert xfer.recv_all(on_1) == b""
    on_1.close()
    assert xfer.sha256_hex(bytes(got_1)) == xfer.sha256_hex(bytes(sent_1))

    # Worker 0 comes back (a new process), counted; client-2 returns to it and is relayed again.
    xfer.wait_for(lambda: per_worker("ferryman_edge_worker_restarts_total", 0) == 1
                  and per_worker("ferryman_edge_worker_up", 0) == 1, 15, "worker 0 started again")
    assert _workers(fab.pids["edge-1"])[0] != workers[0]
    assert _workers(fab.pids["edge-1"])[1] == workers[1]
    assert per_worker("ferryman_edge_worker_restarts_total", 1) == 0
    xfer.wait_for(lambda: per_worker("ferryman_edge_worker_clients", 0) == 1, 15, "client-2 back on worker 0")
    xfer.wait_for(lambda: xfer.upload_intact(c2[0]), 10, "a new flow of client-2 through the new worker 0")
    assert "worker died; its flows are lost; restarting it" in fab.log_tail("edge-1", 200)
    # The counters of the dead worker stay in the edge's totals: they never go back.
    assert xfer.metric(xfer.scrape(edge), "ferryman_bytes_total", direction="rx") >= carried

    # SIGTERM: the workers drain (an echo flow keeps them at it): the port is shut, not left
    # accepting into a queue nobody reads, and no worker spins; once the flow ends, the
    # supervisor stops its workers and exits cleanly.
    running = _workers(fab.pids["edge-1"])
    flow = xfer.connect(c1[2], timeout=10)
    _exchange(flow, os.urandom(4096))
    fab.procs["edge-1"].send_signal(signal.SIGTERM)
    xfer.wait_for(lambda: _refused(fab.edge_ports["edge-1"]), 5, "the edge's tunnel port to refuse connections")
    spent = {w: cpu for w, pid in running.items() if _alive(pid) and (cpu := _cpu_seconds(pid)) is not None}
    time.sleep(1.0)
    for w, before in spent.items():
        now = _cpu_seconds(running[w])
        if now is not None:  # (a worker with no flow may finish draining and exit meanwhile: not busy)
            assert now - before < 0.3, f"worker {w} busy while draining an idle flow"
    _exchange(flow, os.urandom(4096))  # still carried
    flow.close()
    assert fab.procs["edge-1"].wait(timeout=10) == 0
    tail = fab.log_tail("edge-1", 40)
    assert "worker stopped" in tail and "edge supervisor stopped" in tail
    assert not any(_alive(pid) for pid in running.values())


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to pin nodes to")
def test_a_flow_relayed_by_a_peer_edge_goes_on_to_the_worker_holding_its_connector(fabric, backend, xfer) -> None:
    """Two edges of 2 workers each; the connector (CPU 0) holds tunnels to edge-2's worker 0 only;
    the client (CPU 1) reaches edge-1's worker 1, which relays to edge-2; edge-1 runs on CPU 1, so
    its relay tunnel lands on edge-2's worker 1, which passes the flow on to worker 0."""
    sha = backend("sha")
    fab = fabric([sha], managed=True, edges=2, workers=2, connector_edges={"connector-1": ["edge-2"]},
                 env={"FERRYMAN_EDGE_WORKER_STEERING": "cpu", "FERRYMAN_TRANSPORT": "tcp"},
                 prefix={"connector-1": CPU0, "client-1": CPU1, "edge-1": CPU1}, timeout=40)
    edge1, edge2 = fab.metrics["edge-1"], fab.metrics["edge-2"]
    xfer.wait_for(lambda: xfer.metric(xfer.scrape(edge2), "ferryman_edge_worker_connector_tunnels", worker="0") == 2
                  and xfer.metric(xfer.scrape(edge1), "ferryman_edge_worker_clients", worker="1") == 1, 10,
                  "the connector on edge-2's worker 0, the client on edge-1's worker 1")

    def relayed() -> tuple[float, float]:
        return (xfer.metric(xfer.scrape(edge1), "ferryman_relayed_flows_total", direction="out"),
                xfer.metric(xfer.scrape(edge2), "ferryman_relayed_flows_total", direction="in"))

    xfer.wait_for(lambda: xfer.upload_intact(fab.forward_ports[0]), 10, "a flow relayed from edge-1 to edge-2")
    out_before, in_before = relayed()
    upload = os.urandom(1 << 20)
    assert xfer.upload_sha(fab.forward_ports[0], upload) == xfer.sha256_hex(upload)
    out_after, in_after = relayed()
    # edge-1 relayed each flow out once; edge-2 took each in twice: from edge-1 (its worker 1), then
    # from its worker 1 (its worker 0, holding the connector)
    assert out_after - out_before >= 1
    assert in_after - in_before == 2 * (out_after - out_before)
    assert xfer.metric(xfer.scrape(edge2), "ferryman_edge_worker_connector_tunnels", worker="1") == 0


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    time.sleep(0.05)
    return False


def _cpu_seconds(pid: int) -> float | None:
    """CPU seconds process ``pid`` has used; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (an exited process not yet reaped by init does not)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in fh)
    except FileNotFoundError:
        return False


def test_quic_tunnels_on_an_edge_of_two_workers_without_a_control_plane(fabric, backend, xfer) -> None:
    """QUIC tunnels reach the workers through the supervisor's UDP sockets (hashed by the kernel),
    and workers of an edge with only an application file relay to each other too."""
    sha = backend("sha")
    fab = fabric([sha], workers=2, env={"FERRYMAN_TRANSPORT": "quic", "FERRYMAN_CONNECTOR_TUNNELS": "1"})
    edge = fab.metrics["edge-1"]

    def placed() -> tuple[int, int] | None:
        samples = xfer.scrape(edge)
        client = [w for w in (0, 1) if xfer.metric(samples, "ferryman_edge_worker_clients", worker=str(w)) == 1]
        connector = [w for w in (0, 1)
                     if xfer.metric(samples, "ferryman_edge_worker_connector_tunnels", worker=str(w)) == 1]
        return (client[0], connector[0]) if len(client) == 1 and len(connector) == 1 else None

    client, connector = xfer.wait_for(placed, 10, "the client's and the connector's tunnel on a worker each")
    assert xfer.metric(xfer.scrape(edge), "ferryman_tunnels_by_transport", transport="quic") >= 2
    before = xfer.metric(xfer.scrape(edge), "ferryman_relayed_flows_total", direction="out")
    upload = os.urandom(1 << 20)
    assert xfer.upload_sha(fab.forward_ports[0], upload) == xfer.sha256_hex(upload)
    relayed = xfer.metric(xfer.scrape(edge), "ferryman_relayed_flows_total", direction="out") - before
    assert relayed == (1 if client != connector else 0)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to pin curl to")
def test_every_worker_serves_the_front_door_and_opens_the_others_sessions(fabric, xfer) -> None:
    """Both workers listen on the HTTPS port (steered by CPU; the connector pinned to CPU 1 holds
    its tunnels on worker 1, curl is pinned per request). A browser signs in through worker 0,
    whose backend flows are relayed to worker 1; then, with worker 0 stopped (SIGSTOP), worker 1
    serves the same cookie jar's next request (the cookie keys are the edge's, not one
    process's) and signs the backend's identity assertion with the key worker 0 publishes."""
    from tests.test_e2e_webapps import curl, sign_in
    from tests.web_support import Backend

    wiki = Backend("wiki", internal_host="127.0.0.1")
    try:
        fab = fabric([], managed=True, workers=2, prefix={"connector-1": CPU1, "client-1": CPU0},
                     env={"FERRYMAN_EDGE_WORKER_STEERING": "cpu", "FERRYMAN_TRANSPORT": "tcp"}, timeout=40,
                     webapps=[{"name": "wiki", "external_url": f"https://wiki.{WEB_DOMAIN}",
                               "internal_url": wiki.internal_url}])
        edge = fab.metrics["edge-1"]
        xfer.wait_for(lambda: xfer.metric(xfer.scrape(edge), "ferryman_edge_worker_connector_tunnels", worker="1") == 2
                      and xfer.metric(xfer.scrape(edge), "ferryman_edge_worker_connector_tunnels", worker="0") == 0,
                      15, "the connector's tunnels on worker 1")
        relayed = xfer.metric(xfer.scrape(edge), "ferryman_relayed_flows_total", direction="out")
        jar = os.path.join(fab.workdir, "jar")
        page = sign_in(fab, jar, fab.web_url("wiki", "/hello"), prefix=CPU0)
        assert (page.status, page.body) == (200, b"hello from backend wiki")
        assert xfer.metric(xfer.scrape(edge), "ferryman_relayed_flows_total", direction="out") > relayed
        jwks = curl(fab, fab.web_url("login", "/.ferryman/jwks.json"), prefix=CPU0)
        assert jwks.status == 200

        workers = _workers(fab.procs["edge-1"].pid)
        os.kill(workers[0], signal.SIGSTOP)
        try:
            again = curl(fab, fab.web_url("wiki", "/hello"), jar=jar, prefix=CPU1)
            assert (again.status, again.body) == (200, b"hello from backend wiki"), again
            seen = json.loads(curl(fab, fab.web_url("wiki", "/headers"), jar=jar, prefix=CPU1).body)
            assert curl(fab, fab.web_url("login", "/.ferryman/jwks.json"), prefix=CPU1).body == jwks.body
        finally:
            os.kill(workers[0], signal.SIGCONT)
        from joserfc import jwt
        from joserfc.jwk import ECKey

        key = ECKey.import_key(json.loads(jwks.body)["keys"][0])
        assert jwt.decode(seen["x-ferryman-jwt-assertion"], key).claims["upn"] == fab.user
    finally:
        wiki.stop()
