"""Transparent capture end to end (``FERRYMAN_TRANSPARENT=on``): the client agent runs in its
own network namespace (joined to this host by a veth pair only), and apps in that namespace
connect to private addresses directly, with no proxy setting.

A managed fabric (control plane, edge, connector here; the signed-in client agent in the
namespace) with applications for ``127.0.0.0/8`` port P (an echo backend on this host's
loopback: inside the namespace nothing listens on 127.0.0.1:P, so an echo proves capture)
and for ``*.corp.example``, and the private DNS suffix ``corp.example`` (the connector's DNS
server is the ``dns`` backend, which answers ``rdp.corp.example`` with ``dns_address("rdp")``;
the connector, in a mount namespace of its own, finds that name at 127.0.0.1 in its
/etc/hosts, as a split-horizon network would; ``corp`` names 127.0.0.1 on that port as well,
since the connector dials loopback only where a segment names it). Covered:

- a connection to 127.0.0.1:P inside the namespace is captured and echoed byte for byte;
  its traffic record names the app's process;
- a private name answered by the agent's resolver, then connected to by address (which
  exists nowhere: the namespace's default route leads to this host, which has nothing
  there), is captured and opened by NAME (traffic record ``destination_fqdn``) and echoed;
- a destination outside the profile is not captured (connection refused);
- when the application is deleted, the new profile replaces the rules (127.0.0.1:P is
  refused again); when the agent stops (SIGTERM) its nftables table is gone;
- with the edge down a captured connection is reset (fail closed, reason logged) or, once
  the profile fails open, dialed directly, marked: a backend inside the namespace at the
  very address the rules redirect echoes (without the mark the dial would be captured
  again, in a loop);
- IPv4 and IPv6 connections redirected by a profile's rules give back their original
  destination (SO_ORIGINAL_DST, IP6T_SO_ORIGINAL_DST).

Skipped without root, ``ip netns``, ``nft`` or ``unshare``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from backends import dns_address
from conftest import wait_for
from dataplane.fabric import Fabric, free_port
from netns import private_network, start_backend_in

pytestmark = [pytest.mark.netns, pytest.mark.timeout(150)]

# One app connection inside the namespace: JSON with what came back, or the error.
APP = r"""
import json, os, socket, sys
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if len(sys.argv) > 4:  # resolve through the agent's resolver first
    from dnslib import DNSRecord, QTYPE
    answer = DNSRecord.parse(DNSRecord.question(host, "A").send("127.0.0.1", int(sys.argv[4]), timeout=8))
    host = next(str(rr.rdata) for rr in answer.rr if rr.rtype == QTYPE.A)
data = os.urandom(size)
out = {"pid": os.getpid(), "address": host}
try:
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    out["echoed"] = got == data
    out["received"] = len(got)
except OSError as exc:
    out["error"] = type(exc).__name__
