"""Sign-in through an external OpenID Connect provider: authorization code flow with PKCE (S256),
bound to the client agent that started it and to the browser that goes through it.

The control plane is the OIDC client (``FERRYMAN_OIDC_REDIRECT_URI`` is its own
``/v1/auth/oidc/callback``); the client agent runs a listener on its loopback address
(127.0.0.1, a port of its choosing) for the user's browser, as RFC 8252 native apps do:

1. ``POST /v1/auth/oidc/start`` (the device's CSR, the agent's loopback port and
   ``poll_challenge`` = BASE64URL(SHA-256(poll verifier)), a secret the agent keeps): a
   ``PendingLogin`` is made here, in this process's memory (``PendingLogins``: at most
   ``MAX_PENDING``, each living ``LOGIN_LIFETIME`` seconds) with its own ``state``, ``nonce``,
   PKCE ``code_verifier`` and single-use *begin* id. The answer carries the login id and the
   begin URL (``/v1/auth/oidc/begin?login=<begin id>``). The agent prints its own loopback
   URL; that page sends the browser on to the begin URL.
2. ``GET /v1/auth/oidc/begin`` (once per sign-in): sets a cookie holding a fresh secret in
   the browser (``HttpOnly``, ``SameSite=Lax``, ``Secure`` over HTTPS, path
   ``/v1/auth/oidc``), keeps the secret's hash, and sends the browser to the provider's
   authorization URL (``OidcProvider.authorization_url``).
3. ``GET /v1/auth/oidc/callback`` with ``code`` and ``state``: the state is good once
   (``PendingLogins.claim``) and only with the cookie of the browser that began the sign-in
   (someone who sees the authorization URL and opens it in their own browser is refused).
   ``OidcProvider.redeem`` trades the code (with the PKCE verifier, and the client secret
   if one is configured) at the token endpoint and verifies the ID token
   (``verify_id_token``): signature against the provider's JWKS (RS256, ES256,
   EdDSA/Ed25519; cached by ``kid``, fetched again once for an unknown ``kid``), ``iss``,
   ``aud`` (and ``azp``), ``exp``/``iat``/``nbf`` with ``LEEWAY`` seconds, ``nonce``. The
   user is found by (``iss``, ``sub``) (``control.api.oidc``). The browser is then sent to
   the agent's loopback with a one-time *handoff* secret.
4. ``POST /v1/auth/oidc/poll`` with the login id and the poll verifier: pending until then;
   with the handoff the agent's loopback received, the sign-in is completed (device
   certified, session made) and handed over, once. A refusal is handed over without.

So the tokens go only to the agent that started the sign-in (it alone has the poll
verifier) and only once the browser that signed in came back to *that agent's* loopback:
someone who sends a victim the begin URL of a sign-in they started gets nothing (the
victim's browser takes the handoff to the victim's own loopback), and someone who sees the
login id has no verifier.

The provider's discovery document (``{issuer}/.well-known/openid-configuration``) is
fetched on first use and cached ``METADATA_TTL`` seconds; its ``issuer`` must be exactly
the configured one. Every request to the provider has a ``HTTP_TIMEOUT``; the routes run
in worker threads, so this module is synchronous (urllib) and thread-safe. Authorization
codes, states, handoffs and verifiers never go to a log line.

A control plane with several nodes keeps pending logins per node: start, begin, callback
and poll of one sign-in must reach the same node (sticky routing), or use a single node.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from joserfc import jws, jwt
from joserfc.errors import JoseError, SecurityWarning
from joserfc.jwk import ECKey, OKPKey, RSAKey

log = logging.getLogger("ferryman.control.oidc")

LOGIN_LIFETIME = 600.0  # seconds a started sign-in waits for its callback and its poll
MAX_PENDING = 10_000  # sign-ins in progress per control-plane process
POLL_INTERVAL = 2  # seconds between the agent's polls
HTTP_TIMEOUT = 10.0  # seconds per request to the provider
MAX_RESPONSE = 1 << 20  # bytes read from the provider per answer
METADATA_TTL = 3600.0  # seconds the discovery document is cached
METADATA_RETRY = 60.0  # seconds until a failed refresh of it is tried again (the old copy serves meanwhile)
JWKS_REFETCH_MIN = 10.0  # an unknown kid fetches the JWKS again at most this often
LEEWAY = 60  # seconds of clock difference accepted on exp, iat, nbf
SCOPE = "openid email profile"
ALGORITHMS = ("RS256", "ES256", "EdDSA", "Ed25519")
DEFAULT_MFA_AMR = "mfa,otp,hwk,swk"
MAX_ID_TOKEN = 16384
MAX_SUBJECT = 255  # characters of a ``sub`` claim (users.oidc_subject)

_REGISTRY = jws.JWSRegistry(algorithms=list(ALGORITHMS))
# RFC 9864 deprecates the name "EdDSA" for "Ed25519"; providers still sign with it, and it is accepted on purpose.
warnings.filterwarnings("ignore", message="EdDSA is deprecated", category=SecurityWarning)


class OidcError(Exception):
    """A refused OIDC step: ``status`` (HTTP) and ``code`` for programs, the message for people."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _unavailable(what: str, reason: object) -> OidcError:
    return OidcError(502, "oidc_unavailable", f"cannot reach the OIDC provider ({what}): {reason}")


