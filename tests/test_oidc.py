"""Sign-in through an external OIDC provider (``control.oidc``, ``/v1/auth/oidc``), served for real.

The OIDC provider is a small real one in this module (``Provider``: an HTTP server on
127.0.0.1 with discovery, JWKS, an authorization endpoint that "signs the browser user in"
at once and redirects to the callback, and a token endpoint that checks the client, the
redirect URI, the code (once) and the PKCE verifier against the S256 challenge, then signs
an ID token). It misbehaves on demand (``Provider.faults``). The control plane runs as
``python -m dataplane control`` pointed at it; the tests play the browser (``Browser``:
urllib with a cookie jar, following redirects up to the one to the agent's loopback, whose
handoff it reads) and the client agent (``Agent``: start and poll with a poll verifier of
its own), or run ``python -m dataplane client login --oidc`` (its loopback listener for real).

Besides the sign-in itself: users are matched by the ID token's (``iss``, ``sub``), linked
at first by a verified email only or by an admin; a sign-in is bound to the agent that
started it (poll verifier, handoff through its loopback) and to the browser that began it
(cookie), so neither someone who sees the authorization URL or the login id nor someone who
leads a victim's browser through a sign-in they started gets anything; starts are limited
per source address; no code, state, handoff or verifier reaches a log line.
"""

from __future__ import annotations

import base64
import hashlib
import http.cookiejar
import json
import os
import re
import select
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from joserfc import jwt
from joserfc.jwk import RSAKey

from control.oidc import OidcConfig, OidcError, OidcProvider, PendingLogins
from control.tokens import verify_access_token
from dataplane.basics.pki import new_key_and_csr
from dataplane.basics.settings import ControlSettings, load

import controlplane
from controlplane import ROOT, environment
from controlplane import free_port as _free_port
from controlplane import stop as _stop
from sources import call_from

pytestmark = pytest.mark.timeout(60)

CLIENT_ID = "ferryman-test"
CLIENT_SECRET = "s3cret/with:odd&chars"


# ---------------------------------------------------------------------------- the OIDC provider


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Grant:
    client_id: str
    redirect_uri: str
    nonce: str
    challenge: str
    claims: dict[str, Any]


@dataclass
class Provider:
    """A real (small) OIDC provider. ``user`` is who the "browser user" is at the next
    authorization; ``faults`` makes it misbehave: ``nonce``, ``audience``, ``issuer``,
    ``expired`` (ID token claims), ``signature`` (signed by another key with the same kid),
    ``unknown_kid``, ``pkce`` (remembers another code challenge than the one sent), ``deny``
    (the user refuses: error=access_denied)."""

    server: ThreadingHTTPServer = field(init=False)
    key: RSAKey = field(default_factory=lambda: RSAKey.generate_key(2048, parameters={"kid": "k1", "use": "sig"}))
    rogue: RSAKey = field(default_factory=lambda: RSAKey.generate_key(2048, parameters={"kid": "k1"}))
    user: dict[str, Any] = field(default_factory=dict)
    faults: set[str] = field(default_factory=set)
    grants: dict[str, Grant] = field(default_factory=dict)
    token_requests: list[dict[str, Any]] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)  # every code and state it saw: secrets no log may show

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> None:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def _json(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                url = urllib.parse.urlsplit(self.path)
                if url.path == "/.well-known/openid-configuration":
                    self._json(200, provider.discovery())
                elif url.path == "/jwks":
                    self._json(200, {"keys": [provider.key.as_dict(private=False)]})
                elif url.path == "/authorize":
                    status, location = provider.authorize(dict(urllib.parse.parse_qsl(url.query)))
                    self.send_response(status)
                    self.send_header("Location" if status == 302 else "X-Error", location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self._json(404, {"error": "not_found"})

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", "0"))
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                if urllib.parse.urlsplit(self.path).path != "/token":
                    self._json(404, {"error": "not_found"})
                    return
                self._json(*provider.token(form, self.headers.get("Authorization", "")))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def discovery(self) -> dict[str, Any]:
        return {"issuer": self.issuer, "authorization_endpoint": f"{self.issuer}/authorize",
                "token_endpoint": f"{self.issuer}/token", "jwks_uri": f"{self.issuer}/jwks",
                "response_types_supported": ["code"], "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"], "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic"]}

    def authorize(self, query: dict[str, str]) -> tuple[int, str]:
        """(302, the redirect back with code and state), or (400, why) for a bad request."""
        for name, want in (("response_type", "code"), ("client_id", CLIENT_ID), ("code_challenge_method", "S256")):
            if query.get(name) != want:
                return 400, f"{name} is {query.get(name)!r}, not {want!r}"
        if "openid" not in query.get("scope", "").split():
            return 400, "scope lacks openid"
        for name in ("redirect_uri", "state", "nonce", "code_challenge"):
            if not query.get(name):
                return 400, f"{name} is missing"
        back = query["redirect_uri"]
        self.issued.append(query["state"])
        if "deny" in self.faults:
            return 302, back + "?" + urllib.parse.urlencode({"error": "access_denied", "state": query["state"],
                                                             "error_description": "the user said no"})
        code = uuid.uuid4().hex
        self.issued.append(code)
        challenge = query["code_challenge"]
        if "pkce" in self.faults:
            challenge = _b64(hashlib.sha256(b"some other verifier").digest())
        self.grants[code] = Grant(CLIENT_ID, back, query["nonce"], challenge, dict(self.user))
        return 302, back + "?" + urllib.parse.urlencode({"code": code, "state": query["state"]})

    def token(self, form: dict[str, str], authorization: str) -> tuple[int, dict[str, Any]]:
        self.token_requests.append(dict(form, authorization=authorization))
        if not authorization.startswith("Basic "):
            return 401, {"error": "invalid_client", "error_description": "client_secret_basic is required"}
        user, _, secret = base64.b64decode(authorization[6:]).decode().partition(":")
        if (urllib.parse.unquote_plus(user), urllib.parse.unquote_plus(secret)) != (CLIENT_ID, CLIENT_SECRET):
            return 401, {"error": "invalid_client", "error_description": "wrong client id or secret"}
        if form.get("grant_type") != "authorization_code":
            return 400, {"error": "unsupported_grant_type"}
        grant = self.grants.pop(form.get("code", ""), None)  # a code is good once
        if grant is None:
            return 400, {"error": "invalid_grant", "error_description": "unknown or used code"}
        if form.get("redirect_uri") != grant.redirect_uri:
            return 400, {"error": "invalid_grant", "error_description": "redirect_uri differs from the authorization"}
        if _b64(hashlib.sha256(form.get("code_verifier", "").encode()).digest()) != grant.challenge:
            return 400, {"error": "invalid_grant", "error_description": "PKCE verification failed"}
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": grant.claims.get("sub", uuid.uuid4().hex), "aud": CLIENT_ID,
                  "exp": now + 300, "iat": now, "nonce": grant.nonce, **grant.claims}
        if "nonce" in self.faults:
            claims["nonce"] = "not-the-nonce"
        if "audience" in self.faults:
            claims["aud"] = ["some-other-client"]
        if "issuer" in self.faults:
            claims["iss"] = "https://evil.example"
        if "expired" in self.faults:
            claims["exp"], claims["iat"] = now - 600, now - 900
        key, kid = (self.rogue if "signature" in self.faults else self.key), "k1"
        if "unknown_kid" in self.faults:
            key, kid = self.rogue, "k2"
        id_token = jwt.encode({"alg": "RS256", "kid": kid, "typ": "JWT"}, claims, key)
        return 200, {"access_token": "at-" + uuid.uuid4().hex, "token_type": "Bearer", "expires_in": 300,
                     "id_token": id_token}


