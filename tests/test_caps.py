"""Caps per identity and per source, with real processes and sockets.

- an edge (its own process) holds at most FERRYMAN_MAX_TUNNELS_PER_CLIENT tunnels per client
  certificate and FERRYMAN_MAX_TUNNELS_PER_CONNECTOR per connector certificate: one more is
  refused at its HELLO (GOAWAY ``too_many_tunnels``) while other identities still connect;
- an edge closes at once a connection beyond FERRYMAN_MAX_HANDSHAKES_PER_SOURCE handshakes in
  progress from one source, or FERRYMAN_MAX_HANDSHAKES in all, while another source still
  completes its tunnel, and takes that source again once its half-open connections are gone;
- refused OPENs flooding from one client are logged FERRYMAN_LOG_LIMIT lines per
  FERRYMAN_LOG_LIMIT_INTERVAL; the next line says how many were suppressed, and
  ``ferryman_log_lines_suppressed_total`` counts them;
- the control plane (its own process) closes a slowloris after FERRYMAN_CONTROL_REQUEST_TIMEOUT
  while normal requests keep working, answers a 100 KiB request head 431, and refuses
  connections beyond FERRYMAN_CONTROL_MAX_WAITING_PER_SOURCE (per source) and
  FERRYMAN_CONTROL_MAX_CONNECTIONS (in all) with 503;
- a node's metrics server holds a whole request head to its deadline and caps connections per
  source;
- ``Counts`` and ``LogLimiter`` keep their counts and bounded memory.

The test plays clients and connectors itself with the project's own transport (``Tunnel``)
over real TLS sockets, from distinct loopback source addresses (127.0.0.x).
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from controlplane import Control, environment
from dataplane.basics import pki
from dataplane.basics.caps import Counts, HttpLimits, LogLimiter, source_key
from dataplane.basics.metrics import Stats, start_metrics_server
from dataplane.fabric import free_port
from dataplane.transport.tunnel import Tunnel, TunnelHandler
from dataplane.wire import events as ev
from dataplane.wire.connection import WireConfig
from dataplane.wire.frames import Open

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- an edge of its own
class Edge:
    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.pki = directory / "pki"
        if not self.pki.exists():
            pki.init_pki(str(self.pki), edge_hosts=["127.0.0.1"], edges=["edge-1"],
                         connectors=["connector-1"], clients=["client-1", "client-2"])
        apps = directory / "apps.json"
        apps.write_text(json.dumps({"apps": [{"name": "intranet", "connector_group": "default", "segments": [
            {"destination": "10.99.0.1", "ports": "80"}]}]}))
        self.port = free_port()
        self.metrics = f"127.0.0.1:{free_port()}"
        self.log = directory / "edge.log"
        full = environment(directory, FERRYMAN_TLS_CA=str(self.pki / "ca.pem"),
                           FERRYMAN_TLS_CERT=str(self.pki / "edge-1.pem"),
                           FERRYMAN_TLS_KEY=str(self.pki / "edge-1.key"),
                           FERRYMAN_METRICS_ADDR=self.metrics, FERRYMAN_EDGE_QUIC="off", **env)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "dataplane", "edge", "--listen",
                                          f"127.0.0.1:{self.port}", "--apps", str(apps)], cwd=ROOT, env=full,
                                         stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"edge exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"http://{self.metrics}/ready", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"edge not ready within 20s:\n{self.log.read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=5) as response:
            text = response.read().decode()
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    async def wait_metric(self, name: str, value: float, timeout: float = 5.0, **labels: str) -> None:
        deadline = time.monotonic() + timeout
        while (got := await asyncio.to_thread(self.metric, name, **labels)) != value:
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}{labels} is {got:g}, expected {value:g}\n{self.log.read_text()[-3000:]}")
            await asyncio.sleep(0.05)

    def log_lines(self, text: str) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if text in line]


@pytest.fixture
def edge(tmp_path: Path) -> Iterator[Callable[..., Edge]]:
    started: list[Edge] = []

    def make(**env: str) -> Edge:
        e = Edge(tmp_path, env)
        started.append(e)
        return e

    yield make
    for e in started:
        e.stop()


class Peer(TunnelHandler):
    """The test's side of one tunnel to the edge: records GOAWAYs and refused OPENs."""

    def __init__(self, name: str) -> None:
        self.stats = Stats("client", name)
        self.goaway: tuple[str, str] | None = None
        self.rejected: list[tuple[str, str]] = []

    def goaway_received(self, tunnel: Tunnel, event: ev.GoAwayReceived) -> None:
        self.goaway = (event.code, event.reason)

    def flow_rejected(self, tunnel: Tunnel, event: ev.FlowRejected) -> None:
        self.rejected.append((event.code, event.reason))


