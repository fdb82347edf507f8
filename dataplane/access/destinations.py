"""What a connector may connect to: the one check of every address it dials (``DialPolicy.check``).

A grant names a destination (a name or an address) for one flow. The connector resolves a
name once, then checks every address it would connect to, and connects only to addresses
that passed; this module is that check, pure (the caller resolves names and asks the kernel
how it routes each address). In order, for an address ``A`` of a flow of application ``X``
(the application the edge named in the flow's signed grant) on port ``P``:

1. **group deny**: ``A`` inside a network of the connector group's ``denied_addresses`` is
   refused (rule ``group_deny``); nothing lifts it.
2. **group allow**: when the group has ``allowed_addresses``, ``A`` outside all of them is
   refused (rule ``group_allow``); nothing lifts it.
3. **built-in blocks**: ``A`` inside one of ``BUILTIN`` (unspecified, loopback, link-local,
   the cloud metadata addresses, multicast, limited broadcast), or an address the kernel
   delivers to this host (rule ``connector_address``: every local interface address, and
   any ``local`` route) or treats as a directed broadcast (``broadcast``), is refused unless
   an **explicit segment** names it: an ``ip``, ``cidr`` or ``range`` segment of application
   ``X``, of the flow's protocol, whose ports include ``P``, that contains ``A`` and lies
   entirely inside the block that matched. So ``127.0.0.1`` or ``127.0.0.0/8`` names
   loopback, ``169.254.169.254`` names the metadata address, but ``0.0.0.0/0`` or
   ``10.0.0.0/8`` (a catch-all) names none of them; a connector's own address (a block of
   one address) is named only by a segment of exactly that address. An address matching
   several blocks (``169.254.169.254`` is link-local and metadata) needs a segment inside
   each. Loopback addresses are judged by the loopback rule only (all of ``127.0.0.0/8`` is
   local). A name segment never names an address, whatever it resolves to.

IPv4-mapped IPv6 addresses (``::ffff:127.0.0.1``) are judged as the IPv4 address they carry
(a dual-stack socket reaches it); an address of the well-known NAT64 prefix ``64:ff9b::/96``
or of the local-use one ``64:ff9b:1::/48`` is judged both as itself and as the IPv4 address
in its last 32 bits, which a NAT64 gateway connects to (deny, the blocks and the kernel's
route refuse if either is refused, so the connector's own IPv4 address is
``connector_address`` through the gateway too; allow lets it pass if either is inside, for
the local-use prefix only if the address itself is: see ``_NAT64_LOCAL``). An IPv6 scope
(``%eth0``) is ignored for the check.

A refusal is a ``Refusal``: ``rule`` (a metric label) and ``reason`` (for the OPEN_FAIL and
the log, naming the address and the rule).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple

from ..contract.apps import App, Segment, address_bounds
from ..contract.dialrules import Network, networks
from ..contract.snapshot import SnapGroup

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# (rule, network, what it is). Metadata: the instance-metadata and host endpoints of the
# clouds a connector may run in, reachable from any VM or container there and holding
# credentials; most sit in link-local space but need their own explicit segment.
BUILTIN: tuple[tuple[str, Network, str], ...] = tuple((rule, ipaddress.ip_network(net), what) for rule, net, what in (
    ("unspecified", "0.0.0.0/8", "'this network' (0.0.0.0/8; connecting to 0.0.0.0 reaches this host)"),
    ("unspecified", "::/128", "the unspecified address (::; connecting to it reaches this host)"),
    ("loopback", "127.0.0.0/8", "loopback (127.0.0.0/8)"),
    ("loopback", "::1/128", "loopback (::1)"),
    ("link_local", "169.254.0.0/16", "link-local (169.254.0.0/16)"),
    ("link_local", "fe80::/10", "link-local (fe80::/10)"),
    ("metadata", "169.254.169.254/32", "the cloud instance metadata address (AWS, GCP, Azure, OCI, OpenStack, ...)"),
    ("metadata", "fd00:ec2::254/128", "the AWS instance metadata IPv6 address"),
    ("metadata", "169.254.170.2/32", "the AWS ECS task metadata and credentials address"),
    ("metadata", "169.254.170.23/32", "the AWS EKS pod identity agent address"),
    ("metadata", "fd00:ec2::23/128", "the AWS EKS pod identity agent IPv6 address"),
    ("metadata", "fd20:ce::254/128", "the GCP metadata server IPv6 address"),
    ("metadata", "168.63.129.16/32", "the Azure host (WireServer) address"),
    ("metadata", "100.100.100.200/32", "the Alibaba Cloud metadata address"),
    ("metadata", "169.254.0.23/32", "the Tencent Cloud metadata address"),
    ("metadata", "192.0.0.192/32", "the Oracle Cloud legacy metadata address"),
    ("multicast", "224.0.0.0/4", "multicast (224.0.0.0/4)"),
    ("multicast", "ff00::/8", "multicast (ff00::/8)"),
    ("broadcast", "255.255.255.255/32", "the limited broadcast address"),
))
RULES = ("group_deny", "group_allow", "unspecified", "loopback", "link_local", "metadata", "multicast", "broadcast",
         "connector_address", "route_unknown")

# How the kernel routes an address (the caller's lookup; anything else is an ordinary route).
ROUTE_LOCAL = "local"  # delivered to this host (its own address, or a local route)
ROUTE_BROADCAST = "broadcast"  # a directed broadcast address of a local network
ROUTE_MULTICAST = "multicast"
ROUTE_UNICAST = "unicast"
_UNICAST: Mapping[Address, tuple[str, str]] = MappingProxyType({})  # no route known: every address unicast

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
# NAT64 (RFC 6052): the well-known prefix is only ever a /96, so its addresses carry the IPv4
# address they reach in their last 32 bits. Gateways of the local-use prefix (RFC 8215) use a
# prefix inside it, mostly a /96 as well; but one of /48 to /64 puts the IPv4 address in
# other bits, so there the last 32 bits are only what the address may reach: refused when
# that is refused, never taken into an allow list (a made-up address must not pass as one).
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_LOOPBACK = (ipaddress.IPv4Network("127.0.0.0/8"), ipaddress.IPv6Network("::1/128"))


class Refusal(NamedTuple):
    rule: str  # one of RULES
    reason: str


def plain(address: Address) -> Address:
    """``address`` without an IPv6 scope, an IPv4-mapped one as its IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id is not None:
            return ipaddress.IPv6Address(address.packed)
    return address


