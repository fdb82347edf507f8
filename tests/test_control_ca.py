"""Tests of control/ca.py (the control plane's CA) and dataplane/enroll.py (node enrolment):
certificate contents, refused CSRs, real mutual TLS 1.3 handshakes between nodes the CA
certified, identity files on disk, and when renewal falls due."""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from control.ca import CaError, CertificateAuthority, IssuedCertificate
from dataplane.basics import pki
from dataplane.controllink import renewal
from dataplane.basics.pki import NodeFiles, PeerCertificate, PkiError

pytestmark = pytest.mark.timeout(60)

UTC = datetime.timezone.utc


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _cert(issued: IssuedCertificate) -> x509.Certificate:
    return x509.load_pem_x509_certificate(issued.cert_pem)


def _csr(key: CertificateIssuerPrivateKeyTypes, subject: x509.Name | None = None,
         extensions: Sequence[x509.ExtensionType] = ()) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node")])
    )
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def _key_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.open(str(tmp_path / "ca"))


@pytest.fixture
def enrol(ca: CertificateAuthority, tmp_path: Path) -> Callable[..., NodeFiles]:
    """Enrol a node the way a registering node does: own key + CSR, CA signs, files written."""

    def run(role: str, name: str, hosts: list[str] | None = None, key_pem: bytes | None = None,
            csr_pem: bytes | None = None) -> NodeFiles:
        if key_pem is None:
            key_pem, csr_pem = pki.new_key_and_csr(name)
        assert csr_pem is not None
        issued = ca.sign_csr(csr_pem, role=role, name=name, hosts=hosts)
        return pki.write_node_files(str(tmp_path / "nodes" / name), name, key_pem, issued.cert_pem, ca.bundle())

    return run


def _handshake(server: NodeFiles, client: NodeFiles,
               server_hostname: str = "localhost") -> tuple[PeerCertificate, PeerCertificate]:
    """A real TLS handshake over loopback; returns (who the server saw, who the client saw)."""
    server_ctx = pki.server_context(server.cert, server.key, server.ca)
    client_ctx = pki.client_context(client.cert, client.key, client.ca)
    seen: dict[str, object] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    seen["server"] = pki.peer_certificate(tls)
                    seen["version"] = tls.version()
                    tls.sendall(b"ok")
            except Exception as exc:  # reported by the main thread
                seen["server"] = exc

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                    client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                client_saw = pki.peer_certificate(tls)
                assert tls.recv(2) == b"ok"
        finally:
            thread.join(10)
    server_saw = seen["server"]
    if isinstance(server_saw, Exception):
        raise server_saw
    assert seen["version"] == "TLSv1.3"
    assert isinstance(server_saw, PeerCertificate)
    return server_saw, client_saw


# ---------------------------------------------------------------------------- the CA itself


def test_open_creates_ca_with_private_key_and_reopens_it(tmp_path: Path, umask_zero: None) -> None:
    directory = str(tmp_path / "ca")
    first = CertificateAuthority.open(directory)
    assert sorted(os.listdir(directory)) == ["ca.key", "ca.pem"]
    assert _mode(directory) == 0o700
    assert _mode(os.path.join(directory, "ca.key")) == 0o600
    assert _mode(os.path.join(directory, "ca.pem")) == 0o644
    assert first.bundle() == Path(directory, "ca.pem").read_bytes()
    assert x509.load_pem_x509_certificate(first.bundle()).extensions.get_extension_for_class(
        x509.BasicConstraints).value.ca
    assert CertificateAuthority.open(directory).bundle() == first.bundle()


def test_open_adopts_a_pki_init_directory(tmp_path: Path) -> None:
    """A CA made by `ferryman pki init` keeps working: its old edge talks to a newly enrolled connector."""
    directory = str(tmp_path / "pki")
    made = pki.init_pki(directory)
    ca = CertificateAuthority.open(directory)
    assert ca.bundle() == Path(directory, "ca.pem").read_bytes()
    key_pem, csr_pem = pki.new_key_and_csr("connector-9")
    issued = ca.sign_csr(csr_pem, role="connector", name="connector-9")
    connector = pki.write_node_files(str(tmp_path / "c9"), "connector-9", key_pem, issued.cert_pem, ca.bundle())
    server_saw, client_saw = _handshake(made["edge-1"], connector)
    assert (server_saw.role, server_saw.name) == ("connector", "connector-9")
    assert (client_saw.role, client_saw.name) == ("edge", "edge-1")