# ---------------------------------------------------------------------------- the control plane


class Control(controlplane.Control):
    """The shared control plane handle with this module's two-value ``call``."""

    def call(self, method: str, path: str, body: Any = None, *,  # type: ignore[override]
             admin: bool = False) -> tuple[int, Any]:
        """(status, decoded JSON body); the bootstrap admin key is sent only if ``admin``."""
        status, payload, _ = super().call(method, path, body, key="" if admin else None)
        return status, payload


# What the test's browser trusts: the CA of every control plane this module started.
BROWSER_TRUST = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def _start_control(data_dir: Path, env_extra: dict[str, str], port: int | None = None) -> Control:
    control = Control.launch(data_dir, env=env_extra, port=port)
    BROWSER_TRUST.load_verify_locations(cadata=control.ca_pem.decode())
    return control


@pytest.fixture(scope="module")
def provider() -> Iterator[Provider]:
    p = Provider()
    p.start()
    yield p
    p.server.shutdown()
    p.server.server_close()


@pytest.fixture(scope="module")
def control(provider: Provider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Control]:
    port = _free_port()  # chosen first: the redirect URI names it
    ctl = _start_control(tmp_path_factory.mktemp("control"), {
        "FERRYMAN_OIDC_ISSUER": provider.issuer, "FERRYMAN_OIDC_CLIENT_ID": CLIENT_ID,
        "FERRYMAN_OIDC_CLIENT_SECRET": CLIENT_SECRET,
        "FERRYMAN_OIDC_REDIRECT_URI": f"https://127.0.0.1:{port}/v1/auth/oidc/callback",
        "FERRYMAN_OIDC_STARTS_PER_MINUTE": "1000",  # this module starts many sign-ins from one address
    }, port)
    try:
        yield ctl
    finally:
        _stop(ctl.proc)


@pytest.fixture(autouse=True)
def _fresh_provider(request: pytest.FixtureRequest) -> None:
    if "provider" in request.fixturenames:
        p: Provider = request.getfixturevalue("provider")
        p.user, p.faults = {}, set()


def make_user(control: Control, upn: str) -> dict[str, Any]:
    status, user = control.call("POST", "/v1/users", {"upn": upn, "display_name": upn.split("@")[0].title()},
                                admin=True)
    assert status == 201, user
    return user


