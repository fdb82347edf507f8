"""Verifying users' access tokens at the edge, offline, with the keys the control plane publishes.

A client agent presents its access token in HELLO and refreshes it with AUTH frames. The
token is an Ed25519-signed JWT (``alg`` Ed25519, RFC 9864) from the control plane; its public keys and
issuer come with every configuration snapshot (``token_keys``, ``token_issuer``), so an
edge verifies tokens without calling anyone. ``TokenVerifier.principal(token, device)``
checks the signature (key chosen by ``kid``), the issuer, the claims every flow decision
needs, and that the token was issued to the device whose certificate the tunnel presented
(the ``did`` claim is that certificate's name). Expiry is checked per flow, by
``dataplane.access.policy``, so a tunnel outlives a token the client refreshes in time.
"""

from __future__ import annotations

from collections.abc import Iterable

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from .policy import Principal

ALGORITHM = "Ed25519"  # RFC 9864 fully-specified name (formerly "EdDSA" with crv Ed25519)
MAX_TOKEN = 8192


class TokenError(ValueError):
    """An access token is not acceptable; the message says why, for the user's log."""


class TokenVerifier:
    """Access-token checks for one set of published keys."""

    def __init__(self, keys: Iterable[dict[str, str]], issuer: str) -> None:
        self.keys = [dict(k) for k in keys]
        self.issuer = issuer
        try:
            self._key_set = KeySet.import_key_set({"keys": self.keys}) if self.keys else None
        except (JoseError, ValueError, TypeError) as exc:
            raise TokenError(f"the control plane's token keys cannot be used: {exc}") from None

    def principal(self, token: str, device: str) -> Principal:
        """Who the token speaks for, on the device named ``device`` ("": a browser, whose token names
        no device); ``TokenError`` otherwise."""
        if not token:
            raise TokenError("no access token: sign in with `ferryman client login`")
        if self._key_set is None:
            raise TokenError("this edge has no token keys from the control plane yet")
        if len(token) > MAX_TOKEN:
            raise TokenError(f"the access token is longer than {MAX_TOKEN} characters")
        try:
            decoded = jwt.decode(token, self._key_set, algorithms=[ALGORITHM])
        except (JoseError, ValueError, TypeError) as exc:
            raise TokenError(f"the access token does not verify with the control plane's keys ({exc})") from None
        claims = decoded.claims
        if claims.get("iss") != self.issuer:
            raise TokenError(f"the access token is from issuer {claims.get('iss')!r}, not {self.issuer!r}")
        sub, sid, did, upn = claims.get("sub"), claims.get("sid"), claims.get("did"), claims.get("upn")
        exp, auth_time, amr = claims.get("exp"), claims.get("auth_time"), claims.get("amr")
        if not all(isinstance(v, str) and v for v in (sub, sid, upn)):
            raise TokenError("the access token lacks its user, UPN or session")
        if not isinstance(exp, int) or not isinstance(auth_time, int):
            raise TokenError("the access token lacks integer 'exp' and 'auth_time' claims")
        if not isinstance(amr, list) or not all(isinstance(m, str) for m in amr):
            raise TokenError("the access token's 'amr' claim is not a list of methods")
        if (did or "") != device:  # "" : a browser's sign-in (web apps), whose token names no device
            raise TokenError(f"the access token was issued to device {did!r}, not to this device ({device})")
        return Principal(user_id=sub, upn=upn, session_id=sid, device_id=device,  # type: ignore[arg-type]
                         amr=tuple(amr), auth_time=auth_time, expires=exp)
