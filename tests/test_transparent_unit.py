"""Transparent capture's nftables text built from a forwarding profile (``dataplane/client/transparent.py``).

Covered: the ruleset of a profile (IP, CIDR and range segments grouped by ports, overlaps
merged, name and UDP segments left out, IPv6 only with an IPv6 listener), the
exclusions (the agent's listening ports, edges / control plane / proxy by address and
port, the mark) ahead of every redirect, the DNS set elements with renewed timeouts, the
stale-table sweep, the start checks (not Linux, not root, no nft), what a private DNS
answer does (addresses into the set for TTL + margin, remembered by name; public names
and failures ignored) and whether a captured connection is opened to the name or the
address. When ``nft`` and root are there, the texts are also checked by
``nft --check`` itself (nothing is committed).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import types

import pytest
from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSRecord

from dataplane.basics.metrics import Stats
from dataplane.client import transparent as tp
from dataplane.client.profile import Profile
from dataplane.contract.snapshot import ClientProfile, SnapApp, SnapSegment

pytestmark = pytest.mark.timeout(30)

TABLE = "ferryman_4242"


def _profile(*apps: tuple[str, str, list[tuple[str, str, str]]], suffixes: tuple[str, ...] = ()) -> Profile:
    return Profile(ClientProfile(
        version=7, issued_at="2026-12-01T00:00:00Z", dns_suffixes=list(suffixes), applications=[
            SnapApp(name=name, kind=kind, connector_group="default",
                    segments=[SnapSegment(destination=d, ports=p, protocol=proto) for d, p, proto in segments])
            for name, kind, segments in apps]))


PROFILE = _profile(
    ("rdp", "per_app", [("10.20.0.0/16", "22,3389", "tcp"), ("10.1.2.3", "3389,22", "tcp"),
                        ("10.20.5.0/24", "22,3389", "tcp"),  # inside 10.20.0.0/16: merged away
                        ("*.corp.example", "443", "tcp"), ("10.9.9.9", "53", "udp")]),
    ("web", "per_app", [("10.30.0.1-10.30.0.9", "80-90,8080", "tcp"), ("10.30.0.10", "80-90,8080", "tcp"),
                        ("fd00:1::/64", "443", "tcp"), ("intranet.corp.example", "80", "tcp")]),
    ("everything", "quick_access", [("192.168.0.0/16", "1-65535", "tcp")]),
)


def test_ruleset_redirects_the_profiles_address_segments_after_the_exclusions():
    text = tp.ruleset(TABLE, PROFILE, 40001, 40002, [("203.0.113.7", 8443), ("2001:db8::1", 8443),
                                                     ("198.51.100.2", 0), ("::ffff:192.0.2.1", 3128)],
                      local_ports=[1080, 5353, 40001])
    t = f"inet {TABLE}"
    assert text.splitlines() == [
        f"add table {t}",
        f"add set {t} dns4 {{ type ipv4_addr; flags timeout; }}",
        f"add set {t} dns6 {{ type ipv6_addr; flags timeout; }}",
        f"add chain {t} output {{ type nat hook output priority -100; policy accept; }}",
        f"flush chain {t} output",
        f"add rule {t} output meta l4proto != tcp return",
        f"add rule {t} output meta mark 0x46524d31 return",
        f"add rule {t} output fib daddr type local tcp dport {{ 1080, 5353, 40001, 40002 }} return",
        f"add rule {t} output ip daddr . tcp dport {{ 192.0.2.1 . 3128, 203.0.113.7 . 8443 }} return",
        f"add rule {t} output ip daddr {{ 198.51.100.2 }} return",
        f"add rule {t} output ip6 daddr . tcp dport {{ 2001:db8::1 . 8443 }} return",
        # grouped by IP version and ports (in that order)
        f"add rule {t} output ip daddr {{ 192.168.0.0/16 }} tcp dport {{ 1-65535 }} redirect to :40001",
        # the same ports once, whatever order the segment gave them in; nested networks merged
        f"add rule {t} output ip daddr {{ 10.1.2.3, 10.20.0.0/16 }} tcp dport {{ 22, 3389 }} redirect to :40001",
        # a range and the address right after it become one range
        f"add rule {t} output ip daddr {{ 10.30.0.1-10.30.0.10 }} tcp dport {{ 80-90, 8080 }} redirect to :40001",
        f"add rule {t} output ip6 daddr {{ fd00:1::/64 }} tcp dport {{ 443 }} redirect to :40002",
        f"add rule {t} output ip daddr @dns4 meta l4proto tcp redirect to :40001",
        f"add rule {t} output ip6 daddr @dns6 meta l4proto tcp redirect to :40002",
    ]
    assert "corp.example" not in text and "10.9.9.9" not in text  # names come from DNS answers; UDP is not captured


def test_ruleset_without_ipv6_listener_or_profile():
    text = tp.ruleset(TABLE, PROFILE, 40001, 0, [], local_ports=[])
    assert "ip6 daddr" not in text and "fd00" not in text and "redirect to :0" not in text
    assert f"add rule inet {TABLE} output fib daddr type local tcp dport {{ 40001 }} return" in text
    bare = tp.ruleset(TABLE, None, 40001, 40002, [], local_ports=[])
    assert [line for line in bare.splitlines() if "redirect" in line] == [
        f"add rule inet {TABLE} output ip daddr @dns4 meta l4proto tcp redirect to :40001",
        f"add rule inet {TABLE} output ip6 daddr @dns6 meta l4proto tcp redirect to :40002"]


def test_address_elements_and_merging():
    assert tp._address(4, 0x0A000000, 0x0AFFFFFF) == "10.0.0.0/8"
    assert tp._address(4, 0x0A000001, 0x0A000001) == "10.0.0.1"
    assert tp._address(4, 0x0A000001, 0x0A000002) == "10.0.0.1-10.0.0.2"
    assert tp._address(4, 0, 0xFFFFFFFF) == "0.0.0.0/0"
    assert tp._address(6, 1 << 120, (1 << 120) + 255) == "100::/120"
    assert tp._merge([(5, 9), (1, 3), (4, 4), (20, 30), (25, 26)]) == [(1, 9), (20, 30)]
    assert tp._ports([(3389, 3389), (22, 22), (23, 100)]) == "22-100, 3389"


def test_dns_elements_renew_the_timeout():
    text = tp.elements(TABLE, [("10.1.2.3", 90), ("fd00::5", 330)])
    assert text.splitlines() == [
        f"add element inet {TABLE} dns4 {{ 10.1.2.3 timeout 90s }}",
        f"delete element inet {TABLE} dns4 {{ 10.1.2.3 }}",
        f"add element inet {TABLE} dns4 {{ 10.1.2.3 timeout 90s }}",
        f"add element inet {TABLE} dns6 {{ fd00::5 timeout 330s }}",
        f"delete element inet {TABLE} dns6 {{ fd00::5 }}",
        f"add element inet {TABLE} dns6 {{ fd00::5 timeout 330s }}",
    ]
    assert tp.elements(TABLE, []) == ""


def test_stale_tables_are_those_of_dead_agents():
    listing = ("table inet filter\ntable inet ferryman_100\ntable inet ferryman_200\n"
               f"table inet ferryman_{os.getpid()}\ntable ip ferryman_300\ntable inet ferryman_x\n")
    assert tp.stale_tables(listing, alive=lambda pid: pid == 100) == ["ferryman_200"]
    assert tp.table_name(77) == "ferryman_77" and tp.table_name() == f"ferryman_{os.getpid()}"


def test_start_checks_refuse_clearly():
    with pytest.raises(ValueError, match="Linux only"):
        tp.check_usable(platform="darwin", euid=0, nft="/usr/sbin/nft")
    with pytest.raises(ValueError, match="needs root"):
        tp.check_usable(platform="linux", euid=1000, nft="/usr/sbin/nft")
    with pytest.raises(ValueError, match="`nft` command"):
        tp.check_usable(platform="linux", euid=0, nft=None)
    tp.check_usable(platform="linux", euid=0, nft="/usr/sbin/nft")


def test_client_refuses_transparent_without_root(monkeypatch, tmp_path, capsys):
    """``ferryman client`` stops at start with one line (exit 2) when the checks fail."""
    from dataplane.cli import main

    monkeypatch.setattr(tp.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("FERRYMAN_DATA_DIR", str(tmp_path))
    for name in ("FERRYMAN_TLS_CA", "FERRYMAN_TLS_CERT", "FERRYMAN_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    from dataplane.basics import pki

    pki.init_pki(str(tmp_path / "pki"), edge_hosts=["127.0.0.1"], edges=["edge-1"], connectors=["connector-1"],
                 clients=["client-1"])
    code = main(["client", "--transparent", "--edges", "127.0.0.1:1", "--ca", str(tmp_path / "pki" / "ca.pem"),
                 "--cert", str(tmp_path / "pki" / "client-1.pem"), "--key", str(tmp_path / "pki" / "client-1.key")])
    assert code == 2
    assert "ferryman client: FERRYMAN_TRANSPARENT=on needs root" in capsys.readouterr().err


def _answer(name: str, records: list[RR], rcode: int = RCODE.NOERROR) -> DNSRecord:
    reply = DNSRecord.question(name, "A").reply()
    reply.header.rcode = rcode
    for rr in records:
        reply.add_answer(rr)
    return reply


def test_private_answers_go_into_the_sets_and_are_remembered_by_name(monkeypatch):
    scripts: list[str] = []

    async def fake_nft(script: str, *args: str) -> str:
        scripts.append(script)
        return ""

    monkeypatch.setattr(tp, "_nft", fake_nft)
    client = types.SimpleNamespace(profile=_profile(suffixes=("corp.example",)), resolver=None,
                                   stats=Stats("client", "test"))
    capture = tp.Transparent(client)  # type: ignore[arg-type]
    capture.installed, capture.port4, capture.port6 = True, 40001, 40002

    async def run() -> None:
        await capture.dns_answered("rdp.corp.example", _answer("rdp.corp.example", [
            RR("rdp.corp.example", QTYPE.A, rdata=A("10.7.0.1"), ttl=60),
            RR("rdp.corp.example", QTYPE.AAAA, rdata=AAAA("fd00::7"), ttl=20)]))
        await capture.dns_answered("www.example.org", _answer("www.example.org", [
            RR("www.example.org", QTYPE.A, rdata=A("93.184.216.34"), ttl=60)]))  # not private: left alone
        await capture.dns_answered("gone.corp.example", _answer("gone.corp.example", [], RCODE.NXDOMAIN))

    asyncio.run(run())
    assert scripts == [tp.elements(capture.table, [("10.7.0.1", 60 + tp.DNS_MARGIN), ("fd00::7", 20 + tp.DNS_MARGIN)])]
    assert capture.name_for("10.7.0.1") == "rdp.corp.example" and capture.name_for("fd00::7") == "rdp.corp.example"
    assert capture.name_for("93.184.216.34") is None
    capture.names["10.7.0.1"] = ("rdp.corp.example", 0.0)  # its answer ran out
    assert capture.name_for("10.7.0.1") is None


def test_a_captured_connection_is_opened_to_the_answered_name_unless_only_its_address_is_covered():
    client = types.SimpleNamespace(resolver=None, profile=_profile(
        ("rdp", "per_app", [("*.corp.example", "3389", "tcp"), ("10.20.0.0/16", "22", "tcp")]),
        suffixes=("corp.example",)))
    capture = tp.Transparent(client)  # type: ignore[arg-type]
    capture.names["10.20.0.5"] = ("rdp.corp.example", float("inf"))
    assert capture.flow_host("10.20.0.5", 3389) == "rdp.corp.example"  # the name segment covers it
    assert capture.flow_host("10.20.0.5", 22) == "10.20.0.5"  # only the address segment does
    assert capture.flow_host("10.20.0.5", 80) == "rdp.corp.example"  # neither: the edge decides for the name
    assert capture.flow_host("10.20.0.6", 3389) == "10.20.0.6"  # never answered


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="nft --check needs root and nft")
def test_nft_accepts_the_texts():
    script = tp.ruleset(TABLE, PROFILE, 40001, 40002, [("203.0.113.7", 8443), ("2001:db8::1", 0)], [1080]) \
        + tp.elements(TABLE, [("10.1.2.3", 90), ("fd00::5", 330)])
    done = subprocess.run(["nft", "--check", "-f", "-"], input=script.encode(), capture_output=True, timeout=20)
    assert done.returncode == 0, done.stderr.decode()
