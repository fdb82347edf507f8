"""The connector guards what it dials, end to end through real processes (``dataplane.fabric``).

- A name that resolves to loopback (``localhost``) is refused with ``destination_forbidden``
  and the backend sees no connection, while the same address named by an IP segment is
  dialed, and a name is dialed when its own application also names the address; UDP flows
  (SOCKS5 UDP ASSOCIATE) alike.
- A deny network set with ``ferryman admin groups update --deny`` refuses new flows within
  seconds (even to an address a segment names: deny wins), an allow list refuses what is
  outside it, and removing them lets flows through again.
- DNS rebinding, with a real DNS server (dnslib) inside the connector's own network namespace:
  a name answering loopback and a routable address is dialed only at the routable one; a
  name answering a routable address and loopback in turn never reaches loopback (one
  resolution per flow, no second look-up); a name answering the connector's own address is
  refused; a name with more addresses than ``FERRYMAN_DIAL_ADDRESSES`` has only that many
  checked. A trap backend on every address of the connector's namespace sees no connection.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from backends import Backend
from dataplane.basics import pki
from dataplane.fabric import Fabric, free_port
from netns import ROOT, private_network
from test_e2e_capture import _associate, _udp_header, _udp_roundtrip

pytestmark = pytest.mark.timeout(150)

FAST = {"FERRYMAN_HEARTBEAT_INTERVAL": "0.3", "FERRYMAN_RECONNECT_MAX": "1"}


def _log(fab: Fabric, name: str) -> str:
    with open(fab.logs[name], encoding="utf-8", errors="replace") as fh:
        return fh.read()


def _socks_env() -> tuple[dict[str, str], int]:
    port = free_port()
    return {**FAST, "FERRYMAN_SOCKS_LISTEN": f"127.0.0.1:{port}"}, port


def _echoes(xfer, socks: int, host: str, port: int, data: bytes) -> int:
    """SOCKS5 CONNECT to host:port through the client; the reply code, after an echo check when 0."""
    s, code = xfer.socks_connect(socks, host, port)
    with s:
        if code == 0:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            assert xfer.recv_all(s) == data
    return code


def _opens(backend: Backend) -> int:
    """Connections the backend reported so far."""
    return sum(1 for e in backend.drain_events() if e["ev"] == "open")


def _settled_opens(backend: Backend, expected: int, timeout: float = 5.0) -> int:
    """Connections the backend reported, once it reported ``expected`` (or ``timeout`` passed) and
    half a second more went by (a backend reports each connection on its own stdout, a moment later)."""
    deadline = time.monotonic() + timeout
    while _opens(backend) < expected and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)
    return _opens(backend)


def _seg(destination: str, port: int) -> dict[str, str]:
    return {"destination": destination, "ports": str(port)}


# ---------------------------------------------------------------------------- names and explicit segments


def test_a_name_resolving_to_loopback_is_refused_while_the_address_named_by_a_segment_is_dialed(
        backend, fabric, xfer):
    target, both, udp = backend("echo"), backend("echo"), backend("udp-echo")
    env, socks = _socks_env()
    fab = fabric([], env=env, managed=True, apps=[
        {"name": "by-name", "segments": [_seg("localhost", target.port)]},
        {"name": "by-address", "segments": [_seg("127.0.0.1", target.port)]},
        {"name": "name-and-address", "segments": [_seg("localhost", both.port), _seg("127.0.0.1", both.port)]},
        {"name": "udp-by-name", "segments": [{**_seg("localhost", udp.port), "protocol": "udp"}]},
        {"name": "udp-by-address", "segments": [{**_seg("127.0.0.1", udp.port), "protocol": "udp"}]},
    ])
    # localhost resolves (at the connector, from /etc/hosts) to 127.0.0.1, which app by-name does not name.
    assert _echoes(xfer, socks, "localhost", target.port, b"x") == 0x02  # SOCKS: not allowed by ruleset
    reason = (f"connector connector-1: localhost resolves to 127.0.0.1: 127.0.0.1 is loopback (127.0.0.0/8); "
              f"connectors dial it only when a segment of application 'by-name' names 127.0.0.1 (or a network "
              f"inside that block)")
    xfer.wait_for(lambda: reason in _log(fab, "client-1"), 5, "the client to log the connector's reason")
    assert _settled_opens(target, 0) == 0, "the connector dialed a name that resolves to loopback"
    log = _log(fab, "connector-1")
    assert "destination address refused" in log and "rule=loopback" in log and "app=by-name" in log

    # The same address, named by a segment of the flow's application: dialed.
    assert _echoes(xfer, socks, "127.0.0.1", target.port, b"by address") == 0
    assert _settled_opens(target, 1) == 1
    # A name whose own application names the address it resolves to: dialed.
    assert _echoes(xfer, socks, "localhost", both.port, b"by name, address named") == 0
    assert _settled_opens(both, 1) == 1

    # UDP flows (SOCKS5 UDP ASSOCIATE) are checked the same way.
    ctl, relay = _associate(socks)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(1.0)
    with ctl, sock:
        sock.sendto(_udp_header("localhost", udp.port) + b"by name", relay)
        xfer.wait_for(lambda: "application 'udp-by-name' names 127.0.0.1" in _log(fab, "client-1"), 5,
                      "the client to log the refused UDP flow")
        got = _udp_roundtrip(sock, relay, "127.0.0.1", udp.port, b"by address")
        assert got == _udp_header("127.0.0.1", udp.port) + b"by address"
    assert [e["bytes"] for e in udp.drain_events() if e["ev"] == "udp"] == [len(b"by address")]

    samples = xfer.scrape(fab.metrics["connector-1"])
    assert xfer.metric(samples, "ferryman_dial_refused_total", rule="loopback") == 2
    assert xfer.metric(samples, "ferryman_open_failures_total", reason="destination_forbidden") == 2


# ---------------------------------------------------------------------------- group lists through the admin CLI


def _admin(fab: Fabric, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRYMAN_")}
    env["FERRYMAN_DATA_DIR"] = os.path.join(fab.workdir, "control")  # the bootstrap admin key is there
    done = subprocess.run([sys.executable, "-m", "dataplane", "admin", *args, "--control", fab.control_url],
                          env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _socks_code(xfer, socks: int, port: int) -> int:
    s, code = xfer.socks_connect(socks, "127.0.0.1", port)
    s.close()
    return code


def test_a_deny_network_set_through_the_admin_cli_refuses_within_seconds(backend, fabric, xfer):
    echo = backend("echo")
    env, socks = _socks_env()
    fab = fabric([echo], env=env, managed=True)
    assert _echoes(xfer, socks, "127.0.0.1", echo.port, b"before") == 0

    out = _admin(fab, "groups", "update", "default", "--deny", "127.0.0.1")
    assert "denied: 127.0.0.1/32" in out
    changed = time.monotonic()
    xfer.wait_for(lambda: _socks_code(xfer, socks, echo.port) == 0x02, 10, "the deny list to refuse flows")
    took = time.monotonic() - changed
    assert took < 5.0, f"the deny list took {took:.2f}s to reach the connector"
    opened = _settled_opens(echo, 0)  # the flows dialed before the deny list arrived (and forward probes)
    reason = ("connector connector-1: 127.0.0.1 is in 127.0.0.1/32, which connector group 'default' denies "
              "(denied_addresses)")
    xfer.wait_for(lambda: reason in _log(fab, "client-1"), 5, "the client to log the refusal")
    assert "dial lists updated" in _log(fab, "connector-1")
    samples = xfer.scrape(fab.metrics["connector-1"])
    assert xfer.metric(samples, "ferryman_dial_refused_total", rule="group_deny") >= 1

    # An allow list that does not hold the address refuses it too.
    _admin(fab, "groups", "update", "default", "--no-deny", "--allow", "10.0.0.0/8")
    reason = ("connector connector-1: 127.0.0.1 is outside the networks connector group 'default' allows "
              "(allowed_addresses: 10.0.0.0/8)")
    xfer.wait_for(lambda: _socks_code(xfer, socks, echo.port) == 0x02 and reason in _log(fab, "client-1"), 10,
                  "the allow list to refuse 127.0.0.1")
    assert _settled_opens(echo, opened) == opened, "the connector dialed a denied or not-allowed address"

    # Both lists gone: flows are dialed again.
    _admin(fab, "groups", "update", "default", "--no-allow")
    xfer.wait_for(lambda: _socks_code(xfer, socks, echo.port) == 0, 10, "flows to be dialed again")
    assert _echoes(xfer, socks, "127.0.0.1", echo.port, b"after") == 0


# ---------------------------------------------------------------------------- DNS rebinding, in a namespace

DNS_SERVER = r"""
import socket, sys
from dnslib import A, QTYPE, RCODE, RR, DNSRecord

