"""Which application a flow belongs to: the application tables the edge (and a client's
forwarding profile) match destinations against.

``AppTable.match(host, port, protocol)`` finds the most specific segment covering a
destination (see ``AppTable.match``); ``covering_name`` which application a private DNS
name belongs to. ``TieredAppTable`` puts the quick access application behind every per-app
one; ``app_table`` / ``profile_table`` build it from a snapshot or a forwarding profile.
Pure: no I/O, and names are never resolved.
"""

from __future__ import annotations

import bisect
import socket
from collections.abc import Sequence
from itertools import groupby
from typing import Any

import msgspec

from ..contract.apps import DEFAULT_GROUP, PROTOCOLS, App, Applications, AppsError, Segment, address_bounds
from ..contract.snapshot import ClientProfile, ConfigSnapshot, SnapshotError


class Match(msgspec.Struct, frozen=True):
    app: App
    segment: Segment


def describe_miss(host: str, port: int, protocol: str = "tcp") -> str:
    """The refusal text for a flow that no application covers."""
    text = f"no application covers {host}:{port}"
    return f"{text}/{protocol}" if protocol == "udp" else text


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

    def covers(self, address: int) -> bool:
        """Some segment covers ``address`` (on whatever ports)."""
        k = bisect.bisect_right(self.bounds, address) - 1
        return k >= 0 and bool(self.tiers[k])

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


class AppTable(Applications):
    """The applications an edge (or a client's forwarding profile) knows, indexed for a per-flow ``match``."""

    def __init__(self, apps: Sequence[App]) -> None:
        super().__init__(apps)
        per_protocol: dict[str, list[tuple[Segment, _Candidate]]] = {p: [] for p in PROTOCOLS}
        for app in self._apps:
            for segment in app.segments:
                per_protocol[segment.protocol].append((segment, (segment.ports, Match(app=app, segment=segment))))
        self._index = {protocol: _ProtocolIndex(candidates) for protocol, candidates in per_protocol.items()}

    @classmethod
    def single(
        cls, host: str, port: int, group: str = DEFAULT_GROUP, name: str | None = None, protocol: str = "tcp"
    ) -> AppTable:
        """One application covering one destination (a host name or an IP address) and port."""
        if name is None:
            name = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        segment = {"destination": host, "ports": [port], "protocol": protocol}
        return cls.from_obj({"apps": [{"name": name, "connector_group": group, "segments": [segment]}]}, "<single>")

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

    def covers_address(self, address: str) -> bool:
        """An ip, cidr or range segment of any protocol and port covers the IP address ``address``
        (an IPv4-mapped IPv6 address counts as its IPv4 address); False for anything else."""
        parsed = _parse_address(address)
        if parsed is None:
            return False
        version, value = parsed
        return any((index.v4 if version == 4 else index.v6).covers(value) for index in self._index.values())

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


# ---------------------------------------------------------------------------- snapshots and profiles


class TieredAppTable(AppTable):
    """An ``AppTable`` whose ``fallback`` applications only match flows that ``apps`` leave uncovered.

    Within each tier the usual rule holds (most specific destination, then narrowest port
    range, then order). ``app_table`` puts per-app applications in the first tier and the
    quick access application in the fallback tier.
    """

    def __init__(self, apps: Sequence[App], fallback: Sequence[App] = ()) -> None:
        super().__init__(apps)
        self._fallback = AppTable(fallback) if fallback else None
        self._all = (*apps, *fallback)

    @property
    def apps(self) -> list[App]:
        return list(self._all)

    def groups(self) -> set[str]:
        return {app.connector_group for app in self._all}

    def match(self, host: str, port: int, protocol: str = "tcp") -> Match | None:
        found = super().match(host, port, protocol)
        if found is None and self._fallback is not None:
            return self._fallback.match(host, port, protocol)
        return found

    def covering_name(self, name: str) -> Match | None:
        found = super().covering_name(name)
        if found is None and self._fallback is not None:
            return self._fallback.covering_name(name)
        return found


def app_table(snapshot: ConfigSnapshot) -> AppTable:
    """The applications of ``snapshot`` for ``AppTable.match`` (applications without segments left out).

    Per-app applications come first and quick access is a fallback tier: a flow goes to quick
    access only if no per-app segment covers it (an identical, or even a narrower, quick
    access segment does not take a flow away from a per-app application).
    """
    ordered = sorted((a for a in snapshot.applications if a.segments), key=lambda a: a.kind != "per_app")
    obj: dict[str, Any] = {"apps": [
        {"name": a.name, "connector_group": a.connector_group,
         "segments": [{"destination": s.destination, "ports": s.ports, "protocol": s.protocol} for s in a.segments]}
        for a in ordered
    ]}
    try:
        parsed = AppTable.from_obj(obj, source=f"snapshot version {snapshot.version}").apps
    except AppsError as exc:
        raise SnapshotError(str(exc)) from None
    per_app = sum(1 for a in ordered if a.kind == "per_app")
    return TieredAppTable(parsed[:per_app], parsed[per_app:])


def profile_table(profile: ClientProfile) -> AppTable:
    """The profile's applications for ``AppTable.match``, tiered like the edge's (``app_table``)."""
    return app_table(ConfigSnapshot(version=profile.version, issued_at=profile.issued_at,
                                    applications=profile.applications))
