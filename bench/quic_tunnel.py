"""Throughput of one QUIC tunnel (``dataplane.transport.quic``) between two processes on loopback.

    python -m bench.quic_tunnel [--mb 300] [--datagrams 100000] [--packet-size 1350] [--engine auto|qh3|aioquic]

A child process serves the edge end (it counts and acknowledges what arrives); this
process dials it as a connector, sends one bulk flow under Ferryman credit, then a
UDP flow's datagrams of 1200 bytes as fast as the tunnel takes them. Both ends print
their wall and CPU seconds, so the figure says which end is the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import uvloop

from dataplane.basics import pki
from dataplane.basics.metrics import Stats
from dataplane.basics.settings import DialerSettings as Settings
from dataplane.transport.quic import dial_quic, load_credentials, serve_quic
from dataplane.transport.tunnel import TunnelHandler
from dataplane.wire import events as ev
from dataplane.wire.connection import FlowError, WireConfig
from dataplane.wire.frames import Open
from dataplane.wire.quic_engine import select_engine

DATAGRAM = b"u" * 1200


def cpu() -> float:
    times = os.times()
    return times.user + times.system


class Sink(TunnelHandler):
    """Edge end: accepts flows, consumes bytes and datagrams, reports when a flow ends."""

    def __init__(self) -> None:
        self.stats = Stats("edge", "edge-1")
        self.bytes = 0
        self.datagrams = 0
        self.started = self.first_datagram = self.last_datagram = 0.0

    def flow_requested(self, tunnel: Any, event: ev.FlowRequested) -> None:
        tunnel.accept(event.flow_id)

    def data_received(self, tunnel: Any, event: ev.DataReceived) -> None:
        if not self.bytes:
            self.started = time.perf_counter()
        self.bytes += len(event.data)
        tunnel.acknowledge(event.flow_id, len(event.data))

    def flow_ended(self, tunnel: Any, event: ev.FlowEnded) -> None:
        report = {"bytes": self.bytes, "seconds": time.perf_counter() - self.started, "cpu": cpu()}
        print(json.dumps(report), flush=True)
        tunnel.send_fin(event.flow_id)

    def datagram_received(self, tunnel: Any, event: ev.DatagramReceived) -> None:
        self.last_datagram = time.perf_counter()
        if not self.datagrams:
            self.first_datagram = self.last_datagram
        self.datagrams += 1

    def flow_reset(self, tunnel: Any, event: ev.FlowReset) -> None:
        print(json.dumps({"datagrams": self.datagrams, "seconds": self.last_datagram - self.first_datagram}),
              flush=True)


class Source(TunnelHandler):
    """Connector end: sends what credit and back-pressure allow."""

    def __init__(self) -> None:
        self.stats = Stats("connector", "connector-1")
        self.accepted = asyncio.Event()
        self.closed = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()
        self.more: Any = None

    def flow_accepted(self, tunnel: Any, event: ev.FlowAccepted) -> None:
        self.accepted.set()

    def flow_closed(self, tunnel: Any, event: ev.FlowClosed) -> None:
        self.closed.set()

    def credit_available(self, tunnel: Any, event: ev.CreditAvailable) -> None:
        if self.more is not None:
            self.more()

    def tunnel_writable(self, tunnel: Any, writable: bool) -> None:
        if writable:
            self.writable.set()
            if self.more is not None:
                self.more()
        else:
            self.writable.clear()


async def serve(directory: str, settings: Settings) -> None:
    files = pki.NodeFiles("edge", "edge-1", f"{directory}/edge-1.pem", f"{directory}/edge-1.key",
                          f"{directory}/ca.pem")
    server = await serve_quic(Sink(), WireConfig(role="edge", node="edge-1", window=settings.flow_window),
                              "127.0.0.1", 0, settings, load_credentials(files.cert, files.key, files.ca))
    print(server.sockname[1], flush=True)
    await asyncio.Event().wait()


async def run(directory: str, port: int, settings: Settings, total: int, datagrams: int) -> float:
    files = pki.NodeFiles("connector", "connector-1", f"{directory}/connector-1.pem",
                          f"{directory}/connector-1.key", f"{directory}/ca.pem")
    source = Source()
    tunnel = await dial_quic(source, WireConfig(role="connector", node="connector-1", window=settings.flow_window),
                             "127.0.0.1", port, settings, load_credentials(files.cert, files.key, files.ca))
    await tunnel.up_waiter
    fid = tunnel.open_flow(Open(host="bulk", port=9))
    await source.accepted.wait()
    view = memoryview(os.urandom(1 << 20))
    sent = 0
    finished: list[bool] = []

    def more() -> None:
        nonlocal sent
        if not tunnel.has_flow(fid) or finished:
            return
        while sent < total and tunnel.writable:
            taken = tunnel.send_data(fid, view[:min(len(view), total - sent)])
            if not taken:
                break
            sent += taken
        if sent >= total:
            finished.append(True)
            tunnel.send_fin(fid)

    source.more = more
    start, cpu_start = time.perf_counter(), cpu()
    more()
    await source.closed.wait()
    bulk_cpu = cpu() - cpu_start
    print(json.dumps({"bulk_bytes": total, "seconds": time.perf_counter() - start, "cpu": bulk_cpu}))
    source.more = None

    source.accepted.clear()
    ufid = tunnel.open_flow(Open(host="udp", port=9, protocol="udp"))
    await source.accepted.wait()
    offered = refused = 0
    start = time.perf_counter()
    while offered < datagrams:
        await source.writable.wait()
        for _ in range(64):
            try:
                tunnel.send_datagram(ufid, DATAGRAM)
            except FlowError:  # datagram_queue_full: the tunnel is sending as fast as it can
                refused += 1
                break
            offered += 1
        await asyncio.sleep(0)
    seconds = time.perf_counter() - start
    await asyncio.sleep(0.5)
    tunnel.reset(ufid, "done")
    await asyncio.sleep(0.3)
    print(json.dumps({"datagrams_offered": offered, "seconds": seconds, "queue_full": refused}))
    tunnel.close("shutdown", "bench done")
    return bulk_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=300)
    parser.add_argument("--datagrams", type=int, default=100_000)
    parser.add_argument("--packet-size", type=int, default=1350)
    parser.add_argument("--engine", default="auto", choices=("auto", "qh3", "aioquic"))
    parser.add_argument("--serve", metavar="PKI_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = Settings(quic_packet_size=args.packet_size, quic_engine=args.engine)
    if args.serve:
        uvloop.run(serve(args.serve, settings))
        return
    directory = tempfile.mkdtemp(prefix="ferryman-quic-bench-")
    pki.init_pki(directory)
    child = subprocess.Popen([sys.executable, "-m", "bench.quic_tunnel", "--serve", directory,
                              "--packet-size", str(args.packet_size), "--engine", args.engine],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        connector = uvloop.run(run(directory, port, settings, int(args.mb * 1e6), args.datagrams))
        edge_bulk, edge_datagrams = json.loads(child.stdout.readline()), json.loads(child.stdout.readline())
    finally:
        child.kill()
    gib = edge_bulk["bytes"] / (1 << 30)
    print(f"engine {select_engine(args.engine).name}")
    print(f"bulk: {edge_bulk['bytes'] / edge_bulk['seconds'] / 1e6:.1f} MB/s at the edge, CPU s/GiB: "
          f"edge {edge_bulk['cpu'] / gib:.1f} (process total), connector {connector / gib:.1f}")
    print(f"datagrams: {edge_datagrams['datagrams'] / max(edge_datagrams['seconds'], 1e-9):,.0f}/s received "
          f"({edge_datagrams['datagrams']} of {args.datagrams} offered)")


if __name__ == "__main__":
    main()
