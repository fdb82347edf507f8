"""Tests of the identity modules of control/store (users, user_groups, devices, sessions, totp)
on a real SQLite file: users (UPN rules, argon2 passwords,
one message for unknown user and wrong password), groups and membership, devices (register,
compliance, revocation of the certificate and sessions), sessions (refresh-token rotation and
reuse detection, expiry, the per-user limit), the TOTP second factor with recovery codes, the
configuration version each change moves (or not), audit records without secrets, and the
reads the configuration snapshot is built from.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyotp
import pytest
from sqlalchemy import select

from control.store import (
    Store,
    StoreError,
    certificates,
    config_version,
    devices,
    open_store,
    sessions,
    totp,
    user_groups,
    users,
    values,
)
from control.snapshot import build_snapshot
from control.store.audit import list_audit
from control.store.models import AuditRecord, ConfigVersion, Device, GroupMember, RecoveryCode, SignInSession, User
from control.store.secretbox import SecretBox, SecretBoxError
from dataplane.contract.snapshot import TOKEN_LEEWAY

pytestmark = pytest.mark.timeout(60)

ACTOR = "admin-key:tests"
PASSWORD = "correct horse battery"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(f"sqlite:///{tmp_path / 'data' / 'control.db'}", SecretBox.generate()) as opened:
        yield opened


def refused(code: str, call: Callable[[], object]) -> str:
    """Run ``call``, expect a StoreError with ``code``; return its message."""
    with pytest.raises(StoreError) as info:
        call()
    assert info.value.code == code, str(info.value)
    return str(info.value)


def version(store: Store) -> int:
    with store.read() as session:
        return config_version.config_version(session)


def audit(store: Store, action: str | None = None) -> list[AuditRecord]:
    with store.read() as session:
        records = list(reversed(list_audit(session, limit=1000)))
    return [r for r in records if action is None or r.action == action]


def make_user(store: Store, upn: str = "alice@corp.example", password: str | None = PASSWORD) -> str:
    with store.begin() as session:
        return users.create_user(session, ACTOR, upn, display_name="Alice", password=password).id


# ---------------------------------------------------------------------------- users and passwords


def test_users_are_validated_lower_cased_unique_and_audited(store: Store) -> None:
    start = version(store)
    user_id = make_user(store, "  Alice@Corp.Example ")
    with store.read() as session:
        user = users.get_user(session, user_id)
        assert user.upn == "alice@corp.example"
        assert user.password_hash is not None and user.password_hash.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
        assert users.get_user(session, "ALICE@corp.example").id == user_id  # by UPN, any case
    assert version(store) == start + 1  # edges learn users from the snapshot
    with store.begin() as session:
        assert refused("conflict", lambda: users.create_user(session, ACTOR, "ALICE@corp.example")) == \
            "user 'alice@corp.example' already exists"
        assert "is not of the form name@domain" in refused("invalid", lambda: users.create_user(
            session, ACTOR, "alice"))
        assert "is not of the form name@domain" in refused("invalid", lambda: users.create_user(
            session, ACTOR, "al ice@corp.example"))
        assert refused("invalid", lambda: users.create_user(session, ACTOR, "bob@corp.example", password="short")) \
            == "password must be at least 8 characters long"
        assert refused("invalid", lambda: users.create_user(session, ACTOR, "bob@corp.example",
                                                            password="x" * 1025)) \
            == "password is longer than 1024 characters"
        assert refused("not_found", lambda: users.get_user(session, "nobody@corp.example")) == \
            "user 'nobody@corp.example' does not exist"
    (created,) = audit(store, "user.create")
    assert created.actor == ACTOR and created.after is not None
    assert created.after["upn"] == "alice@corp.example" and created.after["has_password"] is True
    assert "password_hash" not in created.after


def test_user_changes_bump_the_version_only_when_edges_need_them(store: Store) -> None:
    user_id = make_user(store)
    before = version(store)
    with store.begin() as session:
        users.update_user(session, ACTOR, user_id, display_name="Alice A.")
    assert version(store) == before  # not in the snapshot
    with store.begin() as session:
        users.update_user(session, ACTOR, user_id, display_name="Alice A.")  # no change: not recorded
        users.set_password(session, ACTOR, user_id, "another password")
    assert version(store) == before
    assert len(audit(store, "user.update")) == 1
    with store.begin() as session:
        users.disable_user(session, ACTOR, user_id)
        users.set_risk_level(session, ACTOR, user_id, "high")
        assert refused("invalid", lambda: users.set_risk_level(session, ACTOR, user_id, "severe")) == \
            "risk level 'severe' is not one of none, low, medium, high"
    assert version(store) == before + 2
    with store.read() as session:
        assert users.snapshot_users(session) == [(user_id, "alice@corp.example", [], True, "high")]


def test_password_check_gives_one_message_and_costs_the_same_for_unknown_users(store: Store) -> None:
    user_id = make_user(store)
    make_user(store, "nopassword@corp.example", password=None)
    with store.read() as session:
        assert users.check_password(session, "Alice@corp.example", PASSWORD).id == user_id
        wrong = refused("auth_failed", lambda: users.check_password(session, "alice@corp.example", "wrong password"))
        unknown = refused("auth_failed", lambda: users.check_password(session, "bob@corp.example", PASSWORD))
        no_password = refused("auth_failed", lambda: users.check_password(session, "nopassword@corp.example",
                                                                          PASSWORD))
        malformed = refused("auth_failed", lambda: users.check_password(session, "not a upn", PASSWORD))
        assert wrong == unknown == no_password == malformed == "user name or password is wrong"

        def timed(upn: str) -> float:
            samples = []
            for _ in range(3):
                began = time.perf_counter()
                with pytest.raises(StoreError):
                    users.check_password(session, upn, "wrong password")
                samples.append(time.perf_counter() - began)
            return statistics.median(samples)

        known, missing = timed("alice@corp.example"), timed("bob@corp.example")
        assert missing > 0.5 * known, (known, missing)  # the dummy hash costs an argon2 verification too
    with store.begin() as session:
        users.disable_user(session, ACTOR, user_id)
    with store.read() as session:
        assert refused("account_disabled", lambda: users.check_password(session, "alice@corp.example", PASSWORD)) \
            == "account is disabled"
        # A disabled account is only revealed to whoever knows the password.
        assert refused("auth_failed", lambda: users.check_password(session, "alice@corp.example", "wrong one!"))


def test_deleting_a_user_revokes_device_certificates_and_cascades(store: Store) -> None:
    user_id = make_user(store)
    with store.begin() as session:
        group = user_groups.create_user_group(session, ACTOR, "eng")
        user_groups.add_group_member(session, ACTOR, "eng", user_id)
        device = devices.register_device(session, ACTOR, user_id, name="laptop", os="linux", os_version="6.1")
        devices.record_device_certificate(session, ACTOR, device.id, 0xABC123, datetime.now(UTC) + timedelta(days=30))
        sessions.create_session(session, user_id, device_id=device.id)
        group_id, device_id = group.id, device.id
    before = version(store)
    with store.begin() as session:
        users.delete_user(session, ACTOR, "alice@corp.example")
    assert version(store) > before
    with store.read() as session:
        assert certificates.is_revoked(session, 0xABC123)
        assert session.get(Device, device_id) is None
        assert session.scalars(select(SignInSession)).all() == []
        assert session.scalars(select(GroupMember).where(GroupMember.group_id == group_id)).all() == []
        assert users.snapshot_users(session) == [] and devices.snapshot_devices(session) == []
    (deleted,) = audit(store, "user.delete")
    assert deleted.before is not None and deleted.before["groups"] == [group_id]


# ---------------------------------------------------------------------------- user groups


def test_groups_and_membership_are_configuration(store: Store) -> None:
    alice = make_user(store)
    bob = make_user(store, "bob@corp.example")
    with store.begin() as session:
        eng = user_groups.create_user_group(session, ACTOR, "eng")
        ops = user_groups.create_user_group(session, ACTOR, "ops")
        assert refused("conflict", lambda: user_groups.create_user_group(session, ACTOR, " eng ")) == \
            "user group 'eng' already exists"
        eng_id, ops_id = eng.id, ops.id
    steps = version(store)
    with store.begin() as session:
        user_groups.add_group_member(session, ACTOR, "eng", alice)
        user_groups.add_group_member(session, ACTOR, ops_id, "ALICE@corp.example")
        user_groups.add_group_member(session, ACTOR, "eng", "bob@corp.example")
        assert refused("conflict", lambda: user_groups.add_group_member(session, ACTOR, "eng", alice)) == \
            "user 'alice@corp.example' is already a member of group 'eng'"
        assert refused("not_found", lambda: user_groups.add_group_member(session, ACTOR, "nope", alice)) == \
            "user group 'nope' does not exist"
    assert version(store) == steps + 3
    with store.read() as session:
        by_id = {row[0]: row for row in users.snapshot_users(session)}
        assert by_id[alice][2] == sorted([eng_id, ops_id])
        assert by_id[bob][2] == [eng_id]
        assert [u.upn for u in user_groups.group_members(session, "eng")] == ["alice@corp.example", "bob@corp.example"]
    with store.begin() as session:
        user_groups.remove_group_member(session, ACTOR, "eng", "bob@corp.example")
        assert refused("not_found", lambda: user_groups.remove_group_member(session, ACTOR, "eng", bob)) == \
            "user 'bob@corp.example' is not a member of group 'eng'"
        user_groups.rename_user_group(session, ACTOR, "ops", "operations")
        user_groups.delete_user_group(session, ACTOR, eng_id)
    assert version(store) == steps + 6
    with store.read() as session:
        assert [g.name for g in user_groups.list_user_groups(session)] == ["operations"]
        assert users.user_group_ids(session, alice) == [ops_id]
    actions = [r.action for r in audit(store) if r.object_type == "user_group"]
    assert actions == ["user_group.create", "user_group.create", "user_group.add_member", "user_group.add_member",
                       "user_group.add_member", "user_group.remove_member", "user_group.update",
                       "user_group.delete"]


# ---------------------------------------------------------------------------- devices


def test_device_register_compliance_and_revocation(store: Store) -> None:
    user_id = make_user(store)
    before = version(store)
    with store.begin() as session:
        device = devices.register_device(session, ACTOR, user_id, name="laptop", os="windows", os_version="11")
        assert re.fullmatch(r"[0-9a-f-]{36}", device.id) and device.compliant is False
        devices.record_device_certificate(session, ACTOR, device.id, 0xBEEF, datetime.now(UTC) + timedelta(days=9))
        device_id = device.id
    assert version(store) == before + 1
    with store.begin() as session:
        devices.update_device(session, ACTOR, device_id, name="work laptop")  # not configuration
    assert version(store) == before + 1
    with store.begin() as session:
        devices.set_device_compliant(session, ACTOR, device_id, True)
        devices.update_device(session, ACTOR, device_id, os_version="11 23H2")
    assert version(store) == before + 3
    with store.read() as session:
        assert devices.snapshot_devices(session) == [(device_id, user_id, "windows", "11 23H2", True, False)]
    with store.begin() as session:
        live, _ = sessions.create_session(session, user_id, device_id=device_id)
        live_id = live.id
        devices.revoke_device(session, ACTOR, device_id, "laptop stolen")
        assert refused("conflict", lambda: devices.revoke_device(session, ACTOR, device_id)).startswith(
            f"device {device_id} was already revoked at ")
        assert refused("device_refused", lambda: sessions.create_session(session, user_id, device_id=device_id)) == \
            f"device {device_id} is revoked: register the device again"
    with store.read() as session:
        assert certificates.is_revoked(session, 0xBEEF)
        assert devices.snapshot_devices(session)[0][5] is True
        assert sessions.revoked_session_ids(session) == [live_id]
    (revoked,) = audit(store, "device.revoke")
    assert revoked.after is not None and revoked.after["sessions_revoked"] == [live_id]
    assert revoked.after["reason"] == "laptop stolen"


def test_device_limits_and_ownership(store: Store) -> None:
    alice, bob = make_user(store), make_user(store, "bob@corp.example")
    with store.begin() as session:
        for n in range(devices.MAX_DEVICES_PER_USER):
            devices.register_device(session, ACTOR, alice, name=f"d{n}")
        assert refused("conflict", lambda: devices.register_device(session, ACTOR, alice)) == \
            (f"user 'alice@corp.example' already has {devices.MAX_DEVICES_PER_USER} devices, the most allowed "
             f"({devices.MAX_DEVICES_PER_USER}): revoke one first")
        mine = devices.list_devices(session, alice)[0].id
        assert refused("device_refused", lambda: sessions.create_session(session, bob, device_id=mine)) == \
            f"device {mine!r} is not a device of bob@corp.example"
        assert "longer than 64 characters" in refused("invalid", lambda: devices.register_device(
            session, ACTOR, bob, os="x" * 65))


# ---------------------------------------------------------------------------- sessions and refresh tokens


def test_refresh_rotates_and_reuse_revokes_the_session(store: Store) -> None:
    user_id = make_user(store)
    before = version(store)
    with store.begin() as session:
        row, first = sessions.create_session(session, user_id, amr=("pwd", "mfa"))
        sid = row.id
    assert re.fullmatch(rf"fmrt_{sid}\.[A-Za-z0-9_-]{{43}}", first)
    assert version(store) == before  # signing in is not configuration
    (created,) = audit(store, "session.create")
    assert created.actor == f"user:{user_id}" and created.after is not None and created.after["amr"] == "pwd,mfa"
    with store.read() as session:
        stored = session.get_one(SignInSession, sid)
        assert stored.refresh_hash == values.hash_secret(first) and first not in json.dumps(created.after)
    with store.begin() as session:
        row, second = sessions.refresh_session(session, first, store.box)
        assert second != first and row.id == sid and row.last_refresh_at is not None
    with store.begin() as session:
        _, third = sessions.refresh_session(session, second, store.box)
    # The first token comes back: the session is revoked (kept once the caller commits).
    with store.begin() as session:
        message = refused("refresh_reused", lambda: sessions.refresh_session(session, first, store.box))
    assert message == (f"refresh token was already used: session {sid} is revoked, since its refresh token may "
                       f"be stolen; sign in again")
    assert version(store) == before + 1
    with store.begin() as session:
        assert refused("session_revoked", lambda: sessions.refresh_session(session, third, store.box)).startswith(
            f"session {sid} was revoked at ")
        assert sessions.revoked_session_ids(session) == [sid]
    (revoked,) = audit(store, "session.revoke")
    assert revoked.actor == sessions.REUSE_ACTOR
    with store.begin() as session:
        assert refused("refresh_invalid", lambda: sessions.refresh_session(session, "fmrt_nonsense", store.box)).startswith(
            "refresh token is malformed")
        unknown = f"fmrt_{'0' * 8}-0000-0000-0000-{'0' * 12}.{'A' * 43}"
        assert refused("refresh_invalid", lambda: sessions.refresh_session(session, unknown, store.box)).startswith(
            "refresh token is not valid: its session does not exist")


def test_sessions_expire_and_follow_the_user_state(store: Store) -> None:
    user_id = make_user(store)
    now = datetime.now(UTC)
    with store.begin() as session:
        old, old_token = sessions.create_session(session, user_id, now=now - timedelta(days=2),
                                                 lifetime=timedelta(days=1))
        live, live_token = sessions.create_session(session, user_id, now=now)
        old_id = old.id
        assert live.expires_at == now + sessions.DEFAULT_SESSION_LIFETIME
        assert sessions.session_status(live, now) == "active"
    with store.begin() as session:
        # Creating a session deletes the user's expired ones.
        assert session.get(SignInSession, old_id) is None
        row, _ = sessions.create_session(session, user_id, now=now, lifetime=timedelta(hours=1))
        assert refused("session_expired", lambda: sessions.refresh_session(
            session, _, store.box, now=now + timedelta(hours=2))).startswith(f"session {row.id} expired at ")
        users.disable_user(session, ACTOR, user_id)
        assert refused("account_disabled", lambda: sessions.refresh_session(session, live_token, store.box)) == \
            "account is disabled"
        assert refused("account_disabled", lambda: sessions.create_session(session, user_id)) == "account is disabled"
        assert refused("invalid", lambda: sessions.create_session(session, user_id, amr=("mfa",))).startswith(
            "amr ['mfa'] is not one of")
    with store.begin() as session:
        users.enable_user(session, ACTOR, user_id)
        sessions.revoke_session(session, ACTOR, live.id, "lost phone")
        assert refused("conflict", lambda: sessions.revoke_session(session, ACTOR, live.id)).startswith(
            f"session {live.id} was already revoked at ")
        assert refused("session_revoked", lambda: sessions.active_session(session, live.id)).startswith(
            f"session {live.id} was revoked at ")
        # Revoked sessions are listed for the edges only until they expire (and the edges' clock
        # leeway past a token's expiry, which never comes after its session's, has passed).
        assert live.id in sessions.revoked_session_ids(session)
        session.get_one(SignInSession, live.id).expires_at = now - timedelta(seconds=TOKEN_LEEWAY - 5)
        session.flush()
        assert live.id in sessions.revoked_session_ids(session)
        session.get_one(SignInSession, live.id).expires_at = now - timedelta(seconds=TOKEN_LEEWAY + 1)
        session.flush()
        assert live.id not in sessions.revoked_session_ids(session)


def test_a_retried_refresh_within_the_grace_window_gets_the_same_new_token(store: Store) -> None:
    user_id = make_user(store)
    now = datetime.now(UTC)
    with store.begin() as session:
        row, first = sessions.create_session(session, user_id, now=now)
        sid = row.id
    with store.begin() as session:
        _, second = sessions.refresh_session(session, first, store.box, grace=30, now=now)
    # The answer was lost; the client sends the same token again 20 s later: same new token, nothing revoked.
    with store.begin() as session:
        row, again = sessions.refresh_session(session, first, store.box, grace=30, now=now + timedelta(seconds=20))
        assert again == second and row.revoked_at is None
        assert row.refresh_hash == values.hash_secret(second) and row.last_refresh_at == now
    assert audit(store, "session.revoke") == []
    # The new token goes on working; once it rotated, the first one is reuse again, even within the window.
    with store.begin() as session:
        _, third = sessions.refresh_session(session, second, store.box, grace=30, now=now + timedelta(seconds=25))
    with store.begin() as session:
        refused("refresh_reused", lambda: sessions.refresh_session(session, first, store.box, grace=30,
                                                                   now=now + timedelta(seconds=26)))
    (revoked,) = audit(store, "session.revoke")
    assert revoked.object_id == sid
    # Outside the window (or with no window) the retry is reuse and revokes the session.
    for grace, later in ((30, 31), (0, 1)):
        with store.begin() as session:
            row, token = sessions.create_session(session, user_id, now=now)
            sessions.refresh_session(session, token, store.box, grace=grace, now=now)
        with store.begin() as session:
            refused("refresh_reused", lambda: sessions.refresh_session(
                session, token, store.box, grace=grace, now=now + timedelta(seconds=later)))
        with store.read() as session:
            assert session.get_one(SignInSession, row.id).revoked_at is not None
    # A token's successor needs the secrets key: another key's successor is not the stored one.
    with store.begin() as session:
        row, token = sessions.create_session(session, user_id, now=now)
        sessions.refresh_session(session, token, store.box, grace=30, now=now)
    with store.begin() as session:
        refused("refresh_reused", lambda: sessions.refresh_session(session, token, SecretBox.generate(), grace=30,
                                                                   now=now + timedelta(seconds=1)))


def test_session_limit_revokes_the_oldest(store: Store) -> None:
    user_id = make_user(store)
    now = datetime.now(UTC)
    with store.begin() as session:
        ids = [sessions.create_session(session, user_id, now=now + timedelta(seconds=n))[0].id
               for n in range(sessions.MAX_SESSIONS_PER_USER)]
        before = config_version.config_version(session)
        newest, _ = sessions.create_session(session, user_id, now=now + timedelta(seconds=1000))
        assert config_version.config_version(session) == before + 1
        rows = {r.id: r for r in sessions.list_sessions(session, user_id)}
        assert rows[ids[0]].revoked_at is not None
        assert all(rows[i].revoked_at is None for i in ids[1:]) and rows[newest.id].revoked_at is None


# ---------------------------------------------------------------------------- TOTP and recovery codes


def test_totp_enrolment_second_factor_and_recovery_codes(store: Store) -> None:
    user_id = make_user(store)
    now = datetime.now(UTC)
    with store.begin() as session:
        secret = totp.start_totp_enrolment(session, user_id, store.box)
        user = users.get_user(session, user_id)
        assert re.fullmatch(r"[A-Z2-7]{32}", secret) and user.totp_enabled is False
        assert totp.totp_uri(user, secret).startswith("otpauth://totp/Ferryman:alice%40corp.example?secret=")
        authenticator = pyotp.TOTP(secret)
        wrong = "000000" if authenticator.at(now) != "000000" else "111111"
        assert refused("mfa_failed", lambda: totp.confirm_totp(session, user_id, wrong, store.box, now=now)).startswith(
            "TOTP code is wrong")
        codes, step = totp.confirm_totp(session, user_id, authenticator.at(now), store.box, now=now)
        assert step == totp.totp_step(now) and user.totp_enabled is True
        assert len(codes) == 10 and len(set(codes)) == 10
        assert all(re.fullmatch(r"[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}", c) for c in codes)
        assert refused("conflict", lambda: totp.start_totp_enrolment(session, user_id, store.box)) == \
            "TOTP is already enabled for alice@corp.example: an admin must reset it before a new enrolment"
    with store.begin() as session:
        user = users.get_user(session, user_id)
        assert refused("mfa_required", lambda: totp.verify_second_factor(session, user, store.box)) == \
            "a TOTP code is required"
        current = totp.totp_step(now)
        # One step of clock drift either way is accepted, two are not.
        assert totp.verify_second_factor(session, user, store.box, totp_code=authenticator.at(now - timedelta(seconds=30)),
                                         now=now) == current - 1
        assert totp.verify_second_factor(session, user, store.box, totp_code=authenticator.at(now + timedelta(seconds=30)),
                                         now=now) == current + 1
        far = authenticator.at(now - timedelta(seconds=60))
        if far not in {authenticator.at(now + timedelta(seconds=30 * d)) for d in (-1, 0, 1)}:
            assert refused("mfa_failed", lambda: totp.verify_second_factor(session, user, store.box, totp_code=far, now=now))
        assert refused("invalid", lambda: totp.verify_second_factor(session, user, store.box, totp_code="1", recovery_code="2")) \
            == "give either a TOTP code or a recovery code, not both"
        # A recovery code works once, written any way.
        assert totp.verify_second_factor(session, user, store.box, recovery_code=codes[0].upper().replace("-", " ")) is None
        assert refused("mfa_failed", lambda: totp.verify_second_factor(session, user, store.box, recovery_code=codes[0])) == \
            "recovery code is wrong or was already used"
        assert totp.recovery_codes_left(session, user_id) == 9
    with store.begin() as session:
        totp.reset_totp(session, ACTOR, user_id)
        user = users.get_user(session, user_id)
        assert user.totp_enabled is False and user.totp_secret is None
        assert session.scalars(select(RecoveryCode).where(RecoveryCode.user_id == user_id)).all() == []
        assert refused("invalid",
                       lambda: totp.verify_second_factor(session, user, store.box, totp_code=authenticator.at(now))) == \
            "alice@corp.example has no TOTP second factor enabled: sign in without a code"
        assert refused("conflict", lambda: totp.reset_totp(session, ACTOR, user_id)) == \
            "alice@corp.example has no TOTP set up: nothing to reset"
    # No secret is in any audit record.
    text = json.dumps([[r.before, r.after] for r in audit(store)])
    assert secret not in text and codes[1] not in text and codes[1].replace("-", "") not in text
    with store.read() as session:
        password_hash = session.get_one(User, user_id).password_hash
    assert password_hash is not None and password_hash not in text
    assert [r.action for r in audit(store) if r.action.startswith("user.totp") or "recovery" in r.action] == \
        ["user.totp_enrol", "user.totp_enable", "user.recovery_code_use", "user.totp_reset"]


def test_totp_secrets_are_sealed_and_recovery_codes_argon2id(store: Store, tmp_path: Path) -> None:
    user_id = make_user(store)
    other_id = make_user(store, "bob@corp.example")
    now = datetime.now(UTC)
    with store.begin() as session:
        secret = totp.start_totp_enrolment(session, user_id, store.box)
        codes, _ = totp.confirm_totp(session, user_id, pyotp.TOTP(secret).at(now), store.box, now=now)
    with store.read() as session:
        stored = session.get_one(User, user_id).totp_secret
        hashes = list(session.scalars(select(RecoveryCode.code_hash).where(RecoveryCode.user_id == user_id)))
    # Sealed (AES-256-GCM), bound to the user: nothing of the secret in the row or in the database file.
    assert stored is not None and stored.startswith("fmsb1.") and secret not in stored
    assert store.box.unseal(stored, f"totp:{user_id}").decode() == secret
    with pytest.raises(SecretBoxError, match="does not open with secrets key"):
        SecretBox.generate().unseal(stored, f"totp:{user_id}")
    with pytest.raises(SecretBoxError):
        store.box.unseal(stored, f"totp:{other_id}")  # moved to another user's row, it does not open
    store.engine.dispose()
    database = b"".join(p.read_bytes() for p in (tmp_path / "data").iterdir() if p.name.startswith("control.db"))
    assert secret.encode() not in database
    # Recovery codes: argon2id (salted: every hash differs), never the code nor its SHA-256.
    assert len(hashes) == 10 and all(h.startswith("$argon2id$v=19$m=19456,t=2,p=1$") for h in hashes)
    digests = {values.hash_secret(c.replace("-", "")) for c in codes}
    assert not any(d.encode() in database or c.replace("-", "").encode() in database
                   for d, c in zip(digests, codes, strict=True))
    with store.begin() as session:
        user = users.get_user(session, user_id)
        assert totp.verify_second_factor(session, user, store.box, recovery_code=codes[4]) is None
    with store.read() as session:
        spent = session.scalars(select(RecoveryCode).where(RecoveryCode.user_id == user_id,
                                                           RecoveryCode.used_at.is_not(None))).all()
        assert [r.code_hash for r in spent] == [""]  # a used code keeps no hash
        # The check happens in a read (argon2 outside the write transaction); the spend is atomic.
        found = totp.find_recovery_code(session, user_id, codes[5])
        assert found is not None and totp.find_recovery_code(session, user_id, codes[4]) is None
        assert totp.find_recovery_code(session, user_id, "not-a-code") is None
    with store.begin() as session:
        user = users.get_user(session, user_id)
        assert totp.verify_second_factor(session, user, store.box, recovery_code=codes[5],
                                         recovery_code_id=found) is None
        assert refused("mfa_failed", lambda: totp.verify_second_factor(
            session, user, store.box, recovery_code=codes[5], recovery_code_id=found)) == \
            "recovery code is wrong or was already used"
    # The control plane refuses to start with a key that does not open the stored secrets.
    with store.read() as session:
        totp.check_secrets_key(session, store.box)
        assert "cannot be read" in refused("invalid", lambda: totp.check_secrets_key(session, SecretBox.generate()))

TOKEN_LIFETIME = timedelta(hours=1)


def test_sign_ins_refreshes_and_ended_idle_sessions_push_no_configuration(store: Store) -> None:
    """One user's session churn: only a revocation that edges must act on changes the configuration."""
    user_id = make_user(store)
    now = datetime.now(UTC)
    with store.begin() as session:
        # Sessions signed in long ago whose latest access tokens have all expired...
        idle = [sessions.create_session(session, user_id, now=now - timedelta(hours=3, seconds=n),
                                        token_lifetime=TOKEN_LIFETIME)[0].id for n in range(3)]
        # ...and the rest up to the limit, signed in just now (their tokens are valid for an hour).
        fresh = [sessions.create_session(session, user_id, now=now, token_lifetime=TOKEN_LIFETIME)
                 for _ in range(sessions.MAX_SESSIONS_PER_USER - 3)]
    start = version(store)
    with store.begin() as session:
        sessions.refresh_session(session, fresh[0][1], store.box, now=now)
        # Beyond the limit, sign-ins end idle sessions: nothing an edge must refuse, no new version.
        for _ in range(3):
            sessions.create_session(session, user_id, now=now, token_lifetime=TOKEN_LIFETIME)
        rows = {r.id: r for r in sessions.list_sessions(session, user_id)}
        assert all(rows[i].revoked_at is not None for i in idle)
        # Every live session now holds a valid token: a further sign-in is refused, nothing revoked.
        message = refused("too_many_sessions", lambda: sessions.create_session(
            session, user_id, now=now, token_lifetime=TOKEN_LIFETIME))
        assert message.startswith(f"alice@corp.example already has {sessions.MAX_SESSIONS_PER_USER} sessions whose "
                                  f"access tokens are still valid, the most allowed "
                                  f"({sessions.MAX_SESSIONS_PER_USER}): sign out of one, or sign in after ")
    assert version(store) == start
    assert [r.after["reason"] for r in audit(store, "session.revoke")] == [
        f"more than {sessions.MAX_SESSIONS_PER_USER} sessions"] * 3
    with store.begin() as session:
        # Revoking a session whose tokens may still be valid does reach the edges.
        sessions.revoke_session(session, ACTOR, fresh[1][0].id, "signed out", now=now, token_lifetime=TOKEN_LIFETIME)
    assert version(store) == start + 1
    with store.read() as session:
        assert sessions.revoked_session_ids(session, token_lifetime=TOKEN_LIFETIME) == [fresh[1][0].id]


