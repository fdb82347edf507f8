"""Tests of control/store: migrations, schema/model agreement, every change with its audit
record and configuration version, segment validation and overlap errors, registration
tokens, admin keys hashed at rest, and concurrent writers.

Every test runs on SQLite (a file in ``tmp_path``) and on PostgreSQL. The PostgreSQL runs
need ``TEST_POSTGRES_URL`` (a server URL whose role may create databases, e.g.
``postgresql+psycopg://ferryman:PASSWORD@127.0.0.1:5432/postgres``; ``.ci/run`` sets it);
each test gets a fresh database there, dropped afterwards. Without it they are skipped,
except under ``CI=true``, where they fail: CI must not skip a database silently. (The
variable is not ``FERRYMAN_*``: node settings refuse unknown ``FERRYMAN_*`` variables.)
"""

from __future__ import annotations

import functools
import hashlib
import secrets
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy.exc import IntegrityError

from databases import postgres_database

from control.store import (
    Store,
    StoreError,
    admin_keys,
    applications,
    certificates,
    config_version,
    connector_groups,
    database_url,
    dns_suffixes,
    nodes,
    open_store,
    registration_tokens,
)
from control.store.db import MIGRATIONS_DIR
from control.store.audit import list_audit
from control.store.models import Application, AuditRecord, Base, ConnectorGroup, TrafficLog, utcnow
from dataplane.contract.apps import MAX_SEGMENTS
from dataplane.contract.flowrecord import FlowRecord

pytestmark = pytest.mark.timeout(60)

TABLES = {"alembic_version", "connector_groups", "applications", "segments", "connectors", "edges", "dns_suffixes",
          "admin_keys", "audit_records", "registration_tokens", "revocations", "config_version",
          "issued_certificates", "users", "recovery_codes", "user_groups", "group_members", "devices", "sessions",
          "app_assignments", "named_locations", "access_policies", "traffic_logs", "forwarding_profile",
          "web_apps", "console_sessions", "control_keys", "guard_marks", "sign_in_attempts"}
ACTOR = "admin-key:tests"


def _revisions() -> tuple[str, ...]:
    """Every migration revision, oldest first, read from the scripts (so a new migration needs no
    edit here)."""
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return tuple(reversed([script.revision for script in ScriptDirectory.from_config(config).walk_revisions()]))


REVISIONS = _revisions()


def revisions_after(revision: str) -> tuple[str, ...]:
    return REVISIONS[REVISIONS.index(revision) + 1:]


# ---------------------------------------------------------------------------- databases


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'data' / 'control.db'}"
    else:
        with postgres_database() as database:
            yield database


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with postgres_database() as database:
        yield database


@pytest.fixture
def store(url: str) -> Iterator[Store]:
    with open_store(url) as opened:
        yield opened


def seg(destination: str, ports: Any = "1-65535", protocol: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"destination": destination, "ports": ports}
    if protocol is not None:
        out["protocol"] = protocol
    return out


def refused(code: str, call: Callable[[], object]) -> str:
    """Run ``call``, expect a StoreError with ``code``; return its message."""
    with pytest.raises(StoreError) as info:
        call()
    assert info.value.code == code, str(info.value)
    return str(info.value)


def audit(store: Store) -> list[AuditRecord]:
    """Every audit record, oldest first."""
    with store.read() as session:
        return list(reversed(list_audit(session, limit=1000)))


def version(store: Store) -> int:
    with store.read() as session:
        return config_version.config_version(session)


# ---------------------------------------------------------------------------- migrations and schema


def test_migrations_build_the_schema_on_an_empty_database(url: str) -> None:
    with open_store(url) as store:
        assert store.migrations_applied == REVISIONS
        assert set(sa.inspect(store.engine).get_table_names()) == TABLES
        with store.read() as session:
            groups = connector_groups.list_groups(session)
            assert [(g.name, g.is_default) for g in groups] == [("default", True)]
            assert connector_groups.default_group(session).name == "default"
            assert config_version.config_version(session) == 0
            assert list_audit(session) == []


def test_models_and_migrated_schema_agree(store: Store) -> None:
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
        # The comparison does see differences: a column the migrations never made is reported.
        changed = sa.MetaData()
        for table in Base.metadata.tables.values():
            table.to_metadata(changed)
        changed.tables["segments"].append_column(sa.Column("note", sa.String(10)))
        assert [d[0] for d in compare_metadata(context, changed)] == ["add_column"]


def test_reopening_keeps_data_and_does_not_migrate_again(url: str) -> None:
    with open_store(url) as store, store.begin() as session:
        applications.create_application(session, ACTOR, "web", segments=[seg("web.corp.example", "443")])
    with open_store(url) as store:
        assert store.migrations_applied == ()
        with store.read() as session:
            assert [a.name for a in applications.list_applications(session)] == ["web"]
            assert len(connector_groups.list_groups(session)) == 1
            assert config_version.config_version(session) == 1


def test_upgrading_from_0001_records_the_certificates_of_existing_nodes(store: Store, url: str) -> None:
    not_after = datetime(2031, 5, 1, tzinfo=UTC)
    with store.begin() as session:
        connector = nodes.add_connector(session, ACTOR, "conn-old", cert_serial=0xABC, cert_not_after=not_after)
        edge = nodes.add_edge(session, ACTOR, "edge-old", "edge.example:8443", cert_serial=0x4D,
                              cert_not_after=not_after)
    with store.engine.begin() as conn:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        config.attributes["connection"] = conn
        command.downgrade(config, "0001")
        assert "issued_certificates" not in sa.inspect(conn).get_table_names()
    store.close()
    with open_store(url) as upgraded:
        assert upgraded.migrations_applied == revisions_after("0001")
        with upgraded.read() as session:
            assert certificates.node_for_certificate(session, 0xABC).id == connector.id
            assert certificates.node_for_certificate(session, 0x4D).id == edge.id
            assert nodes.get_edge(session, edge.id).tunnels == 0


