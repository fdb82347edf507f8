"""The edge's HTTPS front door wired to the rest of the edge (``FERRYMAN_EDGE_HTTPS_LISTEN``).

``EdgeWeb`` builds a ``web.FrontDoor`` from the edge's settings and gives it the four pieces
it asks for, all backed by what the edge already has:

- the web apps: the snapshot's ``web_apps`` (``configure``, on every configuration);
- ``Authorizer``: every request goes through ``access.admission.admit`` (kind ``web``, the
  web app's name as application) with the edge's current access tables: assignments,
  conditional-access policies, disabled users and revoked sessions from the snapshot, no
  call back to the control plane. A browser has no client agent, so its principal names no
  device (a policy that needs a compliant device denies it, saying so);
- ``BackendDialer``: a tunnel flow to the least-loaded connector of the app's group
  (``Edge.pick_connector``), with a grant signed for exactly that backend, as for a
  client's flow (``webflow.WebFlow`` is the byte stream);
- ``SignIn``: password + TOTP sign-in, refresh and sign-out through the control plane's
  ``/v1/auth`` routes (the access token that comes back is verified with the snapshot's
  token keys before it is believed);
- ``OidcSignIn`` (with ``FERRYMAN_WEB_OIDC_LABEL``): sign-in through the control plane's
  external OIDC provider, by the edge's node routes ``/v1/node/web-oidc/start`` and
  ``/finish`` (``control.api.oidc``): the control plane does PKCE, nonce and the ID-token
  checks; the front door's sealed state cookie binds the round trip to the browser that
  started it, and its state is the verifier the edge collects the sign-in with.

Each HTTP transaction becomes a traffic-log record (``FlowRecord`` with ``application_kind``
``web`` and the HTTP fields). Keys: ``FERRYMAN_WEB_COOKIE_KEYS`` seal session cookies
(every edge needs the same; empty: a random key for this process), the ES256 key of
``X-Ferryman-Jwt-Assertion`` comes from ``FERRYMAN_WEB_ASSERTION_KEY`` (empty: random).
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..access.admission import AccessRequest, admit
from ..access.grants import sign as sign_grant
from ..access.policy import Principal as AccessPrincipal
from ..access.tokens import TokenError
from ..basics.hostport import parse_hostport
from ..contract.flowrecord import FlowRecord, new_connection_id
from ..contract.snapshot import ConfigSnapshot, SnapWebApp
from ..contract.webapps import external_endpoint, internal_endpoint
from ..controllink import http as httpclient
from ..controllink.link import ControlError
from ..wire.connection import FlowError
from ..wire.frames import Open
from . import web
from .relay import RelayError
from .webflow import FlowRefused, WebFlow

if TYPE_CHECKING:
    from .node import Edge
    from .splice import EdgeTunnel

log = logging.getLogger("ferryman.edge.web")

ADMIT_CACHE_ENTRIES = 100_000  # allowing decisions remembered (FERRYMAN_WEB_ADMIT_CACHE), then forgotten at once
SIGN_IN_TIMEOUT = 15.0  # seconds for one call to the control plane's /v1/auth routes
SESSION_BOUND = 30 * 86400  # the longest a sign-in session lives (the control plane ends it earlier)


def web_settings(edge_settings) -> web.WebSettings:
    s = edge_settings
    return web.WebSettings(
        auth_host=s.web_auth_host, max_header_block=s.web_max_header_block, max_headers=s.web_max_headers,
        max_url_length=s.web_max_url_length, max_body_size=s.web_max_body_size,
        backend_timeout=s.web_backend_timeout, backend_timeout_long=s.web_backend_timeout_long,
        backend_connect_timeout=s.web_backend_connect_timeout, app_rate=s.web_app_rate, edge_rate=s.web_edge_rate,
        sign_in_rate=s.web_sign_in_rate, header_timeout=s.web_header_timeout, idle_timeout=s.web_idle_timeout,
        websocket_idle_timeout=s.web_websocket_idle_timeout, max_connections=s.web_max_connections)


def web_app(app: SnapWebApp) -> web.WebApp:
    return web.WebApp(name=app.name, external_url=app.external_url, internal_url=app.internal_url,
                      preauth=app.preauth, backend_timeout=app.backend_timeout,
                      translate_headers=app.translate_headers, translate_body=app.translate_body,
                      cookie_http_only=app.cookie_http_only, cookie_persistent=app.cookie_persistent,
                      header_sso=dict(app.header_sso), websocket=app.websocket, verify_backend=app.verify_backend,
                      backend_ca=app.backend_ca, cors_preflight_bypass=app.cors_preflight_bypass,
                      certificate=app.certificate, certificate_key=app.certificate_key)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ValueError(f"{what} {path}: {exc.strerror}") from None


class EdgeWeb:
    """The front door of one edge; ``ValueError`` (naming the setting) when it cannot be built."""

    def __init__(self, edge: Edge) -> None:
        s = edge.settings
        self.edge = edge
        self.listen = parse_hostport(s.edge_https_listen, "FERRYMAN_EDGE_HTTPS_LISTEN", allow_zero=True)
        if not s.edge_https_cert or not s.edge_https_key:
            raise ValueError("FERRYMAN_EDGE_HTTPS_LISTEN needs FERRYMAN_EDGE_HTTPS_CERT and FERRYMAN_EDGE_HTTPS_KEY: "
                             "the certificate browsers are shown for the sign-in host and the web apps' hosts")
        if not s.web_auth_host:
            raise ValueError("FERRYMAN_EDGE_HTTPS_LISTEN needs FERRYMAN_WEB_AUTH_HOST: the external host[:port] of "
                             "the sign-in site (e.g. login.corp.example)")
        if edge.link is None:
            raise ValueError("the HTTPS front door needs an edge registered with the control plane (web apps, "
                             "users and sign-in come from it)")
        certificate = (_read(s.edge_https_cert, "FERRYMAN_EDGE_HTTPS_CERT").decode(),
                       _read(s.edge_https_key, "FERRYMAN_EDGE_HTTPS_KEY").decode())
        if s.web_cookie_keys:
            try:
                keys = web.KeyRing.from_text(s.web_cookie_keys)
            except ValueError as exc:
                raise ValueError(f"FERRYMAN_WEB_COOKIE_KEYS: {exc}") from None
        else:
            keys = web.KeyRing.generate()
            log.warning("FERRYMAN_WEB_COOKIE_KEYS is not set: web sessions are sealed with a random key of this "
                        "process (they end when it restarts, and no other edge can open them)")
        if s.web_assertion_key:
            try:
                signer = web.AssertionSigner.from_pem(_read(s.web_assertion_key, "FERRYMAN_WEB_ASSERTION_KEY"))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"FERRYMAN_WEB_ASSERTION_KEY: {exc}") from None
        else:
            signer = web.AssertionSigner.generate()
        self.groups: dict[str, str] = {}  # web app -> connector group
        self.backends: dict[str, tuple[str, int]] = {}  # web app -> internal host, port
        self.ports: dict[str, int] = {}  # web app -> external port
        try:
            self.door = web.FrontDoor(web_settings(s), authorizer=_Authorizer(edge), dialer=_Dialer(self),
                                      sign_in=_ControlSignIn(edge), cookie_keys=keys, signer=signer,
                                      certificate=certificate, on_record=self._record,
                                      oidc=_ControlOidc(edge, s.web_oidc_label) if s.web_oidc_label else None)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ValueError(f"the HTTPS front door cannot start: {exc}") from None
        self.address: tuple[str, int] | None = None
        edge.stats.extra_counters["ferryman_web_events_total"] = (
            "HTTPS front door events, by event: refusals (web_unknown_host, web_denied, web_rate_limited_app, "
            "web_header_too_large, ...), backend failures (web_backend_timeout, web_dial_no_connector, ...), "
            "clients cut (web_client_write_timeout), pooled connections retried (web_backend_retry), requests "
            "served in callbacks (web_direct)", "event", lambda: self.door.counters)

    def configure(self, snapshot: ConfigSnapshot) -> None:
        """Publish the snapshot's web apps (``web.WebAppError``: the previous ones stay)."""
        apps = [web_app(a) for a in snapshot.web_apps]
        self.door.set_apps(apps)
        self.groups = {a.name: a.connector_group for a in snapshot.web_apps}
        backends, ports = {}, {}
        for a in snapshot.web_apps:
            end = internal_endpoint(a.internal_url)
            backends[a.name] = (end.host, end.port)
            ports[a.name] = external_endpoint(a.external_url).port
        self.backends, self.ports = backends, ports
        for sid in snapshot.revoked_sessions:  # ended sessions: their WebSockets and pooled connections go now
            self.door.cut_session(sid, "session revoked")
        self.door.recheck()

    async def start(self, sock: socket.socket | None = None) -> tuple[str, int]:
        """Listen on FERRYMAN_EDGE_HTTPS_LISTEN, or on ``sock`` (a worker's, from its supervisor)."""
        host, port = self.listen
        addresses = await self.door.start(host, port, sock=sock)
        self.address = addresses[0]
        return self.address

    def stop_listening(self) -> None:
        self.door.stop_listening()

    def in_flight(self) -> int:
        """Web requests being answered now."""
        return self.door.in_flight

    async def close(self) -> None:
        await self.door.close()

    def _record(self, rec: web.TransactionRecord) -> None:
        records = self.edge.records
        if records.queue is None:
            return
        source_ip, _, port = rec.source.rpartition(":")  # "ip:port" (IPv6 unbracketed), or an address alone
        if not port.isdigit():
            source_ip, port = rec.source, "0"
        start = rec.time - rec.duration if rec.time >= rec.duration else rec.time
        record = FlowRecord(
            connection_id=new_connection_id(), transaction_id=rec.session_id[:64], start=start, end=rec.time,
            duration_ms=min(int(rec.duration * 1000), 2**31 - 1), user_id=rec.user_id, upn=rec.upn,
            device_id=rec.device_id, source_ip=source_ip, source_port=int(port),
            destination_fqdn=rec.host.rsplit(":", 1)[0], destination_port=self.ports.get(rec.app, 443),
            transport="tcp", network="IPv6" if ":" in source_ip else "IPv4" if source_ip else "",
            application=rec.app, application_kind="web" if rec.app else "", policy=rec.policy,
            action=rec.action, reason_code=rec.code, connector_name=rec.connector, relay_edge=rec.relay_edge, edge=self.edge.name,
            bytes_sent=rec.bytes_in, bytes_received=rec.bytes_out, close_reason=rec.reason[:1024],
            http_method=rec.method, http_host=rec.host, http_path=rec.path[:1024], http_status=rec.status,
            user_agent=rec.user_agent[:1024], http_protocol=rec.protocol[:16])
        records.queue.put(record)


