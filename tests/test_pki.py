"""Tests of dataplane/pki.py: files and certificate contents made by ``init_pki``, real
mutual TLS 1.3 handshakes over loopback with the contexts it builds, and its errors."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dataplane.basics import pki
from dataplane.basics.pki import NodeFiles, PeerCertificate, PkiError

pytestmark = pytest.mark.timeout(30)


def _cert(path: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def fabric(tmp_path: Path) -> dict[str, NodeFiles]:
    return pki.init_pki(str(tmp_path / "pki"), edge_hosts=["localhost", "127.0.0.1", "::1", "edge.example"])


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# ---------------------------------------------------------------------------- init_pki


def test_init_creates_ca_and_node_files(tmp_path: Path, umask_zero: None) -> None:
    directory = str(tmp_path / "pki")
    files = pki.init_pki(directory)

    assert list(files) == ["edge-1", "connector-1", "client-1"]
    assert _mode(directory) == 0o700
    assert sorted(os.listdir(directory)) == sorted(
        ["ca.pem", "ca.key"] + [f"{n}.{ext}" for n in files for ext in ("pem", "key")]
    )
    # Keys stay private even with a umask that would let anyone read them; certificates are public.
    for name in ("ca", *files):
        assert _mode(os.path.join(directory, f"{name}.key")) == 0o600
        assert _mode(os.path.join(directory, f"{name}.pem")) == 0o644
    for name, nf in files.items():
        assert nf.name == name
        assert nf.cert == os.path.join(directory, f"{name}.pem")
        assert nf.key == os.path.join(directory, f"{name}.key")
        assert nf.ca == os.path.join(directory, "ca.pem")
    assert [nf.role for nf in files.values()] == ["edge", "connector", "client"]


def test_keys_are_created_with_mode_0600(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key file is born 0600 (os.open mode), not chmod-ed afterwards."""
    created: list[tuple[str, int]] = []
    real_open = os.open

    def recording_open(path: str, flags: int, mode: int = 0o777, **kw: object) -> int:
        if flags & os.O_CREAT:
            created.append((os.path.basename(path), mode))
        return real_open(path, flags, mode, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", recording_open)
    pki.init_pki(str(tmp_path), connectors=[], clients=[])
    key_modes = {mode for name, mode in created if ".key" in name}
    assert key_modes == {0o600}
    assert len([name for name, _ in created if ".key" in name]) == 2  # ca + edge-1


def test_certificate_contents(fabric: dict[str, NodeFiles]) -> None:
    ca = _cert(fabric["edge-1"].ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days >= 3650
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)

    edge = _cert(fabric["edge-1"].cert)
    assert edge.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "edge-1"
    assert edge.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "edge"
    assert edge.issuer == ca.subject
    edge.verify_directly_issued_by(ca)
    key = edge.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    assert isinstance(edge.signature_hash_algorithm, hashes.SHA256)
    san = edge.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "edge.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    eku = edge.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert edge.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    lifetime = edge.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    assert datetime.timedelta(days=364) < lifetime <= datetime.timedelta(days=365)

    for name, role in (("connector-1", "connector"), ("client-1", "client")):
        cert = _cert(fabric[name].cert)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == role
        assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
            ExtendedKeyUsageOID.CLIENT_AUTH
        ]
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [name]
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
        cert.verify_directly_issued_by(ca)


def test_existing_ca_is_reused(tmp_path: Path) -> None:
    directory = str(tmp_path)
    first = pki.init_pki(directory)
    ca_before = Path(first["edge-1"].ca).read_bytes()
    second = pki.init_pki(directory, edges=[], connectors=["connector-2"], clients=[])
    assert Path(second["connector-2"].ca).read_bytes() == ca_before
    _cert(second["connector-2"].cert).verify_directly_issued_by(_cert(first["edge-1"].ca))


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    directory = str(tmp_path)
    files = pki.init_pki(directory)
    before = Path(files["connector-1"].cert).read_bytes()

    with pytest.raises(PkiError) as err:
        pki.init_pki(directory, edges=[], connectors=["connector-2", "connector-1"], clients=[])
    assert str(err.value) == (
        f"{directory}/connector-1.key already exists: not overwriting it (use --force to replace it)"
    )
    assert not os.path.exists(os.path.join(directory, "connector-2.pem")), "nothing is written when refusing"
    with pytest.raises(PkiError, match="client-1.key already exists"):
        pki.issue_node(directory, "client", "client-1")
    assert Path(files["connector-1"].cert).read_bytes() == before

    again = pki.init_pki(directory, edges=[], connectors=["connector-1"], clients=[], force=True)
    assert Path(again["connector-1"].cert).read_bytes() != before
    assert _mode(again["connector-1"].key) == 0o600
    assert [p for p in os.listdir(directory) if p.endswith(".tmp")] == []


