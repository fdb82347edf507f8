"""A flow's end never takes down its tunnel: the traffic matrix through the full path.

Real edge, connector and client agent processes (``Fabric``, TLS/TCP tunnels) and a real
backend process. For ``DURATION`` seconds, ``PARALLEL`` bulk flows run at all times through
the client's forward, each sending and receiving at once; a share of them is ended on
purpose mid-transfer, while data and credit are in flight both ways:

- ``app_close``: the application closes its socket (unread data: the kernel resets it);
- ``app_reset``: the application resets its socket (SO_LINGER 0);
- ``backend_reset``: the backend resets its socket;
- ``backend_close``: the backend stops sending (FIN) and only drains what it is sent.

The others (``ok``) must finish with both directions intact (sha256 of what each side
received equals what the other side sent). Afterwards no tunnel of any node went down
(no ``client_lost`` / ``connector_lost`` at the edge, no tunnel closed anywhere, the
edge still holds its client and connector tunnels) and no handler error was counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from dataplane.fabric import Fabric

from conftest import metric, scrape, wait_metric

DURATION = 30.0  # seconds of traffic (the promise is about sustained abrupt ends, not one)
PARALLEL = 64  # flows running at every moment
MODES = ("ok", "ok", "ok", "app_close", "app_reset", "backend_reset", "backend_close")
FLOW_TIMEOUT = 30.0  # one flow, whatever its end, is over within this
CHUNK = 65536
# A small per-flow window keeps credit (WINDOW frames) in flight all the time, so that ends
# cross credit and data in both directions as often as possible.
FLOW_WINDOW = 32768

BACKEND = r"""
import asyncio, hashlib, socket, struct, sys

LINGER_RESET = struct.pack("ii", 1, 0)

async def handle(reader, writer):
    try:
        seed, up, down, mode = (await reader.readline()).split()
        up, down, mode = int(up), int(down), mode.decode()
        cut = down // 3
        received = hashlib.sha256()

        async def upload():
            got = 0
            while got < up:
                data = await reader.read(65536)
                if not data:
                    return got
                received.update(data)
                got += len(data)
            return got

        async def download():
            data = hashlib.shake_256(seed + b"d").digest(down)
            end = cut if mode in ("backend_reset", "backend_close") else down
            for start in range(0, end, 65536):
                writer.write(data[start:min(start + 65536, end)])
                await writer.drain()

        reading = asyncio.ensure_future(upload())
        reading.add_done_callback(lambda t: t.cancelled() or t.exception())
        await download()
        if mode == "backend_reset":
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            writer.transport.abort()
            reading.cancel()
            return
        if mode == "backend_close":
            writer.write_eof()  # no more from here; what is sent here is still read
            await reading
            while await reader.read(65536):
                pass
            writer.close()
            return
        got = await reading
        if got == up:
            writer.write(received.digest())
            await writer.drain()
        writer.close()
    except (OSError, asyncio.CancelledError, ValueError):
        writer.transport.abort()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def backend_port() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", BACKEND], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        line = proc.stdout.readline().split()  # type: ignore[union-attr]
        assert len(line) == 1, f"backend did not start (exit code {proc.poll()})"
        yield int(line[0])
    finally:
        proc.kill()
        proc.wait()