class _Authorizer:
    """Every web request through ``admit()`` with the edge's current tables.

    With ``FERRYMAN_WEB_ADMIT_CACHE`` > 0 an allowing decision is reused for that many seconds
    (never past the session's own end) for the same principal (session, user, sign-in),
    web app, host and source address — and only while the edge's tables are the ones it was
    made with: a new configuration (assignment removed, user disabled, session revoked,
    policy changed) replaces the tables, which empties the table, so the very next request
    is decided anew. A denial is never reused. At most ``ADMIT_CACHE_ENTRIES`` are kept."""

    def __init__(self, edge: Edge) -> None:
        self.edge = edge
        self.ttl = edge.settings.web_admit_cache
        self._tables: object = None
        self._allowed: dict[tuple, tuple[float, web.Verdict]] = {}

    def authorize(self, app: web.WebApp, principal: web.Principal, facts: web.RequestFacts) -> web.Verdict:
        edge = self.edge
        tables = edge.tables
        if tables.unconfigured:  # no configuration yet: nothing is admitted
            return web.Verdict(allowed=False, code="no_config", reason=tables.unconfigured)
        now = time.time()
        ttl = self.ttl
        key: tuple | None = None
        if ttl > 0:
            if tables is not self._tables:
                self._allowed.clear()
                self._tables = tables
            key = (principal, app.name, facts.host, facts.source)
            hit = self._allowed.get(key)
            if hit is not None:
                if now < hit[0]:
                    return hit[1]
                del self._allowed[key]
        who = AccessPrincipal(user_id=principal.user_id, upn=principal.upn, session_id=principal.session_id,
                              device_id=principal.device_id, amr=tuple(principal.amr), auth_time=principal.auth_time,
                              expires=principal.expires)
        verdict = admit(AccessRequest(host=facts.host, port=0, protocol="tcp", source=facts.source, kind="web",
                                      application=app.name), who, tables, now)
        if not verdict.allowed:
            return web.Verdict(allowed=False, code=verdict.code, reason=verdict.reason, policy=verdict.policy)
        user = tables.access.users.get(principal.user_id) if tables.access is not None else None
        allowed = web.Verdict(allowed=True, policy=verdict.policy, groups=tuple(user.groups) if user else (),
                              claims={"email": principal.upn})
        if key is not None:
            until = now + ttl
            if principal.expires:
                until = min(until, principal.expires)
            if len(self._allowed) >= ADMIT_CACHE_ENTRIES:
                self._allowed.clear()
            self._allowed[key] = (until, allowed)
        return allowed


