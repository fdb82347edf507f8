"""Resilience of the running fabric: real edge, connector and client processes on loopback
with real mutual TLS 1.3, a real backend process, real bytes checked for content.

- a connector killed mid-transfer loses only its own flows (promptly, with a reason the
  edge logs); the other connector's flows and all new flows carry on;
- a restarted edge is rejoined by connector and client;
- keepalive detects a frozen edge within three intervals, and the nodes rejoin it;
- misbehaving peers (speaking the wire protocol by hand over a real TLS tunnel, or not
  speaking TLS properly at all) are cut off with a GOAWAY naming the reason, logged,
  and hurt no other tunnel;
- a connector draining on SIGTERM gets no new flows, lets its flow finish, then exits.

The backend is this file's own small asyncio server (``BACKEND``), started as a process:
``STREAM seed total chunk interval`` streams shake_256(seed) paced in chunks, ``ECHO``
echoes until EOF; a second port accepts and never reads (for flow-control abuse).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dataplane.basics import pki
from dataplane.fabric import Fabric
from dataplane.wire.frames import (
    DECODERS,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    PREAMBLE,
    PREAMBLE_SIZE,
    FrameType,
    GoAway,
    Hello,
    Open,
    encode_control,
    encode_header,
    encode_preamble,
)

BACKEND = r"""
import asyncio, hashlib, sys

held = []

async def handle(reader, writer):
    try:
        parts = (await reader.readline()).split()
        if parts[:1] == [b"STREAM"]:
            seed, total, chunk, interval = parts[1], int(parts[2]), int(parts[3]), float(parts[4])
            data = hashlib.shake_256(seed).digest(total)
            for start in range(0, total, chunk):
                writer.write(data[start:start + chunk])
                await writer.drain()
                if interval:
                    await asyncio.sleep(interval)
        elif parts[:1] == [b"ECHO"]:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()

class Stall(asyncio.Protocol):
    def connection_made(self, transport):
        transport.pause_reading()
        held.append(transport)