def test_a_revoked_session_leaves_the_configuration_once_its_tokens_cannot_be_valid(store: Store) -> None:
    user_id = make_user(store)
    now = datetime.now(UTC)
    with store.begin() as session:
        # Signed in 3 hours ago, refreshed 1 hour 59 minutes ago (its last token lived an hour after that),
        # revoked 1 hour 30 minutes ago: then edges had to refuse its token, not any more.
        old, token = sessions.create_session(session, user_id, now=now - timedelta(hours=3),
                                             token_lifetime=TOKEN_LIFETIME)
        sessions.refresh_session(session, token, store.box, now=now - timedelta(hours=1, minutes=59))
        sessions.revoke_session(session, ACTOR, old.id, now=now - timedelta(hours=1, minutes=30),
                                token_lifetime=TOKEN_LIFETIME)
        # Refreshed 30 minutes ago, revoked now: its last token is valid for 30 more minutes.
        recent, token = sessions.create_session(session, user_id, now=now - timedelta(hours=2),
                                                token_lifetime=TOKEN_LIFETIME)
        sessions.refresh_session(session, token, store.box, now=now - timedelta(minutes=30))
        sessions.revoke_session(session, ACTOR, recent.id, now=now, token_lifetime=TOKEN_LIFETIME)
        old_id, recent_id = old.id, recent.id
    with store.read() as session:
        assert sessions.revoked_session_ids(session, token_lifetime=TOKEN_LIFETIME) == [recent_id]
        row = session.get_one(SignInSession, recent_id)
        assert sessions.tokens_valid_until(row, TOKEN_LIFETIME) == (
            now - timedelta(minutes=30) + TOKEN_LIFETIME + timedelta(seconds=5 + TOKEN_LEEWAY))
        # Without the tokens' lifetime both stay listed until the sessions expire, as before.
        assert sessions.revoked_session_ids(session) == sorted([old_id, recent_id])
    # The snapshot of the control plane carries only the one edges must still refuse.
    with store.read() as session:
        snapshot = build_snapshot(session, edges=[], token_lifetime=3600)
    assert snapshot.revoked_sessions == [recent_id]