def _challenge(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


@dataclass
class Agent:
    """A client agent's side of a sign-in: its loopback port (nothing listens: the tests read the
    redirect there), its poll verifier, and the control plane's start answer."""

    control: Control
    port: int = field(default_factory=_free_port)
    verifier: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    body: dict[str, Any] = field(default_factory=dict)
    key_pem: bytes = b""

    def start(self, name: str = "laptop") -> Agent:
        self.key_pem, csr_pem = new_key_and_csr("device")
        status, body = self.control.call("POST", "/v1/auth/oidc/start", {
            "device": {"csr_pem": csr_pem.decode(), "name": name, "os": "Linux", "os_version": "6.1"},
            "redirect_port": self.port, "poll_challenge": _challenge(self.verifier)})
        assert status == 200, body
        assert set(body) == {"login_id", "begin_url", "poll_interval", "expires_in"}
        assert 590 <= body["expires_in"] <= 600 and body["poll_interval"] >= 1
        self.body = body
        return self

    @property
    def login_id(self) -> str:
        return self.body["login_id"]

    @property
    def begin_url(self) -> str:
        return self.body["begin_url"]

    def poll(self, handoff: str | None = None, verifier: str | None = None) -> tuple[int, Any]:
        request: dict[str, Any] = {"login_id": self.login_id, "poll_verifier": verifier or self.verifier}
        if handoff is not None:
            request["handoff"] = handoff
        return self.control.call("POST", "/v1/auth/oidc/poll", request)

    def handoff_of(self, location: str) -> str:
        """The handoff in the control plane's redirect to this agent's loopback."""
        url = urllib.parse.urlsplit(location)
        assert (url.scheme, url.hostname, url.port, url.path) == ("http", "127.0.0.1", self.port, "/ferryman/oidc"), \
            location
        return dict(urllib.parse.parse_qsl(url.query))["handoff"]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None


class _StopAtLoopback(urllib.request.HTTPRedirectHandler):
    def __init__(self, visited: list[str], follow: bool) -> None:
        self.visited = visited
        self.follow = follow

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if urllib.parse.urlsplit(newurl).path == "/ferryman/oidc" and not self.follow:
            return None  # the agent's loopback: the test reads the Location instead
        self.visited.append(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class Browser:
    """A browser: cookies kept, redirects followed except (unless ``follow_loopback``) the last one,
    to the agent's loopback (``visited``: every URL a redirect led to)."""

    def __init__(self, follow_loopback: bool = False) -> None:
        self.cookies = http.cookiejar.CookieJar()
        self.visited: list[str] = []
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies),
                                                  urllib.request.HTTPSHandler(context=BROWSER_TRUST),
                                                  _StopAtLoopback(self.visited, follow_loopback))

    def open(self, url: str) -> tuple[int, str, str]:
        """(status, page text, final URL: the Location of a redirect to the agent's loopback)."""
        try:
            with self.opener.open(url, timeout=15) as response:
                return response.status, response.read().decode(), response.url
        except urllib.error.HTTPError as exc:
            with exc:
                if exc.code in (302, 303) and exc.headers.get("Location"):
                    return exc.code, exc.read().decode(), exc.headers["Location"]
                return exc.code, exc.read().decode(), exc.url

    def sign_in(self, agent: Agent) -> str:
        """Go through ``agent``'s sign-in (begin URL, provider, callback): the handoff for its loopback."""
        status, page, location = self.open(agent.begin_url)
        assert status == 303, page
        return agent.handoff_of(location)


def browse(url: str) -> tuple[int, str, str]:
    """Open ``url`` in a fresh browser (no cookies)."""
    return Browser().open(url)


def sign_in_refused(control: Control, provider: Provider, email: str, **user: Any) -> tuple[int, str, Any]:
    """A whole sign-in expected to fail: (page status, page, (poll status, poll body)); a claim given
    as None is left out."""
    provider.user = {k: v for k, v in {"email": email, "email_verified": True, **user}.items() if v is not None}
    agent = Agent(control).start()
    status, page, _ = Browser().open(agent.begin_url)
    answer = agent.poll()
    assert agent.poll()[0] == 404  # a refusal is handed out once too
    return status, page, answer


# ---------------------------------------------------------------------------- sign-in