def test_issue_node_without_ca(tmp_path: Path) -> None:
    with pytest.raises(PkiError) as err:
        pki.issue_node(str(tmp_path), "client", "client-9")
    assert str(err.value) == f"no CA in {tmp_path}: run `ferryman pki init {tmp_path}` first"


def test_issue_node_alone(tmp_path: Path) -> None:
    pki.init_pki(str(tmp_path), edges=[], connectors=[], clients=[])
    nf = pki.issue_node(str(tmp_path), "edge", "edge-2", hosts=["edge2.example"], days=10)
    cert = _cert(nf.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["edge2.example"]
    assert (cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)).days in (9, 10)
    assert pki.read_node_certificate(nf.cert).name == "edge-2"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"edges": ["../evil"]}, "node name '../evil' is not usable"),
        ({"clients": ["ca"]}, "node name 'ca' is not usable"),
        ({"clients": ["edge-1"]}, "node name 'edge-1' given twice"),
        ({"edge_hosts": ["bad host"]}, "edge host 'bad host' is neither an IP address nor a DNS name"),
        ({"days": 0}, "days must be at least 1, not 0"),
    ],
)
def test_init_rejects_bad_input(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    directory = tmp_path / "pki"
    with pytest.raises(PkiError, match=message.replace("(", r"\(")):
        pki.init_pki(str(directory), **kwargs)  # type: ignore[arg-type]
    assert not directory.exists(), "bad input is refused before anything is written"


def test_issue_node_rejects_unknown_role(tmp_path: Path) -> None:
    pki.init_pki(str(tmp_path))
    with pytest.raises(PkiError, match="unknown role 'admin': expected one of edge, connector, client"):
        pki.issue_node(str(tmp_path), "admin", "admin-1")


# ---------------------------------------------------------------------------- identity


def test_load_identity(fabric: dict[str, NodeFiles]) -> None:
    me = pki.read_node_certificate(fabric["connector-1"].cert)
    cert = _cert(fabric["connector-1"].cert)
    assert me.role == "connector" and me.name == "connector-1"
    assert me.serial == cert.serial_number
    assert me.not_after == cert.not_valid_after_utc.timestamp()
    assert me.fingerprint == cert.fingerprint(hashes.SHA256()).hex()


def _self_signed(path: Path, subject: x509.Name) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


class _FakeSSLObject:
    """Stands in for a finished handshake: what getpeercert(binary_form=True) would return."""

    def __init__(self, der: bytes | None) -> None:
        self.der = der

    def getpeercert(self, binary_form: bool = False) -> bytes | None:
        assert binary_form
        return self.der


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ([x509.NameAttribute(NameOID.COMMON_NAME, "x")], "has no role (OU)"),
        (
            [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "admin"), x509.NameAttribute(NameOID.COMMON_NAME, "x")],
            "has no role (OU): 'admin' is not one of edge, connector, client",
        ),
        ([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "edge")], "has no name (CN)"),
    ],
)
def test_identity_needs_role_and_name(tmp_path: Path, attributes: list[x509.NameAttribute], message: str) -> None:
    path = tmp_path / "odd.pem"
    _self_signed(path, x509.Name(attributes))
    with pytest.raises(PkiError) as err:
        pki.read_node_certificate(str(path))
    assert str(err.value) == f"certificate {path} {message}"
    der = _cert(str(path)).public_bytes(serialization.Encoding.DER)
    with pytest.raises(PkiError) as err:
        pki.peer_certificate(_FakeSSLObject(der))  # type: ignore[arg-type]
    assert str(err.value) == f"peer certificate {message}"


def test_peer_without_certificate() -> None:
    with pytest.raises(PkiError, match="peer presented no certificate"):
        pki.peer_certificate(_FakeSSLObject(None))  # type: ignore[arg-type]


def test_load_identity_errors(tmp_path: Path) -> None:
    with pytest.raises(PkiError) as err:
        pki.read_node_certificate(str(tmp_path / "edge.pem"))
    assert str(err.value) == f"certificate {tmp_path}/edge.pem: file not found"
    (tmp_path / "junk.pem").write_text("hello")
    with pytest.raises(PkiError) as err:
        pki.read_node_certificate(str(tmp_path / "junk.pem"))
    assert str(err.value) == f"certificate {tmp_path}/junk.pem: not a PEM certificate"


