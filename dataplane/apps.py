"""Applications from a file: which destinations are private, and which connector group reaches them.

An application is a name, a connector group and up to ``MAX_SEGMENTS`` segments; a segment
is a destination, a set of ports and a protocol. The edge asks ``AppTable.match`` for every
new flow; the most specific segment wins (see ``AppTable.match``). Pure: apart from reading
the file in ``AppTable.load`` there is no I/O, and names are never resolved.

File format: JSON or TOML (chosen by the extension ``.json`` / ``.toml``; other names are
tried as JSON, then as TOML)::

    [[apps]]
    name = "intranet"
    connector_group = "default"          # optional, default "default"
    segments = [
      { destination = "*.corp.example", ports = "80,443,8000-8100", protocol = "tcp" },
      { destination = "10.20.0.0/16", ports = [22, "3389"], protocol = "tcp" },
      { destination = "db.corp.example", ports = "5432" },   # protocol defaults to tcp
    ]

Destinations: a host name (case-insensitive, trailing dot ignored), ``*.suffix`` (any name
strictly under ``suffix``, at any depth), an IPv4/IPv6 address, a CIDR network
(``10.20.0.0/16``; host bits must be zero) or an address range (``10.0.0.5-10.0.0.20``).
Ports: a list of numbers / strings or a comma-separated string; ``a-b`` is a range.
Error messages name the file, the app and the segment (counted from 1).
"""

from __future__ import annotations

import bisect
import ipaddress
import json
import os
import re
import socket
import tomllib
from collections.abc import Sequence
from itertools import groupby
from typing import Any

import msgspec

MAX_SEGMENTS = 500
PROTOCOLS = ("tcp", "udp")
DEFAULT_GROUP = "default"

_APP_KEYS = ("name", "connector_group", "segments")
_SEGMENT_KEYS = ("destination", "ports", "protocol")
_LABEL_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_DIGITS_RE = re.compile(r"[0-9]+")


class AppsError(ValueError):
    """The application file (or object) is invalid; the message says where and why."""


class Segment(msgspec.Struct, frozen=True):
    """One destination + ports + protocol of an application.

    ``kind`` is one of ``hostname``, ``wildcard``, ``ip``, ``cidr``, ``range``;
    ``destination`` is normalised (lower case, no trailing dot, canonical addresses);
    ``ports`` are sorted inclusive ranges.
    """

    app: str
    destination: str
    kind: str
    ports: tuple[tuple[int, int], ...]
    protocol: str


class App(msgspec.Struct, frozen=True):
    name: str
    connector_group: str
    segments: tuple[Segment, ...]


class Match(msgspec.Struct, frozen=True):
    app: App
    segment: Segment


def describe_miss(host: str, port: int, protocol: str = "tcp") -> str:
    """The refusal text for a flow that no application covers."""
    text = f"no application covers {host}:{port}"
    return f"{text}/{protocol}" if protocol == "udp" else text


# ---------------------------------------------------------------------------- parsing