def user_with_references(url: str, box: Any) -> tuple[Any, Any, Any, Any]:
    """A user (alice@corp.example) with a device, a session and a group membership, stored at ``url``
    sealed with ``box``: (user id, device id, session id, group id)."""
    from control.store import devices, sessions, user_groups, users

    with open_store(url, box) as store, store.begin() as session:
        user = users.create_user(session, ACTOR, "alice@corp.example", password="correct horse battery")
        device = devices.register_device(session, ACTOR, user.id, name="laptop", os="Linux", os_version="6")
        row, _token = sessions.create_session(session, user.id, device_id=device.id)
        group = user_groups.create_user_group(session, ACTOR, "ops")
        user_groups.add_group_member(session, ACTOR, group.id, user.id)
        return user.id, device.id, row.id, group.id


def test_upgrading_to_0006_seals_totp_secrets_and_rehashes_recovery_codes(url: str) -> None:
    """A database of 0005 with a TOTP user (plain secret, SHA-256 recovery codes), a device, a
    session and a group membership: 0006 seals the secret, wraps each unused code's SHA-256
    in argon2id (the codes keep working), keeps no hash of used codes, and keeps every row
    that refers to the user (on SQLite the users table must not be rebuilt: dropping it
    would cascade to them)."""
    from control.store import devices, sessions, totp, users
    from control.store.secretbox import SecretBox

    box = SecretBox.generate()
    user_id, device_id, session_id, _group_id = user_with_references(url, box)
    with open_store(url, box) as store:
        with store.engine.begin() as conn:
            config = Config()
            config.set_main_option("script_location", str(MIGRATIONS_DIR))
            config.attributes["connection"] = conn
            command.downgrade(config, "0005")
            secret = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
            codes = ["0123456789ab", "ba9876543210", "00000000aaaa"]
            conn.execute(sa.text("UPDATE users SET totp_secret = :s, totp_enabled = :t WHERE id = :id"),
                         {"s": secret, "t": True, "id": user_id})
            for n, code in enumerate(codes):
                conn.execute(sa.text("INSERT INTO recovery_codes (user_id, code_hash, used_at) VALUES (:u, :h, :at)"),
                             {"u": user_id, "h": hashlib.sha256(code.encode()).hexdigest(),
                              "at": datetime.now(UTC) if n == 2 else None})
    assert "secrets key" in refused("invalid", lambda: open_store(url))  # it cannot seal without the key
    with open_store(url, box) as store:
        assert store.migrations_applied == revisions_after("0005")
        with store.read() as session:
            user = users.get_user(session, user_id)
            assert user.totp_secret.startswith("fmsb1.") and totp.user_secret(box, user) == secret
            stored = dict(session.execute(sa.text("SELECT code_hash, used_at FROM recovery_codes")).all())
            assert sorted(stored) == ["", *sorted(h for h in stored if h)]
            assert all(h.startswith("$argon2id$") for h in stored if h)
            assert totp.find_recovery_code(session, user_id, "0123-4567-89ab") is not None
            assert totp.find_recovery_code(session, user_id, "ba98-7654-3210") is not None
            assert totp.find_recovery_code(session, user_id, "0000-0000-aaaa") is None  # used before
            # Nothing that refers to the user went with the migration.
            assert devices.get_device(session, device_id).user_id == user_id
            assert sessions.get_session(session, session_id).user_id == user_id
            assert users.user_group_ids(session, user_id) != []
    with open_store(url, box) as store, store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_downgrade_removes_every_table(store: Store) -> None:
    with store.engine.begin() as conn:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        config.attributes["connection"] = conn
        command.downgrade(config, "base")
    assert set(sa.inspect(store.engine).get_table_names()) <= {"alembic_version"}


def test_a_schema_newer_than_the_code_is_refused(url: str) -> None:
    with open_store(url) as store, store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    message = refused("invalid", lambda: open_store(url))
    assert message == ("the database schema is at revision '9999', which this version of Ferryman does not know "
                       "(was it written by a newer version?)")


def test_database_url_from_the_environment_or_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    assert database_url(str(tmp_path), {}) == f"sqlite:///{tmp_path / 'control.db'}"
    assert database_url(str(tmp_path), {"FERRYMAN_DATABASE_URL": " "}) == f"sqlite:///{tmp_path / 'control.db'}"
    pg = "postgresql://ferryman:pw@db.internal:5432/ferryman"
    assert database_url(str(tmp_path), {"FERRYMAN_DATABASE_URL": pg}) == pg


def test_unsupported_database_urls_are_refused() -> None:
    assert "'mysql' is not supported" in refused("invalid", lambda: open_store("mysql://u:p@host/db"))
    assert refused("invalid", lambda: open_store("not a url")) == \
        "FERRYMAN_DATABASE_URL: 'not a url' is not a database URL"


def test_plain_postgresql_urls_use_psycopg(postgres_url: str) -> None:
    plain = postgres_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with open_store(plain) as store:
        assert store.engine.dialect.driver == "psycopg"
        assert store.migrations_applied == REVISIONS


def test_times_are_aware_utc_and_naive_times_are_refused(store: Store) -> None:
    with store.begin() as session:
        app = applications.create_application(session, ACTOR, "web")
    with store.read() as session:
        created = applications.get_application(session, "web").created_at
    assert created.tzinfo is UTC and created == app.created_at
    with pytest.raises(sa.exc.StatementError, match="naive datetime"), store.begin() as session:
        session.add(ConnectorGroup(name="naive", region="", is_default=False, created_at=datetime(2030, 1, 1)))
        session.flush()


# ---------------------------------------------------------------------------- applications and segments


