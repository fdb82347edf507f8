"""The control plane's internal certificate authority: it turns a node's CSR into a certificate.

``CertificateAuthority.open(dir)`` adopts the CA of a ``ferryman pki init`` directory
(``ca.pem`` + ``ca.key``) or creates one there. ``sign_csr`` checks that the requester holds
the key (CSR signature) and that the key is strong enough, then issues a certificate whose
identity comes only from the caller: the role (OU), name (CN), subjectAltNames, key usages
and lifetime the CSR asks for are ignored. Certificates have exactly the shape of
``dataplane.basics.pki.issue_node``'s, so the data plane's tunnels accept them unchanged.
Pure logic: no HTTP, no database; the caller records the serial for revocation.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Sequence

import msgspec
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dataplane.basics import pki

DEFAULT_LIFETIME_DAYS = 180
MAX_CSR_BYTES = 16 * 1024
MIN_RSA_BITS = 2048
_CURVES = ("secp256r1", "secp384r1")


class CaError(ValueError):
    """The CA cannot be opened, or a CSR cannot be signed; the message says why."""


class IssuedCertificate(msgspec.Struct, frozen=True):
    """A certificate just signed; times are timezone-aware UTC, fingerprint is SHA-256 of the DER."""

    cert_pem: bytes
    serial: int
    not_before: datetime.datetime
    not_after: datetime.datetime
    fingerprint: str


class CertificateAuthority:
    """The CA certificate and key of one directory; use ``CertificateAuthority.open``."""

    def __init__(self, directory: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.directory = directory
        self.certificate = cert
        self._key = key

    @classmethod
    def open(cls, directory: str) -> CertificateAuthority:
        """Load the CA in ``directory``, creating directory (0700) and CA (key 0600) if there is none."""
        try:
            if not os.path.exists(os.path.join(directory, pki.CA_CERT)):
                pki.make_directory(directory)
                pki.create_ca(directory)
            cert, key = pki.load_ca(directory)
        except pki.PkiError as exc:
            raise CaError(str(exc)) from None
        _check_is_ca(cert, os.path.join(directory, pki.CA_CERT))
        return cls(directory, cert, key)

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes, where: str) -> CertificateAuthority:
        """The CA of a certificate and ECDSA key in PEM (as ``pki.new_ca`` makes them); ``where``
        names their origin in messages (and stands for ``directory``)."""
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (TypeError, ValueError):
            raise CaError(f"the CA in {where} is not a PEM certificate and unencrypted key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CaError(f"the CA key in {where} is not an ECDSA key")
        if key.public_key() != cert.public_key():
            raise CaError(f"the CA key in {where} does not match its certificate")
        _check_is_ca(cert, where)
        return cls(where, cert, key)

    def key_pem(self) -> bytes:
        """The CA's private key (PKCS#8 PEM), for sealing it where other control-plane nodes find it."""
        return pki.key_pem(self._key)

    def bundle(self) -> bytes:
        """The CA certificate (PEM) that nodes trust."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def sign_csr(
        self,
        csr_pem: bytes,
        *,
        role: str,
        name: str,
        hosts: Sequence[str] | None = None,
        lifetime_days: int = DEFAULT_LIFETIME_DAYS,
    ) -> IssuedCertificate:
        """Certify the CSR's key as node ``name`` of ``role``; only an edge takes ``hosts``
        (its subjectAltNames, default ``localhost`` and ``127.0.0.1``). The lifetime is cut
        at the CA's own expiry."""
        try:
            san = pki.check_request(role, name, hosts, lifetime_days)
        except pki.PkiError as exc:
            raise CaError(str(exc)) from None
        public_key = _verified_key(csr_pem)
        now = datetime.datetime.now(datetime.timezone.utc)
        ca_expiry = self.certificate.not_valid_after_utc
        if ca_expiry <= now:
            raise CaError(f"the CA certificate in {self.directory} expired at {ca_expiry.isoformat()}: "
                          "nothing can be signed")
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if role == "edge":
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - pki.CLOCK_SKEW)
            .not_valid_after(min(now + datetime.timedelta(days=lifetime_days), ca_expiry))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(pki.key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return IssuedCertificate(
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            serial=cert.serial_number,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            fingerprint=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
        )


    def issue_server(self, hosts: Sequence[str], lifetime_days: int) -> tuple[x509.Certificate, bytes]:
        """A certificate and new key (PEM) for the control plane's own HTTPS: subjectAltNames
        ``hosts`` (names and IP addresses), serverAuth only, OU ``control`` (no node role, so no
        tunnel accepts it); the lifetime is cut at the CA's own expiry."""
        if not hosts:
            raise CaError("the control plane's certificate needs at least one host name or address")
        try:
            san = [pki.general_name(host) for host in hosts]
        except pki.PkiError as exc:
            raise CaError(str(exc).replace("edge host", "control plane host")) from None
        now = datetime.datetime.now(datetime.timezone.utc)
        ca_expiry = self.certificate.not_valid_after_utc
        if ca_expiry <= now:
            raise CaError(f"the CA certificate in {self.directory} expired at {ca_expiry.isoformat()}")
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "control"),
                x509.NameAttribute(NameOID.COMMON_NAME, "ferryman-control"),
            ]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - pki.CLOCK_SKEW)
            .not_valid_after(min(now + datetime.timedelta(days=lifetime_days), ca_expiry))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(pki.key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return cert, pki.key_pem(key)


_AcceptedKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey


def _check_is_ca(cert: x509.Certificate, where: str) -> None:
    if not pki.is_ca_certificate(cert):
        raise CaError(f"{where} is not a CA certificate (basicConstraints CA:TRUE missing)")


def _verified_key(csr_pem: bytes) -> _AcceptedKey:
    """The CSR's public key, once the CSR is shown to be signed by that key and the key is acceptable."""
    if len(csr_pem) > MAX_CSR_BYTES:
        raise CaError(f"CSR is {len(csr_pem)} bytes: more than {MAX_CSR_BYTES} is refused")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise CaError("CSR is not a PEM certificate signing request") from None
    try:
        key = csr.public_key()
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CaError(f"CSR key or signature algorithm is not supported: {exc}") from None
    if not valid:
        raise CaError("CSR signature does not verify: the request was altered or not signed with its own key")
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name in _CURVES:
            return key
        what = f"an EC key on curve {key.curve.name}"
    elif isinstance(key, ed25519.Ed25519PublicKey):
        return key
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size >= MIN_RSA_BITS:
            return key
        what = f"a {key.key_size}-bit RSA key"
    else:
        what = f"a {type(key).__name__.removesuffix('PublicKey').lstrip('_')} key"
    raise CaError(f"CSR carries {what}: use EC P-256 or P-384, Ed25519, or RSA of at least {MIN_RSA_BITS} bits")
