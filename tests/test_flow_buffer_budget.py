"""``BufferBudget`` with real sockets on uvloop: which flows it resets, what it counts.

Flows are real ``SocketFlow``s on real loopback connections, fed by a recording stand-in for
the tunnel (what they ask of it: acknowledge, reset); the local ends read at chosen rates.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvloop

from dataplane.basics.metrics import Stats
from dataplane.transport.socketflow import BufferBudget, SocketFlow

pytestmark = pytest.mark.timeout(60)


class RecordingTunnel:
    def __init__(self) -> None:
        self.routes: dict[int, SocketFlow] = {}
        self.flows: set[int] = set()
        self.resets: list[tuple[int, str]] = []

    def has_flow(self, flow_id: int) -> bool:
        return flow_id in self.flows

    def reset(self, flow_id: int, code: str, reason: str = "") -> None:
        self.flows.discard(flow_id)
        self.resets.append((flow_id, code))

    def acknowledge(self, flow_id: int, n: int) -> None:
        pass


class Node:
    socket_buffer = 262144
    udp_backlog = 32768

    def __init__(self, limit: int) -> None:
        self.stats = Stats("connector", "test")
        self.buffer_budget = BufferBudget(limit, self.stats)


def read_at(conn: socket.socket, per_tick: int, stop: threading.Event) -> None:
    """Read ``per_tick`` bytes every 5 ms (0: never read) until ``stop``."""
    conn.setblocking(True)
    conn.settimeout(0.5)
    while not stop.is_set():
        try:
            if per_tick and not conn.recv(per_tick):
                return
        except TimeoutError:
            continue
        except OSError:
            return
        time.sleep(0.005)


async def open_flow(node: Node, tunnel: RecordingTunnel, flow_id: int, server: socket.socket,
                    per_tick: int, stop: threading.Event) -> tuple[SocketFlow, socket.socket]:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    sock.connect(server.getsockname())
    conn, _ = server.accept()
    threading.Thread(target=read_at, args=(conn, per_tick, stop), daemon=True).start()
    flow = SocketFlow(node)
    await loop.create_connection(lambda: flow, sock=sock)
    flow.bind(tunnel, flow_id)  # type: ignore[arg-type]
    tunnel.flows.add(flow_id)
    flow.activate()
    return flow, conn


@contextlib.contextmanager
def local_sockets(limit: int) -> Iterator[tuple[Node, RecordingTunnel, threading.Event, socket.socket]]:
    """A node with a budget of ``limit``, the tunnel stand-in, the readers' stop event and the
    listener the flows' local ends are accepted from; the readers stop and the listener closes after."""
    node, tunnel, stop = Node(limit), RecordingTunnel(), threading.Event()
    server = listener()
    try:
        yield node, tunnel, stop, server
    finally:
        stop.set()
        server.close()


def listener() -> socket.socket:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    return server


def test_sockets_that_take_nothing_are_reset_before_one_that_drains_slowly() -> None:
    async def run() -> None:
        with local_sockets(8 << 20) as (node, tunnel, stop, server):
            # A bulk flow whose reader is slower than its tunnel: it holds bytes all the time.
            slow, _ = await open_flow(node, tunnel, 1, server, 32768, stop)
            for _ in range(40):
                slow.on_data(memoryview(os.urandom(65536)))
                await asyncio.sleep(0.01)
            assert node.buffer_budget.total > 0
            stalled = [(await open_flow(node, tunnel, 100 + i, server, 0, stop))[0] for i in range(20)]
            for _ in range(30):
                for flow in [slow, *stalled]:
                    if not flow.done:
                        flow.on_data(memoryview(os.urandom(65536)))
                await asyncio.sleep(0.01)
            assert tunnel.resets, "the budget was never passed: the test pushed too little"
            assert {code for _, code in tunnel.resets} == {"buffer_budget"}
            assert not slow.done, f"the draining flow was reset; resets: {tunnel.resets}"
            assert [i for i, _ in tunnel.resets] == sorted(i for i, _ in tunnel.resets)  # oldest stalled first
            assert node.buffer_budget.total <= 8 << 20
            assert node.stats.flows_closed.get("buffer_budget") == len(tunnel.resets)

    uvloop.run(run())


def test_a_view_left_in_the_buffer_counts_the_read_buffer_it_keeps_alive() -> None:
    async def run() -> None:
        with local_sockets(1 << 30) as (node, tunnel, stop, server):
            flow, _ = await open_flow(node, tunnel, 1, server, 0, stop)
            chunk = os.urandom(4 << 20)  # one tunnel read
            flow.on_data(memoryview(chunk)[:1 << 20])  # the socket takes part of it, the rest waits
            assert 0 < flow.transport.get_write_buffer_size() < 1 << 20  # type: ignore[union-attr]
            assert node.buffer_budget.total >= len(chunk)  # the whole read stays alive, so it counts
            flow.on_data(memoryview(chunk)[1 << 20:(1 << 20) + 10])  # behind it: a copy, 10 bytes more
            assert node.buffer_budget.total >= len(chunk)

    uvloop.run(run())


def test_a_flow_closed_with_bytes_unwritten_counts_until_its_socket_takes_them() -> None:
    async def run() -> None:
        with local_sockets(1 << 30) as (node, tunnel, stop, server):
            flow, conn = await open_flow(node, tunnel, 1, server, 0, stop)
            for _ in range(6):
                flow.on_data(memoryview(os.urandom(65536)))
            flow.on_closed()  # FIN both ways: the transport closes once it has written what it holds
            assert flow.done and node.buffer_budget.total > 0
            stop.set()  # the reader that never read gives up its socket...
            await asyncio.sleep(0.6)
            assert node.buffer_budget.total > 0  # ...still counted: nothing took the bytes
            threading.Thread(target=lambda: [None for _ in iter(lambda: conn.recv(65536), b"")], daemon=True).start()
            deadline = time.monotonic() + 10
            while node.buffer_budget.total and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert node.buffer_budget.total == 0 and not node.buffer_budget._holding

    uvloop.run(run())
