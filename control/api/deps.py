"""What the API's handlers share: the ``Api`` context (store, CA, edge addresses) and admin authentication.

Every ``/v1`` route except ``/v1/register`` sits behind ``require_admin``: the request must
carry ``Authorization: Bearer <admin key>`` naming a live (not revoked) key. The key's name
becomes the request's ``actor``, which every change writes into its audit record.

Looking a key up is a read; the key's ``last_used_at`` is written (a short write
transaction) only when it is older than ``admin_keys.LAST_USED_RESOLUTION``, so reads by admins
never queue behind SQLite's single writer.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import anyio.to_thread
from litestar import Request
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.handlers.base import BaseRouteHandler
from sqlalchemy import select
from sqlalchemy.orm import Session

from control.ca import DEFAULT_LIFETIME_DAYS, CertificateAuthority
from control.oidc import Oidc
from control.snapshot import SnapshotHub
from control.tokens import TokenSigner
from control.store import Store, admin_keys, nodes, values
from control.store.models import AdminKey, utcnow

DEFAULT_HEARTBEAT_INTERVAL = 30.0  # seconds between node heartbeats, for active/inactive status
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="ferryman-admin"'}


class Api:
    """The state behind every handler (a Litestar dependency named ``api``).

    ``hub`` holds the newest configuration snapshot for the node routes (kept current by
    ``control.snapshot.follow_store`` while the app runs); ``replay`` remembers node token
    ids (``nodes.ReplayCache``); ``token_signer`` signs users' access tokens, ``sign_ins``
    counts failed sign-ins per user name and ``totp_steps`` refuses a TOTP code used twice
    (``auth.SignInLimiter``, ``auth.TotpReplayGuard``).
    """

    def __init__(self, store: Store, ca: CertificateAuthority, edges_public: Sequence[str],
                 heartbeat_interval: float, cert_lifetime_days: int = DEFAULT_LIFETIME_DAYS, *,
                 token_signer: TokenSigner, oidc: Oidc | None = None) -> None:
        from .auth import SignInLimiter, TotpReplayGuard  # auth imports this module
        from .nodes import ReplayCache  # nodes imports this module

        self.store = store
        self.ca = ca
        self.edges_public = list(edges_public)
        self.heartbeat_interval = heartbeat_interval
        self.cert_lifetime_days = cert_lifetime_days
        self.hub = SnapshotHub()
        self.replay = ReplayCache()
        self.token_signer = token_signer
        self.sign_ins = SignInLimiter()
        self.totp_steps = TotpReplayGuard()
        self.oidc = oidc  # sign-in through an OIDC provider (``control.oidc``); None: not configured

    def authenticate(self, plaintext: str, now: datetime | None = None) -> str | None:
        """The name of the live admin key whose plain text this is, else None."""
        now = now or utcnow()
        with self.store.read() as session:
            key = session.scalar(select(AdminKey).where(AdminKey.key_hash == values.hash_secret(plaintext)))
            if key is None or key.revoked_at is not None:
                return None
            if key.last_used_at is not None and now - key.last_used_at < admin_keys.LAST_USED_RESOLUTION:
                return key.name
        with self.store.begin() as session:  # note the use (at most once per LAST_USED_RESOLUTION)
            key = admin_keys.verify_admin_key(session, plaintext, now)
            return None if key is None else key.name

    def edge_addresses(self, session: Session) -> list[str]:
        """What nodes dial: the configured public edge addresses, then every registered edge
        whose certificate is not revoked (each address once)."""
        return nodes.edge_addresses(session, self.edges_public)


async def require_admin(connection: ASGIConnection, _handler: BaseRouteHandler) -> None:
    """Guard of the admin routes: 401 unless a live admin key is presented."""
    header = connection.headers.get("authorization")
    if not header:
        raise NotAuthorizedException("missing 'Authorization: Bearer <admin key>' header", headers=_CHALLENGE)
    scheme, _, key = header.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise NotAuthorizedException("the Authorization header must be 'Bearer <admin key>'", headers=_CHALLENGE)
    api: Api = connection.app.state.api
    name = await anyio.to_thread.run_sync(api.authenticate, key)
    if name is None:
        raise NotAuthorizedException("admin key is not valid: unknown or revoked", headers=_CHALLENGE)
    connection.state.admin = name


def provide_api(request: Request) -> Api:
    return request.app.state.api


def provide_actor(request: Request) -> str:
    """Who makes the change: the name of the admin key that ``require_admin`` accepted."""
    return request.state.admin