# ---------------------------------------------------------------------------- configuration


def _http_url(value: str, variable: str) -> str:
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{variable}={value!r}: must be an http:// or https:// URL")
    if parts.fragment:
        raise ValueError(f"{variable}={value!r}: must not have a #fragment")
    return value


@dataclass(frozen=True)
class OidcConfig:
    """What ``FERRYMAN_OIDC_*`` configure (see ``dataplane.basics.settings``)."""

    issuer: str
    client_id: str
    redirect_uri: str
    client_secret: str = ""
    upn_claim: str = "email"
    mfa_amr: frozenset[str] = frozenset(DEFAULT_MFA_AMR.split(","))

    @classmethod
    def from_settings(cls, settings: Any) -> OidcConfig | None:
        """The configuration from ``Settings``; None when ``FERRYMAN_OIDC_ISSUER`` is empty (OIDC off).
        Raises ``ValueError`` naming the variable that is missing or wrong."""
        issuer = settings.oidc_issuer.strip()
        if not issuer:
            others = [name for name, value in (("FERRYMAN_OIDC_CLIENT_ID", settings.oidc_client_id),
                                               ("FERRYMAN_OIDC_CLIENT_SECRET", settings.oidc_client_secret),
                                               ("FERRYMAN_OIDC_REDIRECT_URI", settings.oidc_redirect_uri))
                      if value]
            if others:
                log.warning("%s set but FERRYMAN_OIDC_ISSUER is empty: OIDC sign-in is off", ", ".join(others))
            return None
        _http_url(issuer, "FERRYMAN_OIDC_ISSUER")
        client_id = settings.oidc_client_id.strip()
        if not client_id:
            raise ValueError("FERRYMAN_OIDC_ISSUER is set, so FERRYMAN_OIDC_CLIENT_ID must be too (the client id "
                             "registered at the provider)")
        redirect_uri = settings.oidc_redirect_uri.strip()
        if not redirect_uri:
            raise ValueError("FERRYMAN_OIDC_ISSUER is set, so FERRYMAN_OIDC_REDIRECT_URI must be too (this control "
                             "plane's callback, e.g. https://control.example/v1/auth/oidc/callback)")
        _http_url(redirect_uri, "FERRYMAN_OIDC_REDIRECT_URI")
        if not urllib.parse.urlsplit(redirect_uri).path.endswith("/v1/auth/oidc/callback"):
            log.warning("FERRYMAN_OIDC_REDIRECT_URI=%s does not end in /v1/auth/oidc/callback: make sure it reaches "
                        "that route of this control plane", redirect_uri)
        claim = settings.oidc_upn_claim.strip()
        if not claim:
            raise ValueError("FERRYMAN_OIDC_UPN_CLAIM must name an ID token claim (e.g. email)")
        mfa = frozenset(v.strip() for v in settings.oidc_mfa_amr.split(",") if v.strip())
        return cls(issuer=issuer, client_id=client_id, redirect_uri=redirect_uri,
                   client_secret=settings.oidc_client_secret, upn_claim=claim, mfa_amr=mfa)


