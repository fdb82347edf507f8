"""Serving the control plane: open the store and the CA, make sure an admin can get in, run uvicorn on uvloop.

``serve(settings, edges_public=...)`` (``ferryman control``):

- database: ``FERRYMAN_DATABASE_URL`` (environment or config file), else SQLite
  ``<data_dir>/control.db`` (``control.store.db.database_url``), migrated on open;
- CA: ``<data_dir>/ca`` (``CertificateAuthority.open``; created on first start);
- access-token signing key: ``<data_dir>/token-signing.key`` (Ed25519, ``TokenSigner.open``;
  created 0600 on first start), tokens living ``FERRYMAN_ACCESS_TOKEN_MINUTES``;
  on PostgreSQL both are shared by every control-plane node through the database instead
  (``control.shared_keys``);
- secrets key: ``FERRYMAN_SECRETS_KEY_FILE``, else ``<data_dir>/secrets.key`` (``SecretBox``;
  the latter created 0600 on first start), sealing the TOTP secrets the store keeps and the
  shared keys; the start is refused when it does not open the ones already stored;
- first start: when the database has no admin key at all, one named ``bootstrap`` is made
  and its plain text written to ``<data_dir>/admin.key`` (mode 0600). Only the path is
  printed; the key itself never goes to a log;
- HTTPS: uvicorn with ``loop="uvloop"`` on ``FERRYMAN_CONTROL_LISTEN`` (default ``127.0.0.1:8080``), logging
  through Ferryman's log setup, its connections held to the ``FERRYMAN_CONTROL_*`` server limits
  (``control.httplimits``), with a certificate from its own CA for ``FERRYMAN_CONTROL_HOSTS``
  (``control.tls``; issued again when the hosts change). The CA's hash (``sha256:...``, what
  clients pin) is printed and logged at every start. Plain HTTP only with
  ``FERRYMAN_CONTROL_INSECURE_HTTP=1``, warned in the log at every start;
- OIDC sign-in (``control.oidc``) when ``FERRYMAN_OIDC_ISSUER`` is set (with
  ``FERRYMAN_OIDC_CLIENT_ID`` and ``FERRYMAN_OIDC_REDIRECT_URI``); uvicorn's access log never
  shows the query of its begin and callback routes (begin id, the provider's code and state).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from datetime import timedelta

import uvicorn
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from control.api import create_app
from control.api.throttle import SignInLimits
from control.console.security import ConsoleConfig
from control.httplimits import limited_protocol
from control.snapshot import SnapshotHub
from control.store import Store, StoreError, database_url, open_store
from control.store import console as console_store
from control.store import totp
from control.store.admin_keys import create_admin_key
from control.oidc import OidcConfig
from control.store.models import AdminKey
from control.store.secretbox import SecretBox
from control.shared_keys import open_ca, open_token_signer
from control import tls
from dataplane.basics.caps import HttpLimits, LogLimiter
from dataplane.basics.controltls import insecure_warning
from dataplane.basics.hostport import parse_hostport
from dataplane.basics.logs import setup_logging
from dataplane.basics.settings import ControlSettings as Settings

BOOTSTRAP_KEY_NAME = "bootstrap"
ADMIN_KEY_FILE = "admin.key"
CA_DIR = "ca"
_BOOTSTRAP_ACTOR = "control-plane:first-start"

log = logging.getLogger("ferryman.control")


def _write_secret(path: str, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 from the start; replaces an old file only when complete."""
    tmp = f"{path}.new"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")
    os.replace(tmp, path)


def ensure_admin_key(store: Store, data_dir: str) -> str | None:
    """Create the ``bootstrap`` admin key if the database has none; return the file holding it, or None."""
    path = os.path.join(data_dir, ADMIN_KEY_FILE)
    try:
        with store.begin() as session:
            if session.scalar(select(func.count()).select_from(AdminKey)):
                return None
            _key, plaintext = create_admin_key(session, _BOOTSTRAP_ACTOR, BOOTSTRAP_KEY_NAME)
            _write_secret(path, plaintext)  # inside the transaction: a failed write creates no key
    except StoreError as exc:
        if exc.code == "conflict":  # another control-plane node sharing the database made it first
            return None
        raise
    return path


def _drop_color_message(record: logging.LogRecord) -> bool:
    """uvicorn adds a ``color_message`` extra for its own console format; ours would print it."""
    record.__dict__.pop("color_message", None)
    return True


SECRET_QUERY_PATHS = ("/v1/auth/oidc/begin", "/v1/auth/oidc/callback")  # their queries carry secrets


def _drop_secret_queries(record: logging.LogRecord) -> bool:
    """uvicorn's access log line names the request's path and query: keep the query of the paths
    in ``SECRET_QUERY_PATHS`` out of it."""
    args = record.args
    if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
        path = args[2].split("?", 1)[0]
        if path.rstrip("/") in SECRET_QUERY_PATHS:
            record.args = (*args[:2], f"{path}?<redacted>", *args[3:])
    return True