ours, theirs = sys.argv[1], sys.argv[2]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.1", 53))
print("listening", flush=True)
flips = 0
while True:
    data, peer = sock.recvfrom(4096)
    try:
        query = DNSRecord.parse(data)
    except Exception:
        continue
    name = str(query.q.qname).rstrip(".").lower()
    answers = {
        "both.rebind.test": ["127.0.0.1", ours],
        "self.rebind.test": [theirs],
        "many.rebind.test": [f"127.0.0.{i}" for i in range(1, 13)],
        "flip.rebind.test": None,
    }
    reply = query.reply()
    if name not in answers:
        reply.header.rcode = RCODE.NXDOMAIN
    elif query.q.qtype == QTYPE.A:
        if name == "flip.rebind.test":  # a routable address, then loopback, in turn (TTL 0)
            flips += 1
            answers[name] = [ours] if flips % 2 else ["127.0.0.1"]
        for address in answers[name]:
            reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(address), ttl=0))
    sock.sendto(reply.pack(), peer)
"""


def _start(cmd: list[str], what: str) -> tuple[subprocess.Popen[str], str]:
    """Start ``cmd``; return it and the rest of its first line (``listening [PORT]``) once it says so."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, bufsize=1,
                            start_new_session=True)
    assert proc.stdout is not None
    timer = threading.Timer(15, proc.kill)
    timer.start()
    try:
        line = proc.stdout.readline()
    finally:
        timer.cancel()
    if not line.startswith("listening"):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{what} did not start (first line {line!r})")
    return proc, line[len("listening"):].strip()


