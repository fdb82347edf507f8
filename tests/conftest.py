"""Shared fixtures of the end-to-end tests: real backends, real fabrics, checked transfers.

- ``backend(mode)``: starts a ``tests/backends.py`` process (echo, sha, source,
  source-half, hold, rst) and returns its ``Backend`` handle; all are stopped at teardown.
- ``fabric(forwards, env=None, connectors=1, managed=False)``: starts edge-1, connector-N and client-1 as
  separate processes (``dataplane.fabric.Fabric``) in the test's ``tmp_path``, with one
  client port forward per entry of ``forwards`` (a ``Backend``, a port on 127.0.0.1, a
  ``(host, port)`` or a full ``(listen_host, listen_port, host, port)``). Every fabric is
  stopped at teardown, and a failing test's report carries every node's log tail.
  ``managed=True`` runs a control plane too and registers edge and connectors through it;
  ``edges``, ``connector_edges`` and ``client_edges`` lay out several edges (``Fabric``).
- ``xfer``: blocking and asyncio helpers that move real bytes through a forward
  (sha256-checked uploads, seeded downloads, echo round trips), Prometheus scraping and
  /proc RSS reading.

Certificates are made once per session and copied into each fabric's work directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import socket
import struct
import sys
import threading
import time
import types
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataplane.basics import pki  # noqa: E402
from dataplane.fabric import Fabric  # noqa: E402

from backends import Backend, source_bytes, source_request, start_backend  # noqa: E402

MAX_CONNECTORS = 3
# Edges the tests start are one process each (the fabric pins it too): tests count an edge's tunnels,
# caps and log lines per process. tests/test_e2e_workers.py asks for workers explicitly.
os.environ["FERRYMAN_EDGE_WORKERS"] = "1"
_FABRICS = pytest.StashKey[list]()
# A test run started in the background (`cmd &` in a script) ignores SIGINT, and an ignored signal
# stays ignored across exec: the programs the tests start would never see the Ctrl-C some tests
# send them. A handler (unlike "ignore") is reset to the default in every child.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# ---------------------------------------------------------------------------- reporting
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.when in ("setup", "call") and rep.failed:
        for fab in item.stash.get(_FABRICS, []):
            for name in fab.logs:
                rep.sections.append((f"log tail of {name} ({fab.logs[name]})", fab.log_tail(name, 40)))


# ---------------------------------------------------------------------------- backends
@pytest.fixture
def backend() -> Iterator[Callable[[str], Backend]]:
    started: list[Backend] = []

    def make(mode: str, port: int = 0) -> Backend:
        b = start_backend(mode, port)
        started.append(b)
        return b

    yield make
    for b in started:
        b.stop()


# ---------------------------------------------------------------------------- fabrics
@pytest.fixture(scope="session")
def pki_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    directory = str(tmp_path_factory.mktemp("pki") / "pki")
    pki.init_pki(directory, edge_hosts=["127.0.0.1", "localhost"], edges=["edge-1"],
                 connectors=[f"connector-{i + 1}" for i in range(MAX_CONNECTORS)], clients=["client-1"])
    return directory


def _forward(spec: object) -> tuple:
    if isinstance(spec, Backend):
        return ("127.0.0.1", 0, "127.0.0.1", spec.port)
    if isinstance(spec, int):
        return ("127.0.0.1", 0, "127.0.0.1", spec)
    if isinstance(spec, tuple) and len(spec) == 2:
        return ("127.0.0.1", 0, spec[0], spec[1])
    if isinstance(spec, tuple) and len(spec) in (4, 5):  # (lhost, lport, host, port[, protocol])
        return spec  # type: ignore[return-value]
    raise TypeError(f"forward {spec!r}: expected a Backend, a port, (host, port) or a 4-tuple")


@pytest.fixture
def transport() -> str:
    """The tunnel transport of the fabrics a test makes (a module may parametrize it: tcp and quic)."""
    return "tcp"


@pytest.fixture
def fabric(request: pytest.FixtureRequest, tmp_path, pki_cache: str, transport: str) -> Iterator[Callable[..., Fabric]]:
    fabrics: list[Fabric] = []
    request.node.stash[_FABRICS] = fabrics

    def make(forwards: list[object], env: dict[str, str] | None = None, connectors: int = 1,
             timeout: float = 20.0, managed: bool = False, apps: list[dict] | None = None,
             webapps: list[dict] | None = None, **layout: object) -> Fabric:
        assert connectors <= MAX_CONNECTORS
        workdir = tmp_path / f"fabric-{len(fabrics) + 1}"
        workdir.mkdir()
        if not managed:
            shutil.copytree(pki_cache, workdir / "pki")
        # A short drain grace keeps teardown quick when a test leaves flows open.
        full_env = {"FERRYMAN_DRAIN_GRACE": "1", "FERRYMAN_TRANSPORT": transport, **(env or {})}
        fab = Fabric(str(workdir), [_forward(f) for f in forwards], env=full_env, connectors=connectors,
                     managed=managed, apps=apps, webapps=webapps, **layout)  # type: ignore[arg-type]
        fabrics.append(fab)
        fab.start(timeout=timeout)
        return fab

    yield make
    for fab in reversed(fabrics):
        fab.stop()


# ---------------------------------------------------------------------------- transfers
def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def connect(port: int, timeout: float = 30.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def upload_sha(port: int, data: bytes, timeout: float = 30.0) -> str:
    """Send ``data`` to a ``sha`` backend through the forward; return the digest it answered."""
    with connect(port, timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s).decode("ascii", errors="replace")


def upload_intact(port: int, size: int = 65536) -> bool:
    """Whether ``size`` random bytes sent through the forward to a ``sha`` backend arrived intact;
    False (after a short pause) when the flow could not be made, for ``wait_for``."""
    data = os.urandom(size)
    try:
        return upload_sha(port, data, timeout=5) == sha256_hex(data)
    except OSError:
        time.sleep(0.1)
        return False


def download(port: int, n: int, seed: bytes, timeout: float = 30.0) -> bytes:
    """Ask a ``source`` backend for ``n`` bytes of ``seed``'s stream; return what arrived."""
    with connect(port, timeout) as s:
        s.sendall(source_request(n, seed))
        return recv_all(s)