async def dial(edge: Edge, name: str, role: str = "client", source: str = "127.0.0.1") -> tuple[Tunnel, Peer]:
    """A tunnel with ``name``'s certificate, up once the edge's HELLO came (the edge may still refuse ours)."""
    peer = Peer(name)
    ctx = pki.client_context(str(edge.pki / f"{name}.pem"), str(edge.pki / f"{name}.key"), str(edge.pki / "ca.pem"))
    loop = asyncio.get_running_loop()
    _, tunnel = await loop.create_connection(
        lambda: Tunnel(peer, WireConfig(role=role, node=name), dialer=True, accept_roles=("edge",), keepalive=30,
                       handshake_timeout=10, write_buffer_high=1 << 20, label=name),
        "127.0.0.1", edge.port, ssl=ctx, server_hostname="127.0.0.1", local_addr=(source, 0))
    await asyncio.wait_for(tunnel.up_waiter, 10)
    return tunnel, peer


async def refused(tunnel: Tunnel, peer: Peer) -> tuple[str, str]:
    """The GOAWAY the edge ended ``tunnel`` with."""
    await asyncio.wait_for(tunnel.done_waiter, 10)
    assert peer.goaway is not None, (tunnel.close_code, tunnel.close_reason)
    return peer.goaway


# ---------------------------------------------------------------------------- tunnels per identity
def test_an_identity_holds_at_most_its_tunnels_and_others_still_connect(edge) -> None:
    e = edge(FERRYMAN_MAX_TUNNELS_PER_CONNECTOR="3")  # clients: the default, 16

    async def body() -> None:
        tunnels = [await dial(e, "client-1") for _ in range(16)]
        await e.wait_metric("ferryman_edge_clients", 16)
        extra, peer = await dial(e, "client-1")
        code, reason = await refused(extra, peer)
        assert code == "too_many_tunnels"
        assert reason == "client 'client-1' holds its maximum of 16 tunnels on edge edge-1"
        assert not any(t.closed for t, _ in tunnels)
        other, _ = await dial(e, "client-2")  # another identity is not held back
        await e.wait_metric("ferryman_edge_clients", 17)
        assert not other.closed

        connectors = [await dial(e, "connector-1", role="connector") for _ in range(3)]
        await e.wait_metric("ferryman_edge_connector_tunnels", 3)
        extra, peer = await dial(e, "connector-1", role="connector")
        assert (await refused(extra, peer))[0] == "too_many_tunnels"
        assert e.metric("ferryman_tunnels_closed_total", reason="too_many_tunnels") == 2

        tunnels[0][0].close("shutdown", "done")  # a slot freed is a slot taken again
        await e.wait_metric("ferryman_edge_clients", 16)
        again, _ = await dial(e, "client-1")
        await e.wait_metric("ferryman_edge_clients", 17)
        assert not again.closed
        for t, _ in [*tunnels, *connectors, (other, None), (again, None)]:
            t.close("shutdown", "done")

    asyncio.run(body())
    lines = e.log_lines("too_many_tunnels")
    assert any("client 'client-1' holds its maximum of 16 tunnels" in line for line in lines), lines


