"""The control plane's store: the source of truth, in SQLite (default) or PostgreSQL.

- ``db``: choosing and opening the database, migrations, transactions (``open_store``).
- ``models``: the tables (SQLAlchemy 2 typed models).
- ``repo``: every read and change, with validation, audit records and the configuration version.
- ``identity``: users, user groups, devices, sign-in sessions and TOTP, same conventions.
- ``segments``: segment parsing (shared with the data plane), canonical ports, overlap checks.
- ``errors``: ``StoreError``, the one refusal type, with a ``code``.

Typical use::

    store = open_store(database_url(settings.data_dir))
    with store.begin() as session:
        repo.create_application(session, "admin-key:ops", "intranet",
                                segments=[{"destination": "10.20.0.0/16", "ports": "22,3389"}])
"""

from .db import Store, database_url, open_store
from .errors import StoreError

__all__ = ["Store", "StoreError", "database_url", "open_store"]
