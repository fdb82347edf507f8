"""The node's request signer: one-use tokens for its calls to the control plane, made with the
certificate and key its tunnels use (``contract.nodeauth`` says what a token holds)."""

from __future__ import annotations

import base64
import time

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from joserfc.jwk import ECKey

from ..basics import pki
from ..contract.nodeauth import request_token


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
        holder = pki.certificate_identity(cert, der, f"certificate {self.cert_path}")
        self.certificate: x509.Certificate = cert
        self.subject = f"{holder.role}:{holder.name}"
        self.serial = cert.serial_number
        self._x5c = base64.b64encode(der).decode()
        self._key = ECKey.import_key(private)  # type: ignore[arg-type]

    def token(self, method: str, target: str, body: bytes = b"", now: float | None = None) -> str:
        """A token for one request: ``method``, ``target`` (path with query, as sent) and ``body``."""
        return request_token(self._key, self._x5c, self.subject, method, target, body,
                             time.time() if now is None else now)
