"""A connector group's dial lists: the networks its connectors may (``allowed_addresses``) and must
never (``denied_addresses``) connect to, after resolving a flow's destination.

Both are lists of IPv4/IPv6 networks in CIDR form (``10.0.0.0/8``, ``2001:db8::/32``) or single
addresses (``10.1.2.3``, kept as ``10.1.2.3/32``), at most ``MAX_NETWORKS`` each. The control
plane checks them with ``parse_networks`` when an admin sets them and stores the canonical
text; snapshots carry that text to the group's connectors, which read it back with
``networks``. How the lists are applied (deny wins; with an allow list only addresses inside
it) is ``access.destinations``'s job. Pure: no I/O.

Refused, each with a message naming the entry: a value that is not a list of strings, an
entry that is not an address or network, host bits set (``10.1.2.3/24``: the network is
``10.1.2.0/24``; a typo here would widen or narrow a security rule silently), an
IPv4-mapped IPv6 network (``::ffff:10.0.0.0/104``: connectors compare IPv4 addresses in their
IPv4 form, so such an entry would never match; give the IPv4 network), the same network
twice, and more than ``MAX_NETWORKS`` entries.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

MAX_NETWORKS = 256  # entries per list
MAX_ENTRY = 64  # characters of one entry (the longest IPv6 CIDR text is 43)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def parse_networks(value: object, what: str) -> list[str]:
    """``value`` (a list of network strings) checked and in canonical text; ``ValueError`` saying why not.

    ``what`` names the list in messages (``"denied_addresses"``)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{what} must be a list of networks such as ['10.0.0.0/8', '2001:db8::/32'], "
                         f"not {type(value).__name__}")
    if len(value) > MAX_NETWORKS:
        raise ValueError(f"{what} has {len(value)} entries; at most {MAX_NETWORKS} are allowed")
    seen: dict[str, int] = {}
    out = []
    for number, entry in enumerate(value, 1):
        if not isinstance(entry, str) or not entry.strip():
            raise ValueError(f"{what} entry {number} ({entry!r}) must be an IP address or a network such as "
                             f"10.0.0.0/8")
        text = entry.strip()
        if len(text) > MAX_ENTRY:
            raise ValueError(f"{what} entry {number} {text[:20]!r}... is longer than {MAX_ENTRY} characters")
        try:
            network = ipaddress.ip_network(text)
        except ValueError:
            try:
                loose = ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ValueError(f"{what} entry {number} {text!r} is not an IP address or network (expected "
                                 f"e.g. 10.0.0.0/8, 10.1.2.3 or 2001:db8::/32)") from None
            raise ValueError(f"{what} entry {number} {text!r} has host bits set: the network is {loose} "
                             f"(or give the single address {text.split('/')[0]})") from None
        if network.version == 6 and network.subnet_of(_MAPPED):  # type: ignore[arg-type]
            raise ValueError(f"{what} entry {number} {text!r} is an IPv4-mapped IPv6 network: connectors compare "
                             f"IPv4 addresses in their IPv4 form, give the IPv4 network instead")
        canonical = str(network)
        if canonical in seen:
            raise ValueError(f"{what} entry {number} {text!r} is the same network as entry {seen[canonical]} "
                             f"({canonical})")
        seen[canonical] = number
        out.append(canonical)
    return out


def networks(texts: Sequence[str]) -> tuple[Network, ...]:
    """The networks of canonical ``texts`` (as ``parse_networks`` made them); ``ValueError`` on anything else."""
    return tuple(ipaddress.ip_network(text) for text in texts)