# ---------------------------------------------------------------------------- handshakes per source
def half_open(port: int, source: str) -> socket.socket:
    """A TCP connection to the edge that never starts its TLS handshake."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    sock.settimeout(5)
    return sock


def closed_at_once(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_half_open_handshakes_are_capped_per_source_and_in_all(edge) -> None:
    e = edge(FERRYMAN_MAX_HANDSHAKES_PER_SOURCE="8", FERRYMAN_MAX_HANDSHAKES="12", FERRYMAN_HANDSHAKE_TIMEOUT="30")

    async def body() -> None:
        hostile = [half_open(e.port, "127.0.0.1") for _ in range(8)]
        await e.wait_metric("ferryman_edge_handshakes", 8)
        ninth = half_open(e.port, "127.0.0.1")
        assert await asyncio.to_thread(closed_at_once, ninth)  # closed without waiting for the handshake timeout
        tunnel, _ = await dial(e, "client-1", source="127.0.0.2")  # another source completes its tunnel
        await e.wait_metric("ferryman_edge_clients", 1)
        assert not tunnel.closed
        await e.wait_metric("ferryman_edge_handshakes", 8)

        more = [half_open(e.port, "127.0.0.3") for _ in range(4)]  # 12 in all now
        await e.wait_metric("ferryman_edge_handshakes", 12)
        beyond = half_open(e.port, "127.0.0.4")
        assert await asyncio.to_thread(closed_at_once, beyond)
        assert e.metric("ferryman_tunnels_closed_total", reason="too_many_handshakes") == 2

        for sock in [*hostile, ninth, beyond]:
            sock.close()
        await e.wait_metric("ferryman_edge_handshakes", 4)
        back, _ = await dial(e, "client-2", source="127.0.0.1")  # the source is taken again
        await e.wait_metric("ferryman_edge_clients", 2)
        assert not back.closed
        for sock in more:
            sock.close()
        tunnel.close("shutdown", "done")
        back.close("shutdown", "done")

    asyncio.run(body())
    lines = e.log_lines("too_many_handshakes")
    assert any("8 TLS handshakes in progress from 127.0.0.1" in line for line in lines), lines
    assert any("12 TLS handshakes in progress on this edge" in line for line in lines), lines


# ---------------------------------------------------------------------------- log floods
def test_a_handshake_counts_until_the_hello_not_only_until_tls_is_done(edge) -> None:
    """A peer that completes TLS and never sends its HELLO still holds its handshake slot (the
    edge's HELLO timeout ends it); a tunnel that said HELLO holds none."""
    e = edge(FERRYMAN_HANDSHAKE_TIMEOUT="30")

    async def body() -> None:
        ctx = pki.client_context(str(e.pki / "client-1.pem"), str(e.pki / "client-1.key"), str(e.pki / "ca.pem"))
        reader, writer = await asyncio.open_connection("127.0.0.1", e.port, ssl=ctx, server_hostname="127.0.0.1")
        await e.wait_metric("ferryman_edge_handshakes", 1)
        tunnel, _ = await dial(e, "client-2")
        await e.wait_metric("ferryman_edge_clients", 1)
        assert e.metric("ferryman_edge_handshakes") == 1  # TLS done, no HELLO: still in its handshake
        writer.close()
        await e.wait_metric("ferryman_edge_handshakes", 0)
        tunnel.close("shutdown", "done")
        del reader

    asyncio.run(body())
    assert not e.log_lines("Traceback"), e.log.read_text()[-3000:]


def test_a_flood_of_refused_opens_is_logged_with_a_count_of_what_was_suppressed(edge) -> None:
    e = edge(FERRYMAN_LOG_LIMIT="5", FERRYMAN_LOG_LIMIT_INTERVAL="2")

    async def body() -> None:
        tunnel, peer = await dial(e, "client-1")
        await e.wait_metric("ferryman_edge_clients", 1)
        t0 = time.monotonic()
        for i in range(40):
            tunnel.open_flow(Open(host="10.98.0.1", port=1000 + i))
        while len(peer.rejected) < 40:
            await asyncio.sleep(0.01)
        assert {code for code, _ in peer.rejected} == {"no_application"}, peer.rejected[:3]
        assert time.monotonic() - t0 < 2, "the flood took longer than one window"
        await e.wait_metric("ferryman_log_lines_suppressed_total", 35)
        await asyncio.sleep(2.0)  # the next window
        tunnel.open_flow(Open(host="10.98.0.1", port=2000))
        while len(peer.rejected) < 41:
            await asyncio.sleep(0.01)
        tunnel.close("shutdown", "done")

    asyncio.run(body())
    lines = e.log_lines("open refused")
    assert len(lines) == 6, lines
    assert "35 similar lines suppressed" in lines[-1] and "suppressed=35" in lines[-1], lines[-1]


# ---------------------------------------------------------------------------- the control plane's server
def _connect(control: Control, source: str = "127.0.0.1") -> socket.socket:
    url = urllib.parse.urlsplit(control.url)
    sock = socket.create_connection((url.hostname, url.port), timeout=10, source_address=(source, 0))
    if url.scheme == "https":
        context = getattr(control, "ssl_context", None) or ssl.create_default_context(
            cafile=str(control.data_dir / "ca" / "ca.pem"))
        sock = context.wrap_socket(sock, server_hostname=url.hostname)
    return sock


def _answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes."""
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def _get(control: Control, path: str = "/health", source: str = "127.0.0.1", extra: bytes = b"") -> bytes:
    sock = _connect(control, source)
    try:
        sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: control\r\nConnection: close\r\n" + extra + b"\r\n")
        return _answer(sock)
    finally:
        sock.close()


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Control]:
    data = tmp_path_factory.mktemp("control") / "data"
    with Control.running(data, env={"FERRYMAN_CONTROL_REQUEST_TIMEOUT": "3",
                                    "FERRYMAN_CONTROL_MAX_WAITING_PER_SOURCE": "4",
                                    "FERRYMAN_CONTROL_MAX_CONNECTIONS": "12"}) as running:
        yield running


def test_a_slowloris_is_closed_after_the_request_timeout_while_requests_keep_working(control: Control) -> None:
    sock = _connect(control, "127.0.0.20")
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: control\r\n")
    t0 = time.monotonic()
    answer = b""
    closed_after = None
    sock.settimeout(0.25)
    while time.monotonic() - t0 < 8:
        try:
            sock.sendall(b"X")  # one byte of a header at a time, never the end of the head
        except OSError:
            closed_after = time.monotonic() - t0
            break
        assert _get(control, source="127.0.0.21").startswith(b"HTTP/1.1 200 ")  # others are served meanwhile
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except ConnectionResetError:
            closed_after = time.monotonic() - t0
            break
        answer += chunk
        if not chunk:
            closed_after = time.monotonic() - t0
            break
    sock.close()
    assert closed_after is not None, "the slowloris connection was never closed"
    assert 2.7 <= closed_after < 6, closed_after
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"no complete request head within 3s" in answer
    assert "request head timed out" in control.log.read_text()


def test_dribbled_request_bodies_count_per_source_and_are_closed_after_their_deadline(control: Control) -> None:
    """A complete head, then a body that never completes: the connection still counts as
    waiting for its source (a fifth from it is refused while another source is served), and it
    is closed with 408 once its body is late: 3 s (the request timeout) plus 1000 B at 64 KiB/s.
    Registration is unauthenticated and reads the whole body, so without this one address could
    hold every connection of the control plane and lock every node out."""
    head = (b"POST /v1/register HTTP/1.1\r\nHost: control\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n")
    dribbling = [_connect(control, "127.0.0.50") for _ in range(4)]
    try:
        for sock in dribbling:
            sock.sendall(head + b'{"token": "')
        started = time.monotonic()
        deadline = started + 5
        while True:  # the heads are parsed as they come: the fifth is refused once all four are counted
            fifth = _connect(control, "127.0.0.50")
            answer = _answer(fifth)
            fifth.close()
            if answer.startswith(b"HTTP/1.1 503 ") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert b"127.0.0.50 has 4 connections waiting for a request already" in answer
        assert _get(control, source="127.0.0.51").startswith(b"HTTP/1.1 200 ")  # another source is served
        for sock in dribbling:
            sock.sendall(b"a")  # a byte now and then does not extend the deadline
            sock.settimeout(8)
        answers = [_answer(sock) for sock in dribbling]
        elapsed = time.monotonic() - started
    finally:
        for sock in dribbling:
            sock.close()
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"request body not complete within 3.01526s of its head" in answer, answer
    assert 2.5 <= elapsed < 7, elapsed
    assert "request body timed out" in control.log.read_text()
    assert _get(control, source="127.0.0.50").startswith(b"HTTP/1.1 200 ")  # the source is served again


def test_a_request_head_over_the_limit_is_answered_431(control: Control) -> None:
    big = _get(control, source="127.0.0.30", extra=b"X-Big: " + b"a" * (100 * 1024) + b"\r\n")
    assert big.startswith(b"HTTP/1.1 431 "), big[:200]
    assert b"request head larger than 65536 bytes" in big
    fits = _get(control, source="127.0.0.30", extra=b"X-Big: " + b"a" * (60 * 1024) + b"\r\n")
    assert fits.startswith(b"HTTP/1.1 200 "), fits[:200]


def test_connections_waiting_per_source_and_in_all_are_capped(control: Control) -> None:
    idle = [_connect(control, "127.0.0.40") for _ in range(4)]  # accepted in order: counted before the fifth
    try:
        fifth = _connect(control, "127.0.0.40")
        answer = _answer(fifth)
        fifth.close()
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert b"127.0.0.40 has 4 connections waiting for a request already" in answer
        assert _get(control, source="127.0.0.41").startswith(b"HTTP/1.1 200 ")  # another source is served
        idle += [_connect(control, "127.0.0.42") for _ in range(4)]
        idle += [_connect(control, "127.0.0.43") for _ in range(4)]  # 12 connections in all
        full = _get(control, source="127.0.0.44")
        assert full.startswith(b"HTTP/1.1 503 "), full
        assert b"the server holds its maximum of 12 connections" in full
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 5
    while not _get(control, source="127.0.0.44").startswith(b"HTTP/1.1 200 "):  # closed ones are forgotten
        assert time.monotonic() < deadline
        time.sleep(0.05)


# ---------------------------------------------------------------------------- a node's metrics server
def test_the_metrics_server_holds_the_whole_head_to_its_deadline_and_caps_sources() -> None:
    async def body() -> None:
        stats = Stats("edge", "e")
        server = await start_metrics_server("127.0.0.1:0", stats, lambda: True, idle_timeout=0.6,
                                            limits=HttpLimits(max_waiting_per_source=2))
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /metrics HTTP/1.1\r\n")
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            reset = False  # closed while our bytes were still unread: the kernel says so with a reset
            while not reader.at_eof() and not reset and loop.time() - t0 < 5:
                writer.write(b"X")  # every byte within the idle time, never the end of the head
                try:
                    await asyncio.wait_for(reader.read(1), 0.2)
                except asyncio.TimeoutError:
                    pass
                except ConnectionResetError:
                    reset = True
            assert (reader.at_eof() or reset) and 0.5 <= loop.time() - t0 < 2, loop.time() - t0
            writer.close()

            waiting = [await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.50", 0)) for _ in range(2)]
            await asyncio.sleep(0.1)
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.50", 0))
            answer = await asyncio.wait_for(reader.read(), 5)
            assert answer.startswith(b"HTTP/1.1 503 ") and b"127.0.0.50 has 2 connections waiting" in answer
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.51", 0))
            writer.write(b"GET /health HTTP/1.1\r\n\r\n")
            assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200 ")
            assert stats.log_limit.suppressed == 0
            for _, w in waiting:
                w.close()
        finally:
            server.close()

    asyncio.run(body())


# ---------------------------------------------------------------------------- the pieces
def test_counts_cap_per_key_and_in_all_and_forget_keys_at_zero() -> None:
    counts = Counts(per_key=2, total=3)
    assert counts.take("a") is None and counts.take("a") is None
    assert counts.take("a") == "key"
    assert counts.take("b") is None
    assert counts.take("c") == "total"
    counts.give("a")
    assert counts.take("c") is None
    for key in ("a", "b", "c"):
        counts.give(key)
    counts.give("nobody")
    assert counts.total == 0 and len(counts) == 0
    assert counts.take("x", per_key=0) == "key"


def test_the_log_limiter_counts_what_it_drops_and_stays_bounded() -> None:
    now = [0.0]
    limiter = LogLimiter(limit=2, interval=10, max_keys=3, clock=lambda: now[0])
    assert [limiter.allow("p") for _ in range(5)] == [(True, 0), (True, 0), (False, 0), (False, 0), (False, 0)]
    assert limiter.suppressed == 3
    now[0] = 10.0
    assert limiter.allow("p") == (True, 3)  # the next line reports what was dropped
    assert limiter.allow("p") == (True, 0)
    for key in ("q", "r", "s", "t"):  # beyond max_keys: one shared bucket, memory bounded
        limiter.allow(key)
    assert len(limiter._keys) <= 3 + 1
    now[0] = 30.0
    for i in range(1000):
        limiter.allow(f"k{i}")
    assert len(limiter._keys) <= 3 + 1
    assert source_key("2001:db8::1") == "2001:db8::/64" and source_key("::ffff:10.0.0.1") == "10.0.0.1"
