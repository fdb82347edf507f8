"""Node-side enrolment crypto: make a key + CSR, store what the control plane signed, know when to renew.

A node (connector or edge) registering with the control plane calls ``new_key_and_csr``,
sends the CSR, and passes the returned certificate and CA bundle to ``write_identity``,
which stores them in the ``dataplane.pki`` layout (``<name>.key`` 0600, ``<name>.pem`` and
``ca.pem`` 0644). ``renewal_due`` / ``renew_after`` say when a certificate has less than a
given share of its lifetime left. No network and no clock of its own: callers pass ``now``.
"""

from __future__ import annotations

import contextlib
import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from . import pki
from .pki import NodeFiles, PkiError

DEFAULT_RENEW_AT_FRACTION = 1 / 3

CertSource = bytes | str | os.PathLike[str] | x509.Certificate


def new_key_and_csr(name: str) -> tuple[bytes, bytes]:
    """A fresh ECDSA P-256 key (PEM, PKCS#8) and a CSR signed by it with CN=``name``.

    The CN is informational: the control plane decides the certificate's identity.
    """
    pki.check_name(name)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return pki.key_pem(key), csr.public_bytes(serialization.Encoding.PEM)


def write_identity(directory: str, name: str, key_pem: bytes, cert_pem: bytes, ca_pem: bytes) -> NodeFiles:
    """Store node ``name``'s key, certificate and CA bundle in ``directory`` (made 0700 if new).

    Everything is checked first (the key matches the certificate, the CA bundle signed it,
    the certificate names ``name`` and a role), so bad input writes nothing. Each file is
    written in full next to its target (the key 0600 from its creation), and only when all
    three are written do they replace the old ones, CA first, then key, then certificate:
    a failed write (disk full) leaves the previous identity intact.
    """
    pki.check_name(name)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (TypeError, ValueError):
        raise PkiError(f"key for {name}: not an unencrypted PEM private key") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        authorities = x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise PkiError(f"certificate or CA bundle for {name}: not PEM certificates") from None
    if key.public_key() != cert.public_key():
        raise PkiError(f"key for {name} does not match its certificate")
    if not any(pki.issued_by(cert, ca) for ca in authorities):
        raise PkiError(f"certificate for {name} is not signed by any certificate of the CA bundle")
    identity = pki.certificate_identity(cert, cert.public_bytes(serialization.Encoding.DER), f"certificate for {name}")
    if identity.name != name:
        raise PkiError(f"certificate names {identity.name!r}, not {name!r}")

    pki.make_directory(directory)
    key_path, cert_path = pki.node_paths(directory, name)
    ca_path = os.path.join(directory, pki.CA_CERT)
    files = ((ca_path, ca_pem, 0o644), (key_path, key_pem, 0o600), (cert_path, cert_pem, 0o644))
    try:
        for path, data, mode in files:
            pki.write_file(f"{path}.new", data, mode)
    except PkiError:
        for path, _, _ in files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{path}.new")
        raise
    for path, _, _ in files:
        os.replace(f"{path}.new", path)
    return NodeFiles(role=identity.role, name=name, cert=cert_path, key=key_path, ca=ca_path)


def renew_after(cert: CertSource, renew_at_fraction: float = DEFAULT_RENEW_AT_FRACTION) -> datetime.datetime:
    """The moment (UTC) after which less than ``renew_at_fraction`` of the certificate's lifetime is left.

    ``cert`` is PEM bytes, a path to a PEM file, or a loaded certificate.
    """
    if not 0 < renew_at_fraction < 1:
        raise ValueError(f"renew_at_fraction must be between 0 and 1, exclusive, not {renew_at_fraction!r}")
    c = _load(cert)
    lifetime = c.not_valid_after_utc - c.not_valid_before_utc
    return c.not_valid_after_utc - lifetime * renew_at_fraction


def renewal_due(
    cert: CertSource, now: datetime.datetime, renew_at_fraction: float = DEFAULT_RENEW_AT_FRACTION
) -> bool:
    """True when less than ``renew_at_fraction`` of the lifetime is left at ``now`` (or it has expired)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware, e.g. datetime.now(timezone.utc)")
    return now > renew_after(cert, renew_at_fraction)


def _load(cert: CertSource) -> x509.Certificate:
    if isinstance(cert, x509.Certificate):
        return cert
    if isinstance(cert, bytes):
        try:
            return x509.load_pem_x509_certificate(cert)
        except ValueError:
            raise PkiError("certificate: not a PEM certificate") from None
    return pki.read_certificates(os.fspath(cert))[0]
