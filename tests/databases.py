"""Databases for the tests: a new, empty PostgreSQL database on the ``TEST_POSTGRES_URL`` server.

``TEST_POSTGRES_URL`` is a server URL whose role may create databases, e.g.
``postgresql+psycopg://USER:PASSWORD@HOST:PORT/postgres``. Without it the tests that need
PostgreSQL are skipped, or fail when ``CI=true``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa

POSTGRES_VARIABLE = "TEST_POSTGRES_URL"


@contextmanager
def postgres_database(prefix: str = "ferryman_test", needed_by: str = "PostgreSQL store tests") -> Iterator[str]:
    """The URL of a new, empty database named ``<prefix>_<random>``; dropped afterwards.

    ``needed_by`` names the tests in the skip (or, with ``CI=true``, failure) message when
    ``TEST_POSTGRES_URL`` is not set."""
    server = os.environ.get(POSTGRES_VARIABLE, "").strip()
    if not server:
        reason = (f"{needed_by} need {POSTGRES_VARIABLE}=postgresql+psycopg://USER:PASSWORD@HOST:PORT/"
                  f"postgres (a role allowed to create databases; .ci/run sets it up)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and {POSTGRES_VARIABLE} is not set: {reason}")
        pytest.skip(reason)
    server_url = sa.make_url(server).set(drivername="postgresql+psycopg")
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{secrets.token_hex(6)}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield server_url.set(database=name).render_as_string(hide_password=False)
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