class _Dialer:
    def __init__(self, web_door: EdgeWeb) -> None:
        self.web = web_door

    async def _route(self, group: str) -> tuple[EdgeTunnel, str]:
        """(tunnel, connector name) for a backend flow: a tunnel of a connector of ``group`` on this
        edge, else a relay tunnel to the sibling worker or peer edge holding one (as for a client's flow)."""
        edge = self.web.edge
        connector = edge.pick_connector(group)
        if connector is not None:
            return connector, connector.peer_name
        relays = edge.relay.candidates(group) if edge.relay is not None else []
        if relays:
            try:
                return await edge.relay_route(relays)
            except RelayError as exc:
                log.warning("web backend flow: relay failed", extra={"group": group, "code": exc.code,
                                                                     "reason": str(exc)})
        raise web.DialError("no_connector", f"No connector of group '{group}' is connected for this "
                                            "application.", 503)

    async def open(self, app: web.WebApp, principal: web.Principal | None) -> WebFlow:
        edge = self.web.edge
        group = self.web.groups.get(app.name)
        backend = self.web.backends.get(app.name)
        if group is None or backend is None:
            raise web.DialError("no_application", "The application is no longer published.", 502)
        out, connector = await self._route(group)
        relayed = out not in edge.connectors
        host, port = backend
        connection = new_connection_id()
        user = principal.upn if principal is not None else ""
        # Always signed (never MAC'd under the tunnel's key): the grant may travel through a relay.
        # The certificate that verifies it goes along even on a direct tunnel: after a renewal the
        # edge signs with its new key, while a connector tunnel set up before it knows the old one.
        grant = sign_grant(edge._grant_key, edge=edge.name, connector=connector, host=host, port=port,
                           protocol="tcp", connection=connection, user=user, device="", now=time.time(),
                           app=app.name)
        try:
            kfid = out.open_flow(Open(host=host, port=port, protocol="tcp", app=app.name, user=user,
                                      connection=connection, process="browser", grant=grant,
                                      relay_to=connector if relayed else "",
                                      signer=edge._cert_der))
        except FlowError as exc:
            raise web.DialError("unreachable", f"The connector could not take the request ({exc.code}).",
                                502) from None
        if relayed:
            edge.stats.count(edge.stats.relayed, "out")
        flow = WebFlow(out, kfid, app.name, connection, relay_to=connector if relayed else "")
        out.routes[kfid] = flow  # type: ignore[assignment]  # the edge dispatches WebFlow events itself
        try:
            await flow.opened
        except FlowRefused as exc:
            log.info("web backend refused at connector", extra={"app": app.name, "connector": connector,
                                                               "code": exc.code, "reason": exc.reason})
            status = 504 if exc.code in ("timeout", "dial_timeout") else 502
            raise web.DialError(exc.code, "The application could not be reached.", status) from None
        except BaseException:
            flow.close()
            raise
        return flow


