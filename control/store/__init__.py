"""The control plane's store: the source of truth, in SQLite (default) or PostgreSQL.

- ``db``: choosing and opening the database, migrations, transactions (``open_store``).
- ``models``: the tables (SQLAlchemy 2 typed models).
- ``errors``: ``StoreError``, the one refusal type, with a ``code``.
- ``audit``: how every change is written (savepoint, audit record); ``config_version``: the
  version nodes follow, bumped by every configuration change; ``values``: names, texts,
  times, serials and secret hashes, checked and kept the same way everywhere.
- One module per resource, each with its reads and changes (validated, audited):
  ``applications`` (and their segments), ``connector_groups``, ``nodes`` (connectors and
  edges), ``certificates`` (issued certificates, revocations), ``registration_tokens``,
  ``admin_keys``, ``dns_suffixes``, ``forwarding_profile``; ``users``, ``user_groups``,
  ``devices``, ``sessions`` (sign-in sessions, refresh tokens), ``totp`` (second factor,
  recovery codes); ``assignments``, ``named_locations``, ``policies`` (conditional
  access); ``traffic`` (traffic logs, discovery).
- ``segments``: segment parsing (shared with the data plane), canonical ports, overlap checks.

Callers import the resource module they use. Typical use::

    store = open_store(database_url(settings.data_dir))
    with store.begin() as session:
        applications.create_application(session, "admin-key:ops", "intranet",
                                         segments=[{"destination": "10.20.0.0/16", "ports": "22,3389"}])
"""

from .db import Store, database_url, open_store
from .errors import StoreError

__all__ = ["Store", "StoreError", "database_url", "open_store"]
