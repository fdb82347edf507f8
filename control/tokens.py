"""Access tokens: short-lived JWTs the control plane signs with Ed25519 and edges verify offline.

``TokenSigner.open(data_dir)`` loads the signing key ``<data_dir>/token-signing.key``
(PKCS#8 PEM, created with mode 0600 on first start); its ``kid`` is the key's RFC 7638
thumbprint. ``issue`` makes a token for a sign-in session:

- header ``{"typ": "JWT", "alg": "Ed25519", "kid": <thumbprint>}`` (RFC 8037 keys, RFC 9864 algorithm name);
- claims ``iss`` (``"ferryman"``), ``sub`` (user id), ``upn``, ``groups`` (group ids),
  ``amr`` (``["pwd"]`` or ``["pwd", "mfa"]``), ``auth_time`` (when the user proved it, Unix
  seconds; kept through refreshes), ``sid`` (session id), ``did`` (device id; absent for a
  session without a device), ``iat``, ``exp`` (``iat`` + the lifetime, never past the
  session's own expiry) and ``jti`` (unique per token).

``public_jwks()`` is what ``GET /v1/auth/keys`` publishes; an edge verifies a token with
any JOSE library from it (``verify_access_token`` is the reference, ``TokenSigner.verify``
uses this signer's own keys). A token stays valid until it expires: edges learn of revoked
sessions, disabled users and revoked devices from the configuration snapshot.
"""

from __future__ import annotations

import logging
import os
import stat
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import OKPKey

ISSUER = "ferryman"
ALGORITHM = "Ed25519"
KEY_FILE = "token-signing.key"
DEFAULT_LIFETIME = 3600  # seconds
MIN_LIFETIME = 60
MAX_LIFETIME = 86400
CLOCK_SKEW = 30  # seconds of clock difference ``verify_access_token`` tolerates
MAX_TOKEN_LENGTH = 8192  # characters: what a HELLO or AUTH frame carries; 100 groups make about 4.6 KiB
AMR_VALUES = (["pwd"], ["pwd", "mfa"])

_REGISTRY = jws.JWSRegistry(algorithms=[ALGORITHM])

log = logging.getLogger("ferryman.control.tokens")


class TokenError(ValueError):
    """An access token that is not valid; the message says why."""


class TokenKeyError(ValueError):
    """The signing key file cannot be used; the message names it and the reason."""


class AccessClaims(msgspec.Struct, frozen=True, kw_only=True):
    """The claims of a verified access token."""

    iss: str
    sub: str
    upn: str
    groups: list[str]
    amr: list[str]
    auth_time: int
    sid: str
    iat: int
    exp: int
    jti: str
    did: str | None = None


def _key_pem(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def new_key_pem() -> bytes:
    """A new Ed25519 signing key (PKCS#8 PEM)."""
    return _key_pem(ed25519.Ed25519PrivateKey.generate())


def _create_key_file(path: str) -> None:
    """Write a new key to ``path`` (0600 from the start); keep the file of a concurrent starter if it won."""
    tmp = f"{path}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(_key_pem(ed25519.Ed25519PrivateKey.generate()))
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # fails if the file appeared meanwhile: never replace a key
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)


