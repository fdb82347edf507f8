"""How hard anyone may knock on the public sign-in routes: failed sign-ins and OIDC starts, per
account, per source address and in all, in this process's memory.

``SignInLimiter`` guards ``POST /v1/auth/sign-in`` (password, then TOTP or a recovery code).
Four sliding-window limits (``SignInLimits``, ``FERRYMAN_SIGN_IN_*``) count failed sign-ins
(wrong password, unknown user, wrong second factor) within ``window`` seconds:

- ``per_pair``: one account from one source address (the guesses one attacker gets);
- ``per_source``: one source address, all accounts (password spraying from one place);
- ``per_account``: one account from every address (guessing spread over many addresses);
- ``total``: every account from every address (a botnet's guesses, and the argon2 work).

An attacker must not be able to lock a user out, so an account's *known sources* — the
addresses it signed in from successfully within ``known_source_days`` — are held only to
``per_pair``: failures from elsewhere can exhaust ``per_account`` and ``total``, which then
refuse new addresses (a user travelling must wait), but never the address the user signs
in from every day. An attacker sharing that very address (the same NAT) can still use up
its ``per_pair`` budget: that is the one lockout left, bounded by ``window``.

Atomic: ``begin`` checks every limit and counts the attempt as in flight in one step under
a lock, so a burst of parallel requests cannot get more guesses than a limit allows (an
attempt in flight counts as a failure until ``finish`` says how it went). A success clears
its pair's failures and makes the source known for the account.

Source addresses are the TCP peer (the control plane takes no forwarded-for header); IPv6
addresses count per /64, the block one subscriber usually gets. Every table is bounded
(``MAX_TRACKED`` keys, least recently touched forgotten first); each control-plane process
counts its own, except on PostgreSQL, where ``SharedSignInLimiter`` keeps the counts in the
database for every node sharing it.

``SourceRate`` limits how often one source may do something cheap but stateful (``POST
/v1/auth/oidc/start``: ``FERRYMAN_OIDC_STARTS_PER_MINUTE``).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from control.store import Store, guard_state
from dataplane.basics.caps import source_key

MAX_TRACKED = 100_000  # keys (pairs, sources, accounts, known sources) per table


class Throttled(Exception):
    """Refused before any check: ``retry_after`` whole seconds (at least 1); the message says which limit."""

    def __init__(self, message: str, retry_after: float) -> None:
        self.retry_after = max(1, math.ceil(retry_after))
        super().__init__(f"{message}: try again in {self.retry_after} s")


class _Window:
    """Event times per key within a sliding window, plus attempts in flight; bounded in keys and
    (per key) in events: only the newest ``limit`` times matter."""

    def __init__(self, limit: int, window: float, max_keys: int = MAX_TRACKED) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._times: OrderedDict[Hashable, deque[float]] = OrderedDict()
        self._in_flight: dict[Hashable, int] = {}

    def _live(self, key: Hashable, now: float) -> deque[float] | None:
        times = self._times.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._times[key]
            return None
        return times

    def wait(self, key: Hashable, now: float) -> float | None:
        """Seconds until ``key`` may go again, or None when it may now (events + attempts in flight < limit)."""
        times = self._live(key, now)
        used = (len(times) if times else 0) + self._in_flight.get(key, 0)
        if used < self.limit:
            return None
        if times and len(times) >= self.limit:
            return times[-self.limit] + self.window - now
        return 1.0  # full only because of attempts still in flight: they end within a second or so

    def start(self, key: Hashable) -> None:
        self._in_flight[key] = self._in_flight.get(key, 0) + 1

    def end(self, key: Hashable, now: float, *, count: bool) -> None:
        left = self._in_flight.get(key, 0) - 1
        if left > 0:
            self._in_flight[key] = left
        else:
            self._in_flight.pop(key, None)
        if count:
            self.add(key, now)

    def add(self, key: Hashable, now: float) -> None:
        times = self._times.get(key)
        if times is None:
            times = self._times[key] = deque(maxlen=max(1, self.limit))
        times.append(now)
        self._times.move_to_end(key)
        while len(self._times) > self.max_keys:
            self._times.popitem(last=False)

    def clear(self, key: Hashable) -> None:
        self._times.pop(key, None)


@dataclass(frozen=True)
class SignInLimits:
    """The ``FERRYMAN_SIGN_IN_*`` limits (see the module doc)."""

    window: float = 300.0
    per_pair: int = 10
    per_source: int = 100
    per_account: int = 50
    total: int = 1000
    known_source_days: float = 30.0

    @classmethod
    def from_settings(cls, settings: Any) -> SignInLimits:
        return cls(window=settings.sign_in_window, per_pair=settings.sign_in_max_failures,
                   per_source=settings.sign_in_max_source_failures,
                   per_account=settings.sign_in_max_account_failures,
                   total=settings.sign_in_max_total_failures, known_source_days=settings.sign_in_known_source_days)


@dataclass(frozen=True)
class Attempt:
    """One sign-in attempt between ``SignInLimiter.begin`` and ``finish``."""

    account: str
    source: str
    record: int | None = None  # the database record of a ``SharedSignInLimiter`` attempt


_ALL = "*"


class SignInLimiter:
    """Failed sign-ins per (account, source), per source, per account and in all (module doc); thread-safe."""

    def __init__(self, limits: SignInLimits | None = None, max_tracked: int = MAX_TRACKED) -> None:
        self.limits = limits = limits or SignInLimits()
        self._pair = _Window(limits.per_pair, limits.window, max_tracked)
        self._source = _Window(limits.per_source, limits.window, max_tracked)
        self._account = _Window(limits.per_account, limits.window, max_tracked)
        self._total = _Window(limits.total, limits.window, 1)
        self._known: OrderedDict[tuple[str, str], float] = OrderedDict()  # (account, source) -> last success
        self._max_known = max_tracked
        self._lock = threading.Lock()

    def known(self, account: str, source: str, now: float | None = None) -> bool:
        """Whether ``account`` signed in from ``source`` within ``known_source_days``."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return self._is_known(account, source, now)

    def _is_known(self, account: str, source: str, now: float) -> bool:
        last = self._known.get((account, source))
        return last is not None and now - last < self.limits.known_source_days * 86400

    def begin(self, account: str, host: str | None, now: float | None = None) -> Attempt:
        """Let one attempt for ``account`` from ``host`` go ahead (counted in flight), or raise ``Throttled``."""
        now = time.monotonic() if now is None else now
        source = source_key(host)
        limits = self.limits
        window = f"{limits.window:g} s"
        with self._lock:
            wait = self._pair.wait((account, source), now)
            if wait is not None:
                raise Throttled(f"too many failed sign-ins for {account!r} from this address ({limits.per_pair} "
                                f"within {window})", wait)
            if not self._is_known(account, source, now):
                wait = self._source.wait(source, now)
                if wait is not None:
                    raise Throttled(f"too many failed sign-ins from this address ({limits.per_source} within "
                                    f"{window})", wait)
                wait = self._account.wait(account, now)
                if wait is not None:
                    raise Throttled(f"too many failed sign-ins for {account!r} from addresses it has not signed in "
                                    f"from lately ({limits.per_account} within {window}); sign in from an address "
                                    f"you used before, or wait", wait)
                wait = self._total.wait(_ALL, now)
                if wait is not None:
                    raise Throttled(f"too many failed sign-ins on this control plane ({limits.total} within {window}); "
                                    f"addresses users signed in from before are not held back", wait)
            self._pair.start((account, source))
            self._source.start(source)
            self._account.start(account)
            self._total.start(_ALL)
            return Attempt(account, source)

    def finish(self, attempt: Attempt, *, ok: bool, failed: bool, now: float | None = None) -> None:
        """End ``attempt``: ``ok`` signed in (clears the pair's failures, the source becomes known),
        ``failed`` a wrong password or second factor (counted everywhere); neither (e.g. a second
        factor is still needed, or a malformed request) counts nothing."""
        now = time.monotonic() if now is None else now
        account, source = attempt.account, attempt.source
        with self._lock:
            self._pair.end((account, source), now, count=failed)
            self._source.end(source, now, count=failed)
            self._account.end(account, now, count=failed)
            self._total.end(_ALL, now, count=failed)
            if ok:
                self._pair.clear((account, source))
                self._known[(account, source)] = now
                self._known.move_to_end((account, source))
                while len(self._known) > self._max_known:
                    self._known.popitem(last=False)