# ---------------------------------------------------------------------------- PKCE


def new_code_verifier() -> str:
    """RFC 7636 §4.1: 43-128 unreserved characters; 64 here (48 random bytes)."""
    return secrets.token_urlsafe(48)


def code_challenge(verifier: str) -> str:
    """RFC 7636 §4.2, S256: BASE64URL(SHA256(verifier)) without padding."""
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode()


# ---------------------------------------------------------------------------- the provider


def _read_json(url: str, what: str, request: urllib.request.Request, timeout: float) -> tuple[int, Any]:
    """(status, decoded JSON) of ``request``; error statuses are answers too. ``OidcError`` 502 when there
    is no usable answer."""
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, payload = response.status, response.read(MAX_RESPONSE + 1)
    except urllib.error.HTTPError as exc:
        with exc:
            status, payload = exc.code, exc.read(MAX_RESPONSE + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise _unavailable(f"{what} {url}", getattr(exc, "reason", exc)) from None
    if len(payload) > MAX_RESPONSE:
        raise _unavailable(f"{what} {url}", f"answer is larger than {MAX_RESPONSE} bytes")
    try:
        return status, json.loads(payload)
    except ValueError:
        if status >= 400:
            return status, None
        raise _unavailable(f"{what} {url}", f"HTTP {status} answer is not JSON") from None


def _import_jwk(entry: Mapping[str, Any]) -> Any | None:
    """A public verification key from a JWKS entry; None for keys that are not for signatures."""
    if entry.get("use", "sig") != "sig":
        return None
    data = {k: v for k, v in entry.items() if k not in ("d", "p", "q", "dp", "dq", "qi", "key_ops")}
    kty = data.get("kty")
    try:
        if kty == "RSA":
            return RSAKey.import_key(data)
        if kty == "EC" and data.get("crv") == "P-256":
            return ECKey.import_key(data)
        if kty == "OKP" and data.get("crv") == "Ed25519":
            return OKPKey.import_key(data)
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        log.warning("OIDC provider key %r cannot be used: %s", data.get("kid"), exc)
    return None


def _key_fits(key: Any, alg: str) -> bool:
    if alg == "RS256":
        return isinstance(key, RSAKey)
    if alg == "ES256":
        return isinstance(key, ECKey)
    return isinstance(key, OKPKey)


class OidcProvider:
    """The configured provider: discovery, authorization URL, code exchange, ID token verification."""

    def __init__(self, config: OidcConfig, *, timeout: float = HTTP_TIMEOUT) -> None:
        self.config = config
        self.timeout = timeout
        self._lock = threading.Lock()
        self._metadata: dict[str, Any] | None = None
        self._metadata_at = 0.0
        self._keys: dict[str, Any] = {}  # kid ("" for keys without one) -> key
        self._keys_at: float | None = None

    # -- discovery

    def _get(self, url: str, what: str) -> Any:
        request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "ferryman"})
        status, body = _read_json(url, what, request, self.timeout)
        if status != 200:
            raise _unavailable(f"{what} {url}", f"HTTP {status}")
        if not isinstance(body, dict):
            raise _unavailable(f"{what} {url}", "the answer is not a JSON object")
        return body

    def metadata(self) -> dict[str, Any]:
        """The discovery document (cached ``METADATA_TTL`` s; a stale copy is used while the provider is down)."""
        with self._lock:
            now = time.monotonic()
            if self._metadata is not None and now - self._metadata_at < METADATA_TTL:
                return self._metadata
            url = self.config.issuer.rstrip("/") + "/.well-known/openid-configuration"
            try:
                document = self._get(url, "discovery document")
                self._metadata = self._check_metadata(document, url)
                self._metadata_at = now
            except OidcError as exc:
                if self._metadata is None:
                    raise
                log.warning("%s; using the discovery document fetched before", exc)
                self._metadata_at = now - METADATA_TTL + METADATA_RETRY  # try again soon
            return self._metadata

    def _check_metadata(self, document: dict[str, Any], url: str) -> dict[str, Any]:
        issuer = document.get("issuer")
        if issuer != self.config.issuer:
            raise OidcError(502, "oidc_misconfigured",
                            f"the OIDC discovery document {url} names issuer {issuer!r}, not the configured "
                            f"FERRYMAN_OIDC_ISSUER {self.config.issuer!r} (they must be exactly equal)")
        for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            value = document.get(name)
            if not isinstance(value, str) or urllib.parse.urlsplit(value).scheme not in ("http", "https"):
                raise OidcError(502, "oidc_misconfigured",
                                f"the OIDC discovery document {url} has no usable {name} ({value!r})")
        methods = document.get("code_challenge_methods_supported")
        if isinstance(methods, list) and "S256" not in methods:
            raise OidcError(502, "oidc_misconfigured",
                            f"the OIDC provider does not support PKCE with S256 (code_challenge_methods_supported: "
                            f"{methods})")
        return document

    def authorization_url(self, *, state: str, nonce: str, verifier: str) -> str:
        """Where the user's browser goes to sign in (authorization request with PKCE S256)."""
        endpoint = self.metadata()["authorization_endpoint"]
        query = urllib.parse.urlencode({
            "response_type": "code", "scope": SCOPE, "client_id": self.config.client_id,
            "redirect_uri": self.config.redirect_uri, "state": state, "nonce": nonce,
            "code_challenge": code_challenge(verifier), "code_challenge_method": "S256",
        }, quote_via=urllib.parse.quote)
        return f"{endpoint}{'&' if '?' in endpoint else '?'}{query}"

    # -- code exchange

    def exchange(self, code: str, verifier: str) -> str:
        """Trade the authorization code (and the PKCE verifier) for the ID token at the token endpoint."""
        metadata = self.metadata()
        endpoint = metadata["token_endpoint"]
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": self.config.redirect_uri,
                "code_verifier": verifier}
        headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json",
                   "User-Agent": "ferryman"}
        secret = self.config.client_secret
        methods = metadata.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        if secret and "client_secret_basic" in methods:  # RFC 6749 §2.3.1: form-encode, then Basic
            pair = f"{urllib.parse.quote_plus(self.config.client_id)}:{urllib.parse.quote_plus(secret)}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form["client_id"] = self.config.client_id
            if secret:
                form["client_secret"] = secret
        request = urllib.request.Request(endpoint, data=urllib.parse.urlencode(form).encode(), method="POST",
                                         headers=headers)
        status, body = _read_json(endpoint, "token endpoint", request, self.timeout)
        if status != 200:
            if isinstance(body, dict) and isinstance(body.get("error"), str):
                detail = body["error"]
                if isinstance(body.get("error_description"), str) and body["error_description"]:
                    detail += f": {body['error_description'][:300]}"
                raise OidcError(401, "oidc_code_refused",
                                f"the OIDC provider refused the authorization code ({detail})")
            raise _unavailable(f"token endpoint {endpoint}", f"HTTP {status}")
        token = body.get("id_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise OidcError(401, "oidc_token_invalid", "the OIDC provider's token answer has no id_token "
                                                       "(is the 'openid' scope allowed for this client?)")
        return token

    # -- ID token

    def _fetch_keys(self) -> None:
        url = self.metadata()["jwks_uri"]
        document = self._get(url, "JWKS")
        entries = document.get("keys")
        if not isinstance(entries, list):
            raise _unavailable(f"JWKS {url}", "no 'keys' list")
        keys: dict[str, Any] = {}
        for entry in entries:
            if isinstance(entry, dict):
                key = _import_jwk(entry)
                if key is not None:
                    keys.setdefault(str(entry.get("kid", "")), key)
        with self._lock:
            self._keys, self._keys_at = keys, time.monotonic()

    def _candidates(self, kid: str | None, alg: str) -> list[Any]:
        with self._lock:
            fetched, keys = self._keys_at, dict(self._keys)
        known = kid in keys if kid is not None else bool(keys)
        if fetched is None or (not known and time.monotonic() - fetched >= JWKS_REFETCH_MIN):
            self._fetch_keys()  # first use, or a kid not seen yet (the provider rotated its keys)
            with self._lock:
                keys = dict(self._keys)
        if kid is not None:
            return [keys[kid]] if kid in keys and _key_fits(keys[kid], alg) else []
        return [key for key in keys.values() if _key_fits(key, alg)]

    def verify_id_token(self, token: str, *, nonce: str, now: float | None = None) -> dict[str, Any]:
        """The claims of ``token`` once signature, issuer, audience, times and nonce are right;
        ``OidcError`` (401, ``oidc_token_invalid``) naming the fault otherwise."""
        def refuse(message: str) -> OidcError:
            return OidcError(401, "oidc_token_invalid", f"ID token refused: {message}")

        if len(token) > MAX_ID_TOKEN:
            raise refuse(f"longer than {MAX_ID_TOKEN} characters")
        try:
            header = jws.extract_compact(token.encode(), registry=_REGISTRY).headers()
        except (JoseError, ValueError, TypeError):
            raise refuse("not a compact JWS (header.payload.signature)") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALGORITHMS:
            raise refuse(f"signed with {alg!r}; accepted: {', '.join(ALGORITHMS)}")
        if kid is not None and not isinstance(kid, str):
            raise refuse("its 'kid' header is not a string")
        keys = self._candidates(kid, alg)
        if not keys:
            raise refuse(f"signed with key {kid!r} ({alg}), which is not among the provider's keys (JWKS)")
        decoded = None
        for key in keys:
            try:
                decoded = jwt.decode(token, key, algorithms=[alg], registry=_REGISTRY)
                break
            except (JoseError, ValueError, TypeError):
                continue
        if decoded is None:
            raise refuse(f"signature does not verify with the provider's key {kid!r} ({alg})")
        claims = dict(decoded.claims)
        wall = time.time() if now is None else now
        if claims.get("iss") != self.config.issuer:
            raise refuse(f"issued by {claims.get('iss')!r}, not {self.config.issuer!r}")
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if self.config.client_id not in audiences:
            raise refuse(f"audience {aud!r} does not include this client ({self.config.client_id!r})")
        azp = claims.get("azp")
        if azp is not None and azp != self.config.client_id:
            raise refuse(f"authorized party (azp) {azp!r} is not this client ({self.config.client_id!r})")
        for name in ("exp", "iat"):
            if isinstance(claims.get(name), bool) or not isinstance(claims.get(name), int | float):
                raise refuse(f"'{name}' claim is missing or not a number")
        if claims["exp"] <= wall - LEEWAY:
            raise refuse(f"expired {wall - claims['exp']:.0f} s ago")
        if claims["iat"] > wall + LEEWAY:
            raise refuse(f"issued {claims['iat'] - wall:.0f} s in the future (check the clocks)")
        nbf = claims.get("nbf")
        if isinstance(nbf, int | float) and not isinstance(nbf, bool) and nbf > wall + LEEWAY:
            raise refuse(f"not valid before {nbf - wall:.0f} s from now (nbf)")
        got = claims.get("nonce")
        if not isinstance(got, str) or not hmac.compare_digest(got.encode(), nonce.encode()):
            raise refuse("nonce does not match this sign-in (a replayed or foreign ID token)")
        return claims

    def redeem(self, code: str, verifier: str, nonce: str) -> dict[str, Any]:
        """Code → verified ID token claims."""
        return self.verify_id_token(self.exchange(code, verifier), nonce=nonce)

    # -- what the claims mean to Ferryman

    @staticmethod
    def account_of(claims: Mapping[str, Any]) -> tuple[str, str]:
        """The provider's account the ID token speaks for: (``iss``, ``sub``)."""
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject or len(subject) > MAX_SUBJECT:
            raise OidcError(401, "oidc_token_invalid", f"ID token refused: its 'sub' claim is missing, not a string or "
                                                       f"longer than {MAX_SUBJECT} characters")
        return str(claims["iss"]), subject

    def linkable_upn(self, claims: Mapping[str, Any]) -> str:
        """The UPN an account not linked yet may be linked to at its first sign-in: the ``email``
        claim (lower-cased) when the provider vouches for it (``email_verified`` is true);
        ``OidcError`` otherwise: an admin links the account then (``--oidc-subject``)."""
        name = self.config.upn_claim
        subject = claims.get("sub")
        admin = (f"an administrator links it: `ferryman admin users update UPN --oidc-subject {subject}` (the "
                 f"account's subject at {self.config.issuer})")
        if name != "email":
            raise OidcError(403, "oidc_not_linked", f"no Ferryman user is linked to this OIDC account, and only a "
                                                    f"verified email links one by itself: {admin}")
        value = claims.get(name)
        if not isinstance(value, str) or not value.strip():
            raise OidcError(401, "oidc_token_invalid",
                            f"the ID token has no {name!r} claim to match a Ferryman user with "
                            f"(FERRYMAN_OIDC_UPN_CLAIM; is the scope for it allowed for this client?)")
        if claims.get("email_verified") is not True:
            raise OidcError(403, "oidc_email_unverified",
                            f"the OIDC provider does not say the email {value.strip().lower()!r} is verified "
                            f"(email_verified), so it cannot link this account to a Ferryman user: {admin}")
        return value.strip().lower()

    def amr_of(self, claims: Mapping[str, Any]) -> list[str]:
        """``["pwd", "mfa"]`` when the ID token's ``amr`` holds one of ``FERRYMAN_OIDC_MFA_AMR``, else ``["pwd"]``."""
        amr = claims.get("amr")
        values = {v for v in amr if isinstance(v, str)} if isinstance(amr, list) else set()
        return ["pwd", "mfa"] if values & self.config.mfa_amr else ["pwd"]

    @staticmethod
    def auth_time_of(claims: Mapping[str, Any]) -> float:
        """When the user proved who they are: ``auth_time``, else ``iat``."""
        value = claims.get("auth_time")
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return float(value)
        return float(claims["iat"])


