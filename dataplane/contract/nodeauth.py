"""Node request credentials: a short-lived JWT signed with the node's certificate key.

Edges and connectors call the control plane's node endpoints (configuration, heartbeat,
certificate renewal) with the identity their tunnels use, their certificate and key, and
without TLS client authentication on the HTTP API (which may sit behind a TLS-terminating
proxy). Every request carries ``Authorization: Bearer <JWT>``:

- header: ``alg`` ``ES256``, ``typ`` ``JWT``, ``x5c``: ``[base64(DER certificate)]``;
- claims: ``sub`` (``<role>:<name>``), ``iat``, ``exp`` (``iat`` + ``TOKEN_LIFETIME``),
  ``htm`` (HTTP method), ``htu`` (path and query of the request), ``bsh`` (base64url
  SHA-256 of the request body, of b"" without one) and ``jti`` (random).

``request_token`` makes one (``controllink.signer.NodeSigner`` with the node's files). The
control plane (``control.api.guards``) accepts it only when the certificate chains to
its CA, is within its validity, is not revoked, and was issued to a registered node; the
signature verifies with the certificate's key; the token is current (``CLOCK_SKEW``); it
is bound to this very method, path and body; and its ``jti`` was not seen before. A token
is worth one request: a copy replayed later, to another path, or with another body (say,
another CSR) is refused.
"""

from __future__ import annotations

import base64
import hashlib
import secrets

from joserfc import jwt
from joserfc.jwk import ECKey

ALGORITHM = "ES256"
TOKEN_LIFETIME = 60  # seconds a token is valid after it was made
CLOCK_SKEW = 300  # seconds a node's clock may be ahead of or behind the control plane's


MAX_JTI = 64  # characters


def body_hash(body: bytes) -> str:
    """The ``bsh`` claim: base64url (no padding) of the body's SHA-256."""
    return base64.urlsafe_b64encode(hashlib.sha256(body).digest()).rstrip(b"=").decode()


def request_token(key: ECKey, x5c: str, subject: str, method: str, target: str, body: bytes, now: float) -> str:
    """The token of one request: ``subject`` (``<role>:<name>``) signs ``method``, ``target`` (path
    with query, as sent) and ``body`` at ``now`` with ``key``; ``x5c`` is its certificate (base64 DER)."""
    issued = int(now)
    claims = {"sub": subject, "iat": issued, "exp": issued + TOKEN_LIFETIME, "htm": method.upper(),
              "htu": target, "bsh": body_hash(body), "jti": secrets.token_urlsafe(16)}
    return jwt.encode({"alg": ALGORITHM, "typ": "JWT", "x5c": [x5c]}, claims, key, algorithms=[ALGORITHM])