def _setup_logging(settings: Settings) -> None:
    setup_logging(settings.log_level, settings.log_format, "control", "control")
    for name in ("uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addFilter(_drop_color_message)
    logging.getLogger("uvicorn.access").addFilter(_drop_secret_queries)
    if settings.log_level.lower() != "debug":  # Alembic narrates every migration context at INFO
        logging.getLogger("alembic").setLevel(logging.WARNING)


def _safe_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for a log line; open_store reports bad URLs
        return "<unparsable database URL>"


class _Server(uvicorn.Server):
    """uvicorn, releasing configuration long-polls as soon as shutdown begins.

    uvicorn waits for open requests before it runs the app's shutdown; a node waiting for a
    configuration change would hold that up for its whole wait. Closing the hub first
    answers every waiter (204) at once.
    """

    def __init__(self, config: uvicorn.Config, hub: SnapshotHub) -> None:
        super().__init__(config)
        self.hub = hub

    async def shutdown(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        self.hub.close()
        await super().shutdown(sockets)


def serve(settings: Settings, *, edges_public: Sequence[str] = ()) -> None:
    """Run the control plane's API until interrupted (SIGINT/SIGTERM)."""
    _setup_logging(settings)
    host, port = parse_hostport(settings.control_listen, "FERRYMAN_CONTROL_LISTEN")
    edges = [edge.strip() for edge in edges_public]
    for edge in edges:
        parse_hostport(edge, "--edge")
    oidc = OidcConfig.from_settings(settings)  # ValueError naming the variable
    os.makedirs(settings.data_dir, mode=0o700, exist_ok=True)
    url = database_url(settings.data_dir, {"FERRYMAN_DATABASE_URL": settings.database_url})
    box = (SecretBox.open_file(settings.secrets_key_file) if settings.secrets_key_file
           else SecretBox.open(settings.data_dir))
    store = open_store(url, box)
    if store.migrations_applied:
        log.info("database schema migrated: %s", " -> ".join(store.migrations_applied))
    try:
        with store.read() as session:
            totp.check_secrets_key(session, box)
        ca = open_ca(store, os.path.join(settings.data_dir, CA_DIR))
        token_signer = open_token_signer(store, settings.data_dir, lifetime=settings.access_token_minutes * 60)
        ssl_files: dict[str, str] = {}
        if settings.control_insecure_http:
            log.warning(insecure_warning("the control plane serves"))
        else:
            hosts = tls.parse_hosts(settings.control_hosts)
            cert_file, tls_key_file, issued = tls.server_certificate(ca, settings.data_dir, hosts,
                                                                     settings.cert_lifetime_days)
            ssl_files = {"ssl_certfile": cert_file, "ssl_keyfile": tls_key_file}
            log.info("HTTPS certificate %s for %s", "issued" if issued else "kept", ", ".join(hosts),
                     extra={"path": cert_file})
        print(f"ferryman control: CA hash {tls.pin(ca)} (give it to nodes and clients: --ca-hash; "
              f"registration tokens carry it)", file=sys.stderr, flush=True)
        log.info("CA hash %s", tls.pin(ca))
        key_file = ensure_admin_key(store, settings.data_dir)
        if key_file is not None:
            print(f"ferryman control: created admin key {BOOTSTRAP_KEY_NAME!r}; its secret is in {key_file} "
                  f"(mode 0600). Use it as 'Authorization: Bearer <key>'.", file=sys.stderr, flush=True)
        app = create_app(store, ca, edges_public=edges, heartbeat_interval=settings.heartbeat_interval,
                         cert_lifetime_days=settings.cert_lifetime_days, token_signer=token_signer,
                         traffic_retention_days=settings.traffic_retention_days, oidc=oidc,
                         sign_in_limits=SignInLimits.from_settings(settings), refresh_grace=settings.refresh_grace,
                         oidc_starts_per_minute=settings.oidc_starts_per_minute,
                         node_certificates_per_day=settings.node_certificates_per_day,
                         superseded_cert_grace=settings.superseded_cert_grace,
                         console=ConsoleConfig(idle=timedelta(minutes=settings.console_idle_minutes),
                                               lifetime=timedelta(hours=settings.console_session_hours)))
        with store.read() as session:
            if console_store.console_admins(session) == 0:
                print("ferryman control: the web console (/console) has no admin yet: give a user with a password "
                      "the role (ferryman admin users update UPN --console-role admin); they set up TOTP at their "
                      "first console sign-in.", file=sys.stderr, flush=True)
        log.info("control plane: database %s, CA %s, edges handed to nodes: %s", _safe_url(url), ca.directory,
                 ", ".join(edges) or "(registered edges only)")
        if oidc is not None:
            log.info("OIDC sign-in through %s (client %s, users matched by the %r claim)", oidc.issuer,
                     oidc.client_id, oidc.upn_claim)
        limits = HttpLimits.from_settings(settings)
        http = limited_protocol(limits, LogLimiter(settings.log_limit, settings.log_limit_interval))
        config = uvicorn.Config(app, host=host, port=port, loop="uvloop", log_config=None, server_header=False,
                                proxy_headers=False, lifespan="on", timeout_graceful_shutdown=10,
                                http=http, timeout_keep_alive=limits.keepalive_timeout, **ssl_files)
        try:
            _Server(config, app.state.api.hub).run()
        except KeyboardInterrupt:  # uvicorn re-raises SIGINT once it has shut down gracefully
            pass
    finally:
        store.close()