def echo(port: int, data: bytes, timeout: float = 30.0) -> bytes:
    """Send ``data`` then half-close (in a thread) while reading the echo until EOF."""
    with connect(port, timeout) as s:
        def send() -> None:
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # reset or closed: the reading side reports it

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        out = recv_all(s)
        sender.join(timeout)
        return out


async def aupload_sha(port: int, data: bytes) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        return (await reader.read()).decode("ascii", errors="replace")
    finally:
        writer.close()


async def adownload(port: int, n: int, seed: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    try:
        writer.write(source_request(n, seed))
        await writer.drain()
        return await reader.read()
    finally:
        writer.close()


def run_async(coro_factory: Callable[[], object], timeout: float) -> object:
    """Run ``coro_factory()`` on a fresh uvloop event loop, bounded by ``timeout`` seconds."""
    import uvloop

    async def bounded() -> object:
        return await asyncio.wait_for(coro_factory(), timeout)  # type: ignore[arg-type]

    return uvloop.run(bounded())


# ---------------------------------------------------------------------------- observing
def socks_connect(port: int, host: str, dport: int, cmd: int = 1) -> tuple[socket.socket, int]:
    """SOCKS5 greeting + request to the client's SOCKS listener (IPv4 address, or domain name
    when ``host`` is not one); returns the socket and the reply code."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    try:
        addr = b"\x01" + socket.inet_aton(host)
    except OSError:
        addr = b"\x03" + bytes([len(host)]) + host.encode()
    s.sendall(bytes([5, cmd, 0]) + addr + struct.pack("!H", dport))
    rep = b""
    while len(rep) < 10:
        chunk = s.recv(10 - len(rep))
        if not chunk:
            break
        rep += chunk
    assert len(rep) == 10 and rep[0] == 5, f"bad SOCKS reply {rep!r}"
    return s, rep[1]


def scrape(addr: str) -> list:
    """Every sample of the node's /metrics (prometheus_client parser Sample tuples)."""
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def metric(samples: list, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(s.value for s in samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def wait_metric(addr: str, name: str, minimum: float, timeout: float = 5.0, **labels: str) -> list:
    """Scrape ``addr`` until ``metric(name, **labels) >= minimum``; return those samples."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(addr)
        value = metric(samples, name, **labels)
        if value >= minimum:
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels} at {addr} is {value:g}, expected >= {minimum:g} "
                                 f"within {timeout:g}s")
        time.sleep(0.05)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture
def xfer() -> types.SimpleNamespace:
    return types.SimpleNamespace(
        sha256_hex=sha256_hex, connect=connect, recv_all=recv_all, upload_sha=upload_sha, upload_intact=upload_intact,
        download=download, source_bytes=source_bytes,
        echo=echo, aupload_sha=aupload_sha, adownload=adownload, run_async=run_async, scrape=scrape,
        metric=metric, wait_metric=wait_metric, rss_bytes=rss_bytes, wait_for=wait_for, socks_connect=socks_connect,
    )