print(json.dumps(out))
"""


def _app(ns: str, host: str, port: int, size: int = 200_000, dns_port: int | None = None) -> dict:
    args = [host, str(port), str(size)] + ([str(dns_port)] if dns_port else [])
    done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", APP, *args],
                          capture_output=True, text=True, timeout=40)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _ruleset(ns: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "ruleset"], capture_output=True, text=True,
                          timeout=20, check=True).stdout


def _status(fab: Fabric) -> dict:
    """What the running agent reports (``ferryman client status --json``)."""
    directory = os.path.join(fab.workdir, "nodes", "client-1", "client")
    done = subprocess.run([sys.executable, "-m", "dataplane", "client", "status", "--json", "--dir", directory],
                          capture_output=True, text=True, timeout=30)
    return json.loads(done.stdout).get("status") or {}


def _suffixes(fab: Fabric) -> list[str] | None:
    return (_status(fab).get("profile") or {}).get("dns_suffixes")


def _traffic(fab: Fabric, **fields: object) -> dict | None:
    rows = fab.admin("GET", "/v1/traffic?limit=500")
    return next((r for r in rows if all(r.get(k) == v for k, v in fields.items())), None)  # type: ignore[union-attr]


def _fabric(tmp_path, ns: str, ours: str, theirs: str, ready_port: int, env: dict[str, str]) -> Fabric:
    """Control plane, edge and connector here (listening on ``ours``); the client agent in ``ns``,
    with transparent capture on. The namespace gets a default route, as any device has one: the
    kernel routes a connection before nftables redirects it."""
    subprocess.run(["ip", "-n", ns, "route", "add", "default", "via", ours], check=True, timeout=20)
    workdir = tmp_path / "fabric"
    workdir.mkdir()
    fab = Fabric(str(workdir), [(theirs, free_port(), "127.0.0.1", ready_port)], managed=True, env={
        "FERRYMAN_DRAIN_GRACE": "1", "FERRYMAN_TRANSPORT": "tcp", "FERRYMAN_TRANSPARENT": "on", **env})
    fab.edge_host = fab.control_host = ours
    fab.edge_port = free_port()
    fab.prefix["client-1"] = ["ip", "netns", "exec", ns]
    fab.metrics["client-1"] = f"{theirs}:{random.randint(20000, 60000)}"
    return fab


def _lab(fab: Fabric, port: int) -> None:
    """Application ``lab``: 127.0.0.0/8 port ``port``, assigned to the signed-in user; returns once
    the edge runs the configuration with the assignment (the client's capture rules can arrive
    with the application's first version, before the assignment reaches the edge)."""
    fab.admin("POST", "/v1/applications", {"name": "lab", "segments": [
        {"destination": "127.0.0.0/8", "ports": str(port), "protocol": "tcp"}]})
    fab.admin("POST", "/v1/applications/lab/assignments", {"user": fab.user})
    fab.wait_configured()


def _print_logs(fab: Fabric) -> None:
    for name in fab.logs:
        print(f"--- {name}\n{fab.log_tail(name, 40)}")


def test_transparent_capture_of_private_addresses_and_private_names(backend, tmp_path):
    for tool in ("nft", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"`{tool}` is not installed")
    ready, lab, named, outside, private_dns = (backend("echo"), backend("echo"), backend("echo"), backend("echo"),
                                               backend("dns"))
    hosts = tmp_path / "connector-hosts"
    hosts.write_text("127.0.0.1 localhost\n127.0.0.1 rdp.corp.example\n")
    with private_network() as (ns, ours, theirs):
        fab = _fabric(tmp_path, ns, ours, theirs, ready.port, {
            "FERRYMAN_DNS_LISTEN": "127.0.0.1:53", "FERRYMAN_DNS_UPSTREAM": "127.0.0.1:1",
            "FERRYMAN_DNS_SERVER": f"127.0.0.1:{private_dns.port}"})
        fab.prefix["connector-1"] = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"',
                                     str(hosts)]
        try:
            fab.start(timeout=40)
            _lab(fab, lab.port)
            # The connector finds rdp.corp.example at 127.0.0.1: its dial check refuses a name
            # that lands on loopback unless the application names that address explicitly.
            fab.admin("POST", "/v1/applications", {"name": "corp", "segments": [
                {"destination": "*.corp.example", "ports": str(named.port), "protocol": "tcp"},
                {"destination": "127.0.0.1", "ports": str(named.port), "protocol": "tcp"}]})
            fab.admin("POST", "/v1/applications/corp/assignments", {"user": fab.user})
            fab.admin("POST", "/v1/dns-suffixes", {"suffix": "corp.example"})
            fab.wait_configured()
            # The profile reaches the agent, and its rules the namespace's nftables.
            wait_for(lambda: "127.0.0.0/8" in _ruleset(ns), 20.0, "the lab segment's redirect rule", interval=0.3)
            wait_for(lambda: _suffixes(fab) == ["corp.example"], 20.0, "the profile's DNS suffix", interval=0.3)

            # 1. A private address: captured, echoed; the record names the app's process.
            got = _app(ns, "127.0.0.1", lab.port)
            assert got.get("echoed") is True, got
            lab.wait_event("eof", bytes=200_000)
            row = wait_for(lambda: _traffic(fab, destination_port=lab.port, destination_ip="127.0.0.1"), 10.0,
                           "the lab flow's traffic record", interval=0.3)
            assert (row["application"], row["action"], row["upn"]) == ("lab", "allow", fab.user), row
            assert f"[{got['pid']}]" in row["process"], row

            # 2. A private name: answered by the resolver, connected to by address, opened by NAME.
            got = _app(ns, "rdp.corp.example", named.port, size=50_000, dns_port=53)
            assert got["address"] == dns_address("rdp") and got.get("echoed") is True, got
            named.wait_event("eof", bytes=50_000)
            row = wait_for(lambda: _traffic(fab, destination_fqdn="rdp.corp.example", transport="tcp"), 10.0,
                           "the named flow's traffic record", interval=0.3)
            assert (row["destination_port"], row["application"], row["action"]) == (named.port, "corp", "allow"), row
            assert dns_address("rdp") in _ruleset(ns)  # in the dns4 set, with its timeout

            # 3. Outside the profile: not captured (nothing listens there in the namespace).
            assert _app(ns, "127.0.0.1", outside.port).get("error") == "ConnectionRefusedError"
            outside_events = [e for e in outside.drain_events() if e["ev"] == "open"]
            assert not outside_events

            # 4. The application goes away: the next profile replaces the rules.
            fab.admin("DELETE", "/v1/applications/lab")
            wait_for(lambda: "127.0.0.0/8" not in _ruleset(ns), 20.0, "the lab rule to go", interval=0.3)
            assert _app(ns, "127.0.0.1", lab.port).get("error") == "ConnectionRefusedError"
            assert "@dns4" in _ruleset(ns)

            # 5. SIGTERM: the agent removes its table.
            assert "table inet ferryman_" in _ruleset(ns)
            fab.kill("client-1", sig=15)
            assert fab.procs["client-1"].returncode == 0
            assert "ferryman_" not in _ruleset(ns)
        except BaseException:
            _print_logs(fab)
            raise
        finally:
            fab.stop()


