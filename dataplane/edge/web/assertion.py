"""The identity assertion the edge adds to every request it sends a backend, and its JWKS.

``X-Ferryman-Jwt-Assertion`` is a compact JWS (ES256, P-256) that a backend verifies with
the keys the edge publishes (``jwks()``, served at ``/.ferryman/jwks.json`` on every host
the edge serves). Claims: ``iss`` (the edge's issuer, by default ``https://<auth host>``),
``aud`` (the app's external URL, what a backend knows itself as), ``app`` (the app's
name), ``sub`` (user id), ``upn``, ``groups`` (group ids, from the ``Authorizer``),
``sid`` (sign-in session), ``amr``, ``auth_time``, ``did`` (device, when there is one), plus
any claims the ``Authorizer`` returned, and ``iat``/``nbf``/``exp`` (``lifetime`` seconds).

Signing costs ~40 µs; an assertion is reused for the same (app, session, claims) while at
least half its lifetime is left (a bounded cache), so a busy page costs one signature per
half-lifetime. ``kid`` is the RFC 7638 thumbprint of the public key; to rotate, publish the
new key next to the old one (``jwks(new, old)``) for one ``lifetime`` before switching.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from .session import b64e

HEADER = "x-ferryman-jwt-assertion"
CACHE_ENTRIES = 10000


def _int_b64(n: int) -> str:
    return b64e(n.to_bytes(32, "big"))


class AssertionSigner:
    """An ES256 key that signs assertions; ``kid`` is its RFC 7638 thumbprint."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise ValueError("the assertion key must be an EC P-256 key (ES256)")
        self.key = private_key
        nums = private_key.public_key().public_numbers()
        self.x, self.y = _int_b64(nums.x), _int_b64(nums.y)
        thumb = json.dumps({"crv": "P-256", "kty": "EC", "x": self.x, "y": self.y}, separators=(",", ":"),
                           sort_keys=True)
        self.kid = b64e(hashlib.sha256(thumb.encode()).digest())
        self._header = b64e(json.dumps({"alg": "ES256", "typ": "JWT", "kid": self.kid},
                                       separators=(",", ":")).encode())
        self._cache: OrderedDict[tuple, tuple[str, float]] = OrderedDict()

    @classmethod
    def generate(cls) -> AssertionSigner:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def from_pem(cls, pem: bytes) -> AssertionSigner:
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the assertion key file does not hold an EC private key")
        return cls(key)

    def private_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def public_jwk(self) -> dict[str, str]:
        return {"kty": "EC", "crv": "P-256", "x": self.x, "y": self.y, "kid": self.kid, "use": "sig", "alg": "ES256"}

    def sign(self, claims: Mapping[str, Any]) -> str:
        payload = b64e(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
        signing_input = f"{self._header}.{payload}".encode("ascii")
        r, s = decode_dss_signature(self.key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        return f"{self._header}.{payload}.{b64e(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def assertion(self, *, issuer: str, audience: str, app: str, subject: str, upn: str, session_id: str,
                  groups: tuple[str, ...] = (), amr: tuple[str, ...] = (), auth_time: int = 0, device_id: str = "",
                  extra: Mapping[str, str] | None = None, lifetime: int = 60, now: float | None = None) -> str:
        """A signed assertion for one request (reused from the cache while half its lifetime is left)."""
        now = time.time() if now is None else now
        extra_items = tuple(sorted((extra or {}).items()))
        key = (issuer, audience, app, subject, upn, session_id, groups, amr, auth_time, device_id, extra_items, lifetime)
        hit = self._cache.get(key)
        if hit is not None and hit[1] - now > lifetime / 2:
            self._cache.move_to_end(key)
            return hit[0]
        iat = int(now)
        claims: dict[str, Any] = dict(extra_items)
        claims.update({"iss": issuer, "aud": audience, "app": app, "sub": subject, "upn": upn, "sid": session_id,
                       "groups": list(groups), "amr": list(amr), "iat": iat, "nbf": iat - 5, "exp": iat + lifetime})
        if auth_time:
            claims["auth_time"] = auth_time
        if device_id:
            claims["did"] = device_id
        token = self.sign(claims)
        self._cache[key] = (token, iat + lifetime)
        if len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return token


def jwks(*signers: AssertionSigner) -> dict[str, list[dict[str, str]]]:
    """The JWKS document of the given signers' public keys (current first)."""
    return {"keys": [s.public_jwk() for s in signers]}