def test_open_refuses_broken_ca_directories(tmp_path: Path) -> None:
    lone_key = tmp_path / "lone"
    lone_key.mkdir()
    (lone_key / "ca.key").write_bytes(b"secret")
    with pytest.raises(CaError, match="ca.key exists but .*ca.pem does not: not replacing a CA key"):
        CertificateAuthority.open(str(lone_key))

    # A node certificate put where the CA certificate belongs is not a CA.
    made = pki.init_pki(str(tmp_path / "pki"))
    fake = tmp_path / "fake"
    fake.mkdir()
    os.link(made["edge-1"].cert, fake / "ca.pem")
    os.link(made["edge-1"].key, fake / "ca.key")
    with pytest.raises(CaError, match="is not a CA certificate"):
        CertificateAuthority.open(str(fake))


# ---------------------------------------------------------------------------- signing


@pytest.mark.parametrize("role", ["connector", "client"])
def test_signed_node_certificate_has_the_data_plane_shape(ca: CertificateAuthority, role: str) -> None:
    _, csr_pem = pki.new_key_and_csr("node-1")
    issued = ca.sign_csr(csr_pem, role=role, name="node-1")
    cert = _cert(issued)

    ident = pki.certificate_identity(cert, cert.public_bytes(serialization.Encoding.DER), "cert")
    assert (ident.role, ident.name) == (role, "node-1")
    assert ident.serial == issued.serial == cert.serial_number
    assert ident.fingerprint == issued.fingerprint
    assert cert.issuer == x509.load_pem_x509_certificate(ca.bundle()).subject
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.bundle()))
    ext = cert.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).critical
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ext.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert not ext.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert ext.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == ["node-1"]


def test_edge_certificate_carries_its_hosts_and_server_auth(ca: CertificateAuthority) -> None:
    _, csr_pem = pki.new_key_and_csr("edge-7")
    cert = _cert(ca.sign_csr(csr_pem, role="edge", name="edge-7", hosts=["edge.example.com", "192.0.2.7"]))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["edge.example.com"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["192.0.2.7"]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]


