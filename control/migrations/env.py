"""Alembic environment of the control-plane store.

Migrations run from code (``control.store.db.migrate``), which passes an open connection in
``config.attributes["connection"]``; there is no ``alembic.ini``. Revisions are written by
hand in ``versions/`` and must build exactly what ``control/store/models.py`` describes
(``tests/test_store.py`` compares the two on SQLite and PostgreSQL).
"""

from alembic import context

from control.store.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("control/migrations are run by control.store.db.migrate(engine), not by the alembic command")

# Batch mode lets later revisions alter tables on SQLite (which has only a limited ALTER TABLE).
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
