"""Rate limits of the front door: token buckets per web app, per edge and per source address.

``TokenBucket(rate, burst)`` holds up to ``burst`` tokens and gains ``rate`` per second;
``take(now)`` answers 0 when a request may go, or the seconds until one may (the
``Retry-After`` of the 429). ``KeyedBuckets`` keeps one bucket per key (app name, source
address) and is bounded: past ``max_keys`` the least recently used bucket is dropped
(a dropped bucket starts full again, which only ever errs towards letting a request in).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict


class TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float | None = None, now: float | None = None) -> None:
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(1.0, rate))
        self.tokens = self.burst
        self.stamp = time.monotonic() if now is None else now

    def take(self, now: float | None = None) -> float:
        """0.0 and one token spent, or the seconds to wait for the next token (nothing spent)."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class KeyedBuckets:
    def __init__(self, rate: float, burst: float | None = None, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str, now: float | None = None) -> float:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now)

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after(seconds: float) -> bytes:
    """A ``Retry-After`` value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds))).encode("ascii")