def test_application_create_update_delete_with_audit(store: Store) -> None:
    with store.begin() as session:
        connector_groups.create_group(session, ACTOR, "branch", region="eu-west")
        app = applications.create_application(session, ACTOR, " intranet ", segments=[
            seg("*.Corp.Example.", "443,80,81,8000-8100,8050"), seg("10.20.0.0/16", [22, "3389"], "tcp"),
        ])
        app_id = app.id
    assert app.name == "intranet" and app.kind == "per_app" and app.connector_group.name == "default"
    assert [(s.destination, s.kind, s.ports, s.protocol) for s in app.segments] == [
        ("*.corp.example", "wildcard", "80-81,443,8000-8100", "tcp"),
        ("10.20.0.0/16", "cidr", "22,3389", "tcp"),
    ]
    assert [r.action for r in audit(store)] == ["connector_group.create", "application.create"]
    created = audit(store)[-1]
    assert (created.actor, created.action, created.object_type, created.object_id) == (
        ACTOR, "application.create", "application", str(app_id))
    assert created.before is None
    assert created.after is not None and created.after["name"] == "intranet"
    assert created.after["connector_group"] == "default"
    assert [s["destination"] for s in created.after["segments"]] == ["*.corp.example", "10.20.0.0/16"]

    with store.begin() as session:
        applications.update_application(session, "admin-key:other", "intranet", new_name="intra",
                                        connector_group="branch", segments=[seg("10.20.0.0/16", "22")])
    update = audit(store)[-1]
    assert (update.actor, update.action, update.object_id) == ("admin-key:other", "application.update", str(app_id))
    assert update.before is not None and update.after is not None
    assert (update.before["name"], update.after["name"]) == ("intranet", "intra")
    assert (update.before["connector_group"], update.after["connector_group"]) == ("default", "branch")
    assert [s["ports"] for s in update.before["segments"]] == ["80-81,443,8000-8100", "22,3389"]
    assert [s["ports"] for s in update.after["segments"]] == ["22"]
    assert update.after["updated_at"] > update.before["updated_at"]

    records = len(audit(store))
    with store.begin() as session:  # a change that changes nothing is not one
        applications.update_application(session, ACTOR, "intra", new_name="intra", connector_group="branch",
                                        segments=[seg("10.20.0.0/16", 22)])
    assert len(audit(store)) == records

    with store.begin() as session:
        applications.delete_application(session, ACTOR, "intra")
    deleted = audit(store)[-1]
    assert (deleted.action, deleted.object_id, deleted.after) == ("application.delete", str(app_id), None)
    assert deleted.before is not None and deleted.before["name"] == "intra"
    with store.read() as session:
        assert applications.list_applications(session) == []
        assert session.scalar(sa.select(sa.func.count()).select_from(sa.table("segments"))) == 0


def test_application_refusals(store: Store) -> None:
    with store.begin() as session:
        applications.create_application(session, ACTOR, "web")
    with store.begin() as session:
        assert refused("conflict", lambda: applications.create_application(session, ACTOR, "web")) == \
            "application 'web' already exists"
        assert refused("invalid", lambda: applications.create_application(session, ACTOR, "  ")) == \
            "application name must be a non-empty string"
        assert refused("invalid", lambda: applications.create_application(session, ACTOR, "x", kind="vpn")) == \
            "application kind 'vpn' is not one of per_app, quick_access"
        assert refused("not_found", lambda: applications.create_application(session, ACTOR, "x",
                                                                            connector_group="nope")) == \
            "connector group 'nope' does not exist"
        assert refused("not_found", lambda: applications.update_application(session, ACTOR, "nope", new_name="y")) == \
            "application 'nope' does not exist"
        assert refused("not_found", lambda: applications.delete_application(session, ACTOR, "nope")) == \
            "application 'nope' does not exist"
        assert refused("invalid", lambda: applications.create_application(session, "", "x")) == \
            "every change needs an actor (who makes it)"
    with store.read() as session:
        assert [a.name for a in applications.list_applications(session)] == ["web"]


def test_segment_errors_name_the_app_and_the_segment(store: Store) -> None:
    with store.begin() as session:
        message = refused("invalid", lambda: applications.create_application(
            session, ACTOR, "web", segments=[seg("a.corp.example", "80"), seg("bad..name", "80")]))
        assert message == "app 'web' segment 2: 'bad..name' is not a valid host name or IP address"
        message = refused("invalid", lambda: applications.create_application(session, ACTOR, "web",
                                                                             segments=[seg("10.0.0.0/8", "0")]))
        assert message == "app 'web' segment 1: port 0 out of range 1-65535"
        message = refused("invalid", lambda: applications.create_application(
            session, ACTOR, "web", segments=[seg("10.0.0.1", "80,443"), seg("10.0.0.1", "443,80")]))
        assert message == "app 'web' segment 2 repeats segment 1 (10.0.0.1:80,443/tcp)"
        applications.create_application(session, ACTOR, "web", segments=[seg("10.0.0.1", "80"), seg("10.0.0.2", "80")])
        message = refused("invalid", lambda: applications.add_segment(session, ACTOR, "web",
                                                                      seg("10.0.0.3", "80", "sctp")))
        assert message == "app 'web' segment 3: protocol 'sctp' is not tcp or udp"


def test_add_and_remove_segments_with_audit(store: Store) -> None:
    with store.begin() as session:
        applications.create_application(session, ACTOR, "web", segments=[seg("10.0.0.1", "80")])
        added = applications.add_segment(session, ACTOR, "web", seg("db.corp.example", "5432", "TCP"))
        added_id = added.id
    record = audit(store)[-1]
    assert (record.action, record.object_type, record.object_id, record.before) == (
        "segment.create", "segment", str(added_id), None)
    assert record.after == {"application": "web", "id": added_id, "destination": "db.corp.example",
                            "kind": "hostname", "ports": "5432", "protocol": "tcp"}
    with store.begin() as session:
        applications.remove_segment(session, ACTOR, "web", added_id)
        assert refused("not_found", lambda: applications.remove_segment(session, ACTOR, "web", added_id)) == \
            f"application 'web' has no segment {added_id}"
    record = audit(store)[-1]
    assert (record.action, record.after) == ("segment.delete", None)
    assert record.before is not None and record.before["destination"] == "db.corp.example"
    with store.read() as session:
        assert [s.destination for s in applications.get_application(session, "web").segments] == ["10.0.0.1"]


