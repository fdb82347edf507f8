"""Private DNS end to end through real processes: the client agent's resolver, the edge's
decision, the connector's DNS server, and the system resolver for everything else.

A managed fabric (control plane, edge, connector, signed-in client) with two ``dns``
backends: the private DNS server the connector asks (FERRYMAN_DNS_SERVER) and the
client's system resolver (FERRYMAN_DNS_UPSTREAM). Covered:
- a name under the private suffix is answered by the private server, asked by the
  connector (never by the client), and its flow is in the traffic log;
- a name outside it goes to the system resolver, not through the tunnel;
- answers are cached for their TTL (the second query reaches no server), over UDP and TCP;
- with the edge down: fail closed answers SERVFAIL for private names (public ones still
  resolve); after the admin switches the profile to fail open, private names go to the
  system resolver.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from backends import dns_address
from dataplane.fabric import free_port

pytestmark = pytest.mark.timeout(120)


def _free_dns_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (the resolver listens on both)."""
    while True:
        port = free_port("udp")
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def _ask(port: int, name: str, tcp: bool = False, timeout: float = 8.0) -> DNSRecord:
    query = DNSRecord.question(name, "A")
    raw = query.send("127.0.0.1", port, tcp=tcp, timeout=timeout)
    answer = DNSRecord.parse(raw)
    assert answer.header.id == query.header.id
    return answer


def _addresses(answer: DNSRecord) -> list[str]:
    return [str(rr.rdata) for rr in answer.rr if rr.rtype == QTYPE.A]


def _status(fab) -> dict:
    """``ferryman client status --json`` of the fabric's client agent."""
    directory = os.path.join(fab.workdir, "nodes", "client-1", "client")
    done = subprocess.run([sys.executable, "-m", "dataplane", "client", "status", "--json", "--dir", directory],
                          capture_output=True, text=True, timeout=30)
    return json.loads(done.stdout)


def _wait_profile(fab, xfer, **expected: object) -> dict:
    """Wait until the running agent reports a profile with these fields; its status."""
    def current() -> dict | None:
        report = _status(fab)
        profile = (report.get("status") or {}).get("profile", {})
        return report if report["running"] and all(profile.get(k) == v for k, v in expected.items()) else None
    return xfer.wait_for(current, 15.0, f"the client's profile to show {expected}", interval=0.5)


def _names(backend) -> list[str]:
    return [e["name"] for e in backend.drain_events() if e["ev"] == "dns"]


def test_private_dns_through_the_connector_and_public_names_direct(backend, fabric, xfer):
    private, upstream = backend("dns"), backend("dns")
    dns_port = _free_dns_port()
    fab = fabric([backend("echo")], managed=True, env={
        "FERRYMAN_DNS_SERVER": f"127.0.0.1:{private.port}",
        "FERRYMAN_DNS_UPSTREAM": f"127.0.0.1:{upstream.port}",
        "FERRYMAN_DNS_LISTEN": f"127.0.0.1:{dns_port}",
    })
    fab.admin("POST", "/v1/dns-suffixes", {"suffix": "corp.example"})
    # The suffix reaches the client's profile (and the edge's snapshot) within seconds.
    report = _wait_profile(fab, xfer, dns_suffixes=["corp.example"])["status"]
    assert report["user"] == fab.user and report["tunnel"]["state"] == "up" and report["tunnel"]["edge"] == "edge-1"
    assert report["profile"]["fail_mode"] == "closed" and report["forwards"][0]["ready"]

    answer = _ask(dns_port, "rdp.corp.example")
    assert _addresses(answer) == [dns_address("rdp")] and answer.rr[0].ttl <= 60
    asked = private.wait_event("dns", name="rdp.corp.example")
    client_ports = {int(e["peer"].rsplit(":", 1)[1]) for e in upstream.drain_events() if e["ev"] == "dns"}
    assert "rdp.corp.example" not in _names(upstream)  # the private name never left through the system resolver
    assert int(asked["peer"].rsplit(":", 1)[1]) not in client_ports

    # A public name: the system resolver answers (NXDOMAIN from this test server), not the connector.
    outside = _ask(dns_port, "www.example.org")
    assert outside.header.rcode == RCODE.NXDOMAIN
    upstream.wait_event("dns", name="www.example.org")
    time.sleep(0.3)
    assert "www.example.org" not in _names(private)

    # Cached for the TTL: a second query (UDP or TCP) reaches neither server.
    before = len(_names(private))
    again = _ask(dns_port, "rdp.corp.example", tcp=True)
    assert _addresses(again) == [dns_address("rdp")] and 0 < again.rr[0].ttl <= 60
    assert _addresses(_ask(dns_port, "RDP.corp.example")) == [dns_address("rdp")]
    time.sleep(0.3)
    assert len(_names(private)) == before
    # A new private name over TCP goes through the tunnel too.
    assert _addresses(_ask(dns_port, "files.corp.example", tcp=True)) == [dns_address("files")]
    private.wait_event("dns", name="files.corp.example")

    # The query's flow is in the traffic log: a UDP flow to the name, port 53, allowed.
    def record() -> dict | None:
        rows = fab.admin("GET", "/v1/traffic?limit=200")
        return next((r for r in rows if r["destination_fqdn"] == "rdp.corp.example"), None)

    row = xfer.wait_for(record, 10.0, "the DNS flow's traffic record", interval=0.3)
    assert (row["transport"], row["destination_port"], row["action"]) == ("udp", 53, "allow")
    assert row["upn"] == fab.user and row["connector_name"] == "connector-1" and row["bytes_received"] > 0


def test_fail_closed_then_fail_open_while_the_edge_is_down(backend, fabric, xfer):
    private, upstream = backend("dns"), backend("dns")
    dns_port = _free_dns_port()
    fab = fabric([backend("echo")], managed=True, env={
        "FERRYMAN_DNS_SERVER": f"127.0.0.1:{private.port}",
        "FERRYMAN_DNS_UPSTREAM": f"127.0.0.1:{upstream.port}",
        "FERRYMAN_DNS_LISTEN": f"127.0.0.1:{dns_port}",
    })
    fab.admin("POST", "/v1/dns-suffixes", {"suffix": "corp.example"})
    _wait_profile(fab, xfer, dns_suffixes=["corp.example"])
    assert _addresses(_ask(dns_port, "a.corp.example")) == [dns_address("a")]
    private.wait_event("dns", name="a.corp.example")

    fab.kill("edge-1")
    xfer.wait_for(lambda: xfer.metric(xfer.scrape(fab.metrics["client-1"]), "ferryman_tunnels") == 0, 10.0,
                  "the client to see the edge gone")
    closed = _ask(dns_port, "b.corp.example")
    assert closed.header.rcode == RCODE.SERVFAIL and not closed.rr
    time.sleep(0.3)  # what a backend saw is read from its output a moment later
    assert "b.corp.example" not in _names(upstream)  # fail closed: the private name stays private
    assert "fail closed" in fab.log_tail("client-1", 40)
    assert _ask(dns_port, "www.example.org").header.rcode == RCODE.NXDOMAIN  # public names still resolve

    # Fail open: the profile change reaches the client (the control plane is still up) and private
    # names go to the system resolver while no edge is reachable.
    fab.admin("PUT", "/v1/forwarding-profile", {"fail_mode": "open"})
    report = _wait_profile(fab, xfer, fail_mode="open")["status"]
    assert report["tunnel"]["state"] == "down"
    assert _addresses(_ask(dns_port, "c.corp.example")) == [dns_address("c")]
    upstream.wait_event("dns", name="c.corp.example")
    time.sleep(0.3)
    assert "c.corp.example" not in _names(private)
