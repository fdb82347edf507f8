"""Opening the control plane's database: which one, engine set-up, migrations, transactions.

``FERRYMAN_DATABASE_URL`` names the database (the `database_url` setting of dataplane.basics.settings):

- unset or empty: SQLite, the file ``control.db`` in the data directory (nothing to install);
- ``postgresql://USER:PASSWORD@HOST:PORT/DB`` (or ``postgresql+psycopg://...``): PostgreSQL
  through psycopg 3, for several control-plane nodes sharing one database.

``open_store(url, box)`` creates the engine, brings the schema to the newest Alembic revision
(``control/migrations``, run from code: no ``alembic.ini`` needed; concurrent openers wait
for each other) and returns a ``Store``. ``box`` (``secretbox.SecretBox``, the data
directory's ``secrets.key``) seals the secrets the store keeps (TOTP secrets); a migration
that seals existing ones needs it (``store.box``). Write through ``with store.begin() as session:``
(commits at the end, rolls back on an exception) and the functions of the resource modules
(``control.store.applications``, ``control.store.users``, ...).

SQLite is opened in WAL mode with foreign keys on. The database holds password hashes and
sealed secrets, so ``control.db`` is made mode 0600 before SQLite first opens it (SQLite
gives its ``-wal``, ``-shm`` and ``-journal`` files the database file's mode), whatever the
directory's mode and the process umask; files left wider by an older version are set to
0600 when the store opens, and the ``-wal``/``-shm`` files again on every new connection. Python's sqlite3 module would start
transactions only at the first write; here every transaction starts with an explicit
``BEGIN``, and ``Store.begin()`` transactions with ``BEGIN IMMEDIATE``, which takes the write
lock up front: writers queue (busy timeout) instead of failing when they upgrade a read.
"""

from __future__ import annotations

import os
import stat
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
from .secretbox import SecretBox

DATABASE_URL_VARIABLE = "FERRYMAN_DATABASE_URL"
DATABASE_FILE = "control.db"
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
SQLITE_BUSY_TIMEOUT = 30.0  # seconds a SQLite writer waits for the write lock
_WRITE_OPTION = "ferryman_write"
_MIGRATION_LOCK_KEY = 0x4652594D  # PostgreSQL advisory lock held while migrating ("FRYM")
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


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


def _private(path: str) -> None:
    """Make ``path`` mode 0600 if it exists (refusing a symbolic link in its place)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreError("invalid", f"cannot open the database file {path}: {exc.strerror}") from None
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != 0o600:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _private_in_use(path: str) -> None:
    """Make ``path`` mode 0600 if it exists, without opening it: SQLite may hold it open in this
    process, and closing any descriptor of a file releases every POSIX lock the process holds on
    it. Opening ``-shm`` here released SQLite's lock that tells other processes the database is
    in use; the next one to open it (a backup, the sqlite3 shell) then reset the wal-index under
    the control plane's memory map of it, which died of SIGBUS."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise StoreError("invalid", f"the database file {path} is a symbolic link")
    if stat.S_IMODE(info.st_mode) != 0o600:
        os.chmod(path, 0o600)


def private_database_files(database: str) -> None:
    """Create the SQLite file ``database`` with mode 0600 if it does not exist, and set it and
    its side files (``-wal``, ``-shm``, ``-journal``) that exist to 0600."""
    try:
        fd = os.open(database, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError("invalid", f"cannot create the database file {database}: {exc.strerror}") from None
    os.close(fd)
    for suffix in ("", *SQLITE_SIDE_FILES):
        _private(database + suffix)


def _create_engine(url: URL) -> Engine:
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    database = url.database if url.database and url.database != ":memory:" else None
    if database is not None:
        Path(database).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        private_database_files(database)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT})

    @event.listens_for(engine, "connect")
    def configure(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # no implicit transactions: "begin" below starts them
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()
        if database is not None:  # WAL mode is on: its files exist now (held open by SQLite: not opened here)
            for suffix in SQLITE_SIDE_FILES[:2]:
                _private_in_use(database + suffix)

    @event.listens_for(engine, "begin")
    def begin(connection: Connection) -> None:
        write = connection.get_execution_options().get(_WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def _alembic_config(connection: Connection, box: SecretBox | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    config.attributes["secret_box"] = box  # for migrations that seal stored secrets (0006)
    return config


def migrate(engine: Engine, box: SecretBox | None = None) -> tuple[str, ...]:
    """Upgrade the schema to the newest revision; return the revisions applied, oldest first."""
    with engine.execution_options(**{_WRITE_OPTION: True}).begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
        config = _alembic_config(connection, box)
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

    def __init__(self, engine: Engine, migrations_applied: tuple[str, ...], box: SecretBox | None = None) -> None:
        self.engine = engine
        # Seals the secrets stored here (``control.store.secretbox``); None when opened without a key.
        self.box = box
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


def open_store(url: str, box: SecretBox | None = None) -> Store:
    """Open (for SQLite: create) the database at ``url`` and migrate it to the newest schema.
    ``box`` seals stored secrets (the control plane passes ``SecretBox.open(data_dir)``); a
    database holding secrets that a pending migration must seal cannot be upgraded without it."""
    engine = _create_engine(_parse_url(url))
    try:
        applied = migrate(engine, box)
    except BaseException:
        engine.dispose()
        raise
    return Store(engine, applied, box)