# ---------------------------------------------------------------------------- sign-ins in progress


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _same(secret: str | None, digest: str | None) -> bool:
    return bool(secret) and bool(digest) and hmac.compare_digest(_hash(secret or ""), digest or "")


@dataclass
class PendingLogin:
    login_id: str
    state: str
    nonce: str
    verifier: str  # PKCE code verifier (for the provider)
    device: dict[str, str]  # csr_pem, name, os, os_version
    expires: float  # time.monotonic()
    poll_challenge: str = ""  # BASE64URL(SHA-256(the agent's poll verifier))
    redirect_port: int = 0  # the agent's loopback port
    begin_id: str = ""  # single use: the browser's first stop
    tag: str = ""  # names this sign-in's browser cookie (not secret)
    binding: str | None = None  # SHA-256 of the browser cookie's secret, once begun
    handoff: str | None = None  # SHA-256 of the handoff secret, once authenticated
    status: str = "pending"  # pending -> begun -> working (callback) -> authenticated | failed
    return_to: str = ""  # a web login: the edge front door's callback URL (instead of the agent's loopback)
    return_state: str = ""  # a web login: the front door's own state, sent back with the browser
    identity: Any = None  # who signed in (control.api.oidc), once authenticated
    error: OidcError | None = None  # once failed
    created: float = field(default_factory=time.monotonic)


