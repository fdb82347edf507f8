"""``HOST:PORT`` parsing: the one parser of every address setting and flag.

``parse_hostport`` splits ``host:port`` / ``[v6]:port`` and names the setting in its errors;
``dns_server`` reads a DNS server as ``HOST[:PORT]`` (port 53 by default), falling back to the
first ``nameserver`` of /etc/resolv.conf. ``is_host_name`` is the one check of a DNS host name a
peer hands us (SOCKS5 and HTTP CONNECT destinations).
"""

from __future__ import annotations

import ipaddress
import re

_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def is_host_name(name: str) -> bool:
    """``name`` is an ASCII DNS host name: labels of 1-63 letters, digits, ``-`` (not first or last)
    and ``_``, at most 253 characters in all, one trailing dot allowed."""
    name = name[:-1] if name.endswith(".") else name
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


def parse_hostport(value: str, what: str, allow_zero: bool = False) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port``; errors name the setting ``what``."""

    def bad(why: str) -> ValueError:
        return ValueError(f"{what}={value!r}: {why}")

    text = value.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1:].startswith(":"):
            raise bad("expected [IPV6]:PORT")
        host, port_text = text[1:end], text[end + 2:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise bad("expected HOST:PORT")
        if ":" in host:
            raise bad("an IPv6 address must be in brackets, e.g. [::1]:9100")
        if not host:
            raise bad("host is empty (use 0.0.0.0 or [::] for all interfaces)")
        if any(c.isspace() or c in "/[]@" for c in host):
            raise bad(f"{host!r} is not a valid host name or address")
    lowest = 0 if allow_zero else 1
    range_text = "port must be 1-65535" + (" (or 0 for any free port)" if allow_zero else "")
    if not (port_text.isascii() and port_text.isdigit()):
        raise bad(range_text)
    port = int(port_text)
    if not lowest <= port <= 65535:
        raise bad(range_text)
    return host, port


RESOLV_CONF = "/etc/resolv.conf"


def dns_server(setting: str, resolv_conf: str = RESOLV_CONF) -> tuple[str, int]:
    """The DNS server this connector asks for private names: FERRYMAN_DNS_SERVER (``HOST[:PORT]``,
    ``[V6]:PORT``), else the first ``nameserver`` of resolv.conf; ValueError when there is none."""
    text = setting.strip()
    if not text:
        try:
            with open(resolv_conf) as fh:
                for line in fh:
                    fields = line.split()
                    if len(fields) >= 2 and fields[0] == "nameserver":
                        return fields[1], 53
        except OSError as exc:
            raise ValueError(f"no DNS server for private names: FERRYMAN_DNS_SERVER is empty and {resolv_conf} "
                             f"cannot be read ({exc.strerror})") from None
        raise ValueError(f"no DNS server for private names: FERRYMAN_DNS_SERVER is empty and {resolv_conf} "
                         f"names no nameserver")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else "53"
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, "53"
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"FERRYMAN_DNS_SERVER={setting!r}: expected HOST[:PORT]")
    return host, int(port_text)