OVERLAPS = [
    # (segment of app 'a', segment of app 'b', expected refusal of 'b' or None)
    (seg("10.0.0.5", "20-30"), seg("10.0.0.0/24", "22"),
     "segment 10.0.0.0/24:22/tcp of app 'b' overlaps segment 10.0.0.5:20-30/tcp of app 'a'"),
    (seg("10.0.0.0/24", "22"), seg("10.0.0.5", "20-30"),
     "segment 10.0.0.5:20-30/tcp of app 'b' overlaps segment 10.0.0.0/24:22/tcp of app 'a'"),
    (seg("10.0.0.0/24", "22"), seg("10.0.0.5", "23-30"), None),  # same addresses, other ports
    (seg("10.0.0.0/24", "53", "udp"), seg("10.0.0.5", "53"), None),  # other protocol
    (seg("10.0.0.0/24"), seg("10.0.1.0-10.0.1.255"), None),  # adjacent, not overlapping
    (seg("10.0.1.0/24", "443"), seg("10.0.0.250-10.0.1.5", "1-1024"),
     "segment 10.0.0.250-10.0.1.5:1-1024/tcp of app 'b' overlaps segment 10.0.1.0/24:443/tcp of app 'a'"),
    (seg("db.corp.example", "5432"), seg("DB.corp.example.", "5000-6000"),
     "segment db.corp.example:5000-6000/tcp of app 'b' overlaps segment db.corp.example:5432/tcp of app 'a'"),
    (seg("db.corp.example", "5432"), seg("db.corp.example", "5433"), None),
    (seg("*.corp.example", "443"), seg("db.corp.example", "443"),
     "segment db.corp.example:443/tcp of app 'b' overlaps segment *.corp.example:443/tcp of app 'a'"),
    (seg("db.eu.corp.example", "443"), seg("*.corp.example", "80,443"),
     "segment *.corp.example:80,443/tcp of app 'b' overlaps segment db.eu.corp.example:443/tcp of app 'a'"),
    (seg("*.corp.example", "443"), seg("corp.example", "443"), None),  # a wildcard is strictly under its suffix
    (seg("*.corp.example", "443"), seg("*.eu.corp.example", "443"),
     "segment *.eu.corp.example:443/tcp of app 'b' overlaps segment *.corp.example:443/tcp of app 'a'"),
    (seg("*.eu.corp.example", "443"), seg("*.corp.example", "443"),
     "segment *.corp.example:443/tcp of app 'b' overlaps segment *.eu.corp.example:443/tcp of app 'a'"),
    (seg("*.corp.example", "443"), seg("*.corp.example", "443"),
     "segment *.corp.example:443/tcp of app 'b' overlaps segment *.corp.example:443/tcp of app 'a'"),
    (seg("*.corp.example"), seg("*.xcorp.example"), None),  # label boundaries, not string suffixes
    (seg("*.corp.example"), seg("x.example"), None),
    (seg("10.0.0.1"), seg("*.corp.example"), None),  # names are never resolved
    (seg("fd00::/64", "443"), seg("fd00::5", "443"),
     "segment [fd00::5]:443/tcp of app 'b' overlaps segment [fd00::/64]:443/tcp of app 'a'"),
    (seg("0.0.0.0/0"), seg("::/0"), None),  # IPv4 and IPv6 never overlap
]


@pytest.mark.parametrize(("first", "second", "expected"), OVERLAPS)
def test_overlaps_between_per_app_applications(store: Store, first: dict[str, Any], second: dict[str, Any],
                                               expected: str | None) -> None:
    with store.begin() as session:
        applications.create_application(session, ACTOR, "a", segments=[first])
    with store.begin() as session:
        if expected is None:
            applications.create_application(session, ACTOR, "b", segments=[second])
            return
        assert refused("conflict",
                       lambda: applications.create_application(session, ACTOR, "b", segments=[second])) == expected
        applications.create_application(session, ACTOR, "b")
        assert refused("conflict", lambda: applications.add_segment(session, ACTOR, "b", second)) == expected
        assert refused("conflict",
                       lambda: applications.update_application(session, ACTOR, "b", segments=[second])) == expected


def test_the_first_overlapping_segment_is_reported(store: Store) -> None:
    with store.begin() as session:
        applications.create_application(session, ACTOR, "z", segments=[seg("10.0.0.0/16", "8443")])
        applications.create_application(session, ACTOR, "m",
                                        segments=[seg("10.0.0.7", "22"), seg("10.0.0.0/24", "443")])
        message = refused("conflict", lambda: applications.create_application(
            session, ACTOR, "new", segments=[seg("10.1.0.1", "443"), seg("10.0.0.7", "1-10000")]))
    # the new app's first overlapping segment, against the others' segments in app name, then segment order
    assert message == "segment 10.0.0.7:1-10000/tcp of app 'new' overlaps segment 10.0.0.7:22/tcp of app 'm'"


def test_an_application_does_not_overlap_itself(store: Store) -> None:
    with store.begin() as session:
        applications.create_application(session, ACTOR, "a",
                                        segments=[seg("10.0.0.0/24", "443"), seg("10.0.0.5", "443")])
        applications.update_application(session, ACTOR, "a", segments=[seg("10.0.0.0/24", "1-1024")])
        applications.add_segment(session, ACTOR, "a", seg("10.0.0.9", "443"))


def test_quick_access_may_overlap_per_app_applications(store: Store) -> None:
    with store.begin() as session:
        applications.create_application(session, ACTOR, "ssh", segments=[seg("10.0.0.5", "22")])
        applications.create_application(session, ACTOR, "Quick Access", kind="quick_access",
                                        segments=[seg("10.0.0.0/8"), seg("*.corp.example")])
        applications.add_segment(session, ACTOR, "Quick Access", seg("10.0.0.5", "22"))
        applications.create_application(session, ACTOR, "wiki", segments=[seg("wiki.corp.example", "443")])
        applications.update_application(session, ACTOR, "wiki", segments=[seg("wiki.corp.example", "80,443")])
    with store.read() as session:
        qa = applications.get_application(session, "Quick Access")
        assert qa.kind == "quick_access" and len(qa.segments) == 3


