"""``create_app``: the control plane's ASGI application (Litestar), ready for uvicorn.

Routes: the admin resources under ``/v1`` (``admin.py``, admin key required),
``POST /v1/register`` (``register.py``, one-time token), ``GET /health`` (no credential),
and the OpenAPI document at ``/schema/openapi.json`` (Swagger UI at ``/schema/swagger``).
Errors are JSON (``errors.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

from litestar import Litestar, get
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

from control.ca import CertificateAuthority
from control.store import Store

from .admin import admin_router
from .deps import DEFAULT_HEARTBEAT_INTERVAL, Api, provide_api
from .errors import EXCEPTION_HANDLERS
from .register import register
from .schemas import Health

API_VERSION = "1"
# Largest request body accepted (a CSR is at most 16 KiB; an application's 500 segments fit easily).
MAX_BODY_BYTES = 1024 * 1024


@get("/health", tags=["health"], security=[])
async def health() -> Health:
    """Liveness: the process answers (no credential needed)."""
    return Health(status="ok")


def create_app(store: Store, ca: CertificateAuthority, *, edges_public: Sequence[str] = (),
               heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL) -> Litestar:
    """The API over ``store`` and ``ca``; ``edges_public`` are the edge HOST:PORT addresses handed
    to registering nodes (before those of registered edges); ``heartbeat_interval`` (seconds)
    decides when a node counts as inactive."""
    api = Api(store, ca, edges_public, heartbeat_interval)
    openapi = OpenAPIConfig(
        title="Ferryman control plane",
        version=API_VERSION,
        description="Admin API (Authorization: Bearer <admin key>) and node registration (one-time token).",
        components=Components(security_schemes={
            "adminKey": SecurityScheme(type="http", scheme="bearer", description="an admin API key (fmk_...)"),
        }),
        render_plugins=[JsonRenderPlugin(), SwaggerRenderPlugin()],
    )
    app = Litestar(
        route_handlers=[admin_router(), register, health],
        dependencies={"api": Provide(provide_api, sync_to_thread=False)},
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        openapi_config=openapi,
        request_max_body_size=MAX_BODY_BYTES,
        debug=False,
        logging_config=None,  # the process's logging (dataplane.observability) stays as it is
    )
    app.state.api = api
    return app
