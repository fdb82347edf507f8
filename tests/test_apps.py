"""Tests of dataplane/apps.py: the application file format, its error messages, and
segment matching (most specific destination, then narrowest port range)."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.access.apptable import AppTable, Match, describe_miss
from dataplane.contract.apps import MAX_SEGMENTS, App, AppsError, Segment

pytestmark = pytest.mark.timeout(30)

EXAMPLE_TOML = """
[[apps]]
name = "intranet"
connector_group = "default"
segments = [
  { destination = "*.corp.example", ports = "80,443,8000-8100", protocol = "tcp" },
  { destination = "10.20.0.0/16", ports = [22, "3389"], protocol = "tcp" },
  { destination = "db.corp.example", ports = "5432" },   # protocol defaults to tcp
]

[[apps]]
name = "dns"
connector_group = "branch"
segments = [{ destination = "10.20.0.53", ports = 53, protocol = "udp" }]
"""


def table(*apps: dict[str, Any], source: str = "apps.toml") -> AppTable:
    return AppTable.from_obj({"apps": list(apps)}, source=source)


def app(name: str, *segments: dict[str, Any], group: str = "default") -> dict[str, Any]:
    return {"name": name, "connector_group": group, "segments": list(segments)}


def seg(destination: str, ports: Any = "1-65535", protocol: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"destination": destination, "ports": ports}
    if protocol is not None:
        out["protocol"] = protocol
    return out


def winner(t: AppTable, host: str, port: int, protocol: str = "tcp") -> str | None:
    """Name of the app that matched, or None."""
    m = t.match(host, port, protocol)
    return m.app.name if m else None


# ---------------------------------------------------------------------------- loading


def test_example_toml(tmp_path: Path) -> None:
    path = tmp_path / "apps.toml"
    path.write_text(EXAMPLE_TOML)
    t = AppTable.load(str(path))
    assert [a.name for a in t.apps] == ["intranet", "dns"]
    assert t.groups() == {"default", "branch"}
    intranet = t.apps[0]
    assert intranet == App(
        name="intranet",
        connector_group="default",
        segments=(
            Segment("intranet", "*.corp.example", "wildcard", ((80, 80), (443, 443), (8000, 8100)), "tcp"),
            Segment("intranet", "10.20.0.0/16", "cidr", ((22, 22), (3389, 3389)), "tcp"),
            Segment("intranet", "db.corp.example", "hostname", ((5432, 5432),), "tcp"),
        ),
    )
    assert t.match("db.corp.example", 5432) == Match(app=intranet, segment=intranet.segments[2])
    assert t.match("wiki.corp.example", 8000) == Match(app=intranet, segment=intranet.segments[0])
    assert t.match("10.20.3.4", 3389) == Match(app=intranet, segment=intranet.segments[1])
    assert winner(t, "10.20.0.53", 53, "udp") == "dns"
    assert t.match("10.20.0.53", 53) is None  # only udp is published
    assert t.match("wiki.corp.example", 8101) is None


def test_json_file_and_unknown_extension(tmp_path: Path) -> None:
    obj = {"apps": [app("web", seg("web.corp.example", "443"))]}
    (tmp_path / "apps.json").write_text(json.dumps(obj))
    assert winner(AppTable.load(str(tmp_path / "apps.json")), "web.corp.example", 443) == "web"
    (tmp_path / "apps.conf").write_text(json.dumps(obj))
    assert winner(AppTable.load(str(tmp_path / "apps.conf")), "web.corp.example", 443) == "web"
    (tmp_path / "apps.cfg").write_text(EXAMPLE_TOML)
    assert winner(AppTable.load(str(tmp_path / "apps.cfg")), "db.corp.example", 5432) == "intranet"


def test_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(AppsError) as err:
        AppTable.load(str(missing))
    assert str(err.value) == f"{missing}: file not found"

    bad_json = tmp_path / "apps.json"
    bad_json.write_text('{"apps": [}')
    with pytest.raises(AppsError) as err:
        AppTable.load(str(bad_json))
    assert str(err.value).startswith(f"{bad_json}: invalid JSON: ")
    assert "line 1 column 11" in str(err.value)

    bad_toml = tmp_path / "apps.toml"
    bad_toml.write_text("[[apps]\nname = 1\n")
    with pytest.raises(AppsError) as err:
        AppTable.load(str(bad_toml))
    assert str(err.value).startswith(f"{bad_toml}: invalid TOML: ")

    neither = tmp_path / "apps.txt"
    neither.write_text("apps = [")
    with pytest.raises(AppsError) as err:
        AppTable.load(str(neither))
    assert str(err.value).startswith(f"{neither}: neither valid JSON (")
    assert "nor valid TOML (" in str(err.value)

    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(AppsError, match="not UTF-8 text"):
        AppTable.load(str(binary))


def test_empty_apps_list_is_allowed() -> None:
    t = AppTable.from_obj({"apps": []})
    assert t.apps == [] and t.groups() == set()
    assert t.match("anything.example", 80) is None


# ---------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("destination", "kind", "normalised"),
    [
        ("db.corp.example", "hostname", "db.corp.example"),
        ("DB.Corp.Example.", "hostname", "db.corp.example"),
        ("host_1", "hostname", "host_1"),
        ("*.corp.example", "wildcard", "*.corp.example"),
        ("*.CORP.example.", "wildcard", "*.corp.example"),
        ("10.0.0.1", "ip", "10.0.0.1"),
        ("2001:DB8:0:0::1", "ip", "2001:db8::1"),
        ("10.20.0.0/16", "cidr", "10.20.0.0/16"),
        ("2001:db8::/32", "cidr", "2001:db8::/32"),
        ("10.0.0.5-10.0.0.20", "range", "10.0.0.5-10.0.0.20"),
        ("2001:db8::1-2001:db8::ff", "range", "2001:db8::1-2001:db8::ff"),
        ("  web-1.corp.example ", "hostname", "web-1.corp.example"),
    ],
)
def test_destination_kinds(destination: str, kind: str, normalised: str) -> None:
    segment = table(app("a", seg(destination))).apps[0].segments[0]
    assert (segment.kind, segment.destination) == (kind, normalised)


@pytest.mark.parametrize(
    ("ports", "parsed"),
    [
        ("80", ((80, 80),)),
        (443, ((443, 443),)),
        ("80,443,8000-8100", ((80, 80), (443, 443), (8000, 8100))),
        (" 443 , 80 ", ((80, 80), (443, 443))),
        ([22, "3389"], ((22, 22), (3389, 3389))),
        (["8000-8100", 22, 22], ((22, 22), (8000, 8100))),
        ("1-65535", ((1, 65535),)),
        ("5 - 7", ((5, 7),)),
    ],
)
def test_port_syntax(ports: Any, parsed: tuple[tuple[int, int], ...]) -> None:
    assert table(app("a", seg("h.example", ports))).apps[0].segments[0].ports == parsed


def test_protocol_default_and_case() -> None:
    t = table(app("a", seg("h.example", 1), seg("u.example", 1, "UDP")))
    assert [s.protocol for s in t.apps[0].segments] == ["tcp", "udp"]


@pytest.mark.parametrize(
    ("segment", "message"),
    [
        (seg("h.example", 70000), "port 70000 out of range 1-65535"),
        (seg("h.example", "0"), "port 0 out of range 1-65535"),
        (seg("h.example", "80,70000-70001"), "port 70000 out of range 1-65535"),
        (seg("h.example", ""), "ports is empty"),
        (seg("h.example", []), "ports is empty"),
        (seg("h.example", "80,,443"), "ports has an empty entry"),
        (seg("h.example", "http"), "port 'http' is not a number or a range like '8000-8100'"),
        (seg("h.example", "80-"), "port '80-' is not a number or a range like '8000-8100'"),
        (seg("h.example", "8100-8000"), "port range '8100-8000' is reversed"),
        (seg("h.example", [True]), "port True is not a number"),
        (seg("h.example", [4.5]), "port 4.5 is not a number"),
        (seg("h.example", {"a": 1}), "ports must be a list or a string like '80,443,8000-8100', not {'a': 1}"),
        (seg("h.example", 80, "icmp"), "protocol 'icmp' is not tcp or udp"),
        (seg("10.0.0.1/8"), "'10.0.0.1/8' has host bits set"),
        (seg("10.0.0.0/33"), "'10.0.0.0/33' is not a valid CIDR network"),
        (seg("corp.example/24"), "'corp.example/24' is not a valid CIDR network"),
        (seg("10.0.0.20-10.0.0.5"), "'10.0.0.20-10.0.0.5' is not a valid IP range: 10.0.0.20 comes after 10.0.0.5"),
        (seg("10.0.0.5-20"), "'10.0.0.5-20' is not a valid IP range (expected FIRST-LAST addresses)"),
        (seg("10.0.0.5-::1"), "'10.0.0.5-::1' mixes IPv4 and IPv6"),
        (seg("10.0.0.300"), "'10.0.0.300' is not a valid host name or IP address"),
        (seg("bad host.example"), "'bad host.example' is not a valid host name or IP address"),
        (seg("-web.example"), "'-web.example' is not a valid host name or IP address"),
        (seg("a..example"), "'a..example' is not a valid host name or IP address"),
        (seg("*"), "'*' is not a valid destination: a wildcard must look like '*.suffix'"),
        (seg("web.*.example"), "'web.*.example' is not a valid destination: a wildcard must look like '*.suffix'"),
        (seg("*."), "'*.' is not a valid wildcard: '*.' must be followed by a domain name"),
        (seg("   "), "destination is empty"),
        (seg(42), "destination must be a string, not 42"),  # type: ignore[arg-type]
        ({"ports": "80"}, "destination is missing"),
        ({"destination": "h.example"}, "ports is missing"),
        ({"destination": "h.example", "port": 80}, "unknown key 'port' (expected destination, ports, protocol)"),
        ("h.example", "must be a table with destination, ports and protocol"),
    ],
)
def test_segment_errors(segment: Any, message: str) -> None:
    good = seg("ok.example", 80)
    with pytest.raises(AppsError) as err:
        table(app("intranet", good, segment))
    assert str(err.value) == f"apps.toml: app 'intranet' segment 2: {message}"


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([], "apps.toml: expected a table with an 'apps' list"),
        ({}, "apps.toml: expected a table with an 'apps' list"),
        ({"apps": {}}, "apps.toml: 'apps' must be a list"),
        ({"apps": [], "extra": 1}, "apps.toml: unknown key 'extra' (expected apps, connectors)"),
        ({"apps": ["x"]}, "apps.toml: app 1: must be a table"),
        ({"apps": [{"segments": []}]}, "apps.toml: app 1: name must be a non-empty string"),
        ({"apps": [{"name": " "}]}, "apps.toml: app 1: name must be a non-empty string"),
        ({"apps": [{"name": "x", "segments": []}]}, "apps.toml: app 'x' has no segments"),
        ({"apps": [{"name": "x"}]}, "apps.toml: app 'x': segments must be a list"),
        (
            {"apps": [{"name": "x", "group": "g", "segments": [seg("h.example")]}]},
            "apps.toml: app 'x': unknown key 'group' (expected name, connector_group, segments)",
        ),
        (
            {"apps": [{"name": "x", "connector_group": "", "segments": [seg("h.example")]}]},
            "apps.toml: app 'x': connector_group must be a non-empty string",
        ),
        (
            {"apps": [app("x", seg("a.example")), app("y", seg("b.example")), app("x", seg("c.example"))]},
            "apps.toml: duplicate app name 'x'",
        ),
    ],
)
def test_app_errors(obj: Any, message: str) -> None:
    with pytest.raises(AppsError) as err:
        AppTable.from_obj(obj, source="apps.toml")
    assert str(err.value) == message


def test_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "apps.toml"
    path.write_text(EXAMPLE_TOML.replace('ports = [22, "3389"]', 'ports = [22, "70000"]'))
    with pytest.raises(AppsError) as err:
        AppTable.load(str(path))
    assert str(err.value) == f"{path}: app 'intranet' segment 2: port 70000 out of range 1-65535"


def test_segment_limit() -> None:
    at_limit = [seg(f"10.0.{i // 256}.{i % 256}", 80) for i in range(MAX_SEGMENTS)]
    t = table(app("big", *at_limit))
    assert MAX_SEGMENTS == 500
    assert winner(t, "10.0.1.243", 80) == "big"  # segment 500
    with pytest.raises(AppsError) as err:
        table(app("big", *at_limit, seg("10.9.9.9", 80)))
    assert str(err.value) == "apps.toml: app 'big' has 501 segments; at most 500 are allowed"


def test_connector_group_defaults_to_default() -> None:
    t = AppTable.from_obj({"apps": [{"name": "x", "segments": [seg("h.example")]}]})
    assert t.apps[0].connector_group == "default"


# ---------------------------------------------------------------------------- matching


def test_names_never_match_addresses_and_back() -> None:
    t = table(app("net", seg("10.0.0.0/8")), app("name", seg("*.example")))
    assert winner(t, "10.1.2.3", 80) == "net"
    assert winner(t, "ten.example", 80) == "name"
    assert winner(t, "10.example", 80) == "name"  # a name, even though it starts like an address
    assert t.match("192.0.2.1", 80) is None  # an address outside the CIDR; wildcards never cover addresses
    assert t.match("example", 80) is None


def test_hostname_case_and_trailing_dot() -> None:
    t = table(app("a", seg("DB.corp.example.", 5432)))
    for host in ("db.corp.example", "DB.CORP.EXAMPLE", "db.corp.example."):
        assert winner(t, host, 5432) == "a"
    assert t.match("db.corp.example.evil", 5432) is None
    assert t.match("xdb.corp.example", 5432) is None


def test_wildcard_matches_strictly_under_suffix_at_any_depth() -> None:
    t = table(app("w", seg("*.corp.example")))
    assert winner(t, "a.corp.example", 1) == "w"
    assert winner(t, "a.b.c.corp.example", 1) == "w"
    assert winner(t, "A.Corp.Example.", 1) == "w"
    assert t.match("corp.example", 1) is None
    assert t.match("evilcorp.example", 1) is None
    assert t.match("corp.example.evil", 1) is None


def test_exact_beats_wildcard_and_longer_suffix_beats_shorter() -> None:
    t = table(
        app("broad", seg("*.example")),
        app("corp", seg("*.corp.example")),
        app("lab", seg("*.lab.corp.example")),
        app("exact", seg("db.lab.corp.example")),
    )
    assert winner(t, "db.lab.corp.example", 80) == "exact"
    assert winner(t, "x.db.lab.corp.example", 80) == "lab"
    assert winner(t, "web.lab.corp.example", 80) == "lab"
    assert winner(t, "web.corp.example", 80) == "corp"
    assert winner(t, "www.example", 80) == "broad"
    # Declaration order plays no part: reversed file, same answers.
    reverse = table(
        app("exact", seg("db.lab.corp.example")),
        app("lab", seg("*.lab.corp.example")),
        app("corp", seg("*.corp.example")),
        app("broad", seg("*.example")),
    )
    for host in ("db.lab.corp.example", "x.db.lab.corp.example", "web.corp.example", "www.example"):
        assert winner(reverse, host, 80) == winner(t, host, 80)


def test_less_specific_segment_covers_ports_the_specific_one_does_not() -> None:
    t = table(app("exact", seg("db.corp.example", 5432)), app("wild", seg("*.corp.example", "1-65535")))
    assert winner(t, "db.corp.example", 5432) == "exact"
    assert winner(t, "db.corp.example", 22) == "wild"


def test_cidr_nesting_and_single_ip() -> None:
    t = table(
        app("all", seg("0.0.0.0/0")),
        app("ten", seg("10.0.0.0/8")),
        app("lab", seg("10.20.0.0/16")),
        app("host", seg("10.20.1.5")),
        app("range", seg("10.20.1.0-10.20.1.99")),  # 100 addresses: smaller than /24 and /16
        app("rack", seg("10.20.1.0/24")),
    )
    assert winner(t, "10.20.1.5", 22) == "host"
    assert winner(t, "10.20.1.6", 22) == "range"
    assert winner(t, "10.20.1.100", 22) == "rack"
    assert winner(t, "10.20.2.1", 22) == "lab"
    assert winner(t, "10.99.0.1", 22) == "ten"
    assert winner(t, "192.0.2.1", 22) == "all"
    assert t.match("::1", 22) is None  # IPv4 segments never match IPv6 addresses


def test_range_edges() -> None:
    t = table(app("r", seg("10.0.0.5-10.0.0.20")))
    assert [winner(t, f"10.0.0.{i}", 1) for i in (4, 5, 20, 21)] == [None, "r", "r", None]


def test_narrower_port_range_wins_at_equal_destination() -> None:
    t = table(
        app("any-port", seg("10.0.0.0/24", "1-65535")),
        app("web", seg("10.0.0.0/24", "80,443,8000-8100")),
        app("alt", seg("10.0.0.0/24", "8080")),
    )
    assert winner(t, "10.0.0.9", 8080) == "alt"
    assert winner(t, "10.0.0.9", 8081) == "web"
    assert winner(t, "10.0.0.9", 443) == "web"
    assert winner(t, "10.0.0.9", 22) == "any-port"
    names = table(app("wide", seg("h.example", "1-1000")), app("narrow", seg("h.example", "100-200")))
    assert winner(names, "h.example", 150) == "narrow"
    assert winner(names, "h.example", 201) == "wide"


def test_destination_specificity_beats_port_narrowness() -> None:
    t = table(app("cidr-one-port", seg("10.0.0.0/16", 22)), app("host-all-ports", seg("10.0.0.7")))
    assert winner(t, "10.0.0.7", 22) == "host-all-ports"


def test_first_declared_wins_a_full_tie() -> None:
    t = table(app("first", seg("10.0.0.1", 80)), app("second", seg("10.0.0.1", 80)))
    assert winner(t, "10.0.0.1", 80) == "first"


def test_ipv6() -> None:
    t = table(
        app("net", seg("2001:db8::/32")),
        app("sub", seg("2001:db8:1::/48")),
        app("host", seg("2001:db8:1::10")),
        app("v4", seg("10.0.0.0/8")),
    )
    assert winner(t, "2001:db8:1::10", 443) == "host"
    assert winner(t, "2001:DB8:1:0:0:0:0:10", 443) == "host"
    assert winner(t, "[2001:db8:1::10]", 443) == "host"
    assert winner(t, "2001:db8:1::11", 443) == "sub"
    assert winner(t, "2001:db8:2::1", 443) == "net"
    assert t.match("2001:db9::1", 443) is None
    assert winner(t, "::ffff:10.1.2.3", 443) == "v4"  # IPv4-mapped counts as IPv4


def test_udp_and_tcp_are_separate() -> None:
    t = table(app("dns", seg("10.0.0.53", 53, "udp")), app("ssh", seg("10.0.0.53", 22)))
    assert winner(t, "10.0.0.53", 53, "udp") == "dns"
    assert t.match("10.0.0.53", 53, "tcp") is None
    assert t.match("10.0.0.53", 22, "udp") is None
    assert winner(t, "10.0.0.53", 22) == "ssh"
    assert t.match("10.0.0.53", 53, "sctp") is None


def test_out_of_range_ports_never_match() -> None:
    t = table(app("all", seg("h.example", "1-65535")))
    assert t.match("h.example", 0) is None
    assert t.match("h.example", 65536) is None
    assert t.match("", 80) is None


def test_single() -> None:
    t = AppTable.single("10.0.0.7", 5432)
    assert [(a.name, a.connector_group) for a in t.apps] == [("10.0.0.7:5432", "default")]
    assert winner(t, "10.0.0.7", 5432) == "10.0.0.7:5432"
    assert t.match("10.0.0.7", 5433) is None
    named = AppTable.single("DB.corp.example", 5432, group="branch", name="db")
    m = named.match("db.corp.example", 5432)
    assert m is not None and (m.app.name, m.app.connector_group, m.segment.kind) == ("db", "branch", "hostname")
    assert named.groups() == {"branch"}
    assert AppTable.single("::1", 80).apps[0].name == "[::1]:80"
    with pytest.raises(AppsError, match="port 0 out of range"):
        AppTable.single("h.example", 0)


def test_describe_miss() -> None:
    assert describe_miss("rdp.corp.example", 3389) == "no application covers rdp.corp.example:3389"
    assert describe_miss("10.0.0.1", 53, "tcp") == "no application covers 10.0.0.1:53"
    assert describe_miss("10.0.0.1", 53, "udp") == "no application covers 10.0.0.1:53/udp"


def test_apps_accessor_is_a_copy() -> None:
    t = table(app("a", seg("h.example")))
    t.apps.clear()
    assert [a.name for a in t.apps] == ["a"]


# ---------------------------------------------------------------------------- properties


@st.composite
def nested_cidrs(draw: st.DrawFn) -> tuple[list[ipaddress.IPv4Network], list[ipaddress.IPv4Network]]:
    """A chain of nested networks around one base address, plus unrelated networks."""
    base = draw(st.integers(0, 2**32 - 1))
    prefixes = draw(st.lists(st.integers(0, 32), min_size=1, max_size=8, unique=True))
    chain = [ipaddress.IPv4Network((base, p), strict=False) for p in prefixes]
    others = [
        ipaddress.IPv4Network((a, p), strict=False)
        for a, p in draw(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(8, 32)), max_size=6))
    ]
    return chain, others


@settings(max_examples=200, deadline=None)
@given(nets=nested_cidrs(), probes=st.lists(st.integers(0, 2**32 - 1), max_size=10), near=st.integers(0, 255))
def test_smallest_containing_cidr_wins(
    nets: tuple[list[ipaddress.IPv4Network], list[ipaddress.IPv4Network]], probes: list[int], near: int
) -> None:
    chain, others = nets
    networks = list(dict.fromkeys(chain + others))  # distinct, file order kept
    t = table(*(app(str(n), seg(str(n), 443)) for n in networks))
    base = int(chain[0].network_address)
    addresses = [*probes, int(chain[0].network_address), int(chain[0].broadcast_address),
                 (base & ~0xFF) | near]
    for value in addresses:
        address = ipaddress.IPv4Address(value)
        containing = [n for n in networks if address in n]
        expected = str(max(containing, key=lambda n: n.prefixlen)) if containing else None
        assert winner(t, str(address), 443) == expected
        assert t.match(str(address), 444) is None


@settings(max_examples=200, deadline=None)
@given(
    spans=st.lists(
        st.tuples(st.integers(0, 300), st.sampled_from([0, 4, 16, 60]), st.sampled_from(["1-65535", "400-500", "443"])),
        min_size=1, max_size=10,
    ),
    probe=st.integers(0, 400),
    port=st.sampled_from([443, 450, 22]),
)
def test_ranges_agree_with_brute_force(spans: list[tuple[int, int, str]], probe: int, port: int) -> None:
    """Mixed ranges and single addresses: fewest addresses, then narrowest port range, then file order."""
    base = int(ipaddress.IPv4Address("192.0.2.0")) - 100
    apps = []
    oracle = []
    for i, (start, length, ports) in enumerate(spans):
        low, high = base + start, base + start + length
        dest = str(ipaddress.IPv4Address(low)) if length == 0 else \
            f"{ipaddress.IPv4Address(low)}-{ipaddress.IPv4Address(high)}"
        apps.append(app(f"app{i}", seg(dest, ports)))
        lo_port, _, hi_port = ports.partition("-")
        oracle.append((low, high, int(lo_port), int(hi_port or lo_port), i))
    t = table(*apps)
    address = base + probe
    hits = [(high - low, hp - lp, i) for low, high, lp, hp, i in oracle if low <= address <= high and lp <= port <= hp]
    expected = f"app{min(hits)[2]}" if hits else None
    assert winner(t, str(ipaddress.IPv4Address(address)), port) == expected