def read_file(path: str) -> Any:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise AppsError(f"{path}: file not found") from None
    except OSError as exc:
        raise AppsError(f"{path}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AppsError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    ext = os.path.splitext(path)[1].lower()
    if ext == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise AppsError(f"{path}: invalid JSON: {exc}") from None
    if ext == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise AppsError(f"{path}: invalid TOML: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as json_exc:
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as toml_exc:
            raise AppsError(f"{path}: neither valid JSON ({json_exc}) nor valid TOML ({toml_exc})") from None


def _unknown_keys(obj: dict[str, Any], allowed: Sequence[str]) -> str | None:
    unknown = sorted(k for k in obj if k not in allowed)
    if not unknown:
        return None
    return f"unknown key {unknown[0]!r} (expected {', '.join(allowed)})"


def _parse_apps(obj: Any, source: str) -> list[App]:
    if not isinstance(obj, dict) or "apps" not in obj:
        raise AppsError(f"{source}: expected a table with an 'apps' list")
    if problem := _unknown_keys(obj, ("apps",)):
        raise AppsError(f"{source}: {problem}")
    if not isinstance(obj["apps"], list):
        raise AppsError(f"{source}: 'apps' must be a list")
    apps: list[App] = []
    names: set[str] = set()
    for number, raw in enumerate(obj["apps"], 1):
        app = _parse_app(raw, f"{source}: app {number}", source)
        if app.name in names:
            raise AppsError(f"{source}: duplicate app name {app.name!r}")
        names.add(app.name)
        apps.append(app)
    return apps


def _parse_app(raw: Any, where: str, source: str) -> App:
    if not isinstance(raw, dict):
        raise AppsError(f"{where}: must be a table")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise AppsError(f"{where}: name must be a non-empty string")
    name = name.strip()
    where = f"{source}: app {name!r}"
    if problem := _unknown_keys(raw, _APP_KEYS):
        raise AppsError(f"{where}: {problem}")
    group = raw.get("connector_group", DEFAULT_GROUP)
    if not isinstance(group, str) or not group.strip():
        raise AppsError(f"{where}: connector_group must be a non-empty string")
    segments = raw.get("segments")
    if not isinstance(segments, list):
        raise AppsError(f"{where}: segments must be a list")
    if not segments:
        raise AppsError(f"{where} has no segments")
    if len(segments) > MAX_SEGMENTS:
        raise AppsError(f"{where} has {len(segments)} segments; at most {MAX_SEGMENTS} are allowed")
    parsed = tuple(_parse_segment(seg, name, f"{where} segment {i}") for i, seg in enumerate(segments, 1))
    return App(name=name, connector_group=group.strip(), segments=parsed)


def _parse_segment(raw: Any, app: str, where: str) -> Segment:
    if not isinstance(raw, dict):
        raise AppsError(f"{where}: must be a table with destination, ports and protocol")
    if problem := _unknown_keys(raw, _SEGMENT_KEYS):
        raise AppsError(f"{where}: {problem}")
    try:
        if "destination" not in raw:
            raise ValueError("destination is missing")
        if "ports" not in raw:
            raise ValueError("ports is missing")
        kind, destination = _parse_destination(raw["destination"])
        ports = _parse_ports(raw["ports"])
        protocol = _parse_protocol(raw.get("protocol", "tcp"))
    except ValueError as exc:
        raise AppsError(f"{where}: {exc}") from None
    return Segment(app=app, destination=destination, kind=kind, ports=ports, protocol=protocol)


def _parse_destination(value: Any) -> tuple[str, str]:
    """(kind, normalised destination) of a destination string."""
    if not isinstance(value, str):
        raise ValueError(f"destination must be a string, not {value!r}")
    text = value.strip().lower()
    if not text:
        raise ValueError("destination is empty")
    if "/" in text:
        try:
            return "cidr", str(ipaddress.ip_network(text))
        except ValueError:
            try:
                ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ValueError(f"{value!r} is not a valid CIDR network") from None
            raise ValueError(f"{value!r} has host bits set") from None
    first, dash, last = text.partition("-")
    if dash and _is_ip(first):
        try:
            start, end = ipaddress.ip_address(first), ipaddress.ip_address(last)
        except ValueError:
            raise ValueError(f"{value!r} is not a valid IP range (expected FIRST-LAST addresses)") from None
        if start.version != end.version:
            raise ValueError(f"{value!r} mixes IPv4 and IPv6")
        if start > end:
            raise ValueError(f"{value!r} is not a valid IP range: {start} comes after {end}")
        return "range", f"{start}-{end}"
    if _is_ip(text):
        return "ip", str(ipaddress.ip_address(text))
    if text.startswith("*."):
        suffix = text[2:].rstrip(".")
        if not _is_hostname(suffix):
            raise ValueError(f"{value!r} is not a valid wildcard: '*.' must be followed by a domain name")
        return "wildcard", f"*.{suffix}"
    if "*" in text:
        raise ValueError(f"{value!r} is not a valid destination: a wildcard must look like '*.suffix'")
    name = text.rstrip(".")
    if not _is_hostname(name):
        raise ValueError(f"{value!r} is not a valid host name or IP address")
    return "hostname", name


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_hostname(name: str) -> bool:
    labels = name.split(".")
    return (
        len(name) <= 253
        and all(_LABEL_RE.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()  # "10.0.0.300" is a mistyped address, not a name
    )


def _parse_ports(value: Any) -> tuple[tuple[int, int], ...]:
    items: list[Any]
    if isinstance(value, str):
        items = [] if not value.strip() else value.split(",")
    elif isinstance(value, list):
        items = value
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    else:
        raise ValueError(f"ports must be a list or a string like '80,443,8000-8100', not {value!r}")
    if not items:
        raise ValueError("ports is empty")
    return tuple(sorted({_parse_port_item(item) for item in items}))


def _parse_port_item(item: Any) -> tuple[int, int]:
    if isinstance(item, int) and not isinstance(item, bool):
        return _port(item), _port(item)
    if not isinstance(item, str):
        raise ValueError(f"port {item!r} is not a number")
    text = item.strip()
    if not text:
        raise ValueError("ports has an empty entry")
    first, dash, last = text.partition("-")
    low = _port_text(first.strip(), text)
    high = _port_text(last.strip(), text) if dash else low
    if low > high:
        raise ValueError(f"port range '{text}' is reversed")
    return low, high


def _port_text(text: str, item: str) -> int:
    if not _DIGITS_RE.fullmatch(text):
        raise ValueError(f"port {item!r} is not a number or a range like '8000-8100'")
    return _port(int(text))


def _port(number: int) -> int:
    if not 1 <= number <= 65535:
        raise ValueError(f"port {number} out of range 1-65535")
    return number


def _parse_protocol(value: Any) -> str:
    protocol = value.strip().lower() if isinstance(value, str) else value
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {value!r} is not tcp or udp")
    return str(protocol)


# ---------------------------------------------------------------------------- matching

# A candidate segment: its ports and the answer to give when they fit. Every list of
# candidates below holds segments of equal destination specificity, in file order.
_Candidate = tuple[tuple[tuple[int, int], ...], Match]


def _pick(candidates: Sequence[_Candidate], port: int) -> Match | None:
    """The candidate whose narrowest port range containing ``port`` is narrowest (first on ties)."""
    best: Match | None = None
    best_width = 65536
    for ranges, match in candidates:
        for low, high in ranges:
            if low > port:
                break
            if port <= high and high - low < best_width:
                best, best_width = match, high - low
    return best


class _AddressIndex:
    """Segments of one IP version, cut into elementary intervals for a bisect lookup.

    For each interval between consecutive boundaries it keeps the segments covering it,
    grouped into tiers of equal address count, smallest first.
    """

    def __init__(self, entries: Sequence[tuple[int, int, _Candidate]]) -> None:
        self.bounds = sorted({low for low, _, _ in entries} | {high + 1 for _, high, _ in entries})
        covering: list[list[tuple[int, int, _Candidate]]] = [[] for _ in self.bounds]
        for order, (low, high, candidate) in enumerate(entries):
            for k in range(bisect.bisect_left(self.bounds, low), bisect.bisect_left(self.bounds, high + 1)):
                covering[k].append((high - low + 1, order, candidate))
        self.tiers: list[tuple[tuple[_Candidate, ...], ...]] = []
        for cover in covering:
            cover.sort(key=lambda item: (item[0], item[1]))
            tiers = groupby(cover, key=lambda item: item[0])
            self.tiers.append(tuple(tuple(candidate for _, _, candidate in tier) for _, tier in tiers))

    def match(self, address: int, port: int) -> Match | None:
        k = bisect.bisect_right(self.bounds, address) - 1
        if k < 0:
            return None
        for tier in self.tiers[k]:
            if found := _pick(tier, port):
                return found
        return None


class _ProtocolIndex:
    """All segments of one protocol."""

    def __init__(self, candidates: Sequence[tuple[Segment, _Candidate]]) -> None:
        self.names: dict[str, list[_Candidate]] = {}
        self.wildcards: dict[str, list[_Candidate]] = {}
        by_version: dict[int, list[tuple[int, int, _Candidate]]] = {4: [], 6: []}
        for segment, candidate in candidates:
            if segment.kind == "hostname":
                self.names.setdefault(segment.destination, []).append(candidate)
            elif segment.kind == "wildcard":
                self.wildcards.setdefault(segment.destination[2:], []).append(candidate)
            else:
                version, low, high = address_bounds(segment)
                by_version[version].append((low, high, candidate))
        self.v4 = _AddressIndex(by_version[4])
        self.v6 = _AddressIndex(by_version[6])

    def match_name(self, name: str, port: int) -> Match | None:
        exact = self.names.get(name)
        if exact and (found := _pick(exact, port)):
            return found
        dot = name.find(".")
        while dot >= 0:  # longest suffix first
            wild = self.wildcards.get(name[dot + 1:])
            if wild and (found := _pick(wild, port)):
                return found
            dot = name.find(".", dot + 1)
        return None


def address_bounds(segment: Segment) -> tuple[int, int, int]:
    """(IP version, first address, last address) of an ip / cidr / range segment."""
    if segment.kind == "cidr":
        net = ipaddress.ip_network(segment.destination)
        return net.version, int(net.network_address), int(net.broadcast_address)
    first, _, last = segment.destination.partition("-")
    start = ipaddress.ip_address(first)
    return start.version, int(start), int(ipaddress.ip_address(last or first))


def _parse_address(text: str) -> tuple[int, int] | None:
    """(version, integer) if ``text`` is an IP address literal, else None. IPv4-mapped IPv6 counts as IPv4."""
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text))
    except OSError:
        pass
    try:
        value = int.from_bytes(socket.inet_pton(socket.AF_INET6, text))
    except OSError:
        return None
    if value >> 32 == 0xFFFF:
        return 4, value & 0xFFFFFFFF
    return 6, value


def _first(candidates: Sequence[_Candidate] | None) -> Match | None:
    return candidates[0][1] if candidates else None


class AppTable:
    """The applications an edge knows, indexed for a per-flow ``match``."""

    def __init__(self, apps: Sequence[App]) -> None:
        self._apps = tuple(apps)
        per_protocol: dict[str, list[tuple[Segment, _Candidate]]] = {p: [] for p in PROTOCOLS}
        for app in self._apps:
            for segment in app.segments:
                per_protocol[segment.protocol].append((segment, (segment.ports, Match(app=app, segment=segment))))
        self._index = {protocol: _ProtocolIndex(candidates) for protocol, candidates in per_protocol.items()}

    @classmethod
    def load(cls, path: str) -> AppTable:
        """Read a JSON or TOML application file."""
        return cls.from_obj(read_file(path), source=path)

    @classmethod
    def from_obj(cls, obj: Any, source: str = "<apps>") -> AppTable:
        """Build from an already decoded object (``{"apps": [...]}``); ``source`` prefixes errors."""
        return cls(_parse_apps(obj, source))

    @classmethod
    def single(
        cls, host: str, port: int, group: str = DEFAULT_GROUP, name: str | None = None, protocol: str = "tcp"
    ) -> AppTable:
        """One application covering one destination (a host name or an IP address) and port."""
        if name is None:
            name = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        segment = {"destination": host, "ports": [port], "protocol": protocol}
        return cls.from_obj({"apps": [{"name": name, "connector_group": group, "segments": [segment]}]}, "<single>")

    @property
    def apps(self) -> list[App]:
        return list(self._apps)

    def groups(self) -> set[str]:
        """The connector groups that some application needs."""
        return {app.connector_group for app in self._apps}

    def match(self, host: str, port: int, protocol: str = "tcp") -> Match | None:
        """The most specific segment covering ``host:port/protocol``, or None.

        An IP literal is matched against ip / cidr / range segments, a name against
        hostname / wildcard segments (names are never resolved). Most specific wins: an
        exact name beats a wildcard, a longer wildcard suffix a shorter one; fewer
        addresses beat more (a single IP beats any network). Among segments equally
        specific by destination, the narrower matching port range wins, then file order.
        """
        index = self._index.get(protocol)
        if index is None:
            return None
        name = host.lower()
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
        if name and (":" in name or name[-1].isdigit()):
            address = _parse_address(name)
            if address is not None:
                version, value = address
                return (index.v4 if version == 4 else index.v6).match(value, port)
        return index.match_name(name.rstrip("."), port)

    def covering_name(self, name: str) -> Match | None:
        """The most specific hostname or wildcard segment covering the DNS name ``name`` on any
        port or protocol (which application a private name belongs to), or None."""
        name = name.lower().rstrip(".")
        for protocol in PROTOCOLS:
            index = self._index[protocol]
            found = _first(index.names.get(name))
            if found is not None:
                return found
        dot = name.find(".")
        while dot >= 0:  # longest suffix first
            for protocol in PROTOCOLS:
                found = _first(self._index[protocol].wildcards.get(name[dot + 1:]))
                if found is not None:
                    return found
            dot = name.find(".", dot + 1)
        return None
