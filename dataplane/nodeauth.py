"""Node request credentials: a short-lived JWT signed with the node's certificate key.

Edges and connectors call the control plane's node endpoints (configuration, heartbeat,
certificate renewal) with the identity their tunnels use, their certificate and key, and
without TLS client authentication on the HTTP API (which may sit behind a TLS-terminating
proxy). Every request carries ``Authorization: Bearer <JWT>``:

- header: ``alg`` ``ES256``, ``typ`` ``JWT``, ``x5c``: ``[base64(DER certificate)]``;
- claims: ``sub`` (``<role>:<name>``), ``iat``, ``exp`` (``iat`` + ``TOKEN_LIFETIME``),
  ``htm`` (HTTP method), ``htu`` (path and query of the request), ``bsh`` (base64url
  SHA-256 of the request body, of b"" without one) and ``jti`` (random).

The control plane (``control.api.nodes``) accepts it only when the certificate chains to
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
import time

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from joserfc import jwt
from joserfc.jwk import ECKey

from . import pki

ALGORITHM = "ES256"
TOKEN_LIFETIME = 60  # seconds a token is valid after it was made
CLOCK_SKEW = 300  # seconds a node's clock may be ahead of or behind the control plane's


MAX_JTI = 64  # characters


def body_hash(body: bytes) -> str:
    """The ``bsh`` claim: base64url (no padding) of the body's SHA-256."""
    return base64.urlsafe_b64encode(hashlib.sha256(body).digest()).rstrip(b"=").decode()


class NodeSigner:
    """Makes request tokens from one certificate and key (``reload`` after a renewal)."""

    def __init__(self, cert_path: str, key_path: str) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self.reload()

    def reload(self) -> None:
        """Read the certificate and key again (both files, so they always match)."""
        cert = pki.read_certificates(self.cert_path)[0]
        try:
            with open(self.key_path, "rb") as fh:
                key_pem = fh.read()
        except OSError as exc:
            raise pki.PkiError(f"cannot read key {self.key_path}: {exc.strerror}") from None
        try:
            private = serialization.load_pem_private_key(key_pem, password=None)
        except (TypeError, ValueError):
            raise pki.PkiError(f"{self.key_path}: not an unencrypted PEM private key") from None
        if private.public_key() != cert.public_key():
            raise pki.PkiError(f"key {self.key_path} does not match certificate {self.cert_path}")
        der = cert.public_bytes(serialization.Encoding.DER)
        identity = pki.certificate_identity(cert, der, f"certificate {self.cert_path}")
        self.certificate: x509.Certificate = cert
        self.subject = f"{identity.role}:{identity.name}"
        self.serial = cert.serial_number
        self._x5c = base64.b64encode(der).decode()
        self._key = ECKey.import_key(private)  # type: ignore[arg-type]

    def token(self, method: str, target: str, body: bytes = b"", now: float | None = None) -> str:
        """A token for one request: ``method``, ``target`` (path with query, as sent) and ``body``."""
        issued = int(time.time() if now is None else now)
        claims = {"sub": self.subject, "iat": issued, "exp": issued + TOKEN_LIFETIME, "htm": method.upper(),
                  "htu": target, "bsh": body_hash(body), "jti": secrets.token_urlsafe(16)}
        return jwt.encode({"alg": ALGORITHM, "typ": "JWT", "x5c": [self._x5c]}, claims, self._key,
                          algorithms=[ALGORITHM])
