"""The argument types of ``ferryman admin``: segments, durations and times as the API wants them.

Each raises ``argparse.ArgumentTypeError`` with the reason, which argparse reports as a usage
error (exit status 2).
"""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime, timedelta

_DURATION_RE = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


def parse_segment(spec: str) -> dict[str, str]:
    """``DEST:PORTS[/PROTO]`` → a segment for the API (which validates destination and ports).

    ``10.0.0.0/16:22,3389``, ``*.corp.example:443/tcp``, ``[2001:db8::/32]:53/udp``.
    """
    text = spec.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1:end + 2] != ":":
            raise argparse.ArgumentTypeError(f"{spec!r}: expected [IPV6]:PORTS[/PROTO]")
        destination, rest = text[1:end], text[end + 2:]
    else:
        destination, sep, rest = text.rpartition(":")
        if not sep or not destination:
            raise argparse.ArgumentTypeError(f"{spec!r}: expected DEST:PORTS[/PROTO], e.g. 10.0.0.0/16:22,3389/tcp")
        if ":" in destination:
            raise argparse.ArgumentTypeError(f"{spec!r}: put an IPv6 destination in brackets, e.g. "
                                             f"[2001:db8::/32]:443")
    ports, slash, protocol = rest.partition("/")
    if not ports.strip():
        raise argparse.ArgumentTypeError(f"{spec!r}: no ports after the destination")
    if slash and not protocol.strip():
        raise argparse.ArgumentTypeError(f"{spec!r}: no protocol after '/'")
    segment = {"destination": destination, "ports": ports.strip()}
    if slash:
        segment["protocol"] = protocol.strip().lower()
    return segment


def parse_duration(text: str) -> int:
    """Seconds of ``3600``, ``90s``, ``30m``, ``1h``, ``7d`` or a combination such as ``1h30m``."""
    value = text.strip().lower()
    if value.isdigit():
        seconds = int(value)
    else:
        match = _DURATION_RE.fullmatch(value)
        if not value or match is None:
            raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 3600, 90s, 30m, 1h, 7d or 1h30m")
        days, hours, minutes, secs = (int(g or 0) for g in match.groups())
        seconds = ((days * 24 + hours) * 60 + minutes) * 60 + secs
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration must be positive")
    return seconds


def parse_since(text: str) -> str:
    """An RFC 3339 time with a zone (``2024-05-01T12:00:00Z``; a bare date is midnight UTC), or a
    duration back from now (``1h``, ``2d``)."""
    value = text.strip()
    try:
        seconds = parse_duration(value)
    except argparse.ArgumentTypeError:
        pass
    else:
        return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat()
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time like 2024-05-01T12:00:00Z or a duration like "
                                         f"1h") from None
    if moment.tzinfo is None:
        if "T" in value or " " in value:
            raise argparse.ArgumentTypeError(f"{text!r} has no time zone: add Z (UTC) or an offset like +02:00")
        moment = moment.replace(tzinfo=UTC)
    return moment.isoformat()
