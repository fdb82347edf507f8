"""Segment rules of the store: parsing, canonical ports, and overlaps between applications.

Parsing is the data plane's (``dataplane.contract.apps.Applications.from_obj``), so the store accepts
exactly what an application file accepts, with the same messages, and stores segments in
the normalised form the edge matches against. What the store adds:

- ``canonical_ports``: one text form per port set (sorted, overlapping and adjacent ranges
  merged: ``"80,443,8000-8100"``), stored in ``segments.ports``.
- ``OverlapIndex``: the segments of the *other* per-app applications, indexed so that each
  new segment is checked in time proportional to its name's labels (names, wildcards) or to
  the intervals before it (addresses). Two segments overlap when some flow could match
  both: same protocol, intersecting port ranges, and destinations that share a name or an
  address (a name never overlaps an address: names are not resolved).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dataplane.contract.apps import DEFAULT_GROUP, Applications, AppsError, Segment, address_bounds

from .errors import StoreError

PortRanges = tuple[tuple[int, int], ...]
_SOURCE = "<store>"


def parse_segments(app: str, raw: Sequence[Mapping[str, Any]]) -> tuple[Segment, ...]:
    """Validate and normalise ``raw`` segments (``{"destination", "ports", "protocol"}``) of ``app``.

    At most ``dataplane.contract.apps.MAX_SEGMENTS``; an exact duplicate is refused. Errors
    (``StoreError`` code ``invalid``) name the app and the segment, counted from 1.
    """
    if not raw:
        return ()
    obj = {"apps": [{"name": app, "connector_group": DEFAULT_GROUP, "segments": list(raw)}]}
    try:
        segments = Applications.from_obj(obj, source=_SOURCE).apps[0].segments
    except AppsError as exc:
        raise StoreError("invalid", str(exc).removeprefix(f"{_SOURCE}: ")) from None
    merged = tuple(
        Segment(app=s.app, destination=s.destination, kind=s.kind, ports=merge_ports(s.ports), protocol=s.protocol)
        for s in segments
    )
    seen: dict[Segment, int] = {}
    for number, segment in enumerate(merged, 1):
        if segment in seen:
            raise StoreError("invalid", f"app {app!r} segment {number} repeats segment {seen[segment]} "
                                        f"({describe(segment)})")
        seen[segment] = number
    return merged


def merge_ports(ranges: Iterable[tuple[int, int]]) -> PortRanges:
    """Sorted ranges with overlapping and adjacent ones merged."""
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return tuple(merged)


def canonical_ports(ranges: Iterable[tuple[int, int]]) -> str:
    """The stored text of a port set: ``"80,443,8000-8100"``."""
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in merge_ports(ranges))


def ports_from_text(text: str) -> PortRanges:
    """The ranges of a ``canonical_ports`` text (as stored; not a parser for user input)."""
    ranges = []
    for item in text.split(","):
        low, _, high = item.partition("-")
        ranges.append((int(low), int(high or low)))
    return tuple(ranges)


def describe(segment: Segment) -> str:
    """``destination:ports/protocol``, e.g. ``10.0.0.5:20-30/tcp`` (IPv6 in brackets)."""
    destination = f"[{segment.destination}]" if ":" in segment.destination else segment.destination
    return f"{destination}:{canonical_ports(segment.ports)}/{segment.protocol}"


def _ports_intersect(a: PortRanges, b: PortRanges) -> bool:
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i][1] < b[j][0]:
            i += 1
        elif b[j][1] < a[i][0]:
            j += 1
        else:
            return True
    return False


def _proper_suffixes(name: str) -> list[str]:
    """``a.b.c`` → ``["b.c", "c"]``."""
    labels = name.split(".")
    return [".".join(labels[k:]) for k in range(1, len(labels))]


# An indexed segment: its order of insertion (to report the first overlap) and the segment.
_Entry = tuple[int, Segment]


class OverlapIndex:
    """Segments (of per-app applications) to check new segments against."""

    def __init__(self, segments: Iterable[Segment]) -> None:
        self._names: dict[tuple[str, str], list[_Entry]] = {}
        self._wildcards: dict[tuple[str, str], list[_Entry]] = {}
        # Names and wildcards strictly under a suffix: the ones a wildcard of that suffix covers.
        self._under: dict[tuple[str, str], list[_Entry]] = {}
        # Per (protocol, IP version): (first address, last address, entry), sorted by first address.
        self._intervals: dict[tuple[str, int], list[tuple[int, int, _Entry]]] = {}
        for order, segment in enumerate(segments):
            entry = (order, segment)
            if segment.kind == "hostname":
                name = segment.destination
                self._names.setdefault((segment.protocol, name), []).append(entry)
            elif segment.kind == "wildcard":
                name = segment.destination[2:]
                self._wildcards.setdefault((segment.protocol, name), []).append(entry)
            else:
                version, low, high = address_bounds(segment)
                self._intervals.setdefault((segment.protocol, version), []).append((low, high, entry))
                continue
            for suffix in _proper_suffixes(name):
                self._under.setdefault((segment.protocol, suffix), []).append(entry)
        for intervals in self._intervals.values():
            intervals.sort(key=lambda item: (item[0], item[2][0]))
        # The first addresses of ``_intervals``, for bisect.
        self._starts = {key: [low for low, _, _ in intervals] for key, intervals in self._intervals.items()}

    def _candidates(self, segment: Segment) -> Iterable[_Entry]:
        """Indexed segments whose destination shares a name or an address with ``segment``'s."""
        protocol = segment.protocol
        if segment.kind in ("hostname", "wildcard"):
            if segment.kind == "hostname":
                name = segment.destination
                yield from self._names.get((protocol, name), ())
            else:
                name = segment.destination[2:]
                yield from self._wildcards.get((protocol, name), ())
                yield from self._under.get((protocol, name), ())
            for suffix in _proper_suffixes(name):
                yield from self._wildcards.get((protocol, suffix), ())
            return
        version, low, high = address_bounds(segment)
        key = (protocol, version)
        intervals = self._intervals.get(key, [])
        for _, other_high, entry in intervals[:bisect.bisect_right(self._starts.get(key, []), high)]:
            if other_high >= low:
                yield entry

    def first_overlap(self, segment: Segment) -> Segment | None:
        """The earliest indexed segment that overlaps ``segment``, or None."""
        found = [entry for entry in self._candidates(segment) if _ports_intersect(entry[1].ports, segment.ports)]
        return min(found, key=lambda entry: entry[0])[1] if found else None

    def check(self, segments: Iterable[Segment]) -> None:
        """Refuse (``StoreError`` code ``conflict``) the first of ``segments`` that overlaps an indexed one."""
        for segment in segments:
            other = self.first_overlap(segment)
            if other is not None:
                raise StoreError("conflict", f"segment {describe(segment)} of app {segment.app!r} overlaps "
                                             f"segment {describe(other)} of app {other.app!r}")