class SharedSignInLimiter:
    """``SignInLimiter`` with its counts in the database (``control.store.guard_state``): every
    control-plane node on one PostgreSQL database counts the same failures, so spreading
    guesses over the nodes gains nothing. Same limits, messages and lockout rule."""

    def __init__(self, store: Store, limits: SignInLimits | None = None) -> None:
        self.store = store
        self.limits = limits or SignInLimits()
        limits = self.limits
        self._checks = [guard_state.SignInLimit("pair", limits.per_pair),
                        guard_state.SignInLimit("source", limits.per_source),
                        guard_state.SignInLimit("account", limits.per_account),
                        guard_state.SignInLimit("total", limits.total)]

    def begin(self, account: str, host: str | None, now: float | None = None) -> Attempt:
        source = source_key(host)
        record, reached, wait = guard_state.sign_in_begin(self.store, account, source, self._checks,
                                                          self.limits.window)
        if record is not None:
            return Attempt(account, source, record)
        limits, window = self.limits, f"{self.limits.window:g} s"
        messages = {
            "pair": f"too many failed sign-ins for {account!r} from this address ({limits.per_pair} within {window})",
            "source": f"too many failed sign-ins from this address ({limits.per_source} within {window})",
            "account": f"too many failed sign-ins for {account!r} from addresses it has not signed in from lately "
                       f"({limits.per_account} within {window}); sign in from an address you used before, or wait",
            "total": f"too many failed sign-ins on this control plane ({limits.total} within {window}); addresses "
                     f"users signed in from before are not held back",
        }
        raise Throttled(messages[reached or "total"], wait)

    def finish(self, attempt: Attempt, *, ok: bool, failed: bool, now: float | None = None) -> None:
        if attempt.record is None:
            return
        guard_state.sign_in_finish(self.store, attempt.record, attempt.account, attempt.source, ok=ok, failed=failed,
                                   known_for=self.limits.known_source_days * 86400)


class SourceRate:
    """At most ``limit`` events per source address within ``window`` seconds; thread-safe."""

    def __init__(self, limit: int, window: float = 60.0, max_tracked: int = MAX_TRACKED) -> None:
        self._window = _Window(limit, window, max_tracked)
        self._lock = threading.Lock()

    @property
    def limit(self) -> int:
        return self._window.limit

    def take(self, host: str | None, now: float | None = None) -> float | None:
        """Count one event of ``host``'s source; None when allowed, else the seconds until it would be."""
        now = time.monotonic() if now is None else now
        source = source_key(host)
        with self._lock:
            wait = self._window.wait(source, now)
            if wait is None:
                self._window.add(source, now)
            return wait
