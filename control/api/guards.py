"""Who may call the API: the three bearer credentials, their guards, and the state behind them.

Every credential comes as ``Authorization: Bearer <...>`` (parsed by ``bearer_token``, one
realm each) and is checked by one guard:

- ``require_admin`` (every admin route under ``/v1``; ``admin_routes`` builds their routers):
  a live (not revoked) admin key. The key's name becomes the request's ``actor``, which
  every change writes into its audit record. Looking a key up is a read; the key's
  ``last_used_at`` is written (a short write transaction) only when it is older than
  ``admin_keys.LAST_USED_RESOLUTION``, so reads by admins never queue behind SQLite's
  single writer.
- ``require_node`` (the node routes, ``/v1/node/...``): a node request token
  (``dataplane.contract.nodeauth``): certificate issued by this control plane's CA, within its
  validity, not revoked, recorded for a registered node; signature by that certificate's
  key; issued within ``CLOCK_SKEW`` and not expired; bound to this method, path and body;
  ``jti`` not seen before (``ReplayCache``; only a registered, unrevoked node's token ids are
  remembered, and only its request body is read). Each refusal is a 401 or 403 with its own
  message, so an operator reading a node's log knows what to fix. The caller is
  ``request.state.node`` (``NodeCaller``).
- ``require_user`` (``/v1/auth`` routes for a signed-in user, ``/v1/client``): a user's
  access token (signature, issuer, expiry: ``control.tokens``); its claims are
  ``request.state.claims`` and the handler checks that their session is still live.

``Api`` is the state behind every handler and guard (a Litestar dependency named ``api``).
What it keeps in this process's memory is bounded: the node token ids seen
(``ReplayCache``), failed sign-ins and OIDC starts per account and source
(``throttle.SignInLimiter``, ``throttle.SourceRate``) and the TOTP time steps already used
(``TotpReplayGuard``); each control-plane process keeps its own. On PostgreSQL, where
several control-plane nodes may share the database, the node token ids, the TOTP steps and
the failed sign-ins live in the database instead (``SharedGuards``,
``throttle.SharedSignInLimiter``), so a replay or a guess sent to another node counts too;
OIDC starts stay counted per process (a cheap, per-source nuisance limit).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio.to_thread
import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey
from litestar import Request, Router
from litestar.connection import ASGIConnection
from litestar.di import Provide
from litestar.exceptions import HTTPException, NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.types import ControllerRouterHandler
from sqlalchemy import select
from sqlalchemy.orm import Session

from control.ca import DEFAULT_LIFETIME_DAYS, CertificateAuthority
from control.oidc import Oidc
from control.snapshot import SnapshotHub
from control.store import Store, admin_keys, certificates, guard_state, nodes, notify
from control.store.models import Connector, Edge, utcnow
from control.store.secretbox import SecretBox
from control.tokens import TokenError, TokenSigner
from dataplane.basics import pki
from dataplane.contract.nodeauth import ALGORITHM, CLOCK_SKEW, MAX_JTI, TOKEN_LIFETIME, body_hash

from .throttle import SharedSignInLimiter, SignInLimiter, SignInLimits, SourceRate

DEFAULT_HEARTBEAT_INTERVAL = 30.0  # seconds between node heartbeats, for active/inactive status
DEFAULT_REFRESH_GRACE = 30.0  # seconds a refresh token just rotated may be retried (FERRYMAN_REFRESH_GRACE)
DEFAULT_OIDC_STARTS_PER_MINUTE = 20  # per source address (FERRYMAN_OIDC_STARTS_PER_MINUTE)
DEFAULT_NODE_CERTIFICATES_PER_DAY = 4  # per node, its registration included (FERRYMAN_NODE_CERTIFICATES_PER_DAY)
MAX_TRACKED_TOTP_USERS = 100_000
_MAX_NODE_TOKEN = 16384  # characters; a token with a P-256 certificate is about 1.5 KiB
# joserfc's default header limit (512 bytes) is below a header carrying a certificate (x5c).
_REGISTRY = jws.JWSRegistry(algorithms=[ALGORITHM])
_REGISTRY.max_header_length = 8192


# ---------------------------------------------------------------------------- state


class ReplayCache:
    """Token ids seen while they are still valid, so a captured token cannot be used twice.

    Bounded: at most ``limit`` ids are kept; an id is forgotten once its token has expired
    (an expired token is refused anyway). While it is full of live ids, new tokens are
    refused (503, retry) rather than forgetting ids that could still be replayed. The cache
    is per process: control-plane nodes sharing a PostgreSQL database use ``SharedGuards``
    instead, which remembers the ids in the database.
    """

    def __init__(self, limit: int = 200_000) -> None:
        self.limit = limit
        self._seen: OrderedDict[str, float] = OrderedDict()

    def first_use(self, jti: str, expires: float, now: float) -> bool | None:
        """Record ``jti``; False when it was already used, None when the cache is full of live ids."""
        while self._seen:
            oldest, until = next(iter(self._seen.items()))
            if until >= now:
                break
            del self._seen[oldest]
        if jti in self._seen:
            return False
        if len(self._seen) >= self.limit:
            return None
        self._seen[jti] = expires
        return True


class TotpReplayGuard:
    """The newest TOTP time step accepted per user: a code is good once (RFC 6238 §5.2)."""

    def __init__(self, max_users: int = MAX_TRACKED_TOTP_USERS) -> None:
        self.max_users = max_users
        self._last: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def claim(self, user_id: str, step: int) -> bool:
        """Record ``step`` as used by ``user_id``; False if it (or a later one) was used already."""
        with self._lock:
            last = self._last.get(user_id)
            if last is not None and step <= last:
                return False
            self._last[user_id] = step
            self._last.move_to_end(user_id)
            while len(self._last) > self.max_users:  # the oldest entries' codes have long expired
                self._last.popitem(last=False)
            return True


class SharedGuards:
    """``ReplayCache.first_use`` and ``TotpReplayGuard.claim`` kept in the database
    (``control.store.guard_state``), for control-plane nodes sharing a PostgreSQL database: a
    token or code used at one node is refused at every other. Calls block (database):
    run them in a worker thread. Expired records are deleted at most every ``PURGE_EVERY`` seconds."""

    PURGE_EVERY = 60.0
    TOTP_MEMORY = timedelta(hours=1)  # a step older than this cannot pass the TOTP check anyway

    def __init__(self, store: Store) -> None:
        self.store = store
        self._purged = 0.0
        self._lock = threading.Lock()

    def _purge(self) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._purged < self.PURGE_EVERY:
                return
            self._purged = now
        guard_state.forget_expired(self.store)

    def first_use(self, jti: str, expires: float, now: float) -> bool | None:
        self._purge()
        return guard_state.first_use(self.store, "node-request", jti, datetime.fromtimestamp(expires, UTC),
                                     datetime.fromtimestamp(now, UTC))

    def claim(self, user_id: str, step: int) -> bool:
        self._purge()
        return guard_state.claim_step(self.store, "totp-step", user_id, step, utcnow() + self.TOTP_MEMORY)


READY_DB_TIMEOUT = 2.0  # seconds ``GET /ready`` waits for the database


class Api:
    """The state behind every handler (a Litestar dependency named ``api``).

    ``hub`` holds the newest configuration snapshot for the node routes (kept current by
    ``control.snapshot.follow_store`` while the app runs); ``replay`` remembers node token
    ids (``ReplayCache``); ``token_signer`` signs users' access tokens, ``box`` seals the
    secrets the store keeps (the store's ``secrets.key``), ``sign_ins`` counts failed
    sign-ins per account and source (``throttle.SignInLimiter``), ``oidc_starts`` OIDC
    sign-ins started per source (``throttle.SourceRate``), ``refresh_grace`` is how long a
    refresh may be retried, and ``totp_steps`` refuses a TOTP code used twice
    (``TotpReplayGuard``). On PostgreSQL ``replay`` and ``totp_steps`` are ``SharedGuards``,
    so several control-plane nodes on that database refuse a replay sent to any of them.
    """

    def __init__(self, store: Store, ca: CertificateAuthority, edges_public: Sequence[str],
                 heartbeat_interval: float, cert_lifetime_days: int = DEFAULT_LIFETIME_DAYS, *,
                 token_signer: TokenSigner, oidc: Oidc | None = None, sign_in_limits: SignInLimits | None = None,
                 refresh_grace: float = DEFAULT_REFRESH_GRACE,
                 oidc_starts_per_minute: int = DEFAULT_OIDC_STARTS_PER_MINUTE,
                 node_certificates_per_day: int = DEFAULT_NODE_CERTIFICATES_PER_DAY) -> None:
        if store.box is None:
            raise ValueError("the store must be opened with the secrets key (open_store(url, SecretBox.open(...)))")
        self.store = store
        self.ca = ca
        self.edges_public = list(edges_public)
        self.heartbeat_interval = heartbeat_interval
        self.cert_lifetime_days = cert_lifetime_days
        self.node_certificates_per_day = node_certificates_per_day  # a node's renewals are refused beyond
        self.hub = SnapshotHub()
        # One process: in memory. PostgreSQL (several nodes may share it): in the database.
        shared = SharedGuards(store) if notify.listens(store) else None
        self.replay: ReplayCache | SharedGuards = shared or ReplayCache()
        self.token_signer = token_signer
        self.box: SecretBox = store.box
        self.sign_ins: SignInLimiter | SharedSignInLimiter = (
            SharedSignInLimiter(store, sign_in_limits) if shared else SignInLimiter(sign_in_limits))
        self.oidc_starts = SourceRate(oidc_starts_per_minute, 60.0)
        self.refresh_grace = refresh_grace
        self.totp_steps: TotpReplayGuard | SharedGuards = shared or TotpReplayGuard()
        self.oidc = oidc  # sign-in through an OIDC provider (``control.oidc``); None: not configured
        self.listener: notify.ChangeListener | None = None  # PostgreSQL change notifications, set while running

    async def readiness(self) -> list[str]:
        """What keeps this node from serving (empty: ready): the database must answer within
        ``READY_DB_TIMEOUT`` seconds, the configuration snapshot be loaded and, on PostgreSQL,
        configuration changes be listened for."""
        problems = []
        try:
            await asyncio.wait_for(asyncio.to_thread(self._ping_database), READY_DB_TIMEOUT)
        except TimeoutError:
            problems.append(f"the database did not answer within {READY_DB_TIMEOUT:g} s")
        except Exception as exc:  # noqa: BLE001 - any failure to reach it is the answer
            problems.append(f"the database is not reachable: {type(exc).__name__}")
        if self.hub.current is None:
            problems.append("the configuration snapshot is not loaded yet")
        if notify.listens(self.store) and (self.listener is None or not self.listener.connected):
            problems.append("not listening for configuration changes")
        return problems

    def _ping_database(self) -> None:
        with self.store.read() as session:
            session.execute(select(1))

    def authenticate(self, plaintext: str, now: datetime | None = None) -> str | None:
        """The name of the live admin key whose plain text this is, else None."""
        now = now or utcnow()
        with self.store.read() as session:
            key = admin_keys.live_key(session, plaintext)
            if key is None:
                return None
            if admin_keys.use_is_noted(key, now):
                return key.name
        with self.store.begin() as session:  # note the use (at most once per LAST_USED_RESOLUTION)
            key = admin_keys.verify_admin_key(session, plaintext, now)
            return None if key is None else key.name

    def edge_addresses(self, session: Session) -> list[str]:
        """What nodes dial: the configured public edge addresses, then every registered edge
        whose certificate is not revoked (each address once)."""
        return nodes.edge_addresses(session, self.edges_public)


def provide_api(request: Request) -> Api:
    return request.app.state.api


# ---------------------------------------------------------------------------- bearer credentials


@dataclass(frozen=True)
class Realm:
    """One kind of bearer credential: its ``WWW-Authenticate`` realm, its name in messages, and
    the words every refusal starts with."""

    name: str
    credential: str
    prefix: str = ""

    def refuse(self, message: str) -> NotAuthorizedException:
        """A 401 saying ``message`` (after the prefix), with this realm's challenge."""
        challenge = {"WWW-Authenticate": f'Bearer realm="{self.name}"'}
        return NotAuthorizedException(self.prefix + message, headers=challenge)


ADMIN = Realm("ferryman-admin", "admin key")
NODE = Realm("ferryman-node", "node token", "node credential refused: ")
USER = Realm("ferryman-user", "access token")


def bearer_token(connection: ASGIConnection, realm: Realm) -> str:
    """The token of ``Authorization: Bearer <token>``; 401 (in ``realm``) when the header is missing or malformed."""
    header = connection.headers.get("authorization")
    if not header:
        raise realm.refuse(f"missing 'Authorization: Bearer <{realm.credential}>' header")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise realm.refuse(f"the Authorization header must be 'Bearer <{realm.credential}>'")
    return token


# ---------------------------------------------------------------------------- admin keys


async def require_admin(connection: ASGIConnection, _handler: BaseRouteHandler) -> None:
    """Guard of the admin routes: 401 unless a live admin key is presented."""
    key = bearer_token(connection, ADMIN)
    api: Api = connection.app.state.api
    name = await anyio.to_thread.run_sync(api.authenticate, key)
    if name is None:
        raise ADMIN.refuse("admin key is not valid: unknown or revoked")
    connection.state.admin = name


def provide_actor(request: Request) -> str:
    """Who makes the change: the name of the admin key that ``require_admin`` accepted."""
    return request.state.admin


def admin_routes(handlers: Sequence[ControllerRouterHandler], *, tags: Sequence[str] | None = None) -> Router:
    """The admin routes ``handlers`` under ``/v1``, each guarded by an admin key; ``actor`` is that key's name."""
    return Router(path="/v1", route_handlers=handlers, guards=[require_admin],
                  dependencies={"actor": Provide(provide_actor, sync_to_thread=False)},
                  security=[{"adminKey": []}], tags=None if tags is None else list(tags))


# ---------------------------------------------------------------------------- users' access tokens


async def require_user(connection: ASGIConnection, _handler: BaseRouteHandler) -> None:
    """Guard: a valid access token (signature, issuer, expiry); the handler checks its session is live."""
    token = bearer_token(connection, USER)
    api: Api = connection.app.state.api
    try:
        connection.state.claims = api.token_signer.verify(token)
    except TokenError as exc:
        raise USER.refuse(f"access token refused: {exc}") from None


# ---------------------------------------------------------------------------- node request tokens


class NodeCaller(msgspec.Struct, frozen=True):
    """Who made a node request: the node's role and id and the certificate it signed with."""

    role: str
    node_id: str
    name: str
    serial: int
    certificate: Any  # x509.Certificate


def _certificate_of(token: str) -> x509.Certificate:
    try:
        header = jws.extract_compact(token.encode(), registry=_REGISTRY).headers()
    except (JoseError, ValueError, TypeError):
        raise NODE.refuse("the bearer token is not a compact JWS") from None
    if header.get("alg") != ALGORITHM:
        raise NODE.refuse(f"the token must be signed with {ALGORITHM}, not {header.get('alg')!r}")
    chain = header.get("x5c")
    if not isinstance(chain, list) or not chain or not isinstance(chain[0], str):
        raise NODE.refuse("the token carries no certificate (x5c)")
    try:
        return x509.load_der_x509_certificate(base64.b64decode(chain[0], validate=True))
    except (ValueError, binascii.Error):
        raise NODE.refuse("the token's certificate (x5c) cannot be parsed") from None


def _lookup(api: Api, serial: int) -> tuple[bool, Connector | Edge | None]:
    with api.store.read() as session:
        return certificates.is_revoked(session, serial), certificates.node_for_certificate(session, serial)


async def _registered_node(api: Api, serial: int, role: str, name: str) -> Connector | Edge:
    """The registered node certificate ``serial`` was issued to, which must not be revoked and
    must have the ``role`` the certificate says; else 403 saying which."""
    revoked, node = await anyio.to_thread.run_sync(_lookup, api, serial)
    if revoked:
        raise PermissionDeniedException(f"node credential refused: certificate {serial:x} of {role} {name!r} is revoked")
    if node is None:
        raise PermissionDeniedException(f"node credential refused: certificate {serial:x} was not "
                                        f"issued to a registered node (register it with a token)")
    registered = "connector" if isinstance(node, Connector) else "edge"
    if registered != role:
        raise PermissionDeniedException(f"node credential refused: the certificate says {role}, "
                                        f"the node it was issued to is a {registered}")
    return node


async def recheck_node(api: Api, node: NodeCaller) -> None:
    """After a long-poll's wait, before its answer: the node's certificate may have been revoked
    while it waited (the revocation is itself a change, which is what wakes the poll), and a
    revoked node must not get the snapshot or map that revocation produced (403)."""
    await _registered_node(api, node.serial, node.role, node.name)


def _target(connection: ASGIConnection) -> str:
    path = connection.scope.get("raw_path") or connection.scope["path"].encode()
    query = connection.scope.get("query_string") or b""
    return (path.decode("latin-1") + ("?" + query.decode("latin-1") if query else ""))


async def require_node(connection: ASGIConnection, _handler: BaseRouteHandler) -> None:
    """Guard of the node routes: the request must carry a valid node token (see module doc)."""
    token = bearer_token(connection, NODE)
    if len(token) > _MAX_NODE_TOKEN:
        raise NODE.refuse(f"the token is longer than {_MAX_NODE_TOKEN} characters")
    api: Api = connection.app.state.api
    cert = _certificate_of(token)
    if not pki.issued_by(cert, api.ca.certificate):
        raise NODE.refuse("the certificate was not issued by this control plane's CA")
    now = datetime.now(UTC)
    if now < cert.not_valid_before_utc:
        raise NODE.refuse(f"the certificate is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC")
    if now >= cert.not_valid_after_utc:
        raise NODE.refuse(f"the certificate expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC: "
                          f"register the node again with a new token")
    try:
        identity = pki.certificate_identity(cert, cert.public_bytes(serialization.Encoding.DER), "the certificate")
    except pki.PkiError as exc:
        raise NODE.refuse(str(exc)) from None
    try:
        decoded = jwt.decode(token, ECKey.import_key(cert.public_key()), algorithms=[ALGORITHM],  # type: ignore[arg-type]
                             registry=_REGISTRY)
    except (JoseError, ValueError, TypeError):
        raise NODE.refuse("the token's signature does not verify with its certificate's key") from None
    claims = decoded.claims
    if not isinstance(claims, dict):
        raise NODE.refuse("the token's payload is not a JSON object")
    wall = time.time()
    iat, exp, jti = claims.get("iat"), claims.get("exp"), claims.get("jti")
    if not isinstance(iat, int) or not isinstance(exp, int) or not isinstance(jti, str) or not jti:
        raise NODE.refuse("the token needs integer 'iat' and 'exp' claims and a 'jti'")
    if not (0 < iat < 2**40 and 0 < exp < 2**40) or len(jti) > MAX_JTI:
        raise NODE.refuse(f"the token's 'iat'/'exp' are out of range or its 'jti' is longer than {MAX_JTI}")
    if abs(wall - iat) > CLOCK_SKEW:
        raise NODE.refuse(f"the token was issued {wall - iat:+.0f}s from the control plane's clock "
                          f"(more than {CLOCK_SKEW}s apart: check the node's clock)")
    if exp <= wall - CLOCK_SKEW or exp - iat > TOKEN_LIFETIME:
        raise NODE.refuse(f"the token has expired or lives longer than {TOKEN_LIFETIME}s")
    if claims.get("htm") != connection.scope.get("method") or claims.get("htu") != _target(connection):
        raise NODE.refuse("the token was made for another request (method or path differ)")
    if claims.get("sub") != f"{identity.role}:{identity.name}":
        raise NODE.refuse("the token's subject does not name its certificate")
    # Only the certificate of a registered node that is not revoked goes further: the body is read
    # (up to 4 MiB) and the token's id is remembered only for such a caller, so a client's device
    # certificate, or a revoked node's, can neither fill the replay memory nor make the control plane
    # buffer bodies.
    node = await _registered_node(api, cert.serial_number, identity.role, identity.name)
    body = await connection.body() if isinstance(connection, Request) else b""
    if claims.get("bsh") != body_hash(body):
        raise NODE.refuse("the token was made for another request body")
    if isinstance(api.replay, SharedGuards):
        fresh = await anyio.to_thread.run_sync(api.replay.first_use, jti, exp + CLOCK_SKEW, wall)
    else:
        fresh = api.replay.first_use(jti, exp + CLOCK_SKEW, wall)
    if fresh is None:
        raise HTTPException(status_code=503, detail="too many node requests in the last minutes; retry shortly",
                            headers={"Retry-After": "5"})
    if not fresh:
        raise NODE.refuse("the token was already used (replayed request)")
    connection.state.node = NodeCaller(role=identity.role, node_id=node.id, name=node.name, serial=cert.serial_number,
                                       certificate=cert)
