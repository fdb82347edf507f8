"""FERRYMAN_FLOW_BUFFER_BUDGET: flows toward sockets that read nothing cannot make the connector
hold more than its budget, the flows that have held bytes the longest are the ones reset, and a
flow whose backend reads keeps working throughout.

Real edge, connector and client agent processes (``Fabric``), a real backend process with two
listeners: one accepts and never reads (what a hostile user points flows at: any service that
waits for something), one echoes. Each stalled flow can make the connector hold its backend
socket's high-water mark (256 KiB) plus one flow window (512 KiB). Three of them fit the 4 MiB
budget and are held (the connector's ``ferryman_flow_buffer_bytes`` shows it); nine more do not,
and the first three, holding the longest, are reset (``buffer_budget``) while an echo flow
carries its bytes intact.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dataplane.fabric import Fabric

from conftest import metric, scrape, wait_metric

BUDGET = 4 * 1024 * 1024
# Each stalled flow's app sends this much: the connector's socket toward the backend takes up to
# 4 MiB into the kernel (tcp_wmem's largest send buffer) before its flow holds anything itself.
PUSH = 8 * 1024 * 1024

BACKEND = r"""
import socket, sys, threading

def listener():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # accepted sockets inherit it
    s.bind(("127.0.0.1", 0))
    s.listen(128)
    return s

stall, echo = listener(), listener()
held = []

def never_read():
    while True:
        conn, _ = stall.accept()
        held.append(conn)

def echo_one(conn):
    with conn:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass

def echo_all():
    while True:
        conn, _ = echo.accept()
        threading.Thread(target=echo_one, args=(conn,), daemon=True).start()

threading.Thread(target=never_read, daemon=True).start()
threading.Thread(target=echo_all, daemon=True).start()
print(stall.getsockname()[1], echo.getsockname()[1], flush=True)
sys.stdin.read()
"""


class StalledApp:
    """An app connection through the stall forward: pushes PUSH bytes, then waits to learn its fate."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        self.outcome = ""
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.sock.settimeout(40)
        try:
            self.sock.sendall(os.urandom(PUSH))
            data = self.sock.recv(1)  # the backend never answers: only an end of the flow wakes this
            self.outcome = "closed" if not data else "data"
        except (ConnectionResetError, BrokenPipeError):
            self.outcome = "reset"
        except TimeoutError:
            self.outcome = "timeout"
        except OSError as exc:
            self.outcome = f"error: {exc}"

    def close(self) -> None:
        self.sock.close()


def echo_round_trip(port: int, size: int) -> None:
    payload = os.urandom(size)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
        sender.start()
        got = bytearray()
        while len(got) < size:
            data = sock.recv(65536)
            assert data, f"echo flow ended after {len(got)} of {size} bytes"
            got += data
        sender.join(10)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


def held_bytes(addr: str) -> float:
    return metric(scrape(addr), "ferryman_flow_buffer_bytes")


def wait_held(addr: str, minimum: float, timeout: float = 20.0) -> float:
    deadline = time.monotonic() + timeout
    while (value := held_bytes(addr)) < minimum:
        if time.monotonic() > deadline:
            raise AssertionError(f"the connector holds {value:.0f} bytes, expected >= {minimum:.0f}")
        time.sleep(0.05)
    return value


@pytest.mark.timeout(120)
def test_flows_toward_sockets_that_read_nothing_stay_within_the_budget(tmp_path: Path) -> None:
    backend = subprocess.Popen([sys.executable, "-c", BACKEND], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
    apps: list[StalledApp] = []
    try:
        stall_port, echo_port = map(int, backend.stdout.readline().split())  # type: ignore[union-attr]
        fabric = Fabric(str(tmp_path / "fabric"), [("127.0.0.1", 0, "127.0.0.1", stall_port),
                                                   ("127.0.0.1", 0, "127.0.0.1", echo_port)],
                        env={"FERRYMAN_FLOW_BUFFER_BUDGET": str(BUDGET), "FERRYMAN_CONNECTOR_TUNNELS": "1",
                             "FERRYMAN_TRANSPORT": "tcp"})
        with fabric:
            connector = fabric.metrics["connector-1"]
            stall_fwd, echo_fwd = fabric.forward_ports
            echo_round_trip(echo_fwd, 1 << 20)

            # Three stalled flows fit: the connector holds well over a megabyte for them, sheds nothing.
            apps = [StalledApp(stall_fwd) for _ in range(3)]
            first = wait_held(connector, 3 * 512 * 1024)
            time.sleep(1.0)  # what was in flight has landed
            assert metric(scrape(connector), "ferryman_flows_closed_total", reason="buffer_budget") == 0
            assert first <= BUDGET
            assert all(not a.outcome for a in apps), [a.outcome for a in apps]

            # Nine more pass the budget (twelve flows of 512-768 KiB hold 6-9 MiB: at most eight fit,
            # so at least four go): the three that held the longest go first.
            apps += [StalledApp(stall_fwd) for _ in range(9)]
            wait_metric(connector, "ferryman_flows_closed_total", 3, timeout=20.0, reason="buffer_budget")
            for app in apps[:3]:
                app.thread.join(20)
                assert app.outcome == "reset", [a.outcome for a in apps]
            # Meanwhile and afterwards a flow whose backend reads carries its bytes intact.
            echo_round_trip(echo_fwd, 4 << 20)
            time.sleep(1.0)
            samples = scrape(connector)
            assert metric(samples, "ferryman_flow_buffer_bytes") <= BUDGET
            shed = metric(samples, "ferryman_flows_closed_total", reason="buffer_budget")
            assert 3 <= shed < len(apps), f"{shed} flows shed"
            survivors = [a for a in apps[3:] if not a.outcome]
            assert survivors, "every later flow was shed too: the budget took flows that fit"
            # No tunnel went down on the way.
            for name in fabric.procs:
                assert metric(scrape(fabric.metrics[name]), "ferryman_tunnels_closed_total") == 0, \
                    fabric.log_tail(name, 40)
            with open(fabric.logs["connector-1"], errors="replace") as fh:
                assert "flow buffer budget of 4194304 bytes passed" in fh.read()
    finally:
        for app in apps:
            app.close()
        backend.kill()
        backend.wait(10)
