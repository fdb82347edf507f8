"""Sealed cookies and tokens of browser sessions: AES-256-GCM with a key only edges hold.

Everything the front door hands a browser and later takes back is *sealed*: msgpack
payload, encrypted and authenticated with AES-256-GCM under the edges' shared cookie key
(``KeyRing``). The associated data binds each token to what it is for and where it is
valid: ``ferryman/1 \\0 <purpose> \\0 <external host>``, so a token of one kind or one host
is refused as forged anywhere else. Token text: ``1.<key id>.<base64url(nonce ‖ ciphertext)>``;
the key id picks the key (rotation: add a new key, make it current, drop the old one after
the longest session has ended).

What each token carries, and why it is enough:

- ``__Host-ferryman`` on an app host (``AppSession``): the ``Principal`` (user, UPN,
  session, device, ``amr``, ``auth_time``, access-token expiry) and the cookie's own end,
  which is never past the access token's end (``Principal.expires``) nor the sign-in
  session's. No token inside: every request is decided from the principal and the edge's
  snapshot, and the backend gets the edge's own signed assertion. ~250 bytes.
- ``__Host-ferryman`` on the sign-in host (``AuthSession``): the principal, the refresh
  token and the sign-in session's end. Only this cookie holds the refresh token: refresh
  tokens work once (a reused one revokes the session), so exactly one place may hold and
  rotate it; app hosts get new principals from here through the single-sign-on round trip
  when theirs expire. ~450 bytes.
- ``__Host-ferryman-s-<id>`` on an app host (``SignInState``): a sign-in in progress —
  the nonce the one-time code must carry and the same-host path to return to.
- one-time code (``Code``, in the callback URL): minted on the sign-in host for one app
  host and one state nonce, valid ``code_lifetime`` seconds, used once (``OneTimeCache``).
- sign-out ticket (``SignOutTicket``): lets an app host ask the sign-in host to end the
  session the two share, without a cross-site request the sign-in host would have to trust.

All cookies are ``Secure; HttpOnly; Path=/`` with no ``Domain`` (the ``__Host-`` prefix
makes browsers enforce that), ``SameSite=Lax``, and at most ``MAX_COOKIE`` bytes.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .model import Principal

VERSION = "1"
COOKIE = "__Host-ferryman"
STATE_PREFIX = "__Host-ferryman-s-"
CSRF_COOKIE = "__Host-ferryman-csrf"
OIDC_COOKIE = "__Host-ferryman-oidc"
MAX_COOKIE = 4000  # bytes of name=value; browsers keep at least 4096 per cookie
MAX_TOKEN = 8000  # characters of a sealed token accepted anywhere (URL parameters too)
_KID = re.compile(r"[A-Za-z0-9_-]{1,16}")


class SealError(ValueError):
    """A sealed token that is refused; ``reason`` is one of ``malformed``, ``unknown_key``,
    ``forged`` (tampered, another host or another purpose), ``expired``, ``replayed``,
    ``mismatch``, ``too_large``, ``busy``."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or reason)
        self.reason = reason


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class KeyRing:
    """The AES-256-GCM keys edges seal cookies with: one current key, older ones still opened."""

    def __init__(self, keys: Mapping[str, bytes], current: str) -> None:
        if current not in keys:
            raise ValueError(f"the current cookie key {current!r} is not among the keys")
        self._aead: dict[str, AESGCM] = {}
        for kid, key in keys.items():
            if not _KID.fullmatch(kid):
                raise ValueError(f"cookie key id {kid!r} must be 1-16 letters, digits, '-' or '_'")
            if len(key) != 32:
                raise ValueError(f"cookie key {kid!r} must be 32 bytes (AES-256), not {len(key)}")
            self._aead[kid] = AESGCM(key)
        self.current = current

    @classmethod
    def generate(cls, kid: str = "k1") -> KeyRing:
        return cls({kid: AESGCM.generate_key(256)}, kid)

    @staticmethod
    def generate_text(kid: str = "k1") -> str:
        """A new random key ring written as ``from_text`` reads it (what FERRYMAN_WEB_COOKIE_KEYS holds)."""
        return f"{kid}:{b64e(AESGCM.generate_key(256))}"

    @classmethod
    def from_text(cls, text: str) -> KeyRing:
        """``kid:base64url-key[,kid:key...]``; the first is current (how a setting carries the keys)."""
        keys: dict[str, bytes] = {}
        first = ""
        for item in text.split(","):
            kid, sep, value = item.strip().partition(":")
            if not sep:
                raise ValueError("cookie keys are written kid:base64url-key[,kid:key...]")
            try:
                keys[kid] = b64d(value.strip())
            except (binascii.Error, ValueError):
                raise ValueError(f"cookie key {kid!r} is not base64url") from None
            first = first or kid
        return cls(keys, first)

    @staticmethod
    def _ad(purpose: str, host: str) -> bytes:
        return f"ferryman/{VERSION}\0{purpose}\0{host.lower()}".encode()

    def seal(self, purpose: str, host: str, plaintext: bytes) -> str:
        nonce = os.urandom(12)
        ct = self._aead[self.current].encrypt(nonce, plaintext, self._ad(purpose, host))
        return f"{VERSION}.{self.current}.{b64e(nonce + ct)}"

    def open(self, purpose: str, host: str, token: str) -> bytes:
        if not token or len(token) > MAX_TOKEN:
            raise SealError("malformed", "empty or oversized token")
        version, _, rest = token.partition(".")
        kid, _, data = rest.partition(".")
        if version != VERSION or not data:
            raise SealError("malformed", "not a sealed token of this version")
        aead = self._aead.get(kid)
        if aead is None:
            raise SealError("unknown_key", f"sealed with unknown key {kid[:16]!r}")
        try:
            raw = b64d(data)
        except (binascii.Error, ValueError):
            raise SealError("malformed", "not base64url") from None
        if len(raw) < 12 + 16:
            raise SealError("malformed", "too short")
        try:
            return aead.decrypt(raw[:12], raw[12:], self._ad(purpose, host))
        except InvalidTag:
            raise SealError("forged", "does not authenticate (tampered, or for another host or use)") from None


