"""The connector's address policy (``access.destinations``), its group dial lists
(``contract.dialrules``) and the kernel's view of an address (``connector.dial.route_kind``).

Unit and property tests: the built-in blocks (loopback, link-local, metadata, unspecified,
multicast, broadcast, this host's addresses) and exactly which segments name them, the group
deny and allow lists at CIDR edges (hypothesis, checked against integer arithmetic),
IPv4-mapped and NAT64 addresses, and the precise refusals of a bad list.
"""

from __future__ import annotations

import ipaddress
import socket
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.access.destinations import (
    BUILTIN,
    ROUTE_BROADCAST,
    ROUTE_LOCAL,
    ROUTE_UNICAST,
    DialPolicy,
)
from dataplane.connector import dial
from dataplane.connector.dial import route_kind
from dataplane.contract.apps import Applications
from dataplane.contract.dialrules import MAX_NETWORKS, networks, parse_networks
from dataplane.contract.snapshot import SnapGroup

pytestmark = pytest.mark.timeout(120)

ip = ipaddress.ip_address


def apps(*segments: tuple[str, str, str], name: str = "app") -> list:
    """One application ``name`` with (destination, ports, protocol) segments."""
    return Applications.from_obj({"apps": [{"name": name, "segments": [
        {"destination": d, "ports": p, "protocol": proto} for d, p, proto in segments]}]}).apps


def rule(policy: DialPolicy, address: str, *, app: str = "app", port: int = 443, protocol: str = "tcp",
         route: str = ROUTE_UNICAST, route_error: str = "", routes: dict[str, str] | None = None) -> str | None:
    """The rule refusing ``address``; the kernel routes it ``route`` (or not known: ``route_error``), and the
    addresses in ``routes`` as it says."""
    known = {ip(a): (r, "") for a, r in (routes or {}).items()}
    refusal = policy.check(ip(address), app=app, port=port, protocol=protocol,
                           routes={ip(address): (route, route_error), **known})
    return None if refusal is None else refusal.rule


# ---------------------------------------------------------------------------- built-in blocks


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1", "loopback"), ("127.255.255.254", "loopback"), ("::1", "loopback"),
    ("169.254.1.1", "link_local"), ("fe80::1", "link_local"), ("febf:ffff::1", "link_local"),
    ("169.254.169.254", "link_local"),  # link-local first: it is both
    ("fd00:ec2::254", "metadata"), ("168.63.129.16", "metadata"), ("100.100.100.200", "metadata"),
    ("fd20:ce::254", "metadata"), ("192.0.0.192", "metadata"),
    ("0.0.0.0", "unspecified"), ("0.1.2.3", "unspecified"), ("::", "unspecified"),
    ("224.0.0.1", "multicast"), ("239.255.255.255", "multicast"), ("ff02::1", "multicast"),
    ("255.255.255.255", "broadcast"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:169.254.169.254", "link_local"),  # IPv4-mapped
    ("64:ff9b::7f00:1", "loopback"), ("64:ff9b::a9fe:a9fe", "link_local"),  # NAT64-embedded IPv4
    ("64:ff9b:1::7f00:1", "loopback"), ("64:ff9b:1:ab:cd::a9fe:a9fe", "link_local"),  # the local-use prefix
    ("64:ff9b:1::a9fe:a9fe", "link_local"), ("64:ff9b:1::ffff:ffff", "broadcast"),
    ("10.1.2.3", None), ("192.0.2.10", None), ("2001:db8::1", None), ("fec0::1", None), ("fd00:ec2::253", None),
    ("64:ff9b::a01:203", None), ("64:ff9b:1::a01:203", None), ("64:ff9b:2::7f00:1", None),
])
def test_builtin_blocks_refuse_without_a_segment(address: str, expected: str | None) -> None:
    assert rule(DialPolicy(), address) == expected