# ---------------------------------------------------------------------------- contexts


def test_contexts_are_tls13_mutual(fabric: dict[str, NodeFiles]) -> None:
    e, c = fabric["edge-1"], fabric["client-1"]
    server = pki.server_context(e.cert, e.key, e.ca)
    client = pki.client_context(c.cert, c.key, c.ca)
    for ctx in (server, client):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert client.check_hostname is True


def test_context_file_errors(fabric: dict[str, NodeFiles], tmp_path: Path) -> None:
    e, c = fabric["edge-1"], fabric["client-1"]
    missing = str(tmp_path / "x" / "edge.pem")
    with pytest.raises(PkiError) as err:
        pki.server_context(missing, e.key, e.ca)
    assert str(err.value) == f"certificate {missing}: file not found"
    with pytest.raises(PkiError) as err:
        pki.client_context(c.cert, c.key, missing)
    assert str(err.value) == f"CA {missing}: file not found"
    with pytest.raises(PkiError) as err:
        pki.server_context(e.cert, c.key, e.ca)
    assert str(err.value) == f"key {c.key} does not match certificate {e.cert}"
    junk = tmp_path / "junk.key"
    junk.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(PkiError) as err:
        pki.server_context(e.cert, str(junk), e.ca)
    assert str(err.value) == f"key {junk}: not a PEM private key"

    other = pki.init_pki(str(tmp_path / "other"))
    with pytest.raises(PkiError) as err:
        pki.client_context(other["client-1"].cert, other["client-1"].key, c.ca)
    assert str(err.value) == f"certificate {other['client-1'].cert} is not signed by the CA in {c.ca}"


