"""Applications and their segments: what is private, and which connector group reaches it.

An application is a name, a connector group and up to ``MAX_SEGMENTS`` segments; a segment
is a destination, a set of ports and a protocol. This module parses and validates them (from
an application file, the control plane's store and API, or a snapshot) into ``App`` and
``Segment``; which segment a flow matches is ``access.apptable``'s job. Pure: apart from
reading a file in ``read_file`` / ``Applications.load`` there is no I/O, and names are
never resolved.

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

An edge running from the file without a control plane may also be told which connector
serves which group (the certificate's CN, as ``ferryman pki init`` names it)::

    [[connectors]]
    name = "connector-lab-1"
    group = "lab"

With a ``connectors`` list the edge files each connector tunnel under the group listed for
its certificate name, refuses one whose HELLO names another group, and files no connector
that is not listed; without it, each connector's HELLO names its group (any certificate of
the CA may then serve any group). ``Applications.connectors`` is the mapping (None: no list).

Destinations: a host name (case-insensitive, trailing dot ignored), ``*.suffix`` (any name
strictly under ``suffix``, at any depth), an IPv4/IPv6 address, a CIDR network
(``10.20.0.0/16``; host bits must be zero) or an address range (``10.0.0.5-10.0.0.20``).
Ports: a list of numbers / strings or a comma-separated string; ``a-b`` is a range.
Error messages name the file, the app and the segment (counted from 1).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Sequence
from typing import Any, Self

import msgspec

MAX_SEGMENTS = 500
PROTOCOLS = ("tcp", "udp")
DEFAULT_GROUP = "default"

_APP_KEYS = ("name", "connector_group", "segments")
_CONNECTOR_KEYS = ("name", "group")
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


def _parse_connectors(obj: dict[str, Any], source: str) -> dict[str, str] | None:
    """The ``connectors`` list as certificate name -> group (None when the file has none)."""
    if "connectors" not in obj:
        return None
    raw = obj["connectors"]
    if not isinstance(raw, list):
        raise AppsError(f"{source}: 'connectors' must be a list")
    out: dict[str, str] = {}
    for number, entry in enumerate(raw, 1):
        where = f"{source}: connector {number}"
        if not isinstance(entry, dict):
            raise AppsError(f"{where}: must be a table")
        if problem := _unknown_keys(entry, _CONNECTOR_KEYS):
            raise AppsError(f"{where}: {problem}")
        name, group = entry.get("name"), entry.get("group")
        if not isinstance(name, str) or not name.strip():
            raise AppsError(f"{where}: name must be a non-empty string (the connector certificate's name)")
        if not isinstance(group, str) or not group.strip():
            raise AppsError(f"{where}: group must be a non-empty string")
        if name.strip() in out:
            raise AppsError(f"{source}: connector {name.strip()!r} is listed twice")
        out[name.strip()] = group.strip()
    return out


def _parse_apps(obj: Any, source: str) -> list[App]:
    if not isinstance(obj, dict) or "apps" not in obj:
        raise AppsError(f"{source}: expected a table with an 'apps' list")
    if problem := _unknown_keys(obj, ("apps", "connectors")):
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


def address_bounds(segment: Segment) -> tuple[int, int, int]:
    """(IP version, first address, last address) of an ip / cidr / range segment."""
    if segment.kind == "cidr":
        net = ipaddress.ip_network(segment.destination)
        return net.version, int(net.network_address), int(net.broadcast_address)
    first, _, last = segment.destination.partition("-")
    start = ipaddress.ip_address(first)
    return start.version, int(start), int(ipaddress.ip_address(last or first))




class Applications:
    """A validated list of applications (``from_obj`` / ``load``), in file order."""

    def __init__(self, apps: Sequence[App]) -> None:
        self._apps = tuple(apps)
        self.connectors: dict[str, str] | None = None  # the file's connector name -> group, if it lists them

    @classmethod
    def load(cls, path: str) -> Self:
        """Read a JSON or TOML application file."""
        return cls.from_obj(read_file(path), source=path)

    @classmethod
    def from_obj(cls, obj: Any, source: str = "<apps>") -> Self:
        """Build from an already decoded object (``{"apps": [...]}``); ``source`` prefixes errors."""
        table = cls(_parse_apps(obj, source))
        table.connectors = _parse_connectors(obj, source)
        return table

    @property
    def apps(self) -> list[App]:
        return list(self._apps)

    def groups(self) -> set[str]:
        """The connector groups that some application needs."""
        return {app.connector_group for app in self._apps}
