"""Node certificates and mutual-TLS contexts, until the control plane issues certificates.

``ferryman pki init DIR`` (``init_pki``) makes a small internal CA and one ECDSA P-256
key + certificate per node; the certificate's subject says who the node is: CN=<name>,
OU=<role> with role ``edge``, ``connector`` or ``client``. ``server_context`` and
``client_context`` build TLS 1.3-only contexts that demand a certificate from the CA on
both sides, and ``peer_certificate`` reads the peer's role and name off a finished handshake.
Private keys are created 0600 and never exist with wider permissions, even briefly.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import contextlib
import re
import ssl
from collections.abc import Sequence

import msgspec
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import statefile

ROLES = ("edge", "connector", "client")
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
CA_DAYS = 3650
# Backdate notBefore a little so a peer whose clock is slightly behind accepts a new certificate.
CLOCK_SKEW = datetime.timedelta(minutes=5)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class PkiError(Exception):
    """A certificate or key cannot be created, loaded or trusted; the message names the file."""


class NodeFiles(msgspec.Struct, frozen=True):
    """Where one node's credentials live."""

    role: str
    name: str
    cert: str
    key: str
    ca: str


class PeerCertificate(msgspec.Struct, frozen=True):
    """What a node certificate says about its holder (a tunnel's peer, or this node itself):
    role (OU), name (CN), serial, expiry and SHA-256 fingerprint."""

    role: str
    name: str
    serial: int
    not_after: float
    fingerprint: str


# ---------------------------------------------------------------------------- issuing


def init_pki(
    directory: str,
    *,
    edge_hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    connectors: Sequence[str] = ("connector-1",),
    clients: Sequence[str] = ("client-1",),
    edges: Sequence[str] = ("edge-1",),
    days: int = 365,
    force: bool = False,
) -> dict[str, NodeFiles]:
    """Create (or reuse) the CA in ``directory`` and a key + certificate for every node.

    Nothing is written if any node's files already exist and ``force`` is false.
    Returns the node files by node name, edges first, then connectors, then clients.
    """
    nodes = [("edge", n) for n in edges] + [("connector", n) for n in connectors] + [("client", n) for n in clients]
    seen: set[str] = set()
    for role, name in nodes:
        check_request(role, name, edge_hosts if role == "edge" else None, days)
        if name in seen:
            raise PkiError(f"node name {name!r} given twice: every node needs its own name")
        seen.add(name)
        if not force:
            for path in node_paths(directory, name):
                _refuse_existing(path)
    make_directory(directory)
    if not os.path.exists(os.path.join(directory, CA_CERT)):
        create_ca(directory)  # otherwise the existing CA is reused
    return {
        name: issue_node(directory, role, name, hosts=edge_hosts if role == "edge" else None, days=days, force=force)
        for role, name in nodes
    }


