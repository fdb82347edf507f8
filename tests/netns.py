"""Network namespaces for the tests that need separate hosts: a namespace joined to this one
by a veth pair only, a backend started inside it, reachability checks from inside, and
nftables rules in it (to block or drop traffic the way a real network would).

Everything here needs root and ``ip`` (iproute2); the nftables helpers need ``nft``.
Without them the calling test is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from backends import Backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=20)


@contextlib.contextmanager
def private_network() -> Iterator[tuple[str, str, str]]:
    """A network namespace joined to this one by a veth pair only (no route anywhere else);
    yields (namespace, our address on the pair, the namespace's address)."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("`ip` (iproute2) is not installed")
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, timeout=10).stdout
    tag = f"{os.getpid() % 0xFFFFF:05x}"
    ns, outside, inside = f"fmpx{tag}", f"fmpr{tag}", f"fmpn{tag}"
    octet = random.choice([n for n in range(1, 255) if f"10.231.{n}." not in used])
    ours, theirs = f"10.231.{octet}.1", f"10.231.{octet}.2"
    try:
        _sh("ip", "netns", "add", ns)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create a network namespace: {exc.stderr.decode().strip()}")
    try:
        _sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        _sh("ip", "link", "set", inside, "netns", ns)
        _sh("ip", "addr", "add", f"{ours}/30", "dev", outside)
        _sh("ip", "link", "set", outside, "up")
        _sh("ip", "-n", ns, "addr", "add", f"{theirs}/30", "dev", inside)
        _sh("ip", "-n", ns, "link", "set", inside, "up")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield ns, ours, theirs
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        subprocess.run(["ip", "link", "del", outside], capture_output=True, timeout=20)


@contextlib.contextmanager
def clients_across(fab, ns: str, ours: str, theirs: str, clients: tuple[str, ...] = ("client-1",)) -> Iterator[None]:
    """Start the managed fabric ``fab`` with its control plane and edges on ``ours`` and the client
    agents ``clients`` in ``ns`` (their metrics on ``theirs``), so they reach the rest across the
    veth pair only; print every node's log tail if the body fails; stop the fabric."""
    fab.edge_host = fab.control_host = ours
    for name in clients:
        fab.prefix[name] = ["ip", "netns", "exec", ns]
        fab.metrics[name] = f"{theirs}:{random.randint(20000, 60000)}"
    try:
        fab.start(timeout=40)
        yield
    except BaseException:
        for name in fab.logs:
            print(f"--- {name}\n{fab.log_tail(name, 30)}")
        raise
    finally:
        fab.stop()


def start_backend_in(ns: str, mode: str, timeout: float = 15.0) -> Backend:
    """``tests/backends.py MODE`` inside namespace ``ns`` (on its own 127.0.0.1)."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, os.path.join(ROOT, "tests", "backends.py"),
                             mode, "--port", "0"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            bufsize=1, start_new_session=True)
    assert proc.stdout is not None
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        line = proc.stdout.readline()
    finally:
        timer.cancel()
    if not line.startswith("listening "):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"backend {mode} in {ns} did not start (first line {line!r})")
    return Backend(mode, proc, int(line.split()[1]))


def reachable_from(ns: str, targets: list[tuple[str, int]]) -> dict[tuple[str, int], bool]:
    code = ("import socket, sys\n"
            "for t in sys.argv[1:]:\n"
            "    h, p = t.rsplit(':', 1)\n"
            "    try:\n"
            "        socket.create_connection((h, int(p)), timeout=2).close(); print('open')\n"
            "    except OSError:\n"
            "        print('closed')\n")
    done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code, *(f"{h}:{p}" for h, p in targets)],
                          capture_output=True, text=True, timeout=30, check=True)
    return dict(zip(targets, (line == "open" for line in done.stdout.split())))


def nft(ns: str, *rules: str) -> None:
    """Apply nftables ``rules`` (one command each, as for ``nft``) inside namespace ``ns``."""
    if shutil.which("nft") is None:
        pytest.skip("`nft` (nftables) is not installed")
    for rule in rules:
        subprocess.run(["ip", "netns", "exec", ns, "nft", *rule.split()], check=True, capture_output=True, timeout=20)


def nft_flush(ns: str) -> None:
    """Remove every nftables rule of namespace ``ns``."""
    subprocess.run(["ip", "netns", "exec", ns, "nft", "flush", "ruleset"], check=True, capture_output=True,
                   timeout=20)
