"""QUIC tunnels on a network the test builds: the client agent runs in its own network
namespace (joined to the edge's host by a veth pair), and nftables inside that namespace
plays the network.

- ``FERRYMAN_TRANSPORT=auto`` with UDP to the edge dropped: the client's tunnel comes up
  over TLS/TCP within 10 s (the fallback is counted), carries real bytes, and once the
  test lets UDP through again the agent moves to a QUIC tunnel by itself (re-probe), new
  flows use it, and the TCP tunnel drains away;
- QUIC under loss: with 5 % of the namespace's UDP packets to and from the edge dropped at
  random, a 4 MiB transfer through a QUIC tunnel arrives intact (sha256 at the backend),
  and a UDP echo still works.

(``tc netem`` would add delay too, but this machine's kernel has no netem qdisc; nftables'
random drop gives the loss.) Skipped without root, ``ip netns`` or ``nft``.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import socket
import time

import pytest

from conftest import metric, recv_all, scrape, wait_for
from dataplane.basics import pki
from dataplane.fabric import Fabric, free_port
from netns import nft, nft_flush, private_network

pytestmark = [pytest.mark.netns, pytest.mark.timeout(150)]

MiB = 1 << 20


def _fabric(tmp_path, ns: str, ours: str, theirs: str, forwards: list[tuple], env: dict[str, str]) -> Fabric:
    """Edge and connector here; the client agent in ``ns``, dialing the edge at ``ours``."""
    if shutil.which("nft") is None:
        pytest.skip("`nft` (nftables) is not installed")
    workdir = tmp_path / "fabric"
    certs = workdir / "pki"
    certs.mkdir(parents=True)
    pki.init_pki(str(certs), edge_hosts=["127.0.0.1", "localhost", ours], edges=["edge-1"],
                 connectors=["connector-1"], clients=["client-1"])
    fab = Fabric(str(workdir), forwards, env={"FERRYMAN_DRAIN_GRACE": "1", **env})
    fab.edge_host = ours
    fab.edge_port = free_port()
    fab.prefix["client-1"] = ["ip", "netns", "exec", ns]
    fab.metrics["client-1"] = f"{theirs}:{random.randint(20000, 60000)}"
    return fab


def _upload_sha(host: str, port: int, data: bytes, timeout: float) -> str:
    """Send ``data`` to the forward at host:port, half-close, return the sha backend's digest."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock).decode()


def _transports(fab: Fabric, node: str) -> dict[str, float]:
    samples = scrape(fab.metrics[node])
    return {kind: metric(samples, "ferryman_tunnels_by_transport", transport=kind) for kind in ("tcp", "quic")}


def test_auto_falls_back_to_tcp_when_udp_is_blocked_and_moves_to_quic_when_it_returns(backend, tmp_path):
    sha = backend("sha")
    with private_network() as (ns, ours, theirs):
        fab = _fabric(tmp_path, ns, ours, theirs, [(theirs, free_port(), "127.0.0.1", sha.port)],
                      {"FERRYMAN_TRANSPORT": "auto", "FERRYMAN_QUIC_TIMEOUT": "2", "FERRYMAN_QUIC_PROBE_INTERVAL": "2"})
        nft(ns, "add table inet ferryman",
            "add chain inet ferryman out { type filter hook output priority 0 ; }",
            f"add rule inet ferryman out ip daddr {ours} udp dport {fab.edge_port} drop")
        try:
            started = time.monotonic()
            fab.start(timeout=40)
            assert time.monotonic() - started < 10.0 + 5.0  # (the edge and connector start meanwhile)
            assert _transports(fab, "client-1") == {"tcp": 1, "quic": 0}
            client = scrape(fab.metrics["client-1"])
            assert metric(client, "ferryman_transport_fallbacks_total", transport="tcp") >= 1
            # The connector's UDP is not blocked (if it dialed before the edge's QUIC listener was up,
            # it moves to QUIC at its next probe).
            wait_for(lambda: _transports(fab, "connector-1") == {"tcp": 0, "quic": 2}, 10.0, "connector on QUIC")
            with open(fab.logs["client-1"]) as fh:
                assert "QUIC unreachable; falling back to TLS/TCP" in fh.read()
            data = os.urandom(2 * MiB)
            assert _upload_sha(theirs, fab.forward_ports[0], data, timeout=30) == hashlib.sha256(data).hexdigest()

            nft_flush(ns)  # UDP gets through again: within a probe interval or two the agent moves to QUIC
            wait_for(lambda: _transports(fab, "client-1") == {"tcp": 0, "quic": 1}, 20.0, "the move to QUIC")
            edge = _transports(fab, "edge-1")
            assert edge == {"tcp": 0, "quic": 3}, edge
            data = os.urandom(2 * MiB)
            assert _upload_sha(theirs, fab.forward_ports[0], data, timeout=30) == hashlib.sha256(data).hexdigest()
            with open(fab.logs["client-1"]) as fh:
                assert "QUIC reachable again" in fh.read()
        except BaseException:
            for name in fab.logs:
                print(f"--- {name}\n{fab.log_tail(name, 30)}")
            raise
        finally:
            fab.stop()


def test_quic_tunnel_carries_bytes_intact_under_packet_loss(backend, tmp_path):
    sha, udp = backend("sha"), backend("udp-echo")
    with private_network() as (ns, ours, theirs):
        fab = _fabric(tmp_path, ns, ours, theirs,
                      [(theirs, free_port(), "127.0.0.1", sha.port),
                       (theirs, free_port("udp"), "127.0.0.1", udp.port, "udp")],
                      {"FERRYMAN_TRANSPORT": "quic"})
        try:
            fab.start(timeout=40)
            assert _transports(fab, "client-1") == {"tcp": 0, "quic": 1}
            nft(ns, "add table inet ferryman",
                "add chain inet ferryman out { type filter hook output priority 0 ; }",
                "add chain inet ferryman in { type filter hook input priority 0 ; }",
                f"add rule inet ferryman out ip daddr {ours} udp dport {fab.edge_port} numgen random mod 100 < 5 drop",
                f"add rule inet ferryman in ip saddr {ours} udp sport {fab.edge_port} numgen random mod 100 < 5 drop")
            data = os.urandom(4 * MiB)
            assert _upload_sha(theirs, fab.forward_ports[0], data, timeout=60) == hashlib.sha256(data).hexdigest()
            assert sha.wait_event("eof", bytes=len(data))["sha256"] == hashlib.sha256(data).hexdigest()
            # UDP through the lossy QUIC tunnel: datagrams may be lost (they are not retransmitted),
            # but every answer that comes back is intact.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(1.0)
                got = None
                for _ in range(30):
                    sock.sendto(b"through the loss", (theirs, fab.forward_ports[1]))
                    try:
                        got = sock.recvfrom(2048)[0]
                        break
                    except socket.timeout:
                        continue
                assert got == b"through the loss"
            assert _transports(fab, "client-1") == {"tcp": 0, "quic": 1}  # the tunnel survived the loss
        except BaseException:
            for name in fab.logs:
                print(f"--- {name}\n{fab.log_tail(name, 30)}")
            raise
        finally:
            nft_flush(ns)
            fab.stop()