class _ControlSignIn:
    """Sign-in, refresh and sign-out through the control plane's public ``/v1/auth`` routes."""

    def __init__(self, edge: Edge) -> None:
        self.edge = edge

    async def _post(self, target: str, body: Mapping[str, object], token: str = "") -> dict:
        link = self.edge.link
        assert link is not None
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            answer = await httpclient.request(link.base, "POST", target, headers=headers,
                                              body=json.dumps(body).encode(), timeout=SIGN_IN_TIMEOUT,
                                              max_body=1 << 20, user_agent="ferryman-edge",
                                              ssl_context=link.client.tls)  # the pinned control-plane CA
        except httpclient.HttpError as exc:
            log.warning("sign-in through the control plane failed: %s", exc)
            raise web.SignInError("unavailable", "Sign-in is unavailable right now; try again shortly.", 503) from None
        try:
            payload = json.loads(answer.body) if answer.body else {}
        except ValueError:
            payload = {}
        if answer.status >= 300:
            code = payload.get("code") if isinstance(payload, dict) else None
            message = payload.get("error") if isinstance(payload, dict) else None
            retry = float(answer.headers.get("retry-after", "0") or 0) if answer.status == 429 else 0.0
            status = answer.status if answer.status in (401, 403, 429) else 503
            raise web.SignInError(str(code or "auth_failed"), str(message or "Sign-in failed."), status, retry)
        if not isinstance(payload, dict):
            raise web.SignInError("unavailable", "Sign-in is unavailable right now; try again shortly.", 503)
        return payload

    def _result(self, payload: dict) -> web.SignInResult:
        verifier = self.edge.tokens
        if verifier is None:
            raise web.SignInError("unavailable", "This edge has no configuration from the control plane yet.", 503)
        try:
            who = verifier.principal(str(payload.get("access_token", "")), "")
        except TokenError as exc:
            log.warning("the control plane's access token did not verify at the edge: %s", exc)
            raise web.SignInError("unavailable", "Sign-in is unavailable right now; try again shortly.", 503) from None
        principal = web.Principal(user_id=who.user_id, upn=who.upn, session_id=who.session_id, device_id="",
                                  amr=tuple(who.amr), auth_time=who.auth_time, expires=who.expires)
        return web.SignInResult(principal=principal, refresh_token=str(payload.get("refresh_token", "")),
                                session_expires=int(time.time()) + SESSION_BOUND)

    async def sign_in(self, upn: str, password: str, otp: str, source: str) -> web.SignInResult:
        body: dict[str, object] = {"upn": upn, "password": password}
        if otp:
            body["totp_code"] = otp
        return self._result(await self._post("/v1/auth/sign-in", body))

    async def refresh(self, refresh_token: str, source: str) -> web.SignInResult:
        return self._result(await self._post("/v1/auth/refresh", {"refresh_token": refresh_token}))

    async def sign_out(self, principal: web.Principal, refresh_token: str) -> None:
        """Sign-out ends the session at the control plane (every edge then refuses it)."""
        if not refresh_token:
            return
        fresh = await self._post("/v1/auth/refresh", {"refresh_token": refresh_token})
        await self._post("/v1/auth/sign-out", {}, token=str(fresh.get("access_token", "")))


