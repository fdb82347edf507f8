"""What ``ferryman admin`` prints: aligned tables and ``key: value`` lines for people, the API's
own JSON with ``--json`` for scripts (``Ctx.show``), and the small texts values are shown as
(times, sizes, durations, segments).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

from .client import Client, decode


@dataclass
class Ctx:
    """What every command gets: the API client, and whether to print JSON (``--json``)."""

    client: Client
    json: bool

    def show(self, payload: bytes, human: Callable[[Any], str]) -> None:
        """Print the API's JSON (``--json``) or the human form of it."""
        if self.json:
            if payload:
                print(msgspec.json.format(payload, indent=2).decode())
            return
        print(human(decode(payload, self.client.base_url)))

    @staticmethod
    def print_json(value: Any) -> None:
        """``value`` as indented JSON (what ``--json`` prints for a command's own report)."""
        print(msgspec.json.format(msgspec.json.encode(value), indent=2).decode())


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Aligned columns, two spaces apart, no trailing blanks."""
    cells = [[str(h) for h in headers]] + [["-" if c is None or c == "" else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in cells]
    return "\n".join(lines)


def fields(pairs: Sequence[tuple[str, object]]) -> str:
    """``key: value`` lines with aligned values."""
    width = max(len(k) for k, _ in pairs) + 1
    return "\n".join(f"{(k + ':').ljust(width)} {'-' if v is None or v == '' else v}".rstrip() for k, v in pairs)


def when(value: str | None) -> str | None:
    """An API time (RFC 3339, UTC) as ``2024-05-01 12:00:00Z``."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def segment_text(segment: dict[str, Any]) -> str:
    """``destination:ports/protocol`` (IPv6 destinations in brackets), as the API's messages say it."""
    destination = segment["destination"]
    if ":" in destination:
        destination = f"[{destination}]"
    return f"{destination}:{segment['ports']}/{segment['protocol']}"


def yes_no(value: object) -> str:
    return "yes" if value else "no"


def listing(empty: str, headers: Sequence[str], row: Callable[[dict[str, Any]], Sequence[object]]
            ) -> Callable[[Any], str]:
    """A renderer of a list: a table with a row per item, or ``empty`` when there is none."""

    def render(items: list[dict[str, Any]]) -> str:
        return table(headers, [row(item) for item in items]) if items else empty
    return render


def duration_text(seconds: int) -> str:
    """``5400`` → ``1h30m``; the inverse of ``parse_duration`` (``0s`` for zero)."""
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def size_text(count: int) -> str:
    """``512`` → ``512B``, ``1536`` → ``1.5KiB`` (KiB, MiB, GiB, TiB; one decimal, rounded down)."""
    if count < 1024:
        return f"{count}B"
    unit, size = "KiB", 1024
    for unit, size in (("KiB", 1024), ("MiB", 1024 ** 2), ("GiB", 1024 ** 3), ("TiB", 1024 ** 4)):
        if count < size * 1024:
            break
    return f"{count * 10 // size / 10:.1f}{unit}"


def millis_text(ms: int) -> str:
    """``250`` → ``250ms``, ``1500`` → ``1.5s`` (rounded down), ``5400000`` → ``1h30m``."""
    if ms < 1000:
        return f"{ms}ms"
    if ms < 60000:
        return f"{ms // 100 / 10:.1f}s"
    return duration_text(ms // 1000)


def host_port(host: str, port: int) -> str:
    if not host:
        return ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
