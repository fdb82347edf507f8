"""Caps per identity and per source, and log lines that a hostile peer cannot turn into a flood.

- ``source_key(host)``: what a source address counts as (an IPv4 address, an IPv6 /64).
- ``Counts``: how many of something each key holds right now (tunnels per certificate,
  handshakes per source, connections per source), with an optional cap per key and in all.
  A key is forgotten when its count drops to zero, so the table never holds more keys than
  there are things counted.
- ``HttpLimits`` and ``ConnectionGate``: the limits of a small public HTTP server (the control
  plane's API, every node's metrics server): connections in all, connections of one source
  still waiting for a request head, the time a request head may take, the idle time between
  requests, the size of a request head.
- ``LogLimiter``: at most ``limit`` lines per key (a peer, a source address) in every
  ``interval`` seconds; the lines beyond are dropped and counted, and the next line logged
  for that key says how many were dropped (``suppressed``). At most ``max_keys`` keys are
  tracked (those whose window is over are forgotten first): past that, new keys share one
  bucket (``*``), so memory stays bounded whatever peers send.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

__all__ = ["source_key", "Counts", "HttpLimits", "ConnectionGate", "LogLimiter"]


def source_key(host: str | None) -> str:
    """What a source address counts as: the IPv4 address, the IPv6 /64 (an IPv4-mapped IPv6
    address as its IPv4 address), the text as given when it is not an IP address."""
    if not host:
        return "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class Counts:
    """Live counts per key (each ``take`` is matched by one ``give``), capped per key and in all.

    ``take(key)`` returns None when it counted, else why not (``"total"`` or ``"key"``): the
    caller refuses. Keys at zero are dropped, so memory is bounded by what is counted."""

    __slots__ = ("per_key", "total_limit", "counts", "total")

    def __init__(self, per_key: int | None = None, total: int | None = None) -> None:
        self.per_key = per_key
        self.total_limit = total
        self.counts: dict[Hashable, int] = {}
        self.total = 0

    def get(self, key: Hashable) -> int:
        return self.counts.get(key, 0)

    def __len__(self) -> int:
        return len(self.counts)

    def take(self, key: Hashable, per_key: int | None = None) -> str | None:
        """Count one more for ``key`` unless a cap is reached (``per_key`` overrides the
        default cap of this table for this key)."""
        if self.total_limit is not None and self.total >= self.total_limit:
            return "total"
        cap = self.per_key if per_key is None else per_key
        held = self.counts.get(key, 0)
        if cap is not None and held >= cap:
            return "key"
        self.counts[key] = held + 1
        self.total += 1
        return None

    def give(self, key: Hashable) -> None:
        """One of ``key``'s is gone (a key not counted is ignored)."""
        held = self.counts.get(key, 0)
        if held <= 0:
            return
        self.total -= 1
        if held == 1:
            del self.counts[key]
        else:
            self.counts[key] = held - 1


@dataclass(frozen=True)
class HttpLimits:
    """Limits of a public HTTP/1.1 server (``FERRYMAN_CONTROL_*``)."""

    max_connections: int = 4096          # open connections in all; more are answered 503 and closed
    max_waiting_per_source: int = 128    # connections of one source not yet past a request head
    request_timeout: float = 20.0        # seconds from the connection (or a request's first byte) to its full head
    keepalive_timeout: float = 5.0       # seconds an idle connection is kept between requests
    max_head: int = 65536                # bytes of request line and headers; beyond that 431

    @classmethod
    def from_settings(cls, settings: Any) -> HttpLimits:
        return cls(max_connections=settings.control_max_connections,
                   max_waiting_per_source=settings.control_max_waiting_per_source,
                   request_timeout=settings.control_request_timeout,
                   keepalive_timeout=settings.control_keepalive_timeout,
                   max_head=settings.control_max_head)


class ConnectionGate:
    """Who may open a connection to an HTTP server with ``HttpLimits``: ``open(host)`` counts a
    new connection (also as waiting for its request head) or says why it is refused;
    ``head_done`` and ``head_waiting`` move it out of and back into the waiting count (a
    request head complete; the next one awaited), ``close`` forgets it."""

    def __init__(self, limits: HttpLimits) -> None:
        self.limits = limits
        self.connections = 0
        self.waiting = Counts(per_key=limits.max_waiting_per_source)

    def open(self, host: str | None) -> tuple[str | None, str]:
        """(None, source key) when admitted, else (why refused, source key)."""
        key = source_key(host)
        if self.connections >= self.limits.max_connections:
            return f"the server holds its maximum of {self.limits.max_connections} connections", key
        if self.waiting.take(key) is not None:
            return (f"{key} has {self.limits.max_waiting_per_source} connections waiting for a request already",
                    key)
        self.connections += 1
        return None, key

    def head_done(self, key: str) -> None:
        self.waiting.give(key)

    def head_waiting(self, key: str) -> None:
        self.waiting.take(key, per_key=1 << 62)  # a connection already admitted is never refused here

    def close(self, key: str, waiting: bool) -> None:
        self.connections -= 1
        if waiting:
            self.waiting.give(key)


class LogLimiter:
    """Rate-limited log lines per key: ``log(logger, level, key, msg, extra)`` logs at most
    ``limit`` lines per key in each ``interval`` seconds (a fixed window starting at the key's
    first line). Lines beyond are counted in ``suppressed`` (in all) and per key; the first
    line logged for the key afterwards carries ``suppressed=N`` (and says so in its text)."""

    OVERFLOW = "*"  # the bucket shared by keys beyond ``max_keys``

    def __init__(self, limit: int = 50, interval: float = 10.0, max_keys: int = 10000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.interval = interval
        self.max_keys = max_keys
        self.clock = clock
        self.suppressed = 0  # lines dropped in all (``ferryman_log_lines_suppressed_total``)
        self._keys: OrderedDict[Hashable, list[float | int]] = OrderedDict()  # key -> [window start, lines, dropped]

    def _entry(self, key: Hashable, now: float) -> list[float | int]:
        entry = self._keys.get(key)
        if entry is not None:
            return entry
        keys = self._keys
        while len(keys) >= self.max_keys:  # forget keys whose window is over (oldest first)
            oldest, (start, _lines, _dropped) = next(iter(keys.items()))
            if now - start < self.interval:
                break
            del keys[oldest]
        if len(keys) >= self.max_keys:
            key = self.OVERFLOW
            entry = keys.get(key)
            if entry is not None:
                return entry
        entry = keys[key] = [now, 0, 0]
        return entry

    def allow(self, key: Hashable) -> tuple[bool, int]:
        """(whether to log a line for ``key`` now, how many of its lines were dropped since the
        last one logged: report them in this line)."""
        now = self.clock()
        entry = self._entry(key, now)
        if now - entry[0] >= self.interval:
            entry[0], entry[1] = now, 0
            self._keys.move_to_end(key if key in self._keys else self.OVERFLOW)
        if entry[1] >= self.limit:
            entry[2] += 1
            self.suppressed += 1
            return False, 0
        entry[1] += 1
        dropped, entry[2] = int(entry[2]), 0
        return True, dropped

    def log(self, logger: logging.Logger, level: int, key: Hashable, msg: str,
            extra: dict[str, Any] | None = None) -> bool:
        """Log ``msg`` for ``key`` unless its budget is spent; True when logged."""
        if not logger.isEnabledFor(level):
            return False
        ok, dropped = self.allow(key)
        if not ok:
            return False
        if dropped:
            extra = {**(extra or {}), "suppressed": dropped}
            msg = f"{msg} ({dropped} similar lines suppressed before this one)"
        logger.log(level, msg, extra=extra)
        return True