async def main():
    loop = asyncio.get_running_loop()
    a = await asyncio.start_server(handle, "127.0.0.1", 0)
    b = await loop.create_server(Stall, "127.0.0.1", 0)
    print(a.sockets[0].getsockname()[1], b.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


class Backend:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, stall_port: int) -> None:
        self.proc = proc
        self.port = port
        self.stall_port = stall_port


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    proc = subprocess.Popen([sys.executable, "-c", BACKEND], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        line = proc.stdout.readline().split()  # type: ignore[union-attr]
        assert len(line) == 2, f"backend did not start (exit code {proc.poll()})"
        yield Backend(proc, int(line[0]), int(line[1]))
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------- helpers
def make_fabric(tmp_path: Path, backend: Backend, env: dict[str, str], *, connectors: int = 1,
                stall: bool = False) -> Fabric:
    forwards = [("127.0.0.1", 0, "127.0.0.1", backend.port)]
    if stall:
        forwards.append(("127.0.0.1", 0, "127.0.0.1", backend.stall_port))
    return Fabric(str(tmp_path / "fabric"), forwards, env={"FERRYMAN_CONNECTOR_TUNNELS": "1", **env},
                  connectors=connectors)


def dump_logs(fabric: Fabric, lines: int = 40) -> None:
    for name in fabric.logs:
        print(f"----- {name} (last {lines} lines of {fabric.logs[name]})")
        print(fabric.log_tail(name, lines))


@contextlib.contextmanager
def running(fabric: Fabric) -> Iterator[Fabric]:
    """Start the fabric; on any failure (incl. a pytest timeout) print every node's log tail."""
    fabric.start()
    try:
        yield fabric
    except BaseException:
        dump_logs(fabric)
        raise
    finally:
        fabric.stop()


def scrape(fabric: Fabric, name: str) -> dict[str, float]:
    """A node's /metrics as ``{sample: value}``; by-reason samples are ``name{reason=...}``."""
    with urllib.request.urlopen(f"http://{fabric.metrics[name]}/metrics", timeout=3) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            extra = sorted((k, v) for k, v in sample.labels.items() if k not in ("role", "node"))
            key = sample.name + ("{" + ",".join(f"{k}={v}" for k, v in extra) + "}" if extra else "")
            out[key] = sample.value
    return out


def closed_total(metrics: dict[str, float]) -> float:
    """Tunnels closed, all reasons together."""
    return sum(v for k, v in metrics.items() if k.startswith("ferryman_tunnels_closed_total"))


def is_ready(fabric: Fabric, name: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{fabric.metrics[name]}/ready", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll until ``predicate()``; returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        time.sleep(interval)
    return time.monotonic() - start


def log_lines(fabric: Fabric, name: str) -> list[str]:
    with open(fabric.logs[name], errors="replace") as fh:
        return fh.read().splitlines()


def wait_log(fabric: Fabric, name: str, *needles: str, timeout: float = 5.0) -> str:
    """The first line of ``name``'s log containing every needle (waits for it)."""
    found: list[str] = []

    def check() -> bool:
        found[:] = [line for line in log_lines(fabric, name) if all(n in line for n in needles)]
        return bool(found)

    wait_until(check, timeout, f"{name} log line with {needles}")
    return found[0]


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def echo_roundtrip(port: int, size: int = 65536, timeout: float = 10.0) -> None:
    """One flow through the client forward: send random bytes, get exactly them back."""
    payload = os.urandom(size)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"ECHO\n" + payload)
        s.shutdown(socket.SHUT_WR)
        got = recv_all(s)
    assert len(got) == size and got == payload, f"echo returned {len(got)} bytes, content differs"


class StreamFlow(threading.Thread):
    """One app connection reading a paced backend stream; records content, outcome and times."""

    def __init__(self, port: int, seed: str, total: int, chunk: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.request = f"STREAM {seed} {total} {chunk} {interval}\n".encode()
        self.expected = hashlib.shake_256(seed.encode()).digest(total)
        self.data = bytearray()
        self.outcome = ""  # "eof" or "error: ..."
        self.ended = 0.0
        self.first_byte = threading.Event()

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
                s.sendall(self.request)
                while chunk := s.recv(65536):
                    self.data += chunk
                    self.first_byte.set()
                self.outcome = "eof"
        except OSError as exc:
            self.outcome = f"error: {exc!r}"
        self.ended = time.monotonic()

    @property
    def complete(self) -> bool:
        return self.outcome == "eof" and bytes(self.data) == self.expected

    @property
    def correct_prefix(self) -> bool:
        return bytes(self.data) == self.expected[:len(self.data)]


class EchoLoop(threading.Thread):
    """Back-to-back verified echo round trips until stopped: the 'normal transfer'."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.ok: list[float] = []  # completion times
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                echo_roundtrip(self.port, 32 * 1024)
                self.ok.append(time.monotonic())
            except (OSError, AssertionError) as exc:
                self.failures.append(repr(exc))
            time.sleep(0.02)


# ---------------------------------------------------------------------------- 1. connector killed
@pytest.mark.timeout(60)
def test_connector_killed_mid_transfer_loses_only_its_flows(tmp_path: Path, backend: Backend) -> None:
    fabric = make_fabric(tmp_path, backend, {}, connectors=2)
    with running(fabric):
        port = fabric.forward_ports[0]
        # 16 flows, each 640 KiB paced over ~4 s.
        flows = [StreamFlow(port, f"kill-{i}-{os.urandom(4).hex()}", 640 * 1024, 8192, 0.05) for i in range(16)]
        for flow in flows:
            flow.start()
        for flow in flows:
            assert flow.first_byte.wait(10), f"flow got no data: {flow.outcome}"
        load = {name: scrape(fabric, name)["ferryman_flows"] for name in fabric.connector_names}
        assert sum(load.values()) == 16, load
        victim = max(load, key=lambda n: load[n])
        survivor = next(n for n in fabric.connector_names if n != victim)
        on_victim = int(load[victim])
        assert 0 < on_victim < 16, f"flows should be spread over both connectors: {load}"
        assert not any(f.ended for f in flows), "a flow ended before the kill"
        print(f"flows per connector: {load}; killing {victim}")

        killed_at = time.monotonic()
        fabric.kill(victim, signal.SIGKILL)

        # The victim's flows end at the app promptly (reset or EOF), not hang.
        wait_until(lambda: sum(1 for f in flows if f.ended) >= on_victim, 5.0,
                   f"{on_victim} flows of {victim} ended")
        cut = [f for f in flows if f.ended and not f.complete]
        assert len(cut) == on_victim, [f.outcome for f in flows if f.ended]
        for f in cut:
            assert f.ended - killed_at < 3.0, f"a flow of the killed connector took {f.ended - killed_at:.1f}s to end"
            assert f.correct_prefix, "bytes received before the reset are not the stream's bytes"

        line = wait_log(fabric, "edge-1", "reset", f"connector {victim} lost")
        assert "WARNING" in line, line

        # New flows all succeed, through the surviving connector, while the old ones stream on.
        opened_before = scrape(fabric, survivor)["ferryman_flows_opened_total"]
        for _ in range(8):
            echo_roundtrip(port)
        assert scrape(fabric, survivor)["ferryman_flows_opened_total"] >= opened_before + 8

        # The survivor's flows keep going to the end with exactly the right content.
        for f in flows:
            f.join(15)
        survivors = [f for f in flows if f not in cut]
        assert len(survivors) == 16 - on_victim
        for f in survivors:
            assert f.outcome == "eof", f.outcome
            assert f.complete, f"flow on {survivor} got {len(f.data)} bytes, content correct: {f.correct_prefix}"
            assert f.ended > killed_at + 1.0, "surviving flow ended too early to have outlived the kill"


# ---------------------------------------------------------------------------- 2. edge restarted
@pytest.mark.timeout(60)
def test_edge_restart_connector_and_client_rejoin(tmp_path: Path, backend: Backend) -> None:
    fabric = make_fabric(tmp_path, backend, {"FERRYMAN_RECONNECT_MIN": "0.2", "FERRYMAN_RECONNECT_MAX": "1"})
    with running(fabric):
        port = fabric.forward_ports[0]
        echo_roundtrip(port, 256 * 1024)
        before = {name: scrape(fabric, name) for name in ("connector-1", "client-1")}

        fabric.kill("edge-1", signal.SIGKILL)
        wait_until(lambda: not is_ready(fabric, "client-1") and not is_ready(fabric, "connector-1"), 5.0,
                   "client and connector notice the edge is gone")
        fabric.restart("edge-1")
        restarted = time.monotonic()
        took = wait_until(lambda: is_ready(fabric, "connector-1") and is_ready(fabric, "client-1"), 10.0,
                          "connector and client ready again after the edge restart")
        print(f"rejoined {took:.2f}s after the edge was ready again")
        for name in ("connector-1", "client-1"):
            m = scrape(fabric, name)
            assert m["ferryman_reconnects_total"] > before[name]["ferryman_reconnects_total"], name
            assert m["ferryman_tunnels_opened_total"] > before[name]["ferryman_tunnels_opened_total"], name
            assert m["ferryman_tunnels"] >= 1, name
        assert time.monotonic() - restarted < 10.0
        echo_roundtrip(port, 256 * 1024)


# ---------------------------------------------------------------------------- 3. keepalive
@pytest.mark.timeout(60)
def test_keepalive_detects_a_frozen_edge_and_nodes_rejoin(tmp_path: Path, backend: Backend) -> None:
    interval = 0.5
    limit = 3 * interval + 1.0
    fabric = make_fabric(tmp_path, backend, {
        "FERRYMAN_KEEPALIVE_INTERVAL": str(interval), "FERRYMAN_RECONNECT_MIN": "0.2",
        "FERRYMAN_RECONNECT_MAX": "1", "FERRYMAN_HANDSHAKE_TIMEOUT": "2"}, connectors=2)
    nodes = ["client-1", *fabric.connector_names]
    with running(fabric):
        echo_roundtrip(fabric.forward_ports[0])
        for name in nodes:
            assert scrape(fabric, name)["ferryman_tunnels"] == 1, name
        detected: dict[str, float] = {}
        stopped_at = time.monotonic()
        fabric.kill("edge-1", signal.SIGSTOP)
        try:
            while len(detected) < len(nodes) and time.monotonic() - stopped_at < limit + 2.0:
                for name in nodes:
                    if name not in detected and scrape(fabric, name)["ferryman_tunnels"] == 0:
                        detected[name] = time.monotonic() - stopped_at
                time.sleep(0.02)
            print("tunnel gauge at 0 after SIGSTOP:", {n: round(t, 2) for n, t in detected.items()})
            assert set(detected) == set(nodes), f"still up: {set(nodes) - set(detected)}"
            for name, took in detected.items():
                assert took < limit, f"{name} took {took:.2f}s to drop a dead tunnel (limit {limit:g}s)"
                line = wait_log(fabric, name, "keepalive_timeout", timeout=2.0)
                assert "WARNING" in line and "tunnel closed" in line, line
                m = scrape(fabric, name)
                assert m.get("ferryman_tunnels_closed_total{reason=keepalive_timeout}", 0) >= 1, name
        finally:
            fabric.kill("edge-1", signal.SIGCONT)
        wait_until(lambda: all(is_ready(fabric, n) for n in nodes), 15.0, "nodes ready again after SIGCONT")
        echo_roundtrip(fabric.forward_ports[0])


# ---------------------------------------------------------------------------- 4. misbehaving peers
class RawPeer:
    """A tunnel peer driven by hand over a real TLS connection: sends any bytes, parses frames."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, int, bytes]] = []
        self.preamble: tuple[bytes, int] | None = None
        self.closed = asyncio.Event()
        self.error: BaseException | None = None
        self.addr = ""
        self.hello: Hello | None = None
        self._buf = bytearray()

    async def connect(self, port: int, ctx: ssl.SSLContext) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        host, lport = sock.getsockname()[:2]
        self.addr = f"{host}:{lport}"
        sock.setblocking(False)
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(sock=sock, ssl=ctx, server_hostname="127.0.0.1"), 5)
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while chunk := await self.reader.read(65536):
                self._buf += chunk
                self._parse()
        except (OSError, ssl.SSLError) as exc:
            self.error = exc
        finally:
            self.closed.set()

    def _parse(self) -> None:
        buf = self._buf
        if self.preamble is None:
            if len(buf) < PREAMBLE_SIZE:
                return
            self.preamble = PREAMBLE.unpack_from(buf, 0)
            del buf[:PREAMBLE_SIZE]
        while len(buf) >= HEADER_SIZE:
            ftype, _flags, fid, length = HEADER.unpack_from(buf, 0)
            if len(buf) < HEADER_SIZE + length:
                return
            self.frames.append((ftype, fid, bytes(buf[HEADER_SIZE:HEADER_SIZE + length])))
            del buf[:HEADER_SIZE + length]

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def find(self, ftype: int, flow: int | None = None) -> bytes | None:
        for t, fid, payload in self.frames:
            if t == ftype and (flow is None or fid == flow):
                return payload
        return None

    async def wait_frame(self, ftype: int, flow: int | None = None, timeout: float = 5.0) -> bytes:
        deadline = asyncio.get_running_loop().time() + timeout
        while (payload := self.find(ftype, flow)) is None:
            if self.closed.is_set():
                raise AssertionError(f"tunnel closed before a {FrameType(ftype).name} frame "
                                     f"(got {[FrameType(t).name for t, _, _ in self.frames]}, error {self.error!r})")
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no {FrameType(ftype).name} frame within {timeout:g}s")
            await asyncio.sleep(0.01)
        return payload

    async def handshake(self, role: str = "client", node: str = "client-1") -> Hello:
        self.send(encode_preamble() + encode_control(0, Hello(
            role=role, node=node, max_frame=262144, window=524288, max_flows=64)))
        self.hello = DECODERS[FrameType.HELLO].decode(await self.wait_frame(FrameType.HELLO))
        assert self.preamble == (MAGIC, 1)
        return self.hello

    async def expect_goaway(self, code: str) -> GoAway:
        """The edge sends GOAWAY naming ``code`` and then closes the tunnel."""
        goaway: GoAway = DECODERS[FrameType.GOAWAY].decode(await self.wait_frame(FrameType.GOAWAY))
        assert goaway.code == code, f"GOAWAY code {goaway.code!r} ({goaway.reason}), expected {code!r}"
        await asyncio.wait_for(self.closed.wait(), 5)
        assert self.find(FrameType.GOAWAY) is not None
        return goaway

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


def tls_context(cert: str | None, key: str | None, ca: str) -> ssl.SSLContext:
    """Trusts the edge's CA; presents ``cert`` (any CA) or no certificate at all."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(ca)
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


async def misbehave(kind: str, port: int, ctx: ssl.SSLContext, stall_port: int) -> tuple[str, GoAway]:
    """Open a tunnel, break the protocol in one way; returns our address and the GOAWAY."""
    peer = RawPeer()
    await peer.connect(port, ctx)
    try:
        if kind == "name_mismatch":
            await peer.handshake(node="client-2")
            return peer.addr, await peer.expect_goaway("name_mismatch")
        if kind == "role_mismatch":
            await peer.handshake(role="connector", node="client-1")
            return peer.addr, await peer.expect_goaway("role_mismatch")
        hello = await peer.handshake()
        if kind == "unknown_frame":
            peer.send(HEADER.pack(0xEE, 0, 0, 4) + b"junk")
        elif kind == "frame_too_large":
            peer.send(encode_header(FrameType.DATA, 1, hello.max_frame + 1))
        elif kind == "bad_frame":  # an OPEN whose body is not msgpack at all
            body = b"\xc1\xc1\xc1\xc1"
            peer.send(encode_header(FrameType.OPEN, 1, len(body)) + body)
        elif kind == "flow_control":
            peer.send(encode_control(1, Open(host="127.0.0.1", port=stall_port)))
            await peer.wait_frame(FrameType.OPEN_OK, flow=1)
            size = min(hello.max_frame, 65536)
            frame = encode_header(FrameType.DATA, 1, size) + bytes(size)
            sent, limit = 0, hello.window + 64 * 1024 * 1024
            # Never wait for WINDOW: the backend does not read, so credit runs out for sure.
            while sent < limit and peer.find(FrameType.GOAWAY) is None and not peer.closed.is_set():
                peer.send(frame)
                sent += size
                try:
                    await peer.writer.drain()
                except ConnectionError:
                    break
            assert sent > hello.window, f"edge cut us off after {sent} bytes, within its window {hello.window}"
            print(f"flow_control: {sent} bytes sent without waiting for WINDOW (window {hello.window})")
        else:
            raise AssertionError(kind)
        return peer.addr, await peer.expect_goaway(kind)
    finally:
        peer.close()


async def refused_tls(port: int, ctx: ssl.SSLContext) -> tuple[str, str]:
    """Connect with a certificate the edge must refuse; returns our address and what we saw."""
    peer = RawPeer()
    try:
        await peer.connect(port, ctx)
    except (ssl.SSLError, ConnectionError) as exc:
        return peer.addr, f"handshake failed: {exc!r}"
    try:
        await asyncio.wait_for(peer.closed.wait(), 5)
        assert peer.preamble is None and not peer.frames, "edge spoke the tunnel protocol to an unauthenticated peer"
        return peer.addr, f"closed after the handshake: {peer.error!r}"
    finally:
        peer.close()


@pytest.mark.timeout(90)
def test_misbehaving_peers_are_cut_off_alone(tmp_path: Path, backend: Backend) -> None:
    fabric = make_fabric(tmp_path, backend, {"FERRYMAN_HANDSHAKE_TIMEOUT": "1"}, stall=True)
    with running(fabric):
        edge = fabric.edge_port
        certs = Path(fabric.workdir) / "pki"
        ca = str(certs / "ca.pem")
        good = pki.client_context(str(certs / "client-1.pem"), str(certs / "client-1.key"), ca)
        before = scrape(fabric, "client-1")
        traffic = EchoLoop(fabric.forward_ports[0])
        traffic.start()
        try:
            wait_until(lambda: len(traffic.ok) >= 2, 10, "normal transfers before the abuse")

            for kind in ("unknown_frame", "frame_too_large", "flow_control", "bad_frame",
                         "name_mismatch", "role_mismatch"):
                addr, goaway = asyncio.run(misbehave(kind, edge, good, backend.stall_port))
                print(f"{kind}: GOAWAY {goaway.code}: {goaway.reason}")
                line = wait_log(fabric, "edge-1", "tunnel closed", f"peer_addr={addr}", f"code={kind}")
                assert " WARNING " in line, line
                done = len(traffic.ok)
                wait_until(lambda: len(traffic.ok) > done, 10, f"a normal transfer completes after {kind}")

            # A certificate from another CA, and no certificate at all: refused in the TLS handshake.
            other = pki.init_pki(str(tmp_path / "other-pki"), force=True)["client-1"]
            for label, ctx in (("foreign CA", tls_context(other.cert, other.key, ca)),
                               ("no certificate", tls_context(None, None, ca))):
                addr, seen = asyncio.run(refused_tls(edge, ctx))
                print(f"{label}: {seen}")
                line = wait_log(fabric, "edge-1", "tunnel refused", f"peer_addr={addr}")
                assert " WARNING " in line and "TLS handshake failed" in line, line
                assert re.search(r"certificate", line, re.I), f"{label}: reason does not say why: {line}"
                done = len(traffic.ok)
                wait_until(lambda: len(traffic.ok) > done, 10, f"a normal transfer completes after {label}")

            # Plain TCP that never speaks: closed once FERRYMAN_HANDSHAKE_TIMEOUT (1 s) is over.
            with socket.create_connection(("127.0.0.1", edge), timeout=10) as s:
                addr = "%s:%d" % s.getsockname()[:2]
                start = time.monotonic()
                with contextlib.suppress(ConnectionResetError):
                    assert s.recv(1024) == b""
                idle = time.monotonic() - start
            print(f"silent TCP connection closed after {idle:.2f}s")
            assert 0.8 < idle < 3.0, idle
            line = wait_log(fabric, "edge-1", "tunnel refused", f"peer_addr={addr}")
            assert "handshake" in line, line

            done = len(traffic.ok)
            wait_until(lambda: len(traffic.ok) > done + 1, 10, "normal transfers after all the abuse")
        finally:
            traffic.stop.set()
            traffic.join(15)
        assert traffic.failures == [], traffic.failures
        print(f"{len(traffic.ok)} normal transfers, none failed")

        # No other tunnel was touched: the fabric's own client never reconnected.
        client = scrape(fabric, "client-1")
        assert client["ferryman_tunnels_opened_total"] == before["ferryman_tunnels_opened_total"]
        assert client["ferryman_reconnects_total"] == before["ferryman_reconnects_total"]
        assert closed_total(client) == closed_total(before)
        edge_m = scrape(fabric, "edge-1")
        assert edge_m["ferryman_edge_clients"] == 1, "a misbehaving tunnel is still registered"
        assert edge_m["ferryman_edge_connector_tunnels"] == 1
        assert edge_m.get("ferryman_tunnels_closed_total{reason=tls_handshake_failed}", 0) >= 3
        echo_roundtrip(fabric.forward_ports[0], 256 * 1024)


# ---------------------------------------------------------------------------- 5. connector draining
@pytest.mark.timeout(60)
def test_draining_connector_gets_no_new_flows_and_exits_when_idle(tmp_path: Path, backend: Backend) -> None:
    grace = 5.0
    fabric = make_fabric(tmp_path, backend, {"FERRYMAN_DRAIN_GRACE": str(grace)}, connectors=2)
    with running(fabric):
        port = fabric.forward_ports[0]
        # One flow of 320 KiB paced over ~2.4 s.
        flow = StreamFlow(port, f"drain-{os.urandom(4).hex()}", 320 * 1024, 8192, 0.06)
        flow.start()
        assert flow.first_byte.wait(10), flow.outcome
        load = {name: scrape(fabric, name)["ferryman_flows"] for name in fabric.connector_names}
        victim = next(n for n, v in load.items() if v == 1)
        other = next(n for n in fabric.connector_names if n != victim)
        assert load[other] == 0, load
        opened = {n: scrape(fabric, n)["ferryman_flows_opened_total"] for n in fabric.connector_names}

        term_at = time.monotonic()
        fabric.procs[victim].send_signal(signal.SIGTERM)
        wait_until(lambda: not is_ready(fabric, victim), 3.0, f"{victim} starts draining")

        # Held-open new flows: without draining, least-loaded balancing would give the
        # victim (1 flow) some of them. All must go to the other connector.
        held = []
        try:
            for _ in range(4):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                held.append(s)
                payload = os.urandom(1000)
                s.sendall(b"ECHO\n" + payload)
                got = b""
                while len(got) < len(payload):
                    chunk = s.recv(65536)
                    assert chunk, "new flow closed during drain"
                    got += chunk
                assert got == payload
            m_other = scrape(fabric, other)
            assert m_other["ferryman_flows"] == 4, m_other["ferryman_flows"]
            assert m_other["ferryman_flows_opened_total"] == opened[other] + 4
            assert scrape(fabric, victim)["ferryman_flows_opened_total"] == opened[victim]
        finally:
            for s in held:
                s.close()

        # The draining connector's flow finishes with all its bytes ...
        flow.join(grace + 5)
        assert flow.complete, f"{flow.outcome}, {len(flow.data)} bytes, prefix correct: {flow.correct_prefix}"
        assert flow.ended - term_at < grace
        # ... and then the connector exits on its own, long before the grace period is over.
        proc = fabric.procs[victim]
        wait_until(lambda: proc.poll() is not None, grace, f"{victim} exits after its last flow")
        exited_at = time.monotonic()
        print(f"flow ended {flow.ended - term_at:.2f}s after SIGTERM, connector exited "
              f"{exited_at - flow.ended:.2f}s after the flow")
        assert proc.returncode == 0, proc.returncode
        assert exited_at - flow.ended < 1.5
        assert exited_at - term_at < grace - 1.0
        lines = log_lines(fabric, victim)
        assert any("draining" in line for line in lines)
        assert not any("drain grace expired" in line for line in lines)
        echo_roundtrip(port)