def candidates(address: Address) -> tuple[Address, ...]:
    """The addresses a connection to ``address`` (``plain``) may reach, each judged: itself and,
    for a NAT64 address, the IPv4 address in its last 32 bits."""
    if isinstance(address, ipaddress.IPv6Address) and (address in _NAT64 or address in _NAT64_LOCAL):
        return address, ipaddress.IPv4Address(address.packed[-4:])
    return (address,)


class _Explicit(NamedTuple):
    """An ip / cidr / range segment: its address bounds, protocol and ports."""

    version: int
    first: int
    last: int
    protocol: str
    ports: tuple[tuple[int, int], ...]
    text: str


def _explicit(segments: Iterable[Segment]) -> tuple[_Explicit, ...]:
    out = []
    for s in segments:
        if s.kind in ("ip", "cidr", "range"):
            version, first, last = address_bounds(s)
            out.append(_Explicit(version, first, last, s.protocol, s.ports, s.destination))
    return tuple(out)


class DialPolicy:
    """The check for one connector: its group's lists and the explicit segments of the applications it knows.

    ``group``: the connector's group name (for messages); ``allow`` / ``deny``: that group's
    networks; ``apps``: the applications whose ip / cidr / range segments may name special
    addresses (by application name)."""

    def __init__(self, group: str = "", allow: Sequence[Network] = (), deny: Sequence[Network] = (),
                 apps: Iterable[App] = ()) -> None:
        self.group = group
        self.allow = tuple(allow)
        self.deny = tuple(deny)
        self._explicit = {app.name: _explicit(app.segments) for app in apps}

    @classmethod
    def from_config(cls, group: str, groups: Sequence[SnapGroup], apps: Iterable[App]) -> DialPolicy:
        """The policy of connector group ``group`` as ``groups`` (a snapshot's) describe it, with ``apps``'
        segments; a group the list does not name has no lists. ``ValueError`` for an unreadable list."""
        for g in groups:
            if g.name == group:
                return cls(group, networks(g.allowed_addresses), networks(g.denied_addresses), apps)
        return cls(group, (), (), apps)

    def check(self, address: Address, *, app: str, port: int, protocol: str,
              routes: Mapping[Address, tuple[str, str]] = _UNICAST) -> Refusal | None:
        """None if a connection to ``address`` for this flow is allowed, else the ``Refusal``.

        ``routes``: how the kernel routes each of ``candidates(address)``: (``ROUTE_*``, why
        that could not be found out, "" when it could; an address whose route is unknown is
        refused: it might be this host's own). An address it does not name is ``ROUTE_UNICAST``."""
        addr = plain(address)
        reached = candidates(addr)
        group = f"connector group '{self.group}'" if self.group else "this connector's group"
        for candidate in reached:
            for net in self.deny:
                if candidate.version == net.version and candidate in net:
                    return Refusal("group_deny", f"{_shown(address, candidate)} is in {net}, which {group} denies "
                                                 f"(denied_addresses)")
        allowing = reached if addr not in _NAT64_LOCAL else (addr,)
        if self.allow and not any(c.version == net.version and c in net for c in allowing for net in self.allow):
            shown = ", ".join(str(n) for n in self.allow[:4]) + (", ..." if len(self.allow) > 4 else "")
            return Refusal("group_allow", f"{addr} is outside the networks {group} allows "
                                          f"(allowed_addresses: {shown})")
        explicit = self._explicit.get(app, ())
        for candidate in reached:
            for rule, net, what in BUILTIN:
                if candidate.version == net.version and candidate in net and not _named(
                        explicit, candidate, int(net.network_address), int(net.broadcast_address), port, protocol):
                    return Refusal(rule, _blocked(address, candidate, what, app))
        for candidate in reached:
            route, error = routes.get(candidate, (ROUTE_UNICAST, ""))
            if error:
                return Refusal("route_unknown", f"cannot tell whether {_shown(address, candidate)} is an address of "
                                                f"this host ({error}); refused")
            if route in (ROUTE_LOCAL, ROUTE_BROADCAST, ROUTE_MULTICAST) and not any(
                    candidate in n for n in _LOOPBACK if n.version == candidate.version):
                value = int(candidate)
                if not _named(explicit, candidate, value, value, port, protocol):
                    rule, what = {ROUTE_LOCAL: ("connector_address", "an address of this connector's host"),
                                  ROUTE_BROADCAST: ("broadcast", "a broadcast address of this connector's network"),
                                  ROUTE_MULTICAST: ("multicast", "a multicast address")}[route]
                    return Refusal(rule, _blocked(address, candidate, what, app, exact=True))
        return None


def _named(explicit: Sequence[_Explicit], address: Address, low: int, high: int, port: int, protocol: str) -> bool:
    """Whether a segment of the flow's protocol and port contains ``address`` and lies inside ``low``..``high``."""
    value = int(address)
    for seg in explicit:
        if (seg.version == address.version and seg.first <= value <= seg.last and low <= seg.first
                and seg.last <= high and seg.protocol == protocol and any(lo <= port <= hi for lo, hi in seg.ports)):
            return True
    return False


def _shown(address: Address, candidate: Address) -> str:
    original = plain(address)
    return str(candidate) if candidate == original else f"{original} (IPv4 {candidate})"


def _blocked(address: Address, candidate: Address, what: str, app: str, *, exact: bool = False) -> str:
    named = f"exactly {candidate}" if exact else f"{candidate} (or a network inside that block)"
    where = f"application '{app}'" if app else "the flow's application"
    return (f"{_shown(address, candidate)} is {what}; connectors dial it only when a segment of {where} "
            f"names {named}")
