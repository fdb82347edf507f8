"""``create_app``: the control plane's ASGI application (Litestar), ready for uvicorn.

Routes: the admin resources under ``/v1`` (``admin.py``; ``policies.py`` for access;
``identity.py`` for users, groups, devices and sessions; ``traffic.py`` for traffic logs;
admin key required), user sign-in under ``/v1/auth`` (``auth.py``: password/TOTP, access
tokens; ``oidc.py``: through an OIDC provider), the client agents' profile under
``/v1/client`` (``client.py``), ``POST /v1/register`` (``register.py``, one-time token),
the node routes under ``/v1/node`` (``nodes.py``, node certificate token), the web console
under ``/console`` (``control.console``: its own sign-in and session cookie), ``GET /health``, ``GET /ready``
and ``GET /v1/ca`` (the CA certificate, for clients to check against their pin; no credential), and the
OpenAPI document at ``/schema/openapi.json`` (no Swagger UI page: it would run a script from a
CDN on the console's origin). Credentials are checked by ``guards.py``; errors are JSON
(``errors.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from litestar import Litestar, Response, get
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

from control.ca import DEFAULT_LIFETIME_DAYS, CertificateAuthority
from control.console.routes import console_router
from control.console.security import ConsoleConfig
from control.oidc import Oidc, OidcConfig
from control.snapshot import FOLLOW_INTERVAL, follow_store, refresh
from control.store import Store
from control.store import notify
from control.tokens import TokenSigner

from .admin import admin_router
from .auth import auth_router
from .client import client_router
from .errors import EXCEPTION_HANDLERS
from .guards import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_NODE_CERTIFICATES_PER_DAY,
    DEFAULT_OIDC_STARTS_PER_MINUTE,
    DEFAULT_REFRESH_GRACE,
    Api,
    provide_api,
)
from .identity import identity_router
from .nodes import DEFAULT_SUPERSEDED_CERT_GRACE, NODE_ROUTES, certificate_retirement
from .oidc import oidc_router, web_oidc_router
from .policies import policy_router
from .register import register
from .schemas import Health, Readiness
from .throttle import SignInLimits
from .traffic import traffic_retention, traffic_router
from .webapps import webapp_router

log = logging.getLogger("ferryman.control")

API_VERSION = "1"
# Largest request body accepted (a CSR is at most 16 KiB; an application's 500 segments fit easily).
MAX_BODY_BYTES = 1024 * 1024


@get("/health", tags=["health"], security=[])
async def health() -> Health:
    """Liveness: the process answers (no credential needed)."""
    return Health(status="ok")


@get("/ready", tags=["health"], security=[])
async def ready(api: Api) -> Response[Readiness]:
    """Readiness: this node can serve (the database answers, the configuration snapshot is
    loaded and, on PostgreSQL, change notifications are listened for); 503 naming what is not."""
    problems = await api.readiness()
    status = 200 if not problems else 503
    return Response(Readiness(status="ready" if not problems else "not ready", problems=problems),
                    status_code=status)


@get("/v1/ca", tags=["health"], security=[], media_type="application/x-pem-file", sync_to_thread=False)
def ca_certificate(api: Api) -> Response[bytes]:
    """The CA certificate (PEM) that the control plane's HTTPS certificate and every node certificate
    chain to. No credential: a client keeps it only when its SPKI hash equals the pin it was given
    out of band (``dataplane.basics.controltls``)."""
    return Response(api.ca.bundle(), media_type="application/x-pem-file")


def create_app(store: Store, ca: CertificateAuthority, *, edges_public: Sequence[str] = (),
               heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
               cert_lifetime_days: int = DEFAULT_LIFETIME_DAYS,
               follow_interval: float = FOLLOW_INTERVAL, token_signer: TokenSigner,
               traffic_retention_days: int = 30, oidc: OidcConfig | None = None,
               sign_in_limits: SignInLimits | None = None, refresh_grace: float = DEFAULT_REFRESH_GRACE,
               oidc_starts_per_minute: int = DEFAULT_OIDC_STARTS_PER_MINUTE,
               console: ConsoleConfig | None = None,
               node_certificates_per_day: int = DEFAULT_NODE_CERTIFICATES_PER_DAY,
               superseded_cert_grace: float = DEFAULT_SUPERSEDED_CERT_GRACE) -> Litestar:
    """The API over ``store`` and ``ca``; ``edges_public`` are the edge HOST:PORT addresses handed
    to registering nodes (before those of registered edges); ``heartbeat_interval`` (seconds)
    decides when a node counts as inactive; ``cert_lifetime_days`` is the lifetime of the
    certificates signed at registration and renewal; ``token_signer`` signs users' access
    tokens (``TokenSigner.open(data_dir)``).

    While the app runs (ASGI lifespan), the configuration snapshot served to nodes follows
    the store every ``follow_interval`` seconds (on PostgreSQL: at each change notification,
    ``control.store.notify``, and every ``notify.FALLBACK_INTERVAL`` seconds), and traffic logs older than
    ``traffic_retention_days`` are deleted every hour. ``oidc`` turns on sign-in through that
    OIDC provider (``/v1/auth/oidc``, ``control.oidc``). ``sign_in_limits``,
    ``refresh_grace`` and ``oidc_starts_per_minute`` are the sign-in limits
    (``FERRYMAN_SIGN_IN_*``, ``FERRYMAN_REFRESH_GRACE``, ``FERRYMAN_OIDC_STARTS_PER_MINUTE``).
    ``console`` holds the web console's session limits (``FERRYMAN_CONSOLE_*``; the console
    is under ``/console``: ``control.console``). ``node_certificates_per_day`` bounds a node's
    renewals (``FERRYMAN_NODE_CERTIFICATES_PER_DAY``); a node certificate a renewal replaced is
    revoked once its node has used the renewed one for ``superseded_cert_grace`` seconds
    (``FERRYMAN_SUPERSEDED_CERT_GRACE``, checked while the app runs). ``store`` must have been opened with the secrets key (``store.box``).
    """
    api = Api(store, ca, edges_public, heartbeat_interval, cert_lifetime_days, token_signer=token_signer,
              oidc=None if oidc is None else Oidc(oidc), sign_in_limits=sign_in_limits, refresh_grace=refresh_grace,
              oidc_starts_per_minute=oidc_starts_per_minute, node_certificates_per_day=node_certificates_per_day)
    following: list[asyncio.Task[None]] = []
    listeners: list[notify.ChangeListener] = []

    async def start_following() -> None:
        try:
            await refresh(store, api.hub, edges=api.edges_public, token_keys=token_signer.public_jwks(),
                          token_issuer=token_signer.issuer, token_lifetime=token_signer.lifetime)
        except Exception as exc:  # noqa: BLE001 - the follower retries and logs; nodes get 503 meanwhile
            log.warning("cannot build the first configuration snapshot: %s", exc)
        loop = asyncio.get_running_loop()
        changed: asyncio.Event | None = None
        interval = follow_interval
        if notify.listens(store):  # several control-plane nodes may share the database: follow its notifications
            listener = notify.ChangeListener(store)
            listener.start()
            listeners.append(listener)
            changed, interval = listener.changed, max(follow_interval, notify.FALLBACK_INTERVAL)
            if not await listener.wait_connected(5.0):
                log.warning("not yet listening for configuration changes; checking every %g s until then",
                            follow_interval * 4)
        api.listener = listeners[0] if listeners else None
        following.append(loop.create_task(
            follow_store(store, api.hub, edges=api.edges_public, token_keys=token_signer.public_jwks(),
                         token_issuer=token_signer.issuer, token_lifetime=token_signer.lifetime,
                         interval=interval, changed=changed)))
        following.append(loop.create_task(traffic_retention(store, traffic_retention_days)))
        following.append(loop.create_task(certificate_retirement(store, superseded_cert_grace)))

    async def stop_following() -> None:
        api.hub.close()
        for task in following:
            task.cancel()
        await asyncio.gather(*following, return_exceptions=True)
        for listener in listeners:
            await listener.close()

    openapi = OpenAPIConfig(
        title="Ferryman control plane",
        version=API_VERSION,
        description="Admin API (Authorization: Bearer <admin key>) and node registration (one-time token).",
        components=Components(security_schemes={
            "adminKey": SecurityScheme(type="http", scheme="bearer", description="an admin API key (fmk_...)"),
            "nodeToken": SecurityScheme(type="http", scheme="bearer", bearer_format="JWT",
                                        description="a node request token: ES256 JWT signed by the node's "
                                                    "certificate key, the certificate in x5c"),
            "accessToken": SecurityScheme(type="http", scheme="bearer", bearer_format="JWT",
                                          description="a user's access token (Ed25519 JWT from /v1/auth/sign-in)"),
        }),
        render_plugins=[JsonRenderPlugin()],
    )
    app = Litestar(
        route_handlers=[admin_router(), policy_router(), identity_router(), auth_router(), oidc_router(),
                        web_oidc_router(), client_router(), traffic_router(), webapp_router(), register, health,
                        ready, ca_certificate, console_router(),
                        *NODE_ROUTES],
        on_startup=[start_following],
        on_shutdown=[stop_following],
        dependencies={"api": Provide(provide_api, sync_to_thread=False)},
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        openapi_config=openapi,
        request_max_body_size=MAX_BODY_BYTES,
        debug=False,
        logging_config=None,  # the process's logging (dataplane.basics.logs) stays as it is
    )
    app.state.api = api
    app.state.console = console or ConsoleConfig()
    return app