def test_metadata_addresses_need_their_own_segment_even_inside_a_named_link_local_block() -> None:
    policy = DialPolicy(apps=apps(("169.254.0.0/16", "80", "tcp")))
    assert rule(policy, "169.254.10.20", port=80) is None  # link-local, named by the /16
    assert rule(policy, "169.254.169.254", port=80) == "metadata"  # also metadata: the /16 does not name it
    assert rule(policy, "169.254.170.2", port=80) == "metadata"
    exact = DialPolicy(apps=apps(("169.254.169.254", "80", "tcp")))
    assert rule(exact, "169.254.169.254", port=80) is None


def test_a_segment_names_an_address_only_for_its_application_protocol_and_ports() -> None:
    policy = DialPolicy(apps=apps(("127.0.0.1", "8000-8010", "tcp"), ("db.corp.example", "1-65535", "tcp")))
    assert rule(policy, "127.0.0.1", port=8005) is None
    assert rule(policy, "127.0.0.1", port=8000) is None and rule(policy, "127.0.0.1", port=8010) is None
    assert rule(policy, "127.0.0.1", port=7999) == "loopback"
    assert rule(policy, "127.0.0.1", port=8011) == "loopback"
    assert rule(policy, "127.0.0.1", port=8005, protocol="udp") == "loopback"
    assert rule(policy, "127.0.0.1", port=8005, app="other") == "loopback"
    assert rule(policy, "127.0.0.1", port=8005, app="") == "loopback"
    assert rule(policy, "127.0.0.2", port=8005) == "loopback"
    assert rule(policy, "::ffff:127.0.0.1", port=8005) is None  # the same IPv4 address


@pytest.mark.parametrize("catch_all", ["0.0.0.0/0", "0.0.0.0-255.255.255.255", "96.0.0.0/3", "126.0.0.0/7"])
def test_a_catch_all_segment_names_no_special_block(catch_all: str) -> None:
    policy = DialPolicy(apps=apps((catch_all, "1-65535", "tcp")))
    assert rule(policy, "127.0.0.1") == "loopback"
    assert rule(policy, "10.0.0.1") is None


def test_ranges_and_networks_inside_a_block_name_it() -> None:
    policy = DialPolicy(apps=apps(("127.0.0.0/8", "22", "tcp"), ("127.0.0.1-127.0.0.9", "23", "tcp"),
                                  ("fe80::/64", "22", "tcp")))
    assert rule(policy, "127.200.0.1", port=22) is None
    assert rule(policy, "127.0.0.9", port=23) is None
    assert rule(policy, "127.0.0.10", port=23) == "loopback"
    assert rule(policy, "fe80::1234", port=22) is None
    assert rule(policy, "fe80:0:0:1::1", port=22) == "link_local"


def test_this_hosts_addresses_are_named_only_by_a_segment_of_exactly_that_address() -> None:
    wide = DialPolicy(apps=apps(("10.0.0.0/8", "443", "tcp"), ("10.9.9.9", "80", "tcp")))
    assert rule(wide, "10.1.2.3", route=ROUTE_LOCAL) == "connector_address"
    assert rule(wide, "10.1.2.3") is None  # the same address on another host
    assert rule(wide, "10.9.9.9", port=80, route=ROUTE_LOCAL) is None
    assert rule(wide, "10.255.255.255", route=ROUTE_BROADCAST) == "broadcast"
    # Loopback is local too, but judged by the loopback rule alone: 127.0.0.0/8 names all of it.
    loop = DialPolicy(apps=apps(("127.0.0.0/8", "443", "tcp")))
    assert rule(loop, "127.0.0.1", route=ROUTE_LOCAL) is None
    # Not knowing whether an address is local refuses it.
    assert rule(wide, "10.1.2.3", route_error="netlink route lookup failed: Permission denied") == "route_unknown"