class PendingLogins:
    """Sign-ins between start and poll, by login id, by begin id and by state; thread-safe and bounded."""

    def __init__(self, max_pending: int = MAX_PENDING, lifetime: float = LOGIN_LIFETIME) -> None:
        self.max_pending = max_pending
        self.lifetime = lifetime
        self._logins: OrderedDict[str, PendingLogin] = OrderedDict()  # oldest first
        self._begins: dict[str, str] = {}  # begin id -> login id, until the browser came
        self._states: dict[str, str] = {}  # state -> login id, until its callback came
        self._used: OrderedDict[str, float] = OrderedDict()  # states whose callback came -> expiry
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._logins)

    def _prune(self, now: float) -> None:
        while self._logins:
            login = next(iter(self._logins.values()))
            if login.expires > now:
                break
            self._drop(login)
        while self._used and (next(iter(self._used.values())) <= now or len(self._used) > self.max_pending):
            self._used.popitem(last=False)

    def _drop(self, login: PendingLogin) -> None:
        self._logins.pop(login.login_id, None)
        self._begins.pop(login.begin_id, None)
        self._states.pop(login.state, None)

    def add(self, device: dict[str, str], poll_challenge: str = "", redirect_port: int = 0,
            now: float | None = None, return_to: str = "", return_state: str = "") -> PendingLogin:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._prune(now)
            if len(self._logins) >= self.max_pending:
                raise OidcError(503, "oidc_busy", f"{self.max_pending} OIDC sign-ins are in progress on this "
                                                  f"control plane: try again in a minute")
            login = PendingLogin(login_id=secrets.token_urlsafe(32), state=secrets.token_urlsafe(32),
                                 nonce=secrets.token_urlsafe(32), verifier=new_code_verifier(), device=device,
                                 expires=now + self.lifetime, created=now, poll_challenge=poll_challenge,
                                 redirect_port=redirect_port, begin_id=secrets.token_urlsafe(32),
                                 tag=secrets.token_hex(4), return_to=return_to, return_state=return_state)
            self._logins[login.login_id] = login
            self._begins[login.begin_id] = login.login_id
            self._states[login.state] = login.login_id
            return login

    def begin(self, begin_id: str, now: float | None = None) -> tuple[PendingLogin, str]:
        """The sign-in ``begin_id`` starts, and the secret its browser cookie holds; each begin id is good once."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._prune(now)
            login_id = self._begins.pop(begin_id, None)
            if login_id is None:
                raise OidcError(400, "oidc_begin_unknown",
                                "this sign-in link is unknown, expired or was already opened (it works once, in one "
                                "browser): start again with `ferryman client login --oidc`")
            login = self._logins[login_id]
            cookie = secrets.token_urlsafe(32)
            login.binding = _hash(cookie)
            login.status = "begun"
            return login, cookie

    def tag_of(self, state: str) -> str | None:
        """The cookie tag of the sign-in waiting for ``state``'s callback (not secret), or None."""
        with self._lock:
            login_id = self._states.get(state)
            login = self._logins.get(login_id) if login_id is not None else None
            return login.tag if login is not None else None

    def claim(self, state: str, cookie: str | None = None, now: float | None = None) -> PendingLogin:
        """The sign-in ``state`` belongs to, for its callback: each state is good once, and only in
        the browser that began the sign-in (``cookie``: the secret ``begin`` gave it)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._prune(now)
            login_id = self._states.get(state)
            if login_id is None:
                if state in self._used:
                    raise OidcError(400, "oidc_state_used",
                                    "this sign-in response was already used (its state is good once): start the "
                                    "sign-in again with `ferryman client login --oidc`")
                raise OidcError(400, "oidc_state_unknown",
                                f"unknown or expired sign-in (state): sign-ins must finish within "
                                f"{self.lifetime / 60:.0f} minutes on the control plane that started them; start "
                                f"again with `ferryman client login --oidc`")
            login = self._logins[login_id]
            # a web login is bound to its browser by the front door's sealed state cookie (checked there
            # before the edge may collect it); an agent's login by the cookie ``begin`` set here
            if not login.return_to and (login.binding is None or not _same(cookie, login.binding)):
                raise OidcError(403, "oidc_other_browser",
                                "this sign-in was started in another browser (or this browser does not keep "
                                "cookies): finish it in the browser that opened the sign-in link, or start again")
            del self._states[state]
            self._used[state] = login.expires
            login.status = "working"
            return login

    def authenticated(self, login: PendingLogin, identity: Any) -> str:
        """The callback proved who signed in: keep ``identity``; returns the handoff secret for the agent's loopback."""
        handoff = secrets.token_urlsafe(32)
        with self._lock:
            login.identity, login.handoff, login.status = identity, _hash(handoff), "authenticated"
            login.verifier = login.nonce = ""  # not needed any more
        return handoff

    def failed(self, login: PendingLogin, error: OidcError) -> None:
        with self._lock:
            login.error, login.status = error, "failed"
            login.verifier = login.nonce = ""

    def poll(self, login_id: str, poll_verifier: str, handoff: str | None = None,
             now: float | None = None) -> PendingLogin:
        """The sign-in, for the agent that started it (``poll_verifier`` matches its challenge).
        Once failed, or authenticated and ``handoff`` is the one its browser took to the agent's
        loopback, it is handed out this once and forgotten; a wrong handoff ends it."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._prune(now)
            login = self._logins.get(login_id)
            if login is None or not poll_verifier or not hmac.compare_digest(
                    code_challenge(poll_verifier).encode(), login.poll_challenge.encode()):
                raise OidcError(404, "oidc_login_unknown",
                                f"this OIDC sign-in is unknown or has expired (a sign-in lasts "
                                f"{self.lifetime / 60:.0f} minutes and its result is handed out once): start again")
            if login.status == "failed":
                self._drop(login)
            elif login.status == "authenticated" and handoff is not None:
                if not _same(handoff, login.handoff):
                    self._drop(login)
                    raise OidcError(403, "oidc_handoff_invalid",
                                    "the browser's hand-off does not belong to this sign-in: it is ended; start again")
                self._drop(login)
                login.status = "collected"
            return login

    def remaining(self, login: PendingLogin, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        return max(0, int(login.expires - now))


class Oidc:
    """What the API holds (``Api.oidc``): the provider and the sign-ins in progress."""

    def __init__(self, config: OidcConfig, *, timeout: float = HTTP_TIMEOUT,
                 logins: PendingLogins | None = None) -> None:
        self.config = config
        self.provider = OidcProvider(config, timeout=timeout)
        self.logins = logins or PendingLogins()

    @property
    def cookie_path(self) -> str:
        """The path of the browser cookie: the directory of the callback (``/v1/auth/oidc``)."""
        return urllib.parse.urlsplit(self.config.redirect_uri).path.rsplit("/", 1)[0] or "/"

    @property
    def secure_cookie(self) -> bool:
        return urllib.parse.urlsplit(self.config.redirect_uri).scheme == "https"

    def begin_url(self, login: PendingLogin) -> str:
        """This control plane's begin URL of ``login`` (beside its callback, as the provider knows it)."""
        parts = urllib.parse.urlsplit(self.config.redirect_uri)
        path = self.cookie_path.rstrip("/") + "/begin"
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path,
                                        urllib.parse.urlencode({"login": login.begin_id}), ""))

    def start(self, device: dict[str, str], poll_challenge: str, redirect_port: int) -> PendingLogin:
        """A new pending sign-in (module doc, step 1)."""
        self.provider.metadata()  # the provider must answer before a sign-in is recorded
        return self.logins.add(device, poll_challenge, redirect_port)

    def start_web(self, return_to: str, state: str) -> PendingLogin:
        """A sign-in for an edge's HTTPS front door: the browser goes straight to the provider, comes back
        here, then to ``return_to`` with ``state``, the login id and the handoff; the edge collects it
        with ``state`` as the poll verifier (``control.api.oidc``, ``/v1/node/web-oidc``)."""
        self.provider.metadata()
        return self.logins.add({}, code_challenge(state), 0, return_to=return_to, return_state=state)

    def authorization_url(self, login: PendingLogin) -> str:
        """Where the browser signs in at the provider."""
        return self.provider.authorization_url(state=login.state, nonce=login.nonce, verifier=login.verifier)