@contextlib.contextmanager
def _resolv_conf(ns: str) -> Iterator[None]:
    """``ip netns exec NS`` shows /etc/netns/NS/resolv.conf as /etc/resolv.conf."""
    directory = f"/etc/netns/{ns}"
    os.makedirs(directory, exist_ok=False)
    try:
        with open(os.path.join(directory, "resolv.conf"), "w") as fh:
            fh.write("nameserver 127.0.0.1\noptions timeout:2 attempts:2\n")
        yield
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.netns
def test_dns_rebinding_never_reaches_a_forbidden_address(tmp_path, xfer):
    with private_network() as (ns, ours, theirs), _resolv_conf(ns):
        inside = ["ip", "netns", "exec", ns]
        dns, _ = _start([*inside, sys.executable, "-c", DNS_SERVER, ours, theirs], "DNS server")
        started = [dns]
        try:
            backend = [sys.executable, os.path.join(ROOT, "tests", "backends.py"), "echo", "--host"]
            proc, port_text = _start([*backend, ours, "--port", "0"], "backend on the routable address")
            started.append(proc)
            port = int(port_text)
            public = Backend("echo", proc, port)
            # The same port on every address of the connector's namespace (loopback and its own address).
            proc, _ = _start([*inside, *backend, "0.0.0.0", "--port", str(port)], "trap backend in the namespace")
            started.append(proc)
            trap = Backend("echo", proc, port)

            workdir = tmp_path / "fabric"
            (workdir / "pki").mkdir(parents=True)
            pki.init_pki(str(workdir / "pki"), edge_hosts=["127.0.0.1", "localhost", ours], edges=["edge-1"],
                         connectors=["connector-1"], clients=["client-1"])
            socks = free_port()
            fab = Fabric(str(workdir), [], env={"FERRYMAN_DRAIN_GRACE": "1", "FERRYMAN_DIAL_ADDRESSES": "4",
                                                "FERRYMAN_SOCKS_LISTEN": f"127.0.0.1:{socks}",
                                                "FERRYMAN_LOG_FORMAT": "json"},
                         apps=[{"name": "rebind", "segments": [_seg("*.rebind.test", port)]}])
            fab.edge_host = ours
            fab.prefix["connector-1"] = inside
            fab.metrics["connector-1"] = f"{theirs}:{random.randint(20000, 60000)}"
            try:
                fab.start(timeout=40)
                _rebinding(fab, xfer, socks, port, theirs, public, trap)
            finally:
                fab.stop()
        finally:
            for proc in started:
                proc.kill()
                proc.wait()


