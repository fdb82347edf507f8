"""Opening the control plane's database: which one, engine set-up, migrations, transactions.

``FERRYMAN_DATABASE_URL`` names the database (the `database_url` setting of dataplane.basics.settings):

- unset or empty: SQLite, the file ``control.db`` in the data directory (nothing to install);
- ``postgresql://USER:PASSWORD@HOST:PORT/DB`` (or ``postgresql+psycopg://...``): PostgreSQL
  through psycopg 3, for several control-plane nodes sharing one database.

``open_store(url)`` creates the engine, brings the schema to the newest Alembic revision
(``control/migrations``, run from code: no ``alembic.ini`` needed; concurrent openers wait
for each other) and returns a ``Store``. Write through ``with store.begin() as session:``
(commits at the end, rolls back on an exception) and the functions of the resource modules
(``control.store.applications``, ``control.store.users``, ...).

SQLite is opened in WAL mode with foreign keys on. Python's sqlite3 module would start
transactions only at the first write; here every transaction starts with an explicit
``BEGIN``, and ``Store.begin()`` transactions with ``BEGIN IMMEDIATE``, which takes the write
lock up front: writers queue (busy timeout) instead of failing when they upgrade a read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from .errors import StoreError

DATABASE_URL_VARIABLE = "FERRYMAN_DATABASE_URL"
DATABASE_FILE = "control.db"
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
SQLITE_BUSY_TIMEOUT = 30.0  # seconds a SQLite writer waits for the write lock
_WRITE_OPTION = "ferryman_write"
_MIGRATION_LOCK_KEY = 0x4652594D  # PostgreSQL advisory lock held while migrating ("FRYM")


def database_url(data_dir: str, env: Mapping[str, str] | None = None) -> str:
    """``FERRYMAN_DATABASE_URL`` from ``env`` (default: the process environment), else SQLite in ``data_dir``."""
    environ = os.environ if env is None else env
    url = environ.get(DATABASE_URL_VARIABLE, "").strip()
    if url:
        return url
    return f"sqlite:///{os.path.abspath(os.path.join(data_dir, DATABASE_FILE))}"


def _parse_url(url: str) -> URL:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StoreError("invalid", f"{DATABASE_URL_VARIABLE}: {url!r} is not a database URL") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername not in ("sqlite", "sqlite+pysqlite", "postgresql+psycopg"):
        raise StoreError("invalid", f"{DATABASE_URL_VARIABLE}: database {parsed.drivername!r} is not supported "
                                    f"(use sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DB)")
    return parsed


def _create_engine(url: URL) -> Engine:
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT})

    @event.listens_for(engine, "connect")
    def configure(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # no implicit transactions: "begin" below starts them
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def begin(connection: Connection) -> None:
        write = connection.get_execution_options().get(_WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def _alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def migrate(engine: Engine) -> tuple[str, ...]:
    """Upgrade the schema to the newest revision; return the revisions applied, oldest first."""
    with engine.execution_options(**{_WRITE_OPTION: True}).begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
        config = _alembic_config(connection)
        script = ScriptDirectory.from_config(config)
        current = MigrationContext.configure(connection).get_current_revision()
        head = script.get_current_head()
        if current == head:
            return ()
        try:
            pending = [revision.revision for revision in script.iterate_revisions(head, current or "base")]
        except RevisionError:
            raise StoreError("invalid", f"the database schema is at revision {current!r}, which this version of "
                                        f"Ferryman does not know (was it written by a newer version?)") from None
        command.upgrade(config, "head")
    return tuple(reversed(pending))


class Store:
    """An open database at the newest schema, and its transactions."""

    def __init__(self, engine: Engine, migrations_applied: tuple[str, ...]) -> None:
        self.engine = engine
        # The migrations this opening applied, oldest first (empty when the schema was current).
        self.migrations_applied = migrations_applied
        self._writer = sessionmaker(engine.execution_options(**{_WRITE_OPTION: True}), expire_on_commit=False)
        self._reader = sessionmaker(engine, expire_on_commit=False)

    @contextmanager
    def begin(self) -> Iterator[Session]:
        """A write transaction: committed when the block ends, rolled back if it raises."""
        with self._writer.begin() as session:
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only transaction (one consistent view); never committed."""
        with self._reader() as session:
            yield session

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_store(url: str) -> Store:
    """Open (for SQLite: create) the database at ``url`` and migrate it to the newest schema."""
    engine = _create_engine(_parse_url(url))
    try:
        applied = migrate(engine)
    except BaseException:
        engine.dispose()
        raise
    return Store(engine, applied)