def _load_key_file(path: str) -> OKPKey:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError as exc:
        raise TokenKeyError(f"token signing key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TokenKeyError(f"token signing key {path}: encrypted keys are not supported") from None
    except ValueError:
        raise TokenKeyError(f"token signing key {path}: not a PEM private key") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise TokenKeyError(f"token signing key {path}: must be an Ed25519 key, not {type(key).__name__}")
    if mode & 0o077:
        log.warning("token signing key %s has mode %o: other users may read it (chmod 600 it)", path, mode)
    return OKPKey.import_key(_key_pem(key))


class TokenSigner:
    """Signs access tokens with one Ed25519 key (see the module doc for their shape)."""

    def __init__(self, key: OKPKey, *, lifetime: int = DEFAULT_LIFETIME, issuer: str = ISSUER) -> None:
        if not key.is_private or key.as_dict(private=False).get("crv") != "Ed25519":
            raise TokenKeyError("the token signing key must be an Ed25519 private key")
        if isinstance(lifetime, bool) or not isinstance(lifetime, int) or not MIN_LIFETIME <= lifetime <= MAX_LIFETIME:
            raise ValueError(f"access token lifetime {lifetime!r} must be whole seconds from {MIN_LIFETIME} "
                             f"to {MAX_LIFETIME}")
        self._key = key
        self.kid: str = key.thumbprint()
        self.lifetime = lifetime
        self.issuer = issuer

    @classmethod
    def open(cls, data_dir: str, *, lifetime: int = DEFAULT_LIFETIME) -> TokenSigner:
        """The signer whose key is ``<data_dir>/token-signing.key``, created (0600) if there is none."""
        path = os.path.join(data_dir, KEY_FILE)
        if not os.path.exists(path):
            try:
                os.makedirs(data_dir, mode=0o700, exist_ok=True)
                _create_key_file(path)
            except OSError as exc:
                raise TokenKeyError(f"cannot create the token signing key {path}: {exc.strerror}") from None
            log.info("created token signing key %s", path)
        return cls(_load_key_file(path), lifetime=lifetime)

    @classmethod
    def from_pem(cls, key_pem: bytes, where: str, *, lifetime: int = DEFAULT_LIFETIME) -> TokenSigner:
        """The signer of an Ed25519 private key in PEM (``new_key_pem``); ``where`` names its origin."""
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (TypeError, ValueError):
            raise TokenKeyError(f"the token signing key in {where} is not an unencrypted PEM private key") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise TokenKeyError(f"the token signing key in {where} must be an Ed25519 key, not {type(key).__name__}")
        return cls(OKPKey.import_key(_key_pem(key)), lifetime=lifetime)

    def key_pem(self) -> bytes:
        """This signer's private key (PKCS#8 PEM), for sealing it where other control-plane nodes find it."""
        return self._key.as_pem(private=True)

    def issue(self, *, user_id: str, upn: str, groups: Sequence[str], amr: Sequence[str], auth_time: datetime,
              session_id: str, device_id: str | None = None, not_after: datetime | None = None,
              now: float | None = None) -> tuple[str, int]:
        """A signed access token and its lifetime in seconds (``expires_in``): ``self.lifetime``,
        cut at ``not_after`` (the session's expiry)."""
        issued = int(time.time() if now is None else now)
        expires = issued + self.lifetime
        if not_after is not None:
            expires = min(expires, int(not_after.timestamp()))
        if expires <= issued:
            raise TokenError("the session has expired: no access token can be issued for it")
        if list(amr) not in AMR_VALUES:
            raise TokenError(f"amr {list(amr)!r} is not one of {list(AMR_VALUES)}")
        claims: dict[str, object] = {
            "iss": self.issuer, "sub": user_id, "upn": upn, "groups": list(groups), "amr": list(amr),
            "auth_time": int(auth_time.timestamp()), "sid": session_id, "iat": issued, "exp": expires,
            "jti": uuid.uuid4().hex,
        }
        if device_id is not None:
            claims["did"] = device_id
        header = {"typ": "JWT", "alg": ALGORITHM, "kid": self.kid}
        return jwt.encode(header, claims, self._key, algorithms=[ALGORITHM], registry=_REGISTRY), expires - issued

    def public_jwks(self) -> list[dict[str, str]]:
        """The public keys tokens are verified with (JWK, RFC 7517/8037)."""
        public = self._key.as_dict(private=False)
        return [{"kty": "OKP", "crv": "Ed25519", "x": str(public["x"]), "kid": self.kid, "use": "sig",
                 "alg": ALGORITHM}]

    def verify(self, token: str, *, now: float | None = None) -> AccessClaims:
        """The claims of ``token`` if this signer issued it and it has not expired; else ``TokenError``."""
        return verify_access_token(token, self.public_jwks(), issuer=self.issuer, now=now)


def verify_access_token(token: str, jwks: Iterable[Mapping[str, object]], *, issuer: str = ISSUER,
                        now: float | None = None, leeway: int = CLOCK_SKEW) -> AccessClaims:
    """Verify an access token against published keys (``GET /v1/auth/keys``), as an edge does:
    algorithm, known ``kid``, signature, issuer, expiry and issue time (``leeway`` seconds of
    clock difference), and the shape of every claim. Raises ``TokenError`` naming the fault."""
    if not isinstance(token, str) or not token:
        raise TokenError("access token is empty")
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenError(f"access token is longer than {MAX_TOKEN_LENGTH} characters")
    try:
        header = jws.extract_compact(token.encode(), registry=_REGISTRY).headers()
    except (JoseError, ValueError, TypeError):
        raise TokenError("access token is not a compact JWS (header.payload.signature)") from None
    if header.get("alg") != ALGORITHM:
        raise TokenError(f"access token must be signed with {ALGORITHM}, not {header.get('alg')!r}")
    keys = {str(k.get("kid")): k for k in jwks}
    kid = header.get("kid")
    if not isinstance(kid, str) or kid not in keys:
        raise TokenError(f"access token is signed with key {kid!r}, which is not one of the issuer's keys")
    try:
        public = OKPKey.import_key({"kty": "OKP", "crv": keys[kid]["crv"], "x": keys[kid]["x"]})
        decoded = jwt.decode(token, public, algorithms=[ALGORITHM], registry=_REGISTRY)
    except (JoseError, ValueError, TypeError, KeyError):
        raise TokenError("access token signature does not verify") from None
    try:
        claims = msgspec.convert(decoded.claims, AccessClaims)
    except msgspec.ValidationError as exc:
        raise TokenError(f"access token claims are malformed: {exc}") from None
    wall = time.time() if now is None else now
    if claims.iss != issuer:
        raise TokenError(f"access token was issued by {claims.iss!r}, not {issuer!r}")
    if claims.exp <= wall - leeway:
        raise TokenError(f"access token expired {wall - claims.exp:.0f}s ago: refresh it")
    if claims.iat > wall + leeway:
        raise TokenError(f"access token is issued {claims.iat - wall:.0f}s in the future (check the clocks)")
    if claims.amr not in AMR_VALUES:
        raise TokenError(f"access token amr {claims.amr!r} is not one of {list(AMR_VALUES)}")
    return claims