def test_fail_closed_resets_captured_connections_and_fail_open_dials_them_directly(backend, tmp_path):
    """With the edge down a captured connection is reset (fail closed), or dialed from the device
    (fail open). That direct dial goes to the same private address the rules redirect: only its
    mark keeps it from being captured again, so an echo from a backend inside the namespace
    proves the exclusion (no redirect loop)."""
    if shutil.which("nft") is None:
        pytest.skip("`nft` is not installed")
    ready = backend("echo")
    with private_network() as (ns, ours, theirs):
        inside = start_backend_in(ns, "echo")  # 127.0.0.1:Q of the namespace only (nothing there on this host)
        fab = _fabric(tmp_path, ns, ours, theirs, ready.port, {})
        try:
            fab.start(timeout=40)
            _lab(fab, inside.port)
            wait_for(lambda: "127.0.0.0/8" in _ruleset(ns), 20.0, "the lab segment's redirect rule", interval=0.3)
            # Tunnel up: captured, tunnelled, and the connector finds nothing at 127.0.0.1:Q: reset.
            got = _app(ns, "127.0.0.1", inside.port, size=1000)
            assert got.get("error") in ("ConnectionResetError", "BrokenPipeError") or got.get("received") == 0, got
            wait_for(lambda: "dial_refused" in fab.log_tail("client-1", 50), 10.0, "the refusal in the client's log")

            fab.kill("edge-1")
            wait_for(lambda: (_status(fab).get("tunnel") or {}).get("state") == "down", 15.0, "the tunnel to go down",
                     interval=0.3)
            got = _app(ns, "127.0.0.1", inside.port, size=1000)
            assert got.get("error") in ("ConnectionResetError", "BrokenPipeError") or got.get("received") == 0, got
            wait_for(lambda: "edge_unreachable" in fab.log_tail("client-1", 50), 10.0, "the fail-closed refusal")
            with pytest.raises(TimeoutError):
                inside.wait_event("open", timeout=0.5)

            fab.admin("PUT", "/v1/forwarding-profile", {"fail_mode": "open"})
            wait_for(lambda: (_status(fab).get("profile") or {}).get("fail_mode") == "open", 20.0,
                     "the fail-open profile", interval=0.3)
            got = _app(ns, "127.0.0.1", inside.port, size=100_000)
            assert got.get("echoed") is True, got
            inside.wait_event("eof", bytes=100_000)
            log = fab.log_tail("client-1", 80)
            assert "direct flow" in log and "fail open" in log
            assert "transparent connection refused" not in log
        except BaseException:
            _print_logs(fab)
            raise
        finally:
            fab.stop()
            inside.stop()


REDIRECTED = r"""
import socket, subprocess, sys
from dataplane.client import transparent as tp
from dataplane.client.profile import Profile
from dataplane.contract.snapshot import ClientProfile, SnapApp, SnapSegment
v4, v6 = socket.create_server(("127.0.0.1", 0)), socket.create_server(("::1", 0), family=socket.AF_INET6)
profile = Profile(ClientProfile(version=1, issued_at="now", applications=[SnapApp(
    name="a", kind="per_app", connector_group="default", segments=[
        SnapSegment(destination="fd00:9::/64", ports="80", protocol="tcp"),
        SnapSegment(destination="10.9.0.0/16", ports="81", protocol="tcp")])]))
script = tp.ruleset(tp.table_name(), profile, v4.getsockname()[1], v6.getsockname()[1], [], [])
subprocess.run(["nft", "-f", "-"], input=script.encode(), check=True, timeout=20)
for address, port, server in (("10.9.3.4", 81, v4), ("fd00:9::77", 80, v6)):
    app = socket.create_connection((address, port), timeout=5)
    accepted, _ = server.accept()
    print(*tp.original_destination(accepted))
"""


def test_original_destination_of_redirected_ipv4_and_ipv6_connections():
    """The rules of a profile redirect IPv4 and IPv6 connections to the listeners, and
    SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST give back where they were going."""
    if shutil.which("nft") is None:
        pytest.skip("`nft` is not installed")
    with private_network() as (ns, _ours, _theirs):
        subprocess.run(["ip", "-n", ns, "route", "add", "10.9.0.0/16", "dev", "lo"], check=True, timeout=20)
        added = subprocess.run(["ip", "-n", ns, "-6", "route", "add", "fd00:9::/64", "dev", "lo"],
                               capture_output=True, text=True, timeout=20)
        if added.returncode != 0:
            pytest.skip(f"no IPv6 in the namespace: {added.stderr.strip()}")
        done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", REDIRECTED], capture_output=True,
                              text=True, timeout=40, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == ["10.9.3.4 81", "fd00:9::77 80"]