@pytest.mark.parametrize("nat64", ["64:ff9b::a00:5", "64:ff9b:1::a00:5", "64:ff9b:1:fe::a00:5"])
def test_a_nat64_address_of_this_hosts_ipv4_address_is_judged_by_the_route_of_that_address(nat64: str) -> None:
    """A NAT64 gateway connects to the IPv4 address the address carries: this host's own address
    (or a broadcast one) through the gateway is this host's own address."""
    wide = DialPolicy(apps=apps(("10.0.0.0/8", "443", "tcp"), ("64:ff9b::/32", "443", "tcp")))
    assert rule(wide, nat64) is None
    assert rule(wide, nat64, routes={"10.0.0.5": ROUTE_LOCAL}) == "connector_address"
    assert rule(wide, nat64, routes={"10.0.0.5": ROUTE_BROADCAST}) == "broadcast"
    assert rule(wide, nat64, route=ROUTE_LOCAL) == "connector_address"  # the IPv6 address itself
    exact = DialPolicy(apps=apps(("10.0.0.5", "443", "tcp")))
    assert rule(exact, nat64, routes={"10.0.0.5": ROUTE_LOCAL}) is None  # named by a segment of exactly it
    refusal = wide.check(ip(nat64), app="app", port=443, protocol="tcp",
                         routes={ip("10.0.0.5"): (ROUTE_LOCAL, "")})
    assert refusal == ("connector_address", f"{nat64} (IPv4 10.0.0.5) is an address of this connector's host; "
                                            f"connectors dial it only when a segment of application 'app' names "
                                            f"exactly 10.0.0.5")
    unknown = wide.check(ip(nat64), app="app", port=443, protocol="tcp",
                         routes={ip("10.0.0.5"): (ROUTE_UNICAST, "no netlink")})
    assert unknown == ("route_unknown", f"cannot tell whether {nat64} (IPv4 10.0.0.5) is an address of this host "
                                        f"(no netlink); refused")


def test_the_route_of_a_nat64_addresses_ipv4_address_is_asked_of_the_kernel(monkeypatch) -> None:
    asked = []

    def route(address):
        asked.append(str(address))
        return (ROUTE_LOCAL, "") if str(address) == "10.0.0.5" else (ROUTE_UNICAST, "")
    monkeypatch.setattr(dial, "route_kind", route)
    targets: list[dial.Target] = [(socket.AF_INET6, ("64:ff9b::a00:5", 443, 0, 0)),
                                  (socket.AF_INET6, ("64:ff9b::a00:6", 443, 0, 0)), (socket.AF_INET, ("10.0.0.7", 443))]
    refused = []
    allowed = dial.checked(targets, DialPolicy(), app="app", port=443, protocol="tcp",
                           refused=lambda target, refusal: refused.append((target[1][0], refusal.rule)))
    assert [t[1][0] for t in allowed] == ["64:ff9b::a00:6", "10.0.0.7"]
    assert refused == [("64:ff9b::a00:5", "connector_address")]
    assert asked == ["64:ff9b::a00:5", "10.0.0.5", "64:ff9b::a00:6", "10.0.0.6", "10.0.0.7"]


def test_refusal_reasons_name_the_address_the_rule_and_the_application() -> None:
    policy = DialPolicy("lab", deny=networks(["10.0.0.0/8"]), apps=apps(("10.0.0.0/8", "443", "tcp")))
    refusal = policy.check(ip("::ffff:127.0.0.1"), app="app", port=443, protocol="tcp")
    assert refusal is not None and refusal.rule == "loopback"
    assert refusal.reason == ("127.0.0.1 is loopback (127.0.0.0/8); connectors dial it only when a segment of "
                              "application 'app' names 127.0.0.1 (or a network inside that block)")
    refusal = policy.check(ip("10.1.2.3"), app="app", port=443, protocol="tcp")
    assert refusal == ("group_deny", "10.1.2.3 is in 10.0.0.0/8, which connector group 'lab' denies "
                                     "(denied_addresses)")
    refusal = policy.check(ip("64:ff9b::a01:203"), app="app", port=443, protocol="tcp")
    assert refusal == ("group_deny", "64:ff9b::a01:203 (IPv4 10.1.2.3) is in 10.0.0.0/8, which connector group "
                                     "'lab' denies (denied_addresses)")
    own = policy.check(ip("192.0.2.7"), app="app", port=443, protocol="tcp",
                       routes={ip("192.0.2.7"): (ROUTE_LOCAL, "")})
    assert own == ("connector_address", "192.0.2.7 is an address of this connector's host; connectors dial it only "
                                        "when a segment of application 'app' names exactly 192.0.2.7")


