"""The state control-plane nodes share through the database, on SQLite and PostgreSQL: sealed
shared keys (one value whoever stores first, not opened by another secrets key), replay marks
(first use only, again once expired; atomic under concurrent callers), TOTP steps (only
upwards) and sign-in attempts (limits, waits, known sources, in-flight records).
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from control.store import StoreError, open_store
from control.store import control_keys, guard_state
from control.store.models import utcnow
from control.store.secretbox import SecretBox
from test_store import url  # noqa: F401 - the url fixture (SQLite, PostgreSQL)

pytestmark = pytest.mark.timeout(60)


def test_a_shared_key_is_stored_once_and_sealed(url: str) -> None:
    box = SecretBox.generate()
    with open_store(url, box) as store:
        made: list[int] = []

        def make() -> bytes:
            made.append(1)
            return b"the key"

        assert control_keys.shared_key(store, "ca", make) == (b"the key", True)
        assert control_keys.shared_key(store, "ca", lambda: b"another") == (b"the key", False)
        assert made == [1] and control_keys.key_names(store) == ["ca"]
        with store.read() as session:
            from sqlalchemy import text
            sealed = session.execute(text("SELECT sealed FROM control_keys")).scalar_one()
        assert b"the key" not in sealed.encode() and sealed.startswith("fmsb1.")
    with open_store(url, SecretBox.generate()) as other:
        with pytest.raises(StoreError) as caught:
            control_keys.read_key(other, "ca")
        assert "FERRYMAN_SECRETS_KEY_FILE" in str(caught.value) and "does not open" in str(caught.value)
        with pytest.raises(StoreError):
            control_keys.shared_key(other, "", lambda: b"x")


def test_replay_marks_are_first_use_only_and_atomic(url: str) -> None:
    with open_store(url, SecretBox.generate()) as store:
        now = utcnow()
        later = now + timedelta(seconds=60)
        assert guard_state.first_use(store, "node-request", "jti-1", later, now)
        assert not guard_state.first_use(store, "node-request", "jti-1", later, now)
        assert guard_state.first_use(store, "other-kind", "jti-1", later, now)  # kinds are apart
        # once expired, the id may be recorded again (the token itself is refused as expired anyway)
        assert guard_state.first_use(store, "node-request", "jti-1", later + timedelta(seconds=60),
                                     later + timedelta(seconds=1))
        assert guard_state.forget_expired(store, later + timedelta(seconds=200)) == 2

        wins: list[bool] = []
        start = threading.Barrier(8)

        def race() -> None:
            start.wait()
            wins.append(guard_state.first_use(store, "node-request", "contested", later, now))

        threads = [threading.Thread(target=race) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sorted(wins) == [False] * 7 + [True]


def test_totp_steps_only_go_up(url: str) -> None:
    with open_store(url, SecretBox.generate()) as store:
        until = utcnow() + timedelta(hours=1)
        assert guard_state.claim_step(store, "totp-step", "user-1", 100, until)
        assert not guard_state.claim_step(store, "totp-step", "user-1", 100, until)
        assert not guard_state.claim_step(store, "totp-step", "user-1", 99, until)
        assert guard_state.claim_step(store, "totp-step", "user-1", 101, until)
        assert guard_state.claim_step(store, "totp-step", "user-2", 100, until)
        with pytest.raises(ValueError):
            guard_state.claim_step(store, "totp-step", "x" * 201, 1, until)


LIMITS = [guard_state.SignInLimit("pair", 2), guard_state.SignInLimit("source", 3),
          guard_state.SignInLimit("account", 10), guard_state.SignInLimit("total", 100)]


def test_sign_in_attempts_count_failures_and_in_flight_ones(url: str) -> None:
    with open_store(url, SecretBox.generate()) as store:
        now = utcnow()

        def fail(account: str, source: str, at=now) -> None:
            record, reached, _ = guard_state.sign_in_begin(store, account, source, LIMITS, 300, at)
            assert record is not None, reached
            guard_state.sign_in_finish(store, record, account, source, ok=False, failed=True, known_for=86400, now=at)

        fail("alice", "10.0.0.1")
        # an attempt in flight counts: the pair's second one may start, a third may not
        record, _, _ = guard_state.sign_in_begin(store, "alice", "10.0.0.1", LIMITS, 300, now)
        assert record is not None
        assert guard_state.sign_in_begin(store, "alice", "10.0.0.1", LIMITS, 300, now)[1] == "pair"
        guard_state.sign_in_finish(store, record, "alice", "10.0.0.1", ok=False, failed=True, known_for=86400, now=now)
        reached, wait = guard_state.sign_in_begin(store, "alice", "10.0.0.1", LIMITS, 300,
                                                  now + timedelta(seconds=100))[1:]
        assert reached == "pair" and 199 <= wait <= 200
        # after the window the pair may try again
        assert guard_state.sign_in_begin(store, "alice", "10.0.0.1", LIMITS, 300,
                                         now + timedelta(seconds=301))[0] is not None
        # the source limit: 3 failures from one address over several accounts
        fail("bob", "10.0.0.2")
        fail("carol", "10.0.0.2")
        fail("dave", "10.0.0.2")
        assert guard_state.sign_in_begin(store, "erin", "10.0.0.2", LIMITS, 300, now)[1] == "source"


def test_a_known_source_is_held_only_to_the_pair_limit(url: str) -> None:
    with open_store(url, SecretBox.generate()) as store:
        now = utcnow()
        record, _, _ = guard_state.sign_in_begin(store, "alice", "10.0.0.9", LIMITS, 300, now)
        guard_state.sign_in_finish(store, record, "alice", "10.0.0.9", ok=True, failed=False, known_for=86400, now=now)
        for account in ("x", "y", "z"):  # exhaust the source limit of 10.0.0.9 with other accounts
            record, _, _ = guard_state.sign_in_begin(store, account, "10.0.0.9", LIMITS, 300, now)
            guard_state.sign_in_finish(store, record, account, "10.0.0.9", ok=False, failed=True, known_for=1, now=now)
        assert guard_state.sign_in_begin(store, "mallory", "10.0.0.9", LIMITS, 300, now)[1] == "source"
        assert guard_state.sign_in_begin(store, "alice", "10.0.0.9", LIMITS, 300, now)[0] is not None