def test_at_most_one_quick_access_application(store: Store) -> None:
    with store.begin() as session:
        applications.create_application(session, ACTOR, "qa", kind="quick_access")
        assert refused("conflict",
                       lambda: applications.create_application(session, ACTOR, "qa2", kind="quick_access")) == \
            "there is already a quick access application: 'qa'"
    # The schema enforces it as well.
    with pytest.raises(IntegrityError), store.begin() as session:
        session.add(Application(name="qa3", kind="quick_access",
                                connector_group=connector_groups.default_group(session),
                                created_at=utcnow(), updated_at=utcnow()))
        session.flush()


def test_at_most_500_segments_per_application(store: Store) -> None:
    assert MAX_SEGMENTS == 500
    full = [seg(f"10.0.{n // 250}.{n % 250}", "443") for n in range(MAX_SEGMENTS)]
    with store.begin() as session:
        message = refused("invalid", lambda: applications.create_application(
            session, ACTOR, "big", segments=[*full, seg("10.9.9.9", "443")]))
        assert message == "app 'big' has 501 segments; at most 500 are allowed"
        applications.create_application(session, ACTOR, "big", segments=full)
        message = refused("invalid", lambda: applications.add_segment(session, ACTOR, "big", seg("10.9.9.9", "443")))
        assert message == "app 'big' has 501 segments; at most 500 are allowed"
    with store.read() as session:
        assert len(applications.get_application(session, "big").segments) == 500


def test_a_refused_change_leaves_nothing_behind(store: Store) -> None:
    before = version(store)
    with store.begin() as session:
        applications.create_application(session, ACTOR, "web", segments=[seg("10.0.0.1", "80")])
        # renames first, then fails on the segments: the rename is undone too
        refused("invalid", lambda: applications.update_application(session, ACTOR, "web", new_name="renamed",
                                                                   segments=[seg("bad..name", "80")]))
        dns_suffixes.add_dns_suffix(session, ACTOR, "corp.example")  # the transaction goes on
    with store.read() as session:
        assert [a.name for a in applications.list_applications(session)] == ["web"]
        assert [s.suffix for s in dns_suffixes.list_dns_suffixes(session)] == ["corp.example"]
    assert [r.action for r in audit(store)] == ["application.create", "dns_suffix.create"]
    assert version(store) == before + 2


# ---------------------------------------------------------------------------- groups, DNS, nodes, revocations


def test_connector_groups(store: Store) -> None:
    with store.begin() as session:
        group = connector_groups.create_group(session, ACTOR, "branch", region="eu-west")
        assert refused("conflict", lambda: connector_groups.create_group(session, ACTOR, "branch")) == \
            "connector group 'branch' already exists"
        assert refused("not_found", lambda: connector_groups.get_group(session, "nope")) == \
            "connector group 'nope' does not exist"
        applications.create_application(session, ACTOR, "web", connector_group="branch")
    assert (group.name, group.region, group.is_default) == ("branch", "eu-west", False)
    record = audit(store)[0]
    assert (record.action, record.object_type, record.before) == ("connector_group.create", "connector_group", None)
    assert record.after is not None and record.after["name"] == "branch" and record.after["region"] == "eu-west"
    with store.read() as session:
        assert [g.name for g in connector_groups.list_groups(session)] == ["branch", "default"]
        assert applications.get_application(session, "web").connector_group.name == "branch"


def test_dns_suffixes(store: Store) -> None:
    with store.begin() as session:
        assert dns_suffixes.add_dns_suffix(session, ACTOR, " .Corp.Example. ").suffix == "corp.example"
        assert refused("conflict", lambda: dns_suffixes.add_dns_suffix(session, ACTOR, "corp.example")) == \
            "DNS suffix 'corp.example' already exists"
        for bad in ("10.0.0.1", "*.corp.example", "a..b"):
            assert refused("invalid", functools.partial(dns_suffixes.add_dns_suffix, session, ACTOR, bad)) == \
                f"DNS suffix {bad!r} is not a domain name"
        assert refused("invalid", lambda: dns_suffixes.add_dns_suffix(session, ACTOR, ".")) == \
            "DNS suffix '.' must be a non-empty domain name"
    with store.begin() as session:
        dns_suffixes.remove_dns_suffix(session, ACTOR, "corp.example")
        assert refused("not_found", lambda: dns_suffixes.remove_dns_suffix(session, ACTOR, "corp.example")) == \
            "DNS suffix 'corp.example' does not exist"
    assert [(r.action, r.before is None, r.after is None) for r in audit(store)] == [
        ("dns_suffix.create", True, False), ("dns_suffix.delete", False, True)]


def test_connectors_and_edges_with_heartbeats(store: Store) -> None:
    not_after = datetime(2031, 1, 1, tzinfo=UTC)
    with store.begin() as session:
        connector_groups.create_group(session, ACTOR, "branch")
        connector = nodes.add_connector(session, "registration", "conn-a", cert_serial=0xABC, cert_not_after=not_after)
        other = nodes.add_connector(session, "registration", "conn-b", group="branch")
        edge = nodes.add_edge(session, "registration", "edge-1", "edge.example.com:8443", cert_serial=77)
    assert connector.group.name == "default" and other.group.name == "branch"
    assert connector.cert_serial == "abc" and connector.cert_not_after == not_after and edge.cert_serial == "4d"
    assert [r.action for r in audit(store)][-3:] == ["connector.create", "connector.create", "edge.create"]

    now = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
    assert connector.status(now, heartbeat_interval=10) == "inactive"  # never seen
    with store.begin() as session:
        nodes.record_heartbeat(session, "connector", connector.id, version="1.2.3",
                               external_addr="198.51.100.7:40000", internal_addr="10.0.0.9", tunnels=2,
                               active_flows=17, config_version=5, now=now)
        nodes.record_heartbeat(session, "edge", edge.id, version="1.2.3", now=now)
        assert refused("not_found", lambda: nodes.record_heartbeat(
            session, "connector", "nope", version="", now=now)) == "connector 'nope' does not exist"
        assert refused("invalid", lambda: nodes.record_heartbeat(
            session, "edge", edge.id, version="", tunnels=-1, now=now)) == \
            "heartbeat tunnels must be an integer from 0 to 2147483647"
    with store.read() as session:
        seen = nodes.get_connector(session, connector.id)
        assert (seen.version, seen.external_addr, seen.internal_addr, seen.last_seen, seen.tunnels,
                seen.active_flows, seen.config_version) == ("1.2.3", "198.51.100.7:40000", "10.0.0.9", now, 2, 17, 5)
        assert seen.status(now + timedelta(seconds=30), heartbeat_interval=10) == "active"
        assert seen.status(now + timedelta(seconds=31), heartbeat_interval=10) == "inactive"
        assert nodes.get_edge(session, edge.id).status(now + timedelta(seconds=5), heartbeat_interval=10) == "active"
        assert [c.name for c in nodes.list_connectors(session)] == ["conn-a", "conn-b"]
        assert [e.address for e in nodes.list_edges(session)] == ["edge.example.com:8443"]