def issue_node(
    directory: str,
    role: str,
    name: str,
    *,
    hosts: Sequence[str] | None = None,
    days: int = 365,
    force: bool = False,
) -> NodeFiles:
    """Issue ``<name>.key`` + ``<name>.pem`` in ``directory``, signed by the CA there.

    ``hosts`` (edges only) become the certificate's subjectAltName entries; an edge
    without hosts gets ``localhost`` and ``127.0.0.1``.
    """
    san = check_request(role, name, hosts, days)
    key_path, cert_path = node_paths(directory, name)
    if not force:
        _refuse_existing(key_path)
        _refuse_existing(cert_path)
    ca_cert, ca_key = load_ca(directory)

    if role == "edge":
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    else:
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    now = datetime.datetime.now(datetime.timezone.utc)
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(key_path, key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return NodeFiles(role=role, name=name, cert=cert_path, key=key_path, ca=os.path.join(directory, CA_CERT))


def check_request(role: str, name: str, hosts: Sequence[str] | None, days: int) -> list[x509.GeneralName]:
    """Validate what a node certificate would say; returns its subjectAltName entries."""
    if role not in ROLES:
        raise PkiError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
    check_name(name)
    if days < 1:
        raise PkiError(f"days must be at least 1, not {days}")
    if role != "edge":
        if hosts:
            raise PkiError(f"only edge certificates carry host names; a {role} is named by its CN")
        return [x509.DNSName(name)]
    return [general_name(h) for h in (hosts or ("localhost", "127.0.0.1"))]


def new_ca() -> tuple[bytes, bytes]:
    """A new CA: (certificate PEM, private key PEM), in memory (``create_ca`` writes them to files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    # A random suffix keeps two CAs apart by name too, not only by key.
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Ferryman"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"Ferryman CA {os.urandom(4).hex()}"),
    ])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)


def create_ca(directory: str) -> None:
    key_path = os.path.join(directory, CA_KEY)
    if os.path.exists(key_path):
        raise PkiError(f"{key_path} exists but {os.path.join(directory, CA_CERT)} does not: not replacing a CA key")
    cert_pem, private_pem = new_ca()
    _write(key_path, private_pem, 0o600)
    _write(os.path.join(directory, CA_CERT), cert_pem, 0o644)


def load_ca(directory: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = os.path.join(directory, CA_CERT), os.path.join(directory, CA_KEY)
    if not os.path.exists(cert_path):
        raise PkiError(f"no CA in {directory}: run `ferryman pki init {directory}` first")
    if not os.path.exists(key_path):
        raise PkiError(f"CA key {key_path}: file not found (the CA certificate is there, its key is not)")
    cert = read_certificates(cert_path)[0]
    key = _read_key(key_path)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"CA key {key_path}: not an ECDSA key")
    _check_key_matches(cert, key, cert_path, key_path)
    return cert, key


def key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign, crl_sign=crl_sign,
        encipher_only=False, decipher_only=False,
    )


def general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or not all(_NAME_RE.fullmatch(label) for label in host.rstrip(".").split(".")):
        raise PkiError(f"edge host {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host.rstrip(".").lower())


def check_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name) or name == "ca":
        raise PkiError(
            f"node name {name!r} is not usable: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, and not 'ca'"
        )


def node_paths(directory: str, name: str) -> tuple[str, str]:
    return os.path.join(directory, f"{name}.key"), os.path.join(directory, f"{name}.pem")


def _refuse_existing(path: str) -> None:
    if os.path.exists(path):
        raise PkiError(f"{path} already exists: not overwriting it (use --force to replace it)")


def make_directory(directory: str) -> None:
    """Create ``directory`` 0700 (``statefile.make_private_directory``); ``PkiError`` when it fails."""
    try:
        statefile.make_private_directory(directory)
    except statefile.StateFileError as exc:
        raise PkiError(str(exc)) from None


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: str, data: bytes, mode: int) -> None:
    """``statefile.write_file`` with a ``PkiError`` naming the file when it fails."""
    try:
        statefile.write_file(path, data, mode)
    except statefile.StateFileError as exc:
        raise PkiError(str(exc)) from None


# ---------------------------------------------------------------------------- enrolment
# (a key made here, its certificate signed by the control plane)


def new_key_and_csr(name: str) -> tuple[bytes, bytes]:
    """A fresh ECDSA P-256 key (PEM, PKCS#8) and a CSR signed by it with CN=``name``.

    The CN is informational: the control plane decides the certificate's identity.
    """
    check_name(name)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return key_pem(key), csr.public_bytes(serialization.Encoding.PEM)


def write_node_files(directory: str, name: str, key_pem: bytes, cert_pem: bytes, ca_pem: bytes) -> NodeFiles:
    """Store node ``name``'s key, certificate and CA bundle in ``directory`` (made 0700 if new).

    Everything is checked first (the key matches the certificate, the CA bundle signed it,
    the certificate names ``name`` and a role), so bad input writes nothing. Each file is
    written in full next to its target (the key 0600 from its creation), and only when all
    three are written do they replace the old ones, CA first, then key, then certificate:
    a failed write (disk full) leaves the previous identity intact.
    """
    check_name(name)
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
    if not any(issued_by(cert, ca) for ca in authorities):
        raise PkiError(f"certificate for {name} is not signed by any certificate of the CA bundle")
    holder = certificate_identity(cert, cert.public_bytes(serialization.Encoding.DER), f"certificate for {name}")
    if holder.name != name:
        raise PkiError(f"certificate names {holder.name!r}, not {name!r}")

    make_directory(directory)
    key_path, cert_path = node_paths(directory, name)
    ca_path = os.path.join(directory, CA_CERT)
    files = ((ca_path, ca_pem, 0o644), (key_path, key_pem, 0o600), (cert_path, cert_pem, 0o644))
    try:
        for path, data, mode in files:
            _write(f"{path}.new", data, mode)
    except PkiError:
        for path, _, _ in files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{path}.new")
        raise
    for path, _, _ in files:
        os.replace(f"{path}.new", path)
    return NodeFiles(role=holder.role, name=name, cert=cert_path, key=key_path, ca=ca_path)


# ---------------------------------------------------------------------------- loading


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise PkiError(f"{what} {path}: file not found") from None
    except OSError as exc:
        raise PkiError(f"{what} {path}: {exc.strerror}") from None


def read_certificates(path: str, what: str = "certificate") -> list[x509.Certificate]:
    data = _read(path, what)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise PkiError(f"{what} {path}: not a PEM certificate") from None


def _read_key(path: str) -> PrivateKeyTypes:
    data = _read(path, "key")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise PkiError(f"key {path}: encrypted keys are not supported") from None
    except ValueError:
        raise PkiError(f"key {path}: not a PEM private key") from None


def _check_key_matches(cert: x509.Certificate, key: PrivateKeyTypes, cert_path: str, key_path: str) -> None:
    if key.public_key() != cert.public_key():
        raise PkiError(f"key {key_path} does not match certificate {cert_path}")


def _check_node_files(cert_path: str, key_path: str, ca_path: str) -> None:
    """Fail early, with a clear reason, where OpenSSL would fail late or obscurely."""
    cert = read_certificates(cert_path)[0]
    _check_key_matches(cert, _read_key(key_path), cert_path, key_path)
    authorities = read_certificates(ca_path, "CA")
    if not any(issued_by(cert, ca) for ca in authorities):
        raise PkiError(f"certificate {cert_path} is not signed by the CA in {ca_path}")
    now = datetime.datetime.now(datetime.timezone.utc)
    if cert.not_valid_after_utc < now:
        raise PkiError(f"certificate {cert_path} expired at {cert.not_valid_after_utc.isoformat()}")


def is_ca_certificate(cert: x509.Certificate) -> bool:
    """Whether ``cert`` says it is a CA (basicConstraints CA:TRUE; absent means no)."""
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _context(server_side: bool, cert: str, key: str, ca: str) -> ssl.SSLContext:
    _check_node_files(cert, key, ca)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise PkiError(f"CA {ca}: {exc.reason or exc}") from None
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise PkiError(f"certificate {cert} / key {key}: {exc.reason or exc}") from None
    return ctx


def server_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """TLS 1.3 server context that requires a client certificate from ``ca``."""
    return _context(True, cert, key, ca)


def client_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """TLS 1.3 client context presenting ``cert``; checks the server's certificate and host name."""
    ctx = _context(False, cert, key, ca)
    ctx.check_hostname = True
    return ctx


# ---------------------------------------------------------------------------- who a certificate names


def peer_certificate(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> PeerCertificate:
    """The role and name in the certificate the peer presented during the handshake."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise PkiError("peer presented no certificate")
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        raise PkiError("peer certificate cannot be parsed") from None
    return certificate_identity(cert, der, "peer certificate")


def read_node_certificate(cert_path: str) -> PeerCertificate:
    """The role and name in one's own certificate (the first one in a PEM file)."""
    cert = read_certificates(cert_path)[0]
    return certificate_identity(cert, cert.public_bytes(serialization.Encoding.DER), f"certificate {cert_path}")


def certificate_identity(cert: x509.Certificate, der: bytes, what: str) -> PeerCertificate:
    roles = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if not roles:
        raise PkiError(f"{what} has no role (OU)")
    role = str(roles[0].value)
    if role not in ROLES:
        raise PkiError(f"{what} has no role (OU): {role!r} is not one of {', '.join(ROLES)}")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names or not names[0].value:
        raise PkiError(f"{what} has no name (CN)")
    return PeerCertificate(
        role=role,
        name=str(names[0].value),
        serial=cert.serial_number,
        not_after=cert.not_valid_after_utc.timestamp(),
        fingerprint=hashlib.sha256(der).hexdigest(),
    )
