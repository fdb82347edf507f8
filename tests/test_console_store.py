"""The console's store (``control.store.console``) and its migration: upgrading a database with
users, devices, sessions and memberships keeps every row (SQLite: no rebuild of ``users``);
console sessions end when idle, at their absolute expiry, on sign-out, and when the user's
role is taken away or the user is disabled; only the SHA-256 of the cookie's token is stored;
role changes are audited."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from control.store import StoreError, devices, open_store, sessions, users
from control.store import console as console_store
from control.store.audit import list_audit
from control.store.db import MIGRATIONS_DIR
from control.store.models import ConsoleSession
from control.store.secretbox import SecretBox
from control.store.values import hash_secret
from test_store import REVISIONS, revisions_after, user_with_references
from test_store import url  # noqa: F401 - the url fixture (SQLite, PostgreSQL)

pytestmark = pytest.mark.timeout(60)
ACTOR = "admin-key:tests"
IDLE = timedelta(minutes=30)


def test_upgrading_to_the_console_migration_keeps_users_and_what_refers_to_them(url: str) -> None:  # noqa: F811
    before_console = REVISIONS[REVISIONS.index("0009") - 1]
    box = SecretBox.generate()
    user_id, device_id, session_id, group_id = user_with_references(url, box)
    with open_store(url, box) as store, store.engine.begin() as conn:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        config.attributes["connection"] = conn
        command.downgrade(config, before_console)
        assert "console_sessions" not in sa.inspect(conn).get_table_names()
        assert "console_role" not in {c["name"] for c in sa.inspect(conn).get_columns("users")}
    with open_store(url, box) as store:
        assert store.migrations_applied == revisions_after(before_console)
        with store.read() as session:
            user = users.get_user(session, user_id)
            assert user.console_role is None and user.upn == "alice@corp.example"
            assert devices.get_device(session, device_id).user_id == user_id
            assert sessions.get_session(session, session_id).user_id == user_id
            assert users.user_group_ids(session, user_id) == [group_id]
            assert console_store.console_admins(session) == 0


@pytest.fixture
def store(tmp_path):  # type: ignore[no-untyped-def]
    with open_store(f"sqlite:///{tmp_path / 'control.db'}", SecretBox.generate()) as store:
        yield store


def test_console_sessions_end_when_idle_expired_signed_out_or_role_taken(store) -> None:  # type: ignore[no-untyped-def]
    t0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    with store.begin() as session:
        user = users.create_user(session, ACTOR, "ada@corp.example")
        with pytest.raises(StoreError, match="no web console role"):
            console_store.create_console_session(session, user, source="192.0.2.1", lifetime=timedelta(hours=1))
        console_store.set_console_role(session, ACTOR, user.id, "admin")
        token, row = console_store.create_console_session(session, user, source="192.0.2.1",
                                                          lifetime=timedelta(hours=1), now=t0)
        assert row.id == hash_secret(token) and token not in row.id and row.csrf_token != token
        assert console_store.console_admins(session) == 1

    def live(at: datetime) -> str:
        with store.read() as session:
            try:
                console_store.live_console_session(session, token, idle=IDLE, now=at)
            except StoreError as exc:
                return str(exc)
            return "live"

    assert live(t0 + timedelta(minutes=29)) == "live"
    assert "without use" in live(t0 + timedelta(minutes=31))
    with store.begin() as session:
        console_store.touch_console_session(session, row.id, t0 + timedelta(minutes=29))
    assert live(t0 + timedelta(minutes=50)) == "live"
    assert "expired" in live(t0 + timedelta(minutes=61))  # absolute, however active
    with store.read() as session:
        with pytest.raises(StoreError, match="not signed in"):
            console_store.live_console_session(session, "forged", idle=IDLE, now=t0)
    # Taking the role away ends the session; so does disabling the user.
    with store.begin() as session:
        token2, _ = console_store.create_console_session(session, user, source="", lifetime=timedelta(hours=1))
        console_store.set_console_role(session, ACTOR, user.id, None)
    with store.read() as session, pytest.raises(StoreError, match="ended"):
        console_store.live_console_session(session, token2, idle=IDLE)
    with store.begin() as session:
        console_store.set_console_role(session, ACTOR, user.id, "reader")
        token3, row3 = console_store.create_console_session(session, user, source="", lifetime=timedelta(hours=1))
        users.disable_user(session, ACTOR, user.id)
    with store.read() as session, pytest.raises(StoreError, match="may no longer use the console"):
        console_store.live_console_session(session, token3, idle=IDLE)
    with store.begin() as session:
        users.enable_user(session, ACTOR, user.id)
        console_store.end_console_session(session, row3.id, user.upn)
    with store.read() as session, pytest.raises(StoreError, match="ended"):
        console_store.live_console_session(session, token3, idle=IDLE)
    with store.begin() as session:
        with pytest.raises(StoreError, match="console role must be one of admin, reader"):
            console_store.set_console_role(session, ACTOR, user.id, "root")
        # Ended sessions are cleared at the next sign-in.
        console_store.create_console_session(session, user, source="", lifetime=timedelta(hours=1))
        assert session.scalar(sa.select(sa.func.count()).select_from(ConsoleSession)) == 1
        roles = [(r.before["console_role"], r.after["console_role"]) for r in list_audit(session, 100)
                 if r.action == "user.console_role"]
        assert roles == [(None, "reader"), ("admin", None), (None, "admin")]