def _rebinding(fab: Fabric, xfer, socks: int, port: int, theirs: str, public: Backend, trap: Backend) -> None:
    def refusals() -> list[dict]:
        return [json.loads(line) for line in _log(fab, "connector-1").splitlines()
                if line.startswith("{") and "destination address refused" in line]

    # Loopback first, a routable address second: only the routable one is dialed.
    for i in range(3):
        assert _echoes(xfer, socks, "both.rebind.test", port, f"both {i}".encode()) == 0
    assert _settled_opens(public, 3) == 3
    assert {(r["address"], r["rule"]) for r in refusals()} == {("127.0.0.1", "loopback")}

    # A routable answer, then loopback, in turn: each flow resolves once and dials only what it checked.
    codes = [_echoes(xfer, socks, "flip.rebind.test", port, f"flip {i}".encode()) for i in range(8)]
    assert codes.count(0) >= 1 and codes.count(0x02) >= 1, codes
    assert set(codes) == {0, 0x02}, codes
    assert _settled_opens(public, 3 + codes.count(0)) == 3 + codes.count(0)

    # The connector's own address (in its namespace) is refused.
    assert _echoes(xfer, socks, "self.rebind.test", port, b"self") == 0x02
    assert [r for r in refusals() if r["address"] == theirs][0]["rule"] == "connector_address"

    # Twelve addresses, FERRYMAN_DIAL_ADDRESSES=4: four are checked (and refused), eight ignored.
    assert _echoes(xfer, socks, "many.rebind.test", port, b"many") == 0x02
    many = [r for r in refusals() if r["dest"] == f"many.rebind.test:{port}"]
    assert [r["address"] for r in many] == [f"127.0.0.{i}" for i in range(1, 5)]
    xfer.wait_for(lambda: "every address of many.rebind.test is refused (4); the first: 127.0.0.1 is loopback"
                  in _log(fab, "client-1"), 5, "the client to log the refusal")

    assert _settled_opens(trap, 0) == 0, "the connector connected to loopback or to its own address"
    samples = xfer.scrape(fab.metrics["connector-1"])
    assert xfer.metric(samples, "ferryman_dial_refused_total", rule="too_many_addresses") == 8
    assert xfer.metric(samples, "ferryman_dial_refused_total", rule="connector_address") == 1
    assert xfer.metric(samples, "ferryman_dial_refused_total", rule="loopback") == 3 + codes.count(0x02) + 4
    assert xfer.metric(samples, "ferryman_open_failures_total", reason="destination_forbidden") == \
        codes.count(0x02) + 2