# --------------------------------------------------------------------------- payloads

class AppSession(msgspec.Struct, array_like=True, frozen=True):
    principal: Principal
    exp: int
    iat: int


class AuthSession(msgspec.Struct, array_like=True, frozen=True):
    principal: Principal
    refresh_token: str
    session_expires: int
    iat: int


class SignInState(msgspec.Struct, array_like=True, frozen=True):
    nonce: str
    return_to: str
    exp: int


class Code(msgspec.Struct, array_like=True, frozen=True):
    jti: str
    nonce: str
    principal: Principal
    session_expires: int
    exp: int


class SignOutTicket(msgspec.Struct, array_like=True, frozen=True):
    jti: str
    session_id: str
    exp: int


class OidcState(msgspec.Struct, array_like=True, frozen=True):
    state: str
    host: str
    nonce: str
    exp: int


_ENC = msgspec.msgpack.Encoder()
_DEC = {t: msgspec.msgpack.Decoder(t) for t in (AppSession, AuthSession, SignInState, Code, SignOutTicket, OidcState)}
_PURPOSE = {AppSession: "app", AuthSession: "auth", SignInState: "state", Code: "code", SignOutTicket: "signout",
            OidcState: "oidc"}


class Sealer:
    """Seals and opens the payloads above for a host, checking their expiry."""

    def __init__(self, keys: KeyRing) -> None:
        self.keys = keys

    def seal(self, host: str, payload: msgspec.Struct) -> str:
        return self.keys.seal(_PURPOSE[type(payload)], host, _ENC.encode(payload))

    def open(self, kind: type, host: str, token: str, now: float | None = None):
        raw = self.keys.open(_PURPOSE[kind], host, token)
        try:
            payload = _DEC[kind].decode(raw)
        except msgspec.DecodeError:
            raise SealError("malformed", "sealed payload does not decode") from None
        exp = payload.session_expires if kind is AuthSession else payload.exp
        if exp <= (time.time() if now is None else now):
            raise SealError("expired", "expired")
        return payload


def new_nonce() -> str:
    return secrets.token_urlsafe(18)


def state_cookie_name(nonce: str) -> str:
    """The state cookie of one sign-in in progress (several tabs may sign in at once)."""
    return STATE_PREFIX + re.sub(r"[^A-Za-z0-9_-]", "", nonce)[:12]


def cookie_header(name: str, value: str, *, max_age: int | None = None, http_only: bool = True,
                  same_site: str = "Lax") -> bytes:
    """A ``Set-Cookie`` value for a ``__Host-`` cookie; ``max_age`` None = a browser-session cookie."""
    parts = [f"{name}={value}", "Path=/", "Secure"]
    if http_only:
        parts.append("HttpOnly")
    parts.append(f"SameSite={same_site}")
    if max_age is not None:
        parts.append(f"Max-Age={max(0, int(max_age))}")
    out = "; ".join(parts)
    if len(name) + 1 + len(value) > MAX_COOKIE:
        raise SealError("too_large", f"cookie {name} would be {len(value)} bytes, over {MAX_COOKIE}")
    return out.encode("ascii")


def clear_cookie(name: str) -> bytes:
    return f"{name}=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0".encode("ascii")


def parse_cookies(values: list[bytes]) -> dict[str, str]:
    """The request's cookies (all ``Cookie`` headers; the first of a repeated name wins)."""
    out: dict[str, str] = {}
    for value in values:
        for item in value.decode("latin-1").split(";"):
            name, sep, val = item.strip().partition("=")
            if sep and name and name not in out:
                out[name] = val.strip()
    return out


class OneTimeCache:
    """Identifiers (of one-time codes and tickets) already used, until they expire.

    Bounded: when ``max_entries`` unexpired identifiers are held, a new one is refused
    (``SealError('busy')``) rather than an unexpired one forgotten (which would let it be
    replayed). All entries have about the same lifetime, so insertion order is expiry order.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._seen: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def use(self, jti: str, exp: float, now: float | None = None) -> None:
        now = time.time() if now is None else now
        seen = self._seen
        while seen:
            first, first_exp = next(iter(seen.items()))
            if first_exp > now:
                break
            del seen[first]
        if jti in seen:
            raise SealError("replayed", "this one-time code was already used")
        if len(seen) >= self.max_entries:
            raise SealError("busy", "too many sign-ins in progress")
        seen[jti] = exp


class RevokedSessions:
    """Session ids signed out on this edge, refused until their end (the snapshot follows).

    Bounded: past ``max_entries`` the entry closest to its end is forgotten first (the
    control plane's revocation, which reaches every edge through its snapshot, still holds).
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._ends: dict[str, float] = {}

    def add(self, session_id: str, until: float) -> None:
        if session_id in self._ends or len(self._ends) < self.max_entries:
            self._ends[session_id] = max(until, self._ends.get(session_id, 0.0))
            return
        now = time.time()
        for sid in [s for s, end in self._ends.items() if end <= now]:
            del self._ends[sid]
        if len(self._ends) >= self.max_entries:
            del self._ends[min(self._ends, key=self._ends.__getitem__)]
        self._ends[session_id] = until

    def __contains__(self, session_id: str) -> bool:
        end = self._ends.get(session_id)
        if end is None:
            return False
        if end <= time.time():
            del self._ends[session_id]
            return False
        return True
