"""The front door's table of published web apps: one ``Route`` per external host.

``build_routes(apps, ...)`` checks every ``WebApp`` (its URLs and header SSO by the rules of
``dataplane.contract.webapps``, the one home of those checks, shared with the control plane)
and prepares what each request needs: the normalised external host (``host`` or
``host:port``; the key requests are matched on), internal scheme/host/port and ``Host``
header, the ``UrlMap`` for translation, the backend TLS context, the server TLS context of a
custom-domain certificate, the rate-limit bucket and the header-SSO names. Errors
(``WebAppError``) name the app and the field: any field the contract refuses, two apps on
one external host, the sign-in host used by an app, a certificate that does not load with
its key.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Iterable

from ...contract.webapps import (
    DEFAULT_PORTS, Endpoint, WebAppFieldError, check_header_sso, external_endpoint, internal_endpoint,
)
from .backend import client_context
from .limits import TokenBucket
from .model import WebApp, WebAppError
from .translate import UrlMap


class Route:
    __slots__ = ("app", "host", "hostname", "external_url", "urlmap", "internal_tls", "internal_host",
                 "internal_port", "internal_authority", "backend_tls", "server_tls", "sso_names", "timeout",
                 "bucket", "passthrough")

    def __init__(self, app: WebApp, *, host: str, hostname: str, external_url: str, urlmap: UrlMap,
                 internal_tls: bool, internal_host: str, internal_port: int, backend_tls: ssl.SSLContext | None,
                 server_tls: ssl.SSLContext | None, timeout: float, rate: float) -> None:
        self.app = app
        self.host = host
        self.hostname = hostname
        self.external_url = external_url
        self.urlmap = urlmap
        self.internal_tls = internal_tls
        self.internal_host = internal_host
        self.internal_port = internal_port
        default = DEFAULT_PORTS["https" if internal_tls else "http"]
        shown = f"[{internal_host}]" if ":" in internal_host else internal_host
        self.internal_authority = (shown if internal_port == default else f"{shown}:{internal_port}").encode("idna")
        self.backend_tls = backend_tls
        self.server_tls = server_tls
        self.sso_names = tuple(h.lower().encode("ascii") for h in app.header_sso.values())
        self.timeout = timeout
        self.bucket = TokenBucket(rate)
        self.passthrough = app.preauth == "passthrough"


def _fields(app: WebApp) -> tuple[Endpoint, Endpoint]:
    """The app's URLs and header SSO, checked by the one set of rules the control plane also uses."""
    try:
        ext, internal = external_endpoint(app.external_url), internal_endpoint(app.internal_url)
        check_header_sso(app.header_sso)
    except WebAppFieldError as exc:
        raise WebAppError(f"web app {app.name!r}: {exc}") from None
    return ext, internal


def server_context(cert_pem: str, key_pem: str, alpn: Iterable[str] = ("h2", "http/1.1")) -> ssl.SSLContext:
    """A server TLS context from PEM text (TLS 1.2+, ALPN); ``ssl.SSLError``/``ValueError`` if unusable."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(list(alpn))
    with tempfile.TemporaryDirectory(prefix="ferryman-cert-") as tmp:
        cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        for path, text in ((cert_path, cert_pem), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


def build_route(app: WebApp, settings, auth_host: str) -> Route:
    if not app.name:
        raise WebAppError("a web app needs a name")
    ext, internal = _fields(app)
    host = ext.authority
    if auth_host and host == auth_host:
        raise WebAppError(f"web app {app.name!r}: external host {host} is the sign-in host; choose another")
    internal_tls = internal.scheme.lower() == "https"
    backend_tls = None
    if internal_tls:
        try:
            backend_tls = client_context(app.verify_backend, app.backend_ca)
        except (ssl.SSLError, ValueError) as exc:
            raise WebAppError(f"web app {app.name!r}: backend_ca cannot be loaded ({exc})") from None
    server_tls = None
    if app.certificate or app.certificate_key:
        if not (app.certificate and app.certificate_key):
            raise WebAppError(f"web app {app.name!r}: a custom-domain certificate needs both the chain and the key")
        try:
            server_tls = server_context(app.certificate, app.certificate_key)
        except (ssl.SSLError, ValueError, OSError) as exc:
            raise WebAppError(f"web app {app.name!r}: the certificate and key cannot be used ({exc})") from None
    external_url = f"https://{host}{ext.prefix}"
    return Route(app, host=host, hostname=ext.host, external_url=external_url,
                 urlmap=UrlMap(app.internal_url, external_url + "/"), internal_tls=internal_tls,
                 internal_host=internal.host, internal_port=internal.port, backend_tls=backend_tls,
                 server_tls=server_tls, timeout=settings.timeout_for(app.backend_timeout), rate=settings.app_rate)


def build_routes(apps: Iterable[WebApp], settings, auth_host: str) -> dict[str, Route]:
    routes: dict[str, Route] = {}
    names: set[str] = set()
    for app in apps:
        route = build_route(app, settings, auth_host)
        if app.name in names:
            raise WebAppError(f"two web apps are named {app.name!r}")
        names.add(app.name)
        other = routes.get(route.host)
        if other is not None:
            raise WebAppError(f"web apps {other.app.name!r} and {app.name!r} both use external host {route.host}")
        routes[route.host] = route
    return routes