class _ControlOidc:
    """Browser sign-in through the control plane's OIDC provider (module doc)."""

    def __init__(self, edge: Edge, label: str) -> None:
        self.edge = edge
        self.label = label
        self.finisher = _ControlSignIn(edge)

    async def _call(self, target: str, body: Mapping[str, object]) -> dict:
        link = self.edge.link
        assert link is not None
        try:
            _status, payload = await link.client.call("POST", target, dict(body), timeout=SIGN_IN_TIMEOUT)
        except ControlError as exc:
            log.warning("OIDC sign-in through the control plane: %s", exc)
            if exc.status in (401, 403, 409):
                raise web.SignInError("oidc_refused", f"The sign-in was refused: {exc}", 403) from None
            raise web.SignInError("oidc_unavailable", "Sign-in with the external provider is unavailable right "
                                                      "now; try again shortly.", 503) from None
        try:
            answer = json.loads(payload)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise web.SignInError("oidc_unavailable", "The control plane's answer was not understood.", 503)
        return answer

    async def begin(self, callback_url: str, state: str) -> str:
        answer = await self._call("/v1/node/web-oidc/start", {"return_to": callback_url, "state": state})
        return str(answer.get("authorization_url", ""))

    async def finish(self, params: Mapping[str, str], callback_url: str, source: str) -> web.SignInResult:
        login, handoff, state = params.get("login", ""), params.get("handoff", ""), params.get("state", "")
        if not login or not handoff:
            raise web.SignInError("oidc_incomplete", "The answer from the sign-in is incomplete; sign in again.", 400)
        answer = await self._call("/v1/node/web-oidc/finish", {"login_id": login, "state": state,
                                                               "handoff": handoff})
        return self.finisher._result(answer)