def test_expired_certificate_is_refused_early(fabric: dict[str, NodeFiles], tmp_path: Path) -> None:
    c = fabric["client-1"]
    ca_key = serialization.load_pem_private_key(Path(c.ca).with_name("ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    old = _cert(c.cert)
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=2)
    expired = (
        x509.CertificateBuilder().subject_name(old.subject).issuer_name(old.issuer).public_key(old.public_key())
        .serial_number(2).not_valid_before(past).not_valid_after(past + datetime.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    path = tmp_path / "expired.pem"
    path.write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(PkiError, match=f"certificate {path} expired at "):
        pki.client_context(str(path), c.key, c.ca)


def test_orphan_ca_key_is_not_replaced(tmp_path: Path) -> None:
    (tmp_path / "ca.key").write_text("precious")
    with pytest.raises(PkiError) as err:
        pki.init_pki(str(tmp_path))
    assert str(err.value) == f"{tmp_path}/ca.key exists but {tmp_path}/ca.pem does not: not replacing a CA key"
    assert (tmp_path / "ca.key").read_text() == "precious"


def _handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str = "localhost"
) -> tuple[PeerCertificate | Exception, PeerCertificate | Exception]:
    """One TLS handshake over loopback with plain sockets; each side's view of its peer or its error.

    After the handshake the client sends b"ping" and the server answers b"pong", so a
    client whose certificate the server refused sees the refusal (TLS 1.3 reports it late).
    """
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    result: dict[str, PeerCertificate | Exception] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                assert tls.version() == "TLSv1.3"
                result["server"] = pki.peer_certificate(tls)
                assert tls.recv(4) == b"ping"
                tls.sendall(b"pong")
        except Exception as exc:  # the test inspects whatever went wrong
            result["server"] = exc
        finally:
            listener.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=hostname) as tls:
                identity = pki.peer_certificate(tls)
                tls.sendall(b"ping")
                reply = tls.recv(4)
                if reply != b"pong":
                    raise ConnectionError(f"server closed the connection (got {reply!r})")
                result["client"] = identity
    except (ssl.SSLError, OSError) as exc:
        result["client"] = exc
    finally:
        thread.join(10)
    return result["server"], result["client"]


def test_mutual_tls_handshake_and_identities(fabric: dict[str, NodeFiles]) -> None:
    e, k = fabric["edge-1"], fabric["connector-1"]
    server_view, client_view = _handshake(pki.server_context(e.cert, e.key, e.ca), pki.client_context(k.cert, k.key, k.ca))
    assert server_view == pki.read_node_certificate(k.cert)
    assert isinstance(server_view, PeerCertificate) and (server_view.role, server_view.name) == ("connector", "connector-1")
    assert client_view == pki.read_node_certificate(e.cert)
    assert isinstance(client_view, PeerCertificate) and (client_view.role, client_view.name) == ("edge", "edge-1")


@pytest.mark.parametrize("hostname", ["127.0.0.1", "edge.example"])
def test_handshake_with_other_san_entries(fabric: dict[str, NodeFiles], hostname: str) -> None:
    e, c = fabric["edge-1"], fabric["client-1"]
    _, client_view = _handshake(
        pki.server_context(e.cert, e.key, e.ca), pki.client_context(c.cert, c.key, c.ca), hostname
    )
    assert isinstance(client_view, PeerCertificate) and client_view.name == "edge-1"


def test_client_from_another_ca_is_refused(fabric: dict[str, NodeFiles], tmp_path: Path) -> None:
    e = fabric["edge-1"]
    rogue = pki.init_pki(str(tmp_path / "rogue"))["client-1"]
    # The rogue client trusts our CA (so it accepts the edge) but its own certificate is from another CA.
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    client_ctx.load_verify_locations(e.ca)
    client_ctx.load_cert_chain(rogue.cert, rogue.key)
    server_view, client_view = _handshake(pki.server_context(e.cert, e.key, e.ca), client_ctx)
    assert isinstance(server_view, ssl.SSLCertVerificationError), server_view
    assert isinstance(client_view, Exception)


def test_client_without_certificate_is_refused(fabric: dict[str, NodeFiles]) -> None:
    e = fabric["edge-1"]
    client_ctx = ssl.create_default_context(cafile=e.ca)
    server_view, client_view = _handshake(pki.server_context(e.cert, e.key, e.ca), client_ctx)
    assert isinstance(server_view, ssl.SSLError) and "certificate" in str(server_view).lower(), server_view
    assert isinstance(client_view, Exception)


def test_server_from_another_ca_is_refused(fabric: dict[str, NodeFiles], tmp_path: Path) -> None:
    c = fabric["client-1"]
    rogue = pki.init_pki(str(tmp_path / "rogue"))["edge-1"]
    # server_context itself refuses a certificate not issued by the CA it is given ...
    with pytest.raises(PkiError, match="is not signed by the CA"):
        pki.server_context(rogue.cert, rogue.key, c.ca)
    # ... and a rogue edge trusting its own CA is refused by our client.
    _, client_view = _handshake(pki.server_context(rogue.cert, rogue.key, rogue.ca), pki.client_context(c.cert, c.key, c.ca))
    assert isinstance(client_view, ssl.SSLCertVerificationError), client_view


def test_wrong_server_hostname_is_refused(fabric: dict[str, NodeFiles]) -> None:
    e, c = fabric["edge-1"], fabric["client-1"]
    _, client_view = _handshake(
        pki.server_context(e.cert, e.key, e.ca), pki.client_context(c.cert, c.key, c.ca), "other.example"
    )
    assert isinstance(client_view, ssl.SSLCertVerificationError)
    assert "other.example" in str(client_view)


def test_tls12_client_is_refused(fabric: dict[str, NodeFiles]) -> None:
    e, c = fabric["edge-1"], fabric["client-1"]
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    client_ctx.load_verify_locations(c.ca)
    client_ctx.load_cert_chain(c.cert, c.key)
    server_view, client_view = _handshake(pki.server_context(e.cert, e.key, e.ca), client_ctx)
    assert isinstance(server_view, ssl.SSLError) and isinstance(client_view, ssl.SSLError)


def test_asyncio_streams_handshake(fabric: dict[str, NodeFiles]) -> None:
    """The contexts work with asyncio (as the nodes use them); identities via get_extra_info."""
    e, c = fabric["edge-1"], fabric["client-1"]

    async def main() -> tuple[PeerCertificate, PeerCertificate]:
        seen: asyncio.Future[PeerCertificate] = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.set_result(pki.peer_certificate(writer.get_extra_info("ssl_object")))
            writer.write(await reader.readexactly(5))
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=pki.server_context(e.cert, e.key, e.ca))
        port = server.sockets[0].getsockname()[1]
        async with server:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=pki.client_context(c.cert, c.key, c.ca), server_hostname="localhost"
            )
            writer.write(b"hello")
            assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
            mine = pki.peer_certificate(writer.get_extra_info("ssl_object"))
            writer.close()
            return await asyncio.wait_for(seen, 5), mine

    server_view, client_view = asyncio.run(main())
    assert (server_view.role, server_view.name) == ("client", "client-1")
    assert (client_view.role, client_view.name) == ("edge", "edge-1")