# ---------------------------------------------------------------------------- group lists


def test_deny_wins_over_allow_and_over_an_explicit_segment() -> None:
    policy = DialPolicy("lab", allow=networks(["10.0.0.0/8", "127.0.0.1/32"]),
                        deny=networks(["10.0.5.0/24", "127.0.0.1/32"]),
                        apps=apps(("127.0.0.1", "443", "tcp"), ("10.0.0.0/8", "443", "tcp")))
    assert rule(policy, "10.0.4.255") is None
    assert rule(policy, "10.0.5.0") == "group_deny"
    assert rule(policy, "10.0.5.255") == "group_deny"
    assert rule(policy, "10.0.6.0") is None
    assert rule(policy, "127.0.0.1") == "group_deny"
    assert rule(policy, "192.0.2.1") == "group_allow"
    assert rule(policy, "2001:db8::1") == "group_allow"  # an IPv4-only allow list lets no IPv6 through
    assert rule(policy, "::ffff:10.0.5.1") == "group_deny"
    assert rule(policy, "64:ff9b::a00:401") is None  # NAT64 of 10.0.4.1: inside the allow list
    assert rule(policy, "64:ff9b:1::a00:501") == "group_deny"  # the local-use prefix: denied like the other
    # Its last 32 bits are not surely the IPv4 address reached (another prefix length puts it
    # elsewhere): they refuse, but do not let an address into an allow list.
    assert rule(policy, "64:ff9b:1::a00:401") == "group_allow"
    assert rule(DialPolicy(allow=networks(["64:ff9b:1::/48"])), "64:ff9b:1::a00:401") is None


def test_the_local_use_nat64_prefix_is_judged_by_the_ipv4_address_it_carries() -> None:
    """RFC 8215's 64:ff9b:1::/48 like 64:ff9b::/96: 10.1.2.3 through it is denied with 10.0.0.0/8."""
    policy = DialPolicy("lab", deny=networks(["10.0.0.0/8"]))
    assert policy.check(ip("64:ff9b:1::a01:203"), app="app", port=443, protocol="tcp") == (
        "group_deny", "64:ff9b:1::a01:203 (IPv4 10.1.2.3) is in 10.0.0.0/8, which connector group 'lab' denies "
                      "(denied_addresses)")
    assert rule(policy, "64:ff9b:1::7f00:1") == "loopback"
    assert rule(policy, "64:ff9b:1::c000:20a") is None  # 192.0.2.10


def test_an_allow_list_does_not_lift_a_builtin_block() -> None:
    policy = DialPolicy(allow=networks(["127.0.0.0/8", "169.254.169.254/32"]))
    assert rule(policy, "127.0.0.1") == "loopback"
    assert rule(policy, "169.254.169.254") == "link_local"


def test_policy_from_a_snapshot_takes_only_its_own_groups_lists() -> None:
    groups = [SnapGroup(name="default"), SnapGroup(name="lab", denied_addresses=["10.0.0.0/8"]),
              SnapGroup(name="dmz", allowed_addresses=["192.0.2.0/24"])]
    assert rule(DialPolicy.from_config("lab", groups, ()), "10.1.1.1") == "group_deny"
    assert rule(DialPolicy.from_config("lab", groups, ()), "192.0.3.1") is None
    assert rule(DialPolicy.from_config("dmz", groups, ()), "192.0.3.1") == "group_allow"
    assert rule(DialPolicy.from_config("elsewhere", groups, ()), "10.1.1.1") is None
    with pytest.raises(ValueError):
        DialPolicy.from_config("lab", [SnapGroup(name="lab", denied_addresses=["10.0.0.1/8"])], ())