def test_identity_requested_in_the_csr_is_ignored(ca: CertificateAuthority) -> None:
    """A connector asking to be an edge CA for evil.example still gets a plain connector certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr_pem = _csr(
        key,
        x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "edge"),
                   x509.NameAttribute(NameOID.COMMON_NAME, "edge-1")]),
        [x509.BasicConstraints(ca=True, path_length=None),
         x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
         x509.SubjectAlternativeName([x509.DNSName("evil.example")])],
    )
    cert = _cert(ca.sign_csr(csr_pem, role="connector", name="connector-3"))
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "connector"),
                                      x509.NameAttribute(NameOID.COMMON_NAME, "connector-3")])
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["connector-3"]
    assert cert.public_key() == key.public_key()  # only the key is taken from the CSR


def test_tampered_csr_is_refused(ca: CertificateAuthority) -> None:
    """Swapping the key in a signed CSR (a request for someone else's key) breaks its signature."""
    _, csr_pem = pki.new_key_and_csr("node-1")
    csr = x509.load_pem_x509_csr(csr_pem)
    der = csr.public_bytes(serialization.Encoding.DER)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    own_spki = csr.public_key().public_bytes(*spki)
    other_spki = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(*spki)
    assert der.count(own_spki) == 1 and len(other_spki) == len(own_spki)
    forged = x509.load_der_x509_csr(der.replace(own_spki, other_spki)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CaError, match="CSR signature does not verify"):
        ca.sign_csr(forged, role="connector", name="node-1")


@pytest.mark.parametrize(("key", "message"), [
    (lambda: rsa.generate_private_key(65537, 1024),
     "a 1024-bit RSA key: use EC P-256 or P-384, Ed25519, or RSA of at least 2048 bits"),
    (lambda: ec.generate_private_key(ec.SECP256K1()), "an EC key on curve secp256k1"),
    (lambda: ec.generate_private_key(ec.SECP521R1()), "an EC key on curve secp521r1"),
])
def test_weak_or_unexpected_keys_are_refused(
        ca: CertificateAuthority, key: Callable[[], CertificateIssuerPrivateKeyTypes], message: str) -> None:
    with pytest.raises(CaError, match=f"CSR carries {message}"):
        ca.sign_csr(_csr(key()), role="connector", name="node-1")


def test_malformed_requests_are_refused(ca: CertificateAuthority) -> None:
    _, csr_pem = pki.new_key_and_csr("node-1")
    cases: list[tuple[dict[str, object], str]] = [
        ({"csr_pem": b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"},
         "CSR is not a PEM certificate signing request"),
        ({"csr_pem": b"x" * 20000}, "CSR is 20000 bytes: more than 16384 is refused"),
        ({"role": "admin"}, "unknown role 'admin': expected one of edge, connector, client"),
        ({"name": "../etc"}, "node name '../etc' is not usable"),
        ({"lifetime_days": 0}, "days must be at least 1, not 0"),
        ({"hosts": ["x.example"]}, "only edge certificates carry host names"),
        ({"role": "edge", "hosts": ["bad host"]}, "edge host 'bad host' is neither an IP address nor a DNS name"),
    ]
    for change, message in cases:
        args: dict[str, object] = {"csr_pem": csr_pem, "role": "connector", "name": "node-1", **change}
        with pytest.raises(CaError, match=message.replace(".", r"\.")):
            ca.sign_csr(args.pop("csr_pem"), **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("days", [1, 30, 180, 400])
def test_lifetime_days_is_honoured(ca: CertificateAuthority, days: int) -> None:
    _, csr_pem = pki.new_key_and_csr("node-1")
    before = datetime.datetime.now(UTC).replace(microsecond=0)
    issued = ca.sign_csr(csr_pem, role="connector", name="node-1", lifetime_days=days)
    after = datetime.datetime.now(UTC)
    cert = _cert(issued)
    assert (issued.not_before, issued.not_after) == (cert.not_valid_before_utc, cert.not_valid_after_utc)
    assert before - pki.CLOCK_SKEW <= issued.not_before <= after - pki.CLOCK_SKEW
    assert before + datetime.timedelta(days=days) <= issued.not_after <= after + datetime.timedelta(days=days)


def test_default_lifetime_is_180_days(ca: CertificateAuthority) -> None:
    issued = ca.sign_csr(pki.new_key_and_csr("node-1")[1], role="connector", name="node-1")
    assert issued.not_after - issued.not_before == datetime.timedelta(days=180) + pki.CLOCK_SKEW


def test_serials_are_unique(ca: CertificateAuthority) -> None:
    _, csr_pem = pki.new_key_and_csr("node-1")
    issued = [ca.sign_csr(csr_pem, role="connector", name="node-1") for _ in range(100)]
    assert len({i.serial for i in issued}) == 100
    assert len({i.fingerprint for i in issued}) == 100
    assert all(0 < i.serial < 2**159 for i in issued)


# ---------------------------------------------------------------------------- real mutual TLS


@pytest.mark.parametrize("key_type", ["p256", "p384", "ed25519", "rsa2048"])
def test_edge_and_connector_certified_by_the_ca_complete_mutual_tls(
        enrol: Callable[..., NodeFiles], key_type: str) -> None:
    edge = enrol("edge", "edge-1", hosts=["localhost", "127.0.0.1"])
    if key_type == "p256":
        connector = enrol("connector", "connector-1")
    else:
        key = {"p384": lambda: ec.generate_private_key(ec.SECP384R1()),
               "ed25519": ed25519.Ed25519PrivateKey.generate,
               "rsa2048": lambda: rsa.generate_private_key(65537, 2048)}[key_type]()
        connector = enrol("connector", "connector-1", key_pem=_key_pem(key), csr_pem=_csr(key))
    assert (edge.role, connector.role) == ("edge", "connector")

    server_saw, client_saw = _handshake(edge, connector)
    assert (server_saw.role, server_saw.name) == ("connector", "connector-1")
    assert (client_saw.role, client_saw.name) == ("edge", "edge-1")
    assert server_saw == pki.read_node_certificate(connector.cert)
    assert client_saw == pki.read_node_certificate(edge.cert)


def test_certificate_from_another_ca_is_refused_in_the_handshake(
        enrol: Callable[..., NodeFiles], tmp_path: Path) -> None:
    edge = enrol("edge", "edge-1")
    other = CertificateAuthority.open(str(tmp_path / "other"))
    key_pem, csr_pem = pki.new_key_and_csr("connector-1")
    stranger = pki.write_node_files(str(tmp_path / "stranger"), "connector-1", key_pem,
                                     other.sign_csr(csr_pem, role="connector", name="connector-1").cert_pem,
                                     other.bundle())
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _handshake(edge, stranger)


# ---------------------------------------------------------------------------- identity files


def test_new_key_and_csr(ca: CertificateAuthority) -> None:
    key_pem, csr_pem = pki.new_key_and_csr("connector-1")
    key = serialization.load_pem_private_key(key_pem, password=None)
    csr = x509.load_pem_x509_csr(csr_pem)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert csr.is_signature_valid and csr.public_key() == key.public_key()
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "connector-1"
    with pytest.raises(PkiError, match="node name 'a/b' is not usable"):
        pki.new_key_and_csr("a/b")


def test_write_identity_modes_with_umask_zero(enrol: Callable[..., NodeFiles], tmp_path: Path,
                                             umask_zero: None, monkeypatch: pytest.MonkeyPatch) -> None:
    created: list[tuple[str, int]] = []
    real_open = os.open

    def recording_open(path: str, flags: int, mode: int = 0o777, **kw: object) -> int:
        if flags & os.O_CREAT:
            created.append((os.path.basename(path), mode))
        return real_open(path, flags, mode, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", recording_open)
    files = enrol("connector", "connector-1")
    directory = str(tmp_path / "nodes" / "connector-1")
    assert files == NodeFiles(role="connector", name="connector-1", cert=f"{directory}/connector-1.pem",
                              key=f"{directory}/connector-1.key", ca=f"{directory}/ca.pem")
    assert sorted(os.listdir(directory)) == ["ca.pem", "connector-1.key", "connector-1.pem"]
    assert _mode(directory) == 0o700
    assert (_mode(files.key), _mode(files.cert), _mode(files.ca)) == (0o600, 0o644, 0o644)
    # The key file was born 0600: it never existed with wider permissions.
    key_creations = [mode for name, mode in created if name.startswith("connector-1.key")]
    assert key_creations == [0o600]


def test_renewal_replaces_files_atomically(ca: CertificateAuthority, tmp_path: Path, umask_zero: None) -> None:
    directory = str(tmp_path / "node")
    key1, csr1 = pki.new_key_and_csr("connector-1")
    cert1 = ca.sign_csr(csr1, role="connector", name="connector-1").cert_pem
    first = pki.write_node_files(directory, "connector-1", key1, cert1, ca.bundle())
    old_inodes = {p: os.stat(p).st_ino for p in (first.key, first.cert)}
    key2, csr2 = pki.new_key_and_csr("connector-1")
    cert2 = ca.sign_csr(csr2, role="connector", name="connector-1").cert_pem
    with open(first.key, "rb") as old_key, open(first.cert, "rb") as old_cert:
        second = pki.write_node_files(directory, "connector-1", key2, cert2, ca.bundle())
        # The old files were replaced, not rewritten: readers that opened them still read them whole.
        assert (old_key.read(), old_cert.read()) == (key1, cert1)
    assert second == first
    assert (Path(second.key).read_bytes(), Path(second.cert).read_bytes()) == (key2, cert2)
    assert all(os.stat(p).st_ino != ino for p, ino in old_inodes.items())
    assert _mode(second.key) == 0o600
    assert sorted(os.listdir(directory)) == ["ca.pem", "connector-1.key", "connector-1.pem"]


def test_failed_write_keeps_previous_identity(enrol: Callable[..., NodeFiles], ca: CertificateAuthority,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk full while writing the new certificate: the old key and certificate stay, still a pair."""
    files = enrol("connector", "connector-1")
    before = {p: Path(p).read_bytes() for p in (files.key, files.cert, files.ca)}
    key_pem, csr_pem = pki.new_key_and_csr("connector-1")
    cert_pem = ca.sign_csr(csr_pem, role="connector", name="connector-1").cert_pem
    calls = 0
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:  # ca, key, then the certificate
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(PkiError, match="connector-1.pem.new: No space left on device"):
        pki.write_node_files(os.path.dirname(files.key), "connector-1", key_pem, cert_pem, ca.bundle())
    assert {p: Path(p).read_bytes() for p in before} == before
    assert sorted(os.listdir(os.path.dirname(files.key))) == ["ca.pem", "connector-1.key", "connector-1.pem"]


def test_write_identity_refuses_inconsistent_input(ca: CertificateAuthority, tmp_path: Path) -> None:
    key_pem, csr_pem = pki.new_key_and_csr("connector-1")
    cert_pem = ca.sign_csr(csr_pem, role="connector", name="connector-1").cert_pem
    other_key, _ = pki.new_key_and_csr("connector-1")
    other_ca = CertificateAuthority.open(str(tmp_path / "other")).bundle()
    directory = str(tmp_path / "node")
    cases = [
        (("connector-1", other_key, cert_pem, ca.bundle()), "key for connector-1 does not match its certificate"),
        (("connector-1", key_pem, cert_pem, other_ca), "not signed by any certificate of the CA bundle"),
        (("connector-2", key_pem, cert_pem, ca.bundle()), "certificate names 'connector-1', not 'connector-2'"),
        (("connector-1", b"junk", cert_pem, ca.bundle()), "not an unencrypted PEM private key"),
        (("connector-1", key_pem, b"junk", ca.bundle()), "not PEM certificates"),
        (("../x", key_pem, cert_pem, ca.bundle()), "node name '../x' is not usable"),
    ]
    for args, message in cases:
        with pytest.raises(PkiError, match=message):
            pki.write_node_files(directory, *args)
    assert not os.path.exists(directory)  # nothing was written


# ---------------------------------------------------------------------------- renewal


def _issued(ca: CertificateAuthority, days: int = 180) -> IssuedCertificate:
    return ca.sign_csr(pki.new_key_and_csr("node-1")[1], role="connector", name="node-1", lifetime_days=days)


def test_renewal_due_at_one_third_remaining(ca: CertificateAuthority, tmp_path: Path) -> None:
    issued = _issued(ca)
    lifetime = issued.not_after - issued.not_before
    boundary = issued.not_after - lifetime / 3  # exactly 1/3 of the lifetime left
    assert lifetime % datetime.timedelta(seconds=3) == datetime.timedelta(0)  # so the boundary is exact
    tick = datetime.timedelta(microseconds=1)
    path = tmp_path / "cert.pem"
    path.write_bytes(issued.cert_pem)
    for source in (issued.cert_pem, str(path), path, _cert(issued)):
        assert renewal.renew_after(source) == boundary
        assert not renewal.renewal_due(source, issued.not_before)
        assert not renewal.renewal_due(source, boundary - tick)
        assert not renewal.renewal_due(source, boundary)  # not less than 1/3 left yet
        assert renewal.renewal_due(source, boundary + tick)
        assert renewal.renewal_due(source, issued.not_after)
        assert renewal.renewal_due(source, issued.not_after + datetime.timedelta(days=1))  # expired


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.9])
def test_renewal_custom_fraction(ca: CertificateAuthority, fraction: float) -> None:
    issued = _issued(ca, days=30)
    lifetime = issued.not_after - issued.not_before
    due = renewal.renew_after(issued.cert_pem, fraction)
    assert abs((issued.not_after - due) - lifetime * fraction) <= datetime.timedelta(microseconds=1)
    second = datetime.timedelta(seconds=1)
    assert not renewal.renewal_due(issued.cert_pem, due - second, fraction)
    assert renewal.renewal_due(issued.cert_pem, due + second, fraction)
    # A larger share renews earlier.
    assert (renewal.renew_after(issued.cert_pem, 0.05) > due) and (renewal.renew_after(issued.cert_pem, 0.95) < due)


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, float("nan")])
def test_invalid_fraction_is_refused(ca: CertificateAuthority, fraction: float) -> None:
    issued = _issued(ca)
    with pytest.raises(ValueError, match="renew_at_fraction must be between 0 and 1, exclusive"):
        renewal.renewal_due(issued.cert_pem, issued.not_before, fraction)
    with pytest.raises(ValueError, match="renew_at_fraction must be between 0 and 1, exclusive"):
        renewal.renew_after(issued.cert_pem, fraction)


def test_renewal_inputs_are_checked(ca: CertificateAuthority, tmp_path: Path) -> None:
    issued = _issued(ca)
    with pytest.raises(ValueError, match="now must be timezone-aware"):
        renewal.renewal_due(issued.cert_pem, datetime.datetime(2030, 1, 1))
    with pytest.raises(PkiError, match="certificate: not a PEM certificate"):
        renewal.renewal_due(b"junk", issued.not_before)
    with pytest.raises(PkiError, match="file not found"):
        renewal.renewal_due(str(tmp_path / "missing.pem"), issued.not_before)
