"""Telling every control-plane node sharing one PostgreSQL database that the configuration changed.

Several ``ferryman control`` processes may serve one PostgreSQL database. A change made
through any of them must reach the nodes long-polling every other one within a second or
two, without each process polling the database in a tight loop:

- ``announce(session)``: called in the transaction that bumps the configuration version
  (``config_version.bump``). On PostgreSQL it runs ``pg_notify('ferryman_config', '')``,
  which the server delivers to every listener when (and only when) the transaction commits;
  on SQLite it does nothing (one host: the follower's short poll of the one-row version
  table is the in-process path).
- ``ChangeListener``: one dedicated connection per control-plane process that ``LISTEN``s on
  that channel and sets an ``asyncio.Event`` for each notification. When the connection
  breaks (database restart, failover) it reconnects with a growing pause and sets the event
  once connected again, since notifications sent meanwhile were lost: the follower then
  re-reads the version and catches up. ``connected`` says whether it listens right now.

``listens(store)`` says whether the store's database can notify (PostgreSQL); the follower
(``control.snapshot.follow_store``) then re-checks the version only every
``FALLBACK_INTERVAL`` seconds besides the notifications, as a safety net.
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy import text
from sqlalchemy.orm import Session

from .db import Store

CHANNEL = "ferryman_config"
FALLBACK_INTERVAL = 30.0  # seconds between version checks when notifications arrive (safety net)
RETRY_MIN = 0.5  # seconds before the first reconnect of a broken listener
RETRY_MAX = 10.0  # most seconds between reconnects

log = logging.getLogger("ferryman.control.notify")


def listens(store: Store) -> bool:
    """Whether ``store``'s database delivers change notifications (PostgreSQL)."""
    return store.engine.dialect.name == "postgresql"


def announce(session: Session) -> None:
    """Notify every listening control-plane node once this transaction commits (PostgreSQL only)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL})


def _conninfo(store: Store) -> str:
    """The store's URL as libpq connection text (psycopg takes ``postgresql://``, not SQLAlchemy's driver name)."""
    return store.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


class ChangeListener:
    """Sets ``changed`` whenever another (or this) node commits a configuration change (module doc)."""

    def __init__(self, store: Store) -> None:
        if not listens(store):
            raise ValueError("change notifications need PostgreSQL")
        self._conninfo = _conninfo(store)
        self.changed = asyncio.Event()
        self.connected = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start listening (from the event loop); returns at once."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="ferryman-config-listener")

    async def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the first ``LISTEN`` to be in place; return whether it is."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.connected and loop.time() < deadline:
            await asyncio.sleep(0.02)
        return self.connected

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        import psycopg  # PostgreSQL only: SQLite control planes never load the driver

        pause = RETRY_MIN
        failing = False
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True, connect_timeout=10)
                try:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.connected = True
                    pause = RETRY_MIN
                    if failing:
                        log.info("listening for configuration changes again")
                        failing = False
                    self.changed.set()  # whatever was announced while not listening: re-read once
                    async for _notice in conn.notifies():
                        self.changed.set()
                finally:
                    self.connected = False
                    await conn.close()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the database is down or refusing: retry
                if not failing:
                    log.warning("cannot listen for configuration changes (%s); retrying, and checking the "
                                "version every %g s meanwhile", exc, RETRY_MAX)
                    failing = True
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX)