_V4 = st.integers(0, 2**32 - 1)
_PREFIX = st.integers(0, 32)


def _net(base: int, prefix: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network((base >> (32 - prefix) << (32 - prefix) if prefix else 0, prefix))


def _near(net: ipaddress.IPv4Network) -> st.SearchStrategy[int]:
    """Addresses at and around the network's edges (and anywhere)."""
    first, last = int(net.network_address), int(net.broadcast_address)
    edges = [a for a in (first - 1, first, first + 1, last - 1, last, last + 1) if 0 <= a < 2**32]
    return st.one_of(st.sampled_from(edges), _V4)


_SPECIAL = [net for _, net, _ in BUILTIN if net.version == 4]


def _special(value: int) -> bool:
    return any(int(n.network_address) <= value <= int(n.broadcast_address) for n in _SPECIAL)


@settings(max_examples=400, deadline=None)
@given(st.data(), _V4, _PREFIX)
def test_deny_list_refuses_exactly_the_addresses_inside_it(data, base: int, prefix: int) -> None:
    net = _net(base, prefix)
    value = data.draw(_near(net))
    inside = int(net.network_address) <= value <= int(net.broadcast_address)
    got = rule(DialPolicy(deny=[net]), str(ipaddress.IPv4Address(value)))
    if inside:
        assert got == "group_deny"
    else:
        assert got != "group_deny" and (got is None) == (not _special(value))


@settings(max_examples=400, deadline=None)
@given(st.data(), _V4, _PREFIX)
def test_allow_list_lets_through_exactly_the_addresses_inside_it(data, base: int, prefix: int) -> None:
    net = _net(base, prefix)
    value = data.draw(_near(net))
    inside = int(net.network_address) <= value <= int(net.broadcast_address)
    got = rule(DialPolicy(allow=[net]), str(ipaddress.IPv4Address(value)))
    if not inside:
        assert got == "group_allow"
    else:
        assert got != "group_allow" and (got is None) == (not _special(value))


@settings(max_examples=600, deadline=None)
@given(st.sampled_from([n for n in _SPECIAL if n.prefixlen < 32]), st.data(), _PREFIX)
def test_a_segment_names_a_block_address_iff_it_contains_it_and_lies_inside_the_block(block, data, prefix) -> None:
    first, last = int(block.network_address), int(block.broadcast_address)
    base = data.draw(st.integers(max(0, first - 2**24), min(2**32 - 1, last + 2**24)))
    segment = _net(base, prefix)
    value = data.draw(st.one_of(st.integers(first, last), _near(segment).filter(lambda v: first <= v <= last)))
    address = ipaddress.IPv4Address(value)
    policy = DialPolicy(apps=apps((str(segment), "443", "tcp")))
    s_first, s_last = int(segment.network_address), int(segment.broadcast_address)
    # Every block containing the address must contain the segment (metadata inside link-local, ...).
    blocks = [n for n in _SPECIAL if int(n.network_address) <= value <= int(n.broadcast_address)]
    named = s_first <= value <= s_last and all(
        int(n.network_address) <= s_first and s_last <= int(n.broadcast_address) for n in blocks)
    assert (rule(policy, str(address)) is None) == named


# ---------------------------------------------------------------------------- parsing the lists


def test_lists_are_kept_in_canonical_form() -> None:
    assert parse_networks([" 10.0.0.0/8", "10.1.2.3", "2001:DB8::/32", "::1"], "denied_addresses") == [
        "10.0.0.0/8", "10.1.2.3/32", "2001:db8::/32", "::1/128"]
    assert parse_networks([], "allowed_addresses") == []


@pytest.mark.parametrize("value, message", [
    ("10.0.0.0/8", "denied_addresses must be a list of networks such as ['10.0.0.0/8', '2001:db8::/32'], not str"),
    ([10], "denied_addresses entry 1 (10) must be an IP address or a network such as 10.0.0.0/8"),
    ([""], "denied_addresses entry 1 ('') must be an IP address or a network such as 10.0.0.0/8"),
    (["10.0.0.0/8", "db.corp"], "denied_addresses entry 2 'db.corp' is not an IP address or network (expected e.g. "
                                "10.0.0.0/8, 10.1.2.3 or 2001:db8::/32)"),
    (["10.0.0.0/33"], "denied_addresses entry 1 '10.0.0.0/33' is not an IP address or network (expected e.g. "
                      "10.0.0.0/8, 10.1.2.3 or 2001:db8::/32)"),
    (["10.1.2.3/24"], "denied_addresses entry 1 '10.1.2.3/24' has host bits set: the network is 10.1.2.0/24 (or "
                      "give the single address 10.1.2.3)"),
    (["10.0.0.0/8", "10.0.0.0/8"], "denied_addresses entry 2 '10.0.0.0/8' is the same network as entry 1 "
                                   "(10.0.0.0/8)"),
    (["10.0.0.1", "10.0.0.1/32"], "denied_addresses entry 2 '10.0.0.1/32' is the same network as entry 1 "
                                  "(10.0.0.1/32)"),
    (["::ffff:10.0.0.0/104"], "denied_addresses entry 1 '::ffff:10.0.0.0/104' is an IPv4-mapped IPv6 network: "
                              "connectors compare IPv4 addresses in their IPv4 form, give the IPv4 network instead"),
    (["1" * 70], "denied_addresses entry 1 '11111111111111111111'... is longer than 64 characters"),
    ([f"10.0.{i // 256}.{i % 256}" for i in range(MAX_NETWORKS + 1)],
     f"denied_addresses has {MAX_NETWORKS + 1} entries; at most {MAX_NETWORKS} are allowed"),
])
def test_bad_lists_are_refused_naming_the_entry(value: object, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_networks(value, "denied_addresses")
    assert str(caught.value) == message


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.builds(lambda b, p: _net(b, p), _V4, _PREFIX),
                 st.builds(lambda b, p: ipaddress.IPv6Network((b >> (128 - p) << (128 - p) if p else 0, p)),
                           st.integers(0, 2**128 - 1), st.integers(0, 128)).filter(
                     lambda n: not n.subnet_of(ipaddress.IPv6Network("::ffff:0:0/96")))))
def test_any_network_survives_the_round_trip(net) -> None:
    (text,) = parse_networks([str(net)], "allowed_addresses")
    assert networks([text]) == (net,)


# ---------------------------------------------------------------------------- the kernel's view


def _interface_addresses() -> list[str]:
    out = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, timeout=10).stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines() if " lo " not in f" {line.split()[1]} "]


def test_route_kind_tells_this_hosts_addresses_from_others() -> None:
    assert route_kind(ip("127.0.0.1")) == (ROUTE_LOCAL, "")
    assert route_kind(ip("127.45.6.7")) == (ROUTE_LOCAL, "")
    assert route_kind(ip("::1")) == (ROUTE_LOCAL, "")
    assert route_kind(ip("255.255.255.255")) == (ROUTE_BROADCAST, "")
    assert route_kind(ip("224.0.0.1"))[0] == "multicast"
    own = _interface_addresses()
    assert own, "no address on any interface but lo"
    for address in own:
        assert route_kind(ip(address)) == (ROUTE_LOCAL, ""), address
    assert route_kind(ip("192.0.2.213" if "192.0.2.213" not in own else "198.51.100.7"))[0] != ROUTE_LOCAL