def test_snapshot_reads(store: Store) -> None:
    alice, bob = make_user(store), make_user(store, "bob@corp.example", password=None)
    with store.begin() as session:
        group = user_groups.create_user_group(session, ACTOR, "eng")
        user_groups.add_group_member(session, ACTOR, group.id, bob)
        device = devices.register_device(session, ACTOR, alice, os="macos", os_version="14.5")
        users.update_user(session, ACTOR, alice, risk_level="medium")
        row, _ = sessions.create_session(session, alice)
        sessions.revoke_session(session, ACTOR, row.id)
        sessions.create_session(session, alice)  # live: not listed
        group_id, device_id, revoked = group.id, device.id, row.id
    with store.read() as session:
        assert users.snapshot_users(session) == sorted([
            (alice, "alice@corp.example", [], False, "medium"),
            (bob, "bob@corp.example", [group_id], False, "none"),
        ])
        assert devices.snapshot_devices(session) == [(device_id, alice, "macos", "14.5", False, False)]
        assert sessions.revoked_session_ids(session) == [revoked]
    # Expiry is judged as of the configuration version's change, so one version always lists the same
    # sessions: one that expired since then stays listed until the next change.
    with store.begin() as session:
        changed_at = session.get_one(ConfigVersion, 1).changed_at
        session.get_one(SignInSession, revoked).expires_at = (changed_at - timedelta(seconds=TOKEN_LEEWAY)
                                                              + timedelta(milliseconds=1))
    time.sleep(0.01)
    with store.read() as session:
        assert sessions.revoked_session_ids(session) == [revoked]
    with store.begin() as session:
        user_groups.create_user_group(session, ACTOR, "ops")  # the next change
        assert sessions.revoked_session_ids(session) == []