def test_certificate_revocations(store: Store) -> None:
    serial = 0x1F2E3D4C5B6A79880123456789ABCDEF01234567  # 160 bits, the largest X.509 allows
    with store.begin() as session:
        certificates.revoke_certificate(session, ACTOR, serial, reason="laptop lost")
        assert refused("conflict", lambda: certificates.revoke_certificate(session, ACTOR, serial)) == \
            f"certificate {serial:x} is already revoked"
        assert refused("invalid", lambda: certificates.revoke_certificate(session, ACTOR, -1)) == \
            "certificate serial -1 must be a positive integer"
    with store.read() as session:
        assert certificates.is_revoked(session, serial) and not certificates.is_revoked(session, serial + 1)
        assert [(r.serial, r.reason) for r in certificates.list_revocations(session)] == \
            [(f"{serial:x}", "laptop lost")]
    record = audit(store)[-1]
    assert (record.action, record.object_type, record.object_id) == ("certificate.revoke", "certificate", f"{serial:x}")


def test_superseded_certificates_are_revoked_once_the_new_one_was_used_for_the_grace(store: Store) -> None:
    """On both databases: the certificates a renewal replaced are revoked once the node has used
    its current one (heartbeats) for the grace, never before, never the current one, whatever
    the order of issue times (control-plane processes sign with their own clocks)."""
    soon, start, day = datetime(2099, 1, 1, tzinfo=UTC), datetime.now(UTC), timedelta(days=1)
    with store.begin() as session:
        node = nodes.add_connector(session, ACTOR, "c1", cert_serial=0xC1, cert_not_after=soon)
        node_id = node.id
        nodes.renew_certificate(session, node, 0xC2, soon, start + timedelta(minutes=1))
        nodes.renew_certificate(session, node, 0xC3, soon, start + timedelta(minutes=2))
        # a renewal whose answer was lost: the node goes on with c3's predecessor, never uses c3
        assert certificates.retire_superseded(session, day, start + timedelta(days=30)) == []
        certificates.mark_used(session, 0xC3, start + timedelta(hours=1))
        certificates.mark_used(session, 0xC3, start + timedelta(hours=5))  # the first use counts
        assert certificates.retire_superseded(session, day, start + timedelta(hours=24)) == []
    before = version(store)
    with store.begin() as session:
        assert certificates.retire_superseded(session, day, start + timedelta(hours=26)) == ["c1", "c2"]
        assert certificates.retire_superseded(session, day, start + timedelta(hours=26)) == []
    assert version(store) > before
    with store.begin() as session:
        # The next renewal is signed by a process whose clock is a day behind: still the current one.
        nodes.renew_certificate(session, nodes.get_connector(session, node_id), 0xC4, soon, start - day)
        certificates.mark_used(session, 0xC4, start + timedelta(hours=27))
        assert [(old.serial, now.serial) for old, now in certificates.superseded(session, start)] == [("c3", "c4")]
        assert certificates.retire_superseded(session, day, start + timedelta(hours=52)) == ["c3"]
    with store.read() as session:
        assert certificates.revoked_serials(session) == {"c1", "c2", "c3"}
        revocation = [r for r in certificates.list_revocations(session) if r.serial == "c3"][0]
        assert revocation.reason.startswith("superseded: its node has used certificate c4 since ")


def test_configuration_changes_bump_the_version(store: Store) -> None:
    steps: list[tuple[Callable[[Any], object], int]] = [
        (lambda s: connector_groups.create_group(s, ACTOR, "branch"), 1),
        (lambda s: applications.create_application(s, ACTOR, "web", segments=[seg("10.0.0.1", "80")]), 1),
        (lambda s: applications.add_segment(s, ACTOR, "web", seg("10.0.0.2", "80")), 1),
        (lambda s: applications.update_application(s, ACTOR, "web", connector_group="branch"), 1),
        (lambda s: applications.update_application(s, ACTOR, "web", connector_group="branch"), 0),  # no change
        (lambda s: dns_suffixes.add_dns_suffix(s, ACTOR, "corp.example"), 1),
        (lambda s: nodes.add_connector(s, ACTOR, "c1"), 1),
        (lambda s: certificates.revoke_certificate(s, ACTOR, 5), 1),
        (lambda s: applications.delete_application(s, ACTOR, "web"), 1),
        (lambda s: admin_keys.create_admin_key(s, ACTOR, "ops"), 0),  # not configuration
        (lambda s: registration_tokens.create_registration_token(s, ACTOR, "connector"), 0),
    ]
    expected = version(store)
    assert expected == 0
    for step, bump in steps:
        with store.begin() as session:
            step(session)
        expected += bump
        assert version(store) == expected
    with store.begin() as session:  # refused: no bump
        refused("conflict", lambda: connector_groups.create_group(session, ACTOR, "branch"))
    assert version(store) == expected


# ---------------------------------------------------------------------------- admin keys and tokens