async def one_flow(port: int, mode: str, rng: random.Random) -> str:
    """One bulk flow both ways through the forward; returns its outcome (``ok`` only when intact)."""
    seed = os.urandom(8).hex().encode()
    up, down = rng.randint(64 * 1024, 2 * 1024 * 1024), rng.randint(64 * 1024, 2 * 1024 * 1024)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    except OSError as exc:
        return f"{mode} flow could not connect to the forward: {exc!r}"
    sock = writer.get_extra_info("socket")
    upload = hashlib.shake_256(seed + b"u").digest(up)
    cut = down // 3

    async def send() -> None:
        writer.write(b"%s %d %d %s\n" % (seed, up, down, mode.encode()))
        for start in range(0, up, CHUNK):
            writer.write(upload[start:start + CHUNK])
            await writer.drain()
        if mode == "ok":
            writer.write_eof()

    sending = asyncio.ensure_future(send())
    got = hashlib.sha256()
    size = 0
    tail = b""
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            if size + len(data) > down:  # the digest of our upload follows the download
                keep = max(0, down - size)
                tail += data[keep:]
                data = data[:keep]
            got.update(data)
            size += len(data)
            if mode in ("app_close", "app_reset") and size >= cut:
                if mode == "app_reset":
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return mode
        if mode != "ok":
            return mode
        await sending
        if size != down or got.digest() != hashlib.sha256(hashlib.shake_256(seed + b"d").digest(down)).digest():
            return f"ok flow: download differs ({size} of {down} bytes)"
        if tail != hashlib.sha256(upload).digest():
            return f"ok flow: upload differs (backend answered {tail.hex()[:16]}...)"
        return "ok"
    except (OSError, asyncio.IncompleteReadError) as exc:
        return mode if mode != "ok" else f"ok flow failed: {exc!r}"
    finally:
        sending.cancel()
        with contextlib.suppress(BaseException):
            await sending
        writer.transport.abort()


async def traffic(port: int, duration: float) -> Counter[str]:
    """``PARALLEL`` flows at every moment for ``duration`` seconds; the outcomes counted."""
    rng = random.Random(1234)
    outcomes: Counter[str] = Counter()
    deadline = time.monotonic() + duration

    async def lane() -> None:
        while time.monotonic() < deadline:
            mode = rng.choice(MODES)
            try:
                outcome = await asyncio.wait_for(one_flow(port, mode, rng), FLOW_TIMEOUT)
            except TimeoutError:
                outcome = f"{mode} flow hung for {FLOW_TIMEOUT:g}s"
            outcomes[outcome] += 1

    await asyncio.gather(*(lane() for _ in range(PARALLEL)))
    return outcomes


def tunnels_closed(fabric: Fabric, name: str) -> float:
    return metric(scrape(fabric.metrics[name]), "ferryman_tunnels_closed_total")


@pytest.mark.timeout(DURATION + 60)
def test_abrupt_flow_ends_never_take_down_a_tunnel(tmp_path: Path, backend_port: int) -> None:
    fabric = Fabric(str(tmp_path / "fabric"), [("127.0.0.1", 0, "127.0.0.1", backend_port)],
                    env={"FERRYMAN_CONNECTOR_TUNNELS": "2", "FERRYMAN_TRANSPORT": "tcp",
                         "FERRYMAN_FLOW_WINDOW": str(FLOW_WINDOW)})
    with fabric:
        edge = fabric.metrics["edge-1"]
        # the client's tunnel and the connector's two (the second may come up after /ready)
        tunnels_before = metric(wait_metric(edge, "ferryman_tunnels", 3, timeout=15.0), "ferryman_tunnels")
        assert tunnels_before == 3
        outcomes = asyncio.run(traffic(fabric.forward_ports[0], DURATION))
        print(f"outcomes after {DURATION:g}s with {PARALLEL} parallel flows: {dict(outcomes)}")
        failures = {k: v for k, v in outcomes.items() if k not in {"ok", *MODES}}
        assert not failures, f"flows not ended on purpose went wrong: {failures}"
        assert outcomes["ok"] >= PARALLEL, f"too few intact flows to mean anything: {dict(outcomes)}"
        for mode in MODES[3:]:
            assert outcomes[mode] > 0, f"no flow was ended by {mode}"
        samples = scrape(edge)
        assert metric(samples, "ferryman_tunnels") == tunnels_before
        for name in fabric.procs:
            assert tunnels_closed(fabric, name) == 0, f"{name} lost a tunnel:\n{fabric.log_tail(name, 40)}"
            assert metric(scrape(fabric.metrics[name]), "ferryman_handler_errors_total") == 0, \
                f"{name} had handler errors:\n{fabric.log_tail(name, 40)}"
        with open(fabric.logs["edge-1"], errors="replace") as fh:
            log = fh.read()
        assert "client_lost" not in log and "connector_lost" not in log