@pytest.mark.parametrize(("provider_amr", "amr"), [(["pwd", "otp"], ["pwd", "mfa"]), (["pwd"], ["pwd"])])
def test_sign_in_gives_tokens_and_a_device_certificate(control: Control, provider: Provider,
                                                       provider_amr: list[str], amr: list[str]) -> None:
    upn = f"alice-{amr[-1]}@corp.example"
    user = make_user(control, upn)
    auth_time = int(time.time()) - 30
    provider.user = {"email": upn.upper(), "email_verified": True, "amr": provider_amr, "auth_time": auth_time,
                     "sub": f"sub-{upn}"}
    agent = Agent(control).start()
    assert agent.begin_url.startswith(control.url + "/v1/auth/oidc/begin?login=")
    assert agent.poll() == (202, {"status": "pending", "expires_in": pytest.approx(600, abs=10)})
    browser = Browser()
    with pytest.raises(urllib.error.HTTPError) as redirect:  # the begin URL: a cookie, then the provider
        urllib.request.build_opener(urllib.request.HTTPCookieProcessor(browser.cookies), _NoRedirect,
                                    urllib.request.HTTPSHandler(context=BROWSER_TRUST)).open(
            agent.begin_url, timeout=15)
    assert redirect.value.code == 302
    set_cookie = redirect.value.headers["Set-Cookie"]
    assert set_cookie.startswith("ferryman-oidc-") and "; Path=/v1/auth/oidc; " in set_cookie
    assert "HttpOnly" in set_cookie and "SameSite=Lax" in set_cookie
    authorize = redirect.value.headers["Location"]
    assert authorize.startswith(provider.issuer + "/authorize?")
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(authorize).query))
    assert query["scope"] == "openid email profile" and query["code_challenge_method"] == "S256"
    assert query["redirect_uri"] == control.url + "/v1/auth/oidc/callback"
    status, page, location = browser.open(authorize)
    assert status == 303, page
    handoff = agent.handoff_of(location)
    # The control plane authenticated at the token endpoint (Basic) with the PKCE verifier.
    request_seen = provider.token_requests[-1]
    assert request_seen["grant_type"] == "authorization_code" and len(request_seen["code_verifier"]) >= 43
    assert "client_secret" not in request_seen and request_seen["authorization"].startswith("Basic ")
    assert agent.poll() == (202, {"status": "pending", "expires_in": pytest.approx(600, abs=10)})  # no handoff yet
    status, answer = agent.poll(handoff)
    assert status == 200, answer
    assert answer["user"] == {"id": user["id"], "upn": upn, "display_name": user["display_name"], "groups": []}
    assert answer["token_type"] == "Bearer" and answer["refresh_token"].startswith(f"fmrt_{answer['session_id']}.")
    device = answer["device"]
    cert = x509.load_pem_x509_certificate(device["certificate_pem"].encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device["id"]
    assert format(cert.serial_number, "x") == device["serial"]
    status, keys = control.call("GET", "/v1/auth/keys")
    assert status == 200
    claims = verify_access_token(answer["access_token"], keys["keys"])
    assert claims.amr == amr and claims.sub == user["id"] and claims.upn == upn
    assert claims.did == device["id"] and claims.sid == answer["session_id"] and claims.auth_time == auth_time
    # Handed out once; the refresh token works like a password sign-in's.
    assert agent.poll(handoff)[0] == 404
    status, refreshed = control.call("POST", "/v1/auth/refresh", {"refresh_token": answer["refresh_token"]})
    assert status == 200, refreshed
    assert verify_access_token(refreshed["access_token"], keys["keys"]).amr == amr
    status, sessions = control.call("GET", f"/v1/users/{user['id']}/sessions", admin=True)
    assert status == 200, sessions  # the admin view of the session shows what the provider proved
    assert [s["amr"] for s in sessions if s["id"] == answer["session_id"]] == [amr]


def test_unknown_and_disabled_users_are_refused(control: Control, provider: Provider) -> None:
    status, page, answer = sign_in_refused(control, provider, "nobody@corp.example", amr=["mfa"])
    message = ("'nobody@corp.example' (the OIDC provider's 'email' claim) is not a Ferryman user: an administrator "
               "must create the user first (users are not created at sign-in)")
    assert status == 403 and message.replace("'", "&#x27;") in page
    assert answer == (403, {"error": message, "code": "unknown_user"})
    user = make_user(control, "dave@corp.example")
    status, body = control.call("PATCH", f"/v1/users/{user['id']}", {"disabled": True}, admin=True)
    assert status == 200 and body["disabled"] is True
    status, page, answer = sign_in_refused(control, provider, "dave@corp.example")
    assert status == 401 and "account is disabled" in page
    assert answer == (401, {"error": "account is disabled", "code": "account_disabled"})
    make_user(control, "erin@corp.example")
    for verified in (False, "true", None):  # only a JSON true vouches for the email (None: no such claim)
        _, _, (status, body) = sign_in_refused(control, provider, "erin@corp.example", sub="erin-sub",
                                               email_verified=verified)
        assert (status, body["code"]) == (403, "oidc_email_unverified"), (verified, body)
        assert body["error"] == (
            f"the OIDC provider does not say the email 'erin@corp.example' is verified (email_verified), so it "
            f"cannot link this account to a Ferryman user: an administrator links it: `ferryman admin users update "
            f"UPN --oidc-subject erin-sub` (the account's subject at {provider.issuer})")


@pytest.mark.parametrize(("fault", "status", "code", "message"), [
    ("nonce", 401, "oidc_token_invalid",
     "ID token refused: nonce does not match this sign-in (a replayed or foreign ID token)"),
    ("audience", 401, "oidc_token_invalid",
     f"ID token refused: audience ['some-other-client'] does not include this client ('{CLIENT_ID}')"),
    ("signature", 401, "oidc_token_invalid",
     "ID token refused: signature does not verify with the provider's key 'k1' (RS256)"),
    ("unknown_kid", 401, "oidc_token_invalid",
     "ID token refused: signed with key 'k2' (RS256), which is not among the provider's keys (JWKS)"),
    ("issuer", 401, "oidc_token_invalid", "ID token refused: issued by 'https://evil.example', not "),
    ("expired", 401, "oidc_token_invalid", "ID token refused: expired 60"),  # 600 or 601 s
    ("pkce", 401, "oidc_code_refused",
     "the OIDC provider refused the authorization code (invalid_grant: PKCE verification failed)"),
    ("deny", 403, "oidc_denied", "the OIDC provider did not sign you in (access_denied: the user said no)"),
])
def test_a_misbehaving_provider_is_refused_precisely(control: Control, provider: Provider, fault: str,
                                                     status: int, code: str, message: str) -> None:
    make_user(control, f"{fault}@corp.example")
    provider.faults = {fault}
    page_status, page, (got, body) = sign_in_refused(control, provider, f"{fault}@corp.example")
    assert (page_status, got, body["code"]) == (status, status, code), body
    assert body["error"].startswith(message), body
    assert "sign-in failed" in page


def test_state_is_good_once_and_login_ids_must_be_known(control: Control, provider: Provider) -> None:
    make_user(control, "frank@corp.example")
    provider.user = {"email": "frank@corp.example", "email_verified": True, "sub": "frank-sub"}
    agent = Agent(control).start()
    browser = Browser()
    handoff = browser.sign_in(agent)
    (callback_url,) = [u for u in browser.visited if "/v1/auth/oidc/callback?" in u]
    status, page, _ = browser.open(callback_url)  # the same code and state again (a replayed callback)
    assert status == 400 and "this sign-in response was already used (its state is good once)" in page
    assert agent.poll(handoff)[0] == 200  # the first callback's sign-in stands
    status, page, _ = browse(control.url + "/v1/auth/oidc/callback?code=x&state=made-up")
    assert status == 400 and "unknown or expired sign-in (state)" in page
    status, answer = control.call("POST", "/v1/auth/oidc/poll", {"login_id": "no-such-login",
                                                                 "poll_verifier": secrets.token_urlsafe(32)})
    assert (status, answer["code"]) == (404, "oidc_login_unknown")
    assert answer["error"].startswith("this OIDC sign-in is unknown or has expired")
    status, answer = control.call("POST", "/v1/auth/oidc/start", {
        "device": {"csr_pem": "not a CSR"}, "redirect_port": 40000, "poll_challenge": "A" * 43})
    assert (status, answer) == (422, {"error": "CSR is not a PEM certificate signing request", "code": "invalid_csr"})
    _, csr_pem = new_key_and_csr("device")
    for bad in ({"redirect_port": 80}, {"redirect_port": 70000}, {"poll_challenge": "short"}, {"redirect_port": None}):
        status, answer = control.call("POST", "/v1/auth/oidc/start", {
            "device": {"csr_pem": csr_pem.decode()}, "redirect_port": 40000, "poll_challenge": "A" * 43, **bad})
        assert (status, answer["code"]) == (400, "validation"), (bad, answer)


def test_users_are_matched_by_issuer_and_subject_never_by_an_unverified_email(control: Control,
                                                                              provider: Provider) -> None:
    grace = make_user(control, "gina@corp.example")
    make_user(control, "heidi@corp.example")

    def sign_in_as(claims: dict[str, Any]) -> tuple[int, Any]:
        provider.user = claims
        agent = Agent(control).start()
        status, page, location = Browser().open(agent.begin_url)
        if status != 303:
            return agent.poll()
        return agent.poll(agent.handoff_of(location))

    # First sign-in: the verified email links the account (iss, sub) to the user, audited.
    status, answer = sign_in_as({"sub": "g-1", "email": "gina@corp.example", "email_verified": True})
    assert status == 200 and answer["user"]["id"] == grace["id"], answer
    status, shown = control.call("GET", f"/v1/users/{grace['id']}", admin=True)
    assert (shown["oidc_issuer"], shown["oidc_subject"]) == (provider.issuer, "g-1")
    status, records = control.call("GET", "/v1/audit?object_type=user", admin=True)
    (link,) = [r for r in records if r["action"] == "user.oidc_link" and r["object_id"] == grace["id"]]
    assert link["actor"] == f"user:{grace['id']}" and link["after"]["oidc_subject"] == "g-1"
    # From then on the account is the user, whatever email the provider says (not heidi's, nor unverified).
    status, answer = sign_in_as({"sub": "g-1", "email": "heidi@corp.example", "email_verified": True})
    assert status == 200 and answer["user"]["upn"] == "gina@corp.example", answer
    status, answer = sign_in_as({"sub": "g-1"})
    assert status == 200 and answer["user"]["upn"] == "gina@corp.example", answer
    # Another account of the provider cannot take gina over with her (verified) email.
    status, answer = sign_in_as({"sub": "intruder", "email": "gina@corp.example", "email_verified": True})
    assert (status, answer["code"]) == (403, "oidc_account_mismatch"), answer
    assert answer["error"] == ("user gina@corp.example is linked to another account of its OIDC provider than "
                               "this one (subject 'intruder'): an administrator changes the link if this one is right")
    # An unverified email links nothing; an admin links the account instead, then it signs in.
    status, answer = sign_in_as({"sub": "h-1", "email": "heidi@corp.example", "email_verified": False})
    assert (status, answer["code"]) == (403, "oidc_email_unverified"), answer
    status, body = control.call("PATCH", "/v1/users/heidi@corp.example", {"oidc_subject": "h-1"}, admin=True)
    assert status == 200 and (body["oidc_issuer"], body["oidc_subject"]) == (provider.issuer, "h-1"), body
    status, answer = sign_in_as({"sub": "h-1", "email": "someone@else.example", "email_verified": False})
    assert status == 200 and answer["user"]["upn"] == "heidi@corp.example", answer
    # One user per account; "" unlinks.
    status, body = control.call("PATCH", "/v1/users/gina@corp.example", {"oidc_subject": "h-1"}, admin=True)
    assert (status, body["code"]) == (409, "conflict")
    assert body["error"] == f"the OIDC account 'h-1' of {provider.issuer} is linked to user heidi@corp.example already"
    status, body = control.call("PATCH", "/v1/users/heidi@corp.example", {"oidc_subject": ""}, admin=True)
    assert status == 200 and body["oidc_subject"] is None and body["oidc_issuer"] is None
    status, answer = sign_in_as({"sub": "h-1", "email": "heidi@corp.example"})
    assert (status, answer["code"]) == (403, "oidc_email_unverified"), answer


def test_a_sign_in_started_by_someone_else_gives_them_nothing(control: Control, provider: Provider) -> None:
    """The attacker starts a sign-in and leads the victim's browser through it (a phishing link):
    the victim's browser takes the handoff to its own loopback, the attacker's poll stays pending."""
    victim = make_user(control, "ivan@corp.example")
    attacker = Agent(control).start("attacker-laptop")
    provider.user = {"sub": "ivan-sub", "email": "ivan@corp.example", "email_verified": True}
    handoff = Browser().sign_in(attacker)  # on the victim's machine: the attacker never sees it
    assert attacker.poll() == (202, {"status": "pending", "expires_in": pytest.approx(600, abs=10)})
    forged = secrets.token_urlsafe(32)
    status, body = attacker.poll(forged)
    assert (status, body["code"]) == (403, "oidc_handoff_invalid")
    assert body["error"] == "the browser's hand-off does not belong to this sign-in: it is ended; start again"
    assert attacker.poll(handoff)[0] == 404  # ended: not even the real handoff collects it now
    status, rows = control.call("GET", f"/v1/users/{victim['id']}/sessions", admin=True)
    assert (status, rows) == (200, [])  # no session was made for the victim, no device registered
    status, devices = control.call("GET", f"/v1/devices?user={victim['id']}", admin=True)
    assert status == 200 and [d for d in devices if d["user_id"] == victim["id"]] == []


def test_seeing_the_authorization_url_or_the_login_id_is_not_enough(control: Control, provider: Provider) -> None:
    make_user(control, "judy@corp.example")
    make_user(control, "mallory@corp.example")
    victim = Agent(control).start()
    browser = Browser()
    with pytest.raises(urllib.error.HTTPError) as redirect:  # the victim's browser begins: cookie, then provider
        urllib.request.build_opener(urllib.request.HTTPCookieProcessor(browser.cookies), _NoRedirect,
                                    urllib.request.HTTPSHandler(context=BROWSER_TRUST)).open(
            victim.begin_url, timeout=15)
    authorize = redirect.value.headers["Location"]
    # Someone who sees that URL opens it in their own browser and signs in as themselves: refused.
    provider.user = {"sub": "mallory-sub", "email": "mallory@corp.example", "email_verified": True}
    status, page, _ = browse(authorize)
    assert status == 403 and "this sign-in was started in another browser" in page
    # The begin link works once: it cannot be replayed into another browser either.
    status, page, _ = browse(victim.begin_url)
    assert status == 400 and "this sign-in link is unknown, expired or was already opened" in page
    # Someone who knows the login id but not the agent's verifier learns nothing.
    status, body = victim.poll(verifier=secrets.token_urlsafe(32))
    assert (status, body["code"]) == (404, "oidc_login_unknown")
    status, body = control.call("POST", "/v1/auth/oidc/poll", {"login_id": victim.login_id})
    assert (status, body["code"]) == (400, "validation")
    # The victim's own browser still finishes the sign-in, as the victim.
    provider.user = {"sub": "judy-sub", "email": "judy@corp.example", "email_verified": True}
    status, page, location = browser.open(authorize)
    assert status == 303, page
    status, answer = victim.poll(victim.handoff_of(location))
    assert status == 200 and answer["user"]["upn"] == "judy@corp.example"


def test_starts_are_limited_per_source_address(provider: Provider, tmp_path: Path) -> None:
    port = _free_port()
    ctl = _start_control(tmp_path / "limited", {
        "FERRYMAN_OIDC_ISSUER": provider.issuer, "FERRYMAN_OIDC_CLIENT_ID": CLIENT_ID,
        "FERRYMAN_OIDC_CLIENT_SECRET": CLIENT_SECRET, "FERRYMAN_OIDC_STARTS_PER_MINUTE": "3",
        "FERRYMAN_OIDC_REDIRECT_URI": f"https://127.0.0.1:{port}/v1/auth/oidc/callback"}, port)
    try:
        _, csr_pem = new_key_and_csr("device")
        body = {"device": {"csr_pem": csr_pem.decode()}, "redirect_port": 40000,
                "poll_challenge": _challenge(secrets.token_urlsafe(32))}
        assert [call_from(ctl, "127.0.0.2", "POST", "/v1/auth/oidc/start", body)[0] for _ in range(3)] == [200] * 3
        status, answer, headers = call_from(ctl, "127.0.0.2", "POST", "/v1/auth/oidc/start", body)
        assert (status, answer["code"]) == (429, "rate_limited") and 1 <= int(headers["Retry-After"]) <= 60
        assert answer["error"].startswith("too many OIDC sign-ins started from this address (3 a minute): "
                                          "try again in ")
        assert call_from(ctl, "127.0.0.3", "POST", "/v1/auth/oidc/start", body)[0] == 200  # other addresses go on
    finally:
        _stop(ctl.proc)


def test_no_code_state_or_handoff_reaches_a_log_line(provider: Provider, tmp_path: Path) -> None:
    """Every secret of the round trip (codes, states, begin ids, cookies, handoffs, login ids,
    verifiers) stays out of the control plane's log at debug level (uvicorn's access log of the
    callback URL included) and out of the client agent's output."""
    port = _free_port()
    ctl = _start_control(tmp_path / "logged", {
        "FERRYMAN_OIDC_ISSUER": provider.issuer, "FERRYMAN_OIDC_CLIENT_ID": CLIENT_ID,
        "FERRYMAN_OIDC_CLIENT_SECRET": CLIENT_SECRET, "FERRYMAN_LOG_LEVEL": "debug",
        "FERRYMAN_OIDC_REDIRECT_URI": f"https://127.0.0.1:{port}/v1/auth/oidc/callback"}, port)
    secrets_seen: list[str] = []
    first = len(provider.issued)
    try:
        make_user(ctl, "kim@corp.example")
        # The client agent, for real.
        provider.user = {"email": "kim@corp.example", "email_verified": True, "sub": "kim-sub"}
        proc = _client(ctl, tmp_path)
        try:
            browser = Browser(follow_loopback=True)
            status, page, _ = browser.open(_read_url(proc))
            assert status == 200 and "Signed in as kim@corp.example" in page, page
            out, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err.decode()
        session = json.loads((tmp_path / "data" / "client" / "session.json").read_text())
        secrets_seen += [session["refresh_token"], session["access_token"]]
        secrets_seen += [v for u in browser.visited for _, v in urllib.parse.parse_qsl(urllib.parse.urlsplit(u).query)
                         if len(v) >= 20]  # begin id, state, code, handoff as they passed the browser
        secrets_seen += [c.value for c in browser.cookies]
        # A refused sign-in, a replayed callback and a callback from another browser.
        provider.user = {"email": "nobody@corp.example", "email_verified": True, "sub": "nobody-sub"}
        agent = Agent(ctl).start()
        refused_browser = Browser()
        assert refused_browser.open(agent.begin_url)[0] == 403
        assert agent.poll()[0] == 403
        (callback_url,) = [u for u in refused_browser.visited if "/callback?" in u]
        assert browse(callback_url)[0] == 400
        provider.user = {"email": "kim@corp.example", "email_verified": True, "sub": "kim-sub"}
        other = Agent(ctl).start()
        with pytest.raises(urllib.error.HTTPError) as redirect:
            urllib.request.build_opener(_NoRedirect, urllib.request.HTTPSHandler(context=BROWSER_TRUST)).open(
                other.begin_url, timeout=15)
        assert browse(redirect.value.headers["Location"])[0] == 403  # the provider, then the callback: no cookie
        secrets_seen += [agent.login_id, agent.verifier, agent.begin_url.rsplit("=", 1)[1], other.login_id,
                         other.verifier, other.begin_url.rsplit("=", 1)[1]]
        secrets_seen += [v for u in refused_browser.visited for _, v in urllib.parse.parse_qsl(
            urllib.parse.urlsplit(u).query) if len(v) >= 20]
    finally:
        _stop(ctl.proc)
    secrets_seen += provider.issued[first:]
    assert len(provider.issued) - first >= 6  # codes and states of three round trips
    log = ctl.log.read_text()
    assert log.count("/v1/auth/oidc/callback?<redacted>") >= 3  # the access log is on; it names no query
    assert log.count("/v1/auth/oidc/begin?<redacted>") >= 3
    output = out.decode() + err.decode()
    leaked = [secret for secret in set(secrets_seen) if secret in log or secret in output]
    assert leaked == [], [line for line in (log + output).splitlines() if any(s in line for s in leaked)]


def test_oidc_not_configured_is_404(tmp_path: Path) -> None:
    ctl = _start_control(tmp_path / "plain", {})
    try:
        expected = {"error": "OIDC sign-in is not configured on this control plane", "code": "oidc_not_configured"}
        _, csr_pem = new_key_and_csr("device")
        verifier = secrets.token_urlsafe(32)
        assert ctl.call("POST", "/v1/auth/oidc/start", {"device": {"csr_pem": csr_pem.decode()}, "redirect_port": 40000,
                                                        "poll_challenge": _challenge(verifier)}) == (404, expected)
        assert ctl.call("POST", "/v1/auth/oidc/poll", {"login_id": "x", "poll_verifier": verifier}) == (404, expected)
        assert ctl.call("GET", "/v1/auth/oidc/begin?login=b") == (404, expected)
        assert ctl.call("GET", "/v1/auth/oidc/callback?code=a&state=b") == (404, expected)
        status, body = ctl.call("PATCH", "/v1/users/nobody@corp.example", {"oidc_subject": "x"}, admin=True)
        assert (status, body["code"]) == (422, "invalid") and "OIDC sign-in is not configured" in body["error"]
    finally:
        _stop(ctl.proc)


# ---------------------------------------------------------------------------- the client agent


def _read_url(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> str:
    assert proc.stderr is not None
    prefix = "open this URL in a browser to sign in: "
    deadline, seen = time.monotonic() + timeout, b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 0.2)
        if ready:
            chunk = os.read(proc.stderr.fileno(), 65536)
            if not chunk:
                break
            seen += chunk
            for line in seen.decode(errors="replace").splitlines():
                if line.startswith(prefix) and seen.endswith(b"\n"):
                    return line[len(prefix):].strip()
    pytest.fail(f"no sign-in URL on the client's stderr within {timeout}s: {seen.decode(errors='replace')}")


def _client(control: Control, tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "dataplane", "client", "login", "--control", control.url,
                             "--ca-hash", control.ca_hash, "--oidc", *args], cwd=ROOT, env=environment(tmp_path / "data", PYTHONFAULTHANDLER="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def test_cli_login_with_oidc_end_to_end(control: Control, provider: Provider, tmp_path: Path) -> None:
    user = make_user(control, "grace@corp.example")
    provider.user = {"email": "grace@corp.example", "email_verified": True, "amr": ["hwk"], "sub": "grace-sub"}
    proc = _client(control, tmp_path, "--device-name", "grace-laptop")
    try:
        url = _read_url(proc)
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", url), url  # the agent's own loopback listener
        browser = Browser(follow_loopback=True)
        status, page, final = browser.open(url)
        assert status == 200 and "Signed in as grace@corp.example on device &#x27;grace-laptop&#x27;" in page
        assert final.startswith(url + "ferryman/oidc?handoff=")
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    directory = tmp_path / "data" / "client"
    session = json.loads((directory / "session.json").read_text())
    assert f"# signed in as grace@corp.example on device {session['device_id']}" in out.decode()
    assert session["upn"] == "grace@corp.example" and session["user_id"] == user["id"]
    assert (directory / "session.json").stat().st_mode & 0o777 == 0o600
    assert (directory / session["key"]).stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate((directory / session["cert"]).read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == session["device_id"]
    status, keys = control.call("GET", "/v1/auth/keys")
    assert verify_access_token(session["access_token"], keys["keys"]).amr == ["pwd", "mfa"]


def test_cli_login_with_oidc_stops_cleanly_on_ctrl_c(control: Control, tmp_path: Path) -> None:
    proc = _client(control, tmp_path)
    try:
        _read_url(proc)
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER: every thread's stack on stderr
            _, err = proc.communicate(timeout=10)
            pytest.fail(f"the client did not stop within 15 s of SIGINT; its threads:\n{err.decode(errors='replace')}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "Traceback" not in err.decode()
    assert "ferryman client login: interrupted; not signed in" in err.decode()
    assert not (tmp_path / "data" / "client" / "session.json").exists()


def test_cli_login_refuses_password_flags_with_oidc_and_needs_a_user_without(control: Control,
                                                                             tmp_path: Path) -> None:
    proc = _client(control, tmp_path, "--user", "x@corp.example")
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2 and "--user cannot be used with --oidc" in err.decode()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRYMAN_")}
    done = subprocess.run([sys.executable, "-m", "dataplane", "client", "login", "--control", control.url],
                          cwd=ROOT, env=env, capture_output=True, timeout=20)
    assert done.returncode == 2 and b"--user UPN is required (or --oidc" in done.stderr


# ---------------------------------------------------------------------------- configuration, discovery


def test_settings_build_the_oidc_configuration() -> None:
    assert OidcConfig.from_settings(load(ControlSettings, environ={})) is None
    with pytest.raises(ValueError, match="FERRYMAN_OIDC_CLIENT_ID must be too"):
        OidcConfig.from_settings(load(ControlSettings, environ={"FERRYMAN_OIDC_ISSUER": "https://idp.example"}))
    with pytest.raises(ValueError, match="FERRYMAN_OIDC_REDIRECT_URI='control:8080/cb': must be an http"):
        OidcConfig.from_settings(load(ControlSettings, environ={"FERRYMAN_OIDC_ISSUER": "https://idp.example",
                                               "FERRYMAN_OIDC_CLIENT_ID": "c",
                                               "FERRYMAN_OIDC_REDIRECT_URI": "control:8080/cb"}))
    config = OidcConfig.from_settings(load(ControlSettings, environ={
        "FERRYMAN_OIDC_ISSUER": "https://idp.example", "FERRYMAN_OIDC_CLIENT_ID": "c",
        "FERRYMAN_OIDC_REDIRECT_URI": "https://control.example/v1/auth/oidc/callback",
        "FERRYMAN_OIDC_MFA_AMR": " mfa, fido ,", "FERRYMAN_OIDC_UPN_CLAIM": "preferred_username"}))
    assert config is not None and config.mfa_amr == {"mfa", "fido"} and config.upn_claim == "preferred_username"
    assert config.client_secret == ""


def test_discovery_must_name_the_configured_issuer(provider: Provider) -> None:
    config = OidcConfig(issuer=provider.issuer + "/", client_id=CLIENT_ID, redirect_uri="http://x/cb")
    with pytest.raises(OidcError, match=r"names issuer 'http://127\.0\.0\.1:\d+', not the configured "
                                        r"FERRYMAN_OIDC_ISSUER 'http://127\.0\.0\.1:\d+/'"):
        OidcProvider(config).metadata()
    down = OidcConfig(issuer=f"http://127.0.0.1:{_free_port()}", client_id=CLIENT_ID, redirect_uri="http://x/cb")
    with pytest.raises(OidcError, match="cannot reach the OIDC provider \\(discovery document") as err:
        OidcProvider(down, timeout=2).metadata()
    assert err.value.status == 502


def test_pending_logins_are_bounded_and_expire() -> None:
    logins = PendingLogins(max_pending=2, lifetime=10)
    verifier = secrets.token_urlsafe(32)
    first = logins.add({}, _challenge(verifier), 40000, now=0)
    logins.add({}, _challenge(verifier), 40000, now=1)
    with pytest.raises(OidcError, match="2 OIDC sign-ins are in progress"):
        logins.add({}, _challenge(verifier), 40000, now=2)
    logins.add({}, _challenge(verifier), 40000, now=10.5)  # the first expired and made room
    with pytest.raises(OidcError, match="unknown or has expired"):
        logins.poll(first.login_id, verifier, now=10.5)
    with pytest.raises(OidcError, match="unknown or expired sign-in"):
        logins.claim(first.state, "cookie", now=10.5)
    with pytest.raises(OidcError, match="unknown, expired or was already opened"):
        logins.begin(first.begin_id, now=10.5)


def test_the_loopback_listener_is_not_held_up_by_an_idle_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's loopback listener during an OIDC sign-in: a connection that sends nothing (a
    browser's spare preconnect, another local process) neither holds up the browser's request
    nor stays open longer than LOOPBACK_IDLE."""
    import socket

    from dataplane.client import signin

    monkeypatch.setattr(signin, "LOOPBACK_IDLE", 2.0)
    loopback = signin.Loopback()
    loopback.begin_url = "https://control.example/v1/auth/oidc/begin"
    try:
        idle = socket.create_connection(("127.0.0.1", loopback.port), timeout=5)
        started = time.monotonic()
        request = urllib.request.Request(loopback.url)

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
                return None

        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.build_opener(NoRedirect).open(request, timeout=5)
        assert answer.value.code == 302 and answer.value.headers["Location"] == loopback.begin_url
        assert time.monotonic() - started < 1.5  # answered while the idle connection is open (not after it)
        idle.settimeout(10)
        assert idle.recv(1) == b""  # then the idle one is closed
        assert time.monotonic() - started < 8
        idle.close()
    finally:
        loopback.close()