def test_admin_keys_are_hashed_at_rest(store: Store, url: str) -> None:
    with store.begin() as session:
        key, plaintext = admin_keys.create_admin_key(session, ACTOR, "ops")
    assert plaintext.startswith("fmk_") and len(plaintext) > 40
    dumped = []
    with store.read() as session:
        for table in Base.metadata.sorted_tables:
            dumped += [repr(tuple(row)) for row in session.execute(sa.select(table))]
    assert dumped and not any(plaintext in row or plaintext[4:] in row for row in dumped)
    if url.startswith("sqlite"):
        files = list(Path(sa.make_url(url).database or "").parent.glob("control.db*"))
        assert files and all(plaintext[4:].encode() not in f.read_bytes() for f in files)
    record = audit(store)[-1]
    assert record.action == "admin_key.create" and record.after is not None and "key_hash" not in record.after

    now = datetime(2030, 1, 1, tzinfo=UTC)
    with store.begin() as session:
        found = admin_keys.verify_admin_key(session, plaintext, now=now)
        assert found is not None and found.id == key.id and found.last_used_at == now
        assert admin_keys.verify_admin_key(session, plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")) is None
        assert admin_keys.verify_admin_key(session, "") is None
        assert refused("conflict", lambda: admin_keys.create_admin_key(session, ACTOR, "ops")) == \
            "admin key 'ops' already exists"
    with store.begin() as session:
        admin_keys.revoke_admin_key(session, ACTOR, "ops")
        assert admin_keys.verify_admin_key(session, plaintext) is None
        assert "admin key 'ops' was already revoked at" in refused(
            "conflict", lambda: admin_keys.revoke_admin_key(session, ACTOR, "ops"))
        assert refused("not_found", lambda: admin_keys.revoke_admin_key(session, ACTOR, "nope")) == \
            "admin key 'nope' does not exist"
    revoked = audit(store)[-1]
    assert revoked.action == "admin_key.revoke" and revoked.before is not None and revoked.after is not None
    assert revoked.before["revoked_at"] is None and revoked.after["revoked_at"] is not None


def test_registration_tokens_are_single_use(store: Store) -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    with store.begin() as session:
        connector_groups.create_group(session, ACTOR, "branch")
        token, plaintext = registration_tokens.create_registration_token(session, ACTOR, "connector", group="branch",
                                                                         ttl=timedelta(hours=1), now=now)
        _, default_token = registration_tokens.create_registration_token(session, ACTOR, "connector", now=now)
    assert plaintext.startswith("fmr_") and token.expires_at == now + timedelta(hours=1)
    with store.begin() as session:
        used = registration_tokens.consume_registration_token(session, plaintext, "connector", used_by="connector:c1",
                                                              now=now + timedelta(minutes=59))
        assert used.group is not None and used.group.name == "branch"
        assert registration_tokens.consume_registration_token(
            session, default_token, "connector", used_by="connector:c2",
            now=now).group == connector_groups.default_group(session)
    with store.begin() as session:
        message = refused("token_used", lambda: registration_tokens.consume_registration_token(
            session, plaintext, "connector", used_by="connector:c3", now=now + timedelta(minutes=59)))
    assert message == "registration token was already used at 2030-01-01 00:59:00 UTC by connector:c1"
    record = audit(store)[-2]
    assert (record.actor, record.action, record.object_id) == ("connector:c1", "registration_token.use", str(token.id))
    assert record.after is not None and "token_hash" not in record.after


def test_registration_token_refusals_are_distinct(store: Store) -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    with store.begin() as session:
        _, expiring = registration_tokens.create_registration_token(session, ACTOR, "connector",
                                                                    ttl=timedelta(minutes=10), now=now)
        _, edge_token = registration_tokens.create_registration_token(session, ACTOR, "edge", now=now)
    with store.begin() as session:
        expired = refused("token_expired", lambda: registration_tokens.consume_registration_token(
            session, expiring, "connector", used_by="c", now=now + timedelta(minutes=10)))
        unknown = refused("token_unknown", lambda: registration_tokens.consume_registration_token(
            session, "fmr_" + secrets.token_urlsafe(32), "connector", used_by="c", now=now))
        wrong_role = refused("invalid", lambda: registration_tokens.consume_registration_token(
            session, edge_token, "connector", used_by="c", now=now))
        assert refused("invalid", lambda: registration_tokens.create_registration_token(session, ACTOR, "client")) == \
            "registration token role 'client' is not one of connector, edge"
        assert refused("invalid", lambda: registration_tokens.create_registration_token(session, ACTOR, "edge",
                                                                                        group="default")) == \
            "an edge registration token has no connector group"
        assert refused("invalid", lambda: registration_tokens.create_registration_token(
            session, ACTOR, "connector", ttl=timedelta(0))) == "registration token lifetime 0:00:00 must be positive"
    assert expired == "registration token expired at 2030-01-01 00:10:00 UTC"
    assert unknown == "registration token is not known (mistyped, or never issued here)"
    assert wrong_role == "registration token is for an edge, not for a connector"
    with store.begin() as session:  # refusals used nothing up
        assert registration_tokens.consume_registration_token(session, expiring, "connector", used_by="c",
                                                              now=now + timedelta(minutes=9)).used_by == "c"


# ---------------------------------------------------------------------------- concurrent writers


def _race(store: Store, workers: int, work: Callable[[Any, int], object]) -> list[str]:
    """Run ``work(session, n)`` in ``workers`` threads at once, each in its own transaction;
    return ``ok``, the StoreError code or the unexpected exception of each worker, sorted."""
    barrier = threading.Barrier(workers)
    results: list[str] = [""] * workers

    def run(n: int) -> None:
        barrier.wait(timeout=10)
        try:
            with store.begin() as session:
                work(session, n)
            results[n] = "ok"
        except StoreError as exc:
            results[n] = exc.code
        except Exception as exc:  # reported in the assertion, not lost in the thread
            results[n] = repr(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return sorted(results)


def test_a_token_used_concurrently_succeeds_once(store: Store) -> None:
    with store.begin() as session:
        _, plaintext = registration_tokens.create_registration_token(session, ACTOR, "connector")
    results = _race(store, 4, lambda s, n: registration_tokens.consume_registration_token(s, plaintext, "connector",
                                                                                          used_by=f"connector:{n}"))
    assert results == ["ok", "token_used", "token_used", "token_used"]


def test_concurrent_overlapping_applications_one_wins(store: Store) -> None:
    results = _race(store, 4, lambda s, n: applications.create_application(s, ACTOR, f"app-{n}",
                                                                           segments=[seg("10.0.0.0/24", "443")]))
    assert results == ["conflict", "conflict", "conflict", "ok"]
    assert version(store) == 1


def test_traffic_records_are_stored_as_sent(store: Store) -> None:
    """A batch goes in through the driver's executemany with the columns' own conversions:
    what comes back is what was sent (times UTC, over-long text cut, missing end kept empty,
    the sending edge's name instead of the record's), on both databases, and the stored times
    order and filter exactly as the store's own queries bind them (to the microsecond)."""
    from control.store import traffic

    t0 = 1_765_000_000.123456
    web = {"connection_id": "c1", "transaction_id": "t1", "start": t0, "end": t0 + 0.5, "duration_ms": 500,
           "user_id": "u1", "upn": "alice@corp.example", "source_ip": "192.0.2.7", "destination_fqdn": "wiki.example",
           "destination_port": 443, "transport": "tcp", "application": "wiki", "application_kind": "web",
           "action": "allow", "edge": "spoofed", "bytes_sent": 10, "bytes_received": 1100, "http_method": "GET",
           "http_host": "wiki.example", "http_path": "/wiki/Main", "http_status": 200, "user_agent": "curl/" + "8" * 1000}
    flow = {"connection_id": "c2", "transaction_id": "t2", "start": t0 + 1, "destination_fqdn": "db.internal",
            "destination_port": 5432, "transport": "tcp", "action": "deny", "reason_code": "not_assigned"}
    with store.begin() as session:
        batch = msgspec.convert([web, flow, dict(web, connection_id="c3")], list[FlowRecord])
        assert traffic.insert_records(session, "edge-1", batch) == 3
    with store.begin() as session:
        rows = traffic.records_after(session, traffic.TrafficFilter(), 0)
        by_id = {r.connection_id: r for r in rows}
        assert sorted(by_id) == ["c1", "c2", "c3"]
        w, f = by_id["c1"], by_id["c2"]
        assert w.edge == f.edge == "edge-1"
        assert w.start == datetime.fromtimestamp(t0, UTC) and w.end == datetime.fromtimestamp(t0 + 0.5, UTC)
        assert w.start.tzinfo is not None and f.end is None
        assert w.http_status == 200 and w.bytes_received == 1100 and w.upn == "alice@corp.example"
        limit = TrafficLog.__table__.c.user_agent.type.length
        assert limit < 1000 and w.user_agent == ("curl/" + "8" * 1000)[:limit] and w.http_path == "/wiki/Main"
        assert f.reason_code == "not_assigned" and f.http_status == 0 and f.device_id == ""  # column defaults
        later = traffic.records_after(session, traffic.TrafficFilter(since=datetime.fromtimestamp(t0 + 0.000001, UTC)), 0)
        assert [r.connection_id for r in later] == ["c2"]
        first = traffic.records_after(session, traffic.TrafficFilter(until=datetime.fromtimestamp(t0 + 0.000001, UTC)), 0)
        assert sorted(r.connection_id for r in first) == ["c1", "c3"]


@settings(max_examples=3000, deadline=None)
@given(st.one_of(st.floats(min_value=0, max_value=32503679999.999, allow_nan=False),
                 st.integers(min_value=1_700_000_000_000_000, max_value=1_900_000_000_000_000).map(lambda us: us / 1e6),
                 st.integers(min_value=1_700_000_000_000_000, max_value=1_900_000_000_000_000)
                 .map(lambda us: us / 1e6 + 5e-7)))
def test_a_stored_time_is_written_as_sqlites_text_form_of_its_datetime(value: float) -> None:
    """Record times go to SQLite as text made without a datetime; it must be exactly the text of
    the datetime the column type would bind (microseconds rounded half to even, carried into the
    next second), or the store's time filters would miss records by a microsecond."""
    from control.store import traffic

    assert traffic._time_text(value) == datetime.fromtimestamp(value, UTC).isoformat(" ", "microseconds")[:26]


def test_traffic_records_with_nul_characters_are_stored_with_the_rest_of_their_batch(store: Store) -> None:
    """A client chooses text that reaches a record (its HELLO's software, an OPEN's host, a web
    request's user agent), and PostgreSQL text cannot hold NUL: such a record failed its whole
    batch, which the edge then sent again for ever. NUL is stored as U+FFFD, on both databases,
    and the batch's other records go in unchanged."""
    from control.store import traffic

    t0 = 1_765_000_000.0
    poisoned = {"connection_id": "n1", "transaction_id": "t1", "start": t0, "client_version": "ferryman\x00evil",
                "destination_fqdn": "\x00db.internal", "user_agent": "a\x00" * 3, "action": "deny"}
    clean = {"connection_id": "n2", "transaction_id": "t2", "start": t0 + 1, "destination_fqdn": "db.internal",
             "client_version": "ferryman 1.0"}
    with store.begin() as session:
        batch = msgspec.convert([clean, poisoned], list[FlowRecord])
        assert traffic.insert_records(session, "edge-\x00", batch) == 2
    with store.begin() as session:
        by_id = {r.connection_id: r for r in traffic.records_after(session, traffic.TrafficFilter(), 0)}
    assert (by_id["n1"].client_version, by_id["n1"].destination_fqdn, by_id["n1"].user_agent) == (
        "ferryman\ufffdevil", "\ufffddb.internal", "a\ufffd" * 3)
    assert by_id["n1"].edge == by_id["n2"].edge == "edge-\ufffd"
    assert (by_id["n2"].client_version, by_id["n2"].destination_fqdn) == ("ferryman 1.0", "db.internal")
