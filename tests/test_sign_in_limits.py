"""Throttling of ``POST /v1/auth/sign-in`` (``control.api.throttle``), served for real: ``python
-m dataplane control`` in a subprocess, requests sent from several loopback source addresses
(127.0.0.2, 127.0.0.3, ...: the whole 127/8 reaches a listener on 127.0.0.1), so the
control plane sees distinct sources as it would distinct clients.

Covered: a burst of parallel guesses gets exactly the limit, no more (the check and the
count are one step); the limits per account and source, per source, per account and in all,
each with its own message and ``Retry-After``; an attacker exhausting every limit but the
per-pair one from elsewhere cannot lock a user out of the address they signed in from
before; failures age out of the window; sources count per IPv6 /64.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from control.api.throttle import SignInLimiter, SignInLimits, Throttled, source_key

from controlplane import Control
from sources import call_from

pytestmark = pytest.mark.timeout(120)

PASSWORD = "correct horse battery"


def sign_in_from(control: Control, source: str, upn: str, password: str = PASSWORD) -> tuple[int, Any]:
    status, body, headers = call_from(control, source, "POST", "/v1/auth/sign-in", {"upn": upn, "password": password})
    if status == 429:
        assert body["code"] == "rate_limited" and int(headers["Retry-After"]) >= 1, body
    return status, body


def make_user(control: Control, upn: str) -> None:
    status, body, _ = control.call("POST", "/v1/users", {"upn": upn, "password": PASSWORD})
    assert status == 201, body


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Control]:
    with Control.running(tmp_path_factory.mktemp("control")) as control:  # the default limits
        yield control


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Control]:
    """A control plane with small limits: 3 per account and source, 6 per source, 8 per account, 20 in all."""
    with Control.running(tmp_path_factory.mktemp("tight"), env={
            "FERRYMAN_SIGN_IN_MAX_FAILURES": "3", "FERRYMAN_SIGN_IN_MAX_SOURCE_FAILURES": "6",
            "FERRYMAN_SIGN_IN_MAX_ACCOUNT_FAILURES": "8", "FERRYMAN_SIGN_IN_MAX_TOTAL_FAILURES": "20"}) as control:
        yield control


def test_a_burst_of_parallel_guesses_gets_exactly_the_limit(control: Control) -> None:
    make_user(control, "burst@corp.example")
    guesses = 40
    barrier = threading.Barrier(guesses)
    statuses: list[int] = []

    def guess(n: int) -> None:
        barrier.wait()
        statuses.append(sign_in_from(control, "127.0.0.1", "burst@corp.example", f"wrong guess {n}")[0])

    threads = [threading.Thread(target=guess, args=(n,)) for n in range(guesses)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert Counter(statuses) == {401: 10, 429: guesses - 10}  # FERRYMAN_SIGN_IN_MAX_FAILURES, not one more
    status, body = sign_in_from(control, "127.0.0.1", "burst@corp.example")
    assert status == 429 and body["error"].startswith(
        "too many failed sign-ins for 'burst@corp.example' from this address (10 within 300 s): try again in ")


def test_an_attacker_cannot_lock_a_user_out_of_their_usual_address(tight: Control) -> None:
    make_user(tight, "alice@corp.example")
    make_user(tight, "bob@corp.example")
    assert sign_in_from(tight, "127.0.0.2", "alice@corp.example")[0] == 200  # alice's usual address
    assert sign_in_from(tight, "127.0.0.13", "bob@corp.example")[0] == 200  # bob's
    # One attacker address: 3 guesses at alice, then that pair is held.
    assert [sign_in_from(tight, "127.0.0.3", "alice@corp.example", "guess")[0] for _ in range(3)] == [401] * 3
    status, body = sign_in_from(tight, "127.0.0.3", "alice@corp.example", "guess")
    assert status == 429 and "for 'alice@corp.example' from this address (3 within 300 s)" in body["error"]
    # More addresses: once alice had 8 failures from addresses she never signed in from, new ones are held.
    assert [sign_in_from(tight, "127.0.0.4", "alice@corp.example", "guess")[0] for _ in range(3)] == [401] * 3
    assert [sign_in_from(tight, "127.0.0.5", "alice@corp.example", "guess")[0] for _ in range(2)] == [401] * 2
    status, body = sign_in_from(tight, "127.0.0.5", "alice@corp.example", "guess")
    assert status == 429 and body["error"].startswith(
        "too many failed sign-ins for 'alice@corp.example' from addresses it has not signed in from lately "
        "(8 within 300 s); sign in from an address you used before, or wait: try again in ")
    # Alice, from her usual address, is not held: her own typo counts against that pair only.
    assert sign_in_from(tight, "127.0.0.2", "alice@corp.example", "typo")[0] == 401
    assert sign_in_from(tight, "127.0.0.2", "alice@corp.example")[0] == 200
    # From an address she never used, she waits like the attacker (the price of the per-account limit).
    assert sign_in_from(tight, "127.0.0.9", "alice@corp.example")[0] == 429
    # One address spraying many accounts: held after 6 failures.
    assert [sign_in_from(tight, "127.0.0.10", f"user{n}@corp.example", "guess")[0] for n in range(6)] == [401] * 6
    status, body = sign_in_from(tight, "127.0.0.10", "user6@corp.example", "guess")
    assert status == 429 and "too many failed sign-ins from this address (6 within 300 s)" in body["error"]
    # 9 + 6 failures so far; 5 more from elsewhere reach the limit in all (20) ...
    assert [sign_in_from(tight, "127.0.0.11", f"other{n}@corp.example", "guess")[0] for n in range(5)] == [401] * 5
    status, body = sign_in_from(tight, "127.0.0.12", "carol@corp.example", "guess")
    assert status == 429 and body["error"].startswith(
        "too many failed sign-ins on this control plane (20 within 300 s); addresses users signed in from before "
        "are not held back: try again in ")
    assert sign_in_from(tight, "127.0.0.12", "bob@corp.example")[0] == 429
    # ... which holds back new addresses, never users at the addresses they signed in from.
    assert sign_in_from(tight, "127.0.0.2", "alice@corp.example")[0] == 200
    assert sign_in_from(tight, "127.0.0.13", "bob@corp.example")[0] == 200


def test_the_limiter_counts_attempts_in_flight_and_forgets_after_the_window() -> None:
    limiter = SignInLimiter(SignInLimits(window=60, per_pair=2, per_source=100, per_account=100, total=100,
                                         known_source_days=1))
    first = limiter.begin("ann@corp.example", "192.0.2.1", now=0)
    second = limiter.begin("ann@corp.example", "192.0.2.1", now=0)
    with pytest.raises(Throttled, match="try again in 1 s"):  # two in flight fill the pair's budget
        limiter.begin("ann@corp.example", "192.0.2.1", now=0)
    limiter.finish(first, ok=False, failed=False, now=1)  # e.g. a second factor is still needed: not a failure
    limiter.finish(limiter.begin("ann@corp.example", "192.0.2.1", now=1), ok=False, failed=True, now=1)
    limiter.finish(second, ok=False, failed=True, now=2)
    with pytest.raises(Throttled) as held:
        limiter.begin("ann@corp.example", "192.0.2.1", now=30)
    assert held.value.retry_after == 31  # the older failure (t=1) ages out at 61
    limiter.finish(limiter.begin("ann@corp.example", "192.0.2.1", now=61.5), ok=True, failed=False, now=61.5)
    assert limiter.known("ann@corp.example", "192.0.2.1", now=62)
    assert not limiter.known("ann@corp.example", "192.0.2.1", now=61.5 + 86400)  # known_source_days


def test_sources_count_per_ipv6_64() -> None:
    assert source_key("2001:db8:1:2::1") == source_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("::ffff:192.0.2.7") == source_key("192.0.2.7") == "192.0.2.7"
    assert source_key(None) == "unknown"


def test_settings_name_every_limit(tmp_path: Path) -> None:
    from dataplane.basics.settings import ControlSettings, SettingsError, load

    limits = SignInLimits.from_settings(load(ControlSettings, environ={
        "FERRYMAN_SIGN_IN_WINDOW": "60", "FERRYMAN_SIGN_IN_MAX_FAILURES": "5",
        "FERRYMAN_SIGN_IN_MAX_SOURCE_FAILURES": "50", "FERRYMAN_SIGN_IN_MAX_ACCOUNT_FAILURES": "20",
        "FERRYMAN_SIGN_IN_MAX_TOTAL_FAILURES": "500", "FERRYMAN_SIGN_IN_KNOWN_SOURCE_DAYS": "7"}))
    assert limits == SignInLimits(window=60, per_pair=5, per_source=50, per_account=20, total=500,
                                  known_source_days=7)
    assert SignInLimits.from_settings(load(ControlSettings, environ={})) == SignInLimits()
    with pytest.raises(SettingsError, match="FERRYMAN_SIGN_IN_MAX_FAILURES='0': must be between 1 and"):
        load(ControlSettings, environ={"FERRYMAN_SIGN_IN_MAX_FAILURES": "0"})
