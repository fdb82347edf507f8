"""The control plane speaks TLS by default, and its callers trust only the CA they pinned.

- it serves HTTPS from its own CA, for the hosts of ``FERRYMAN_CONTROL_HOSTS`` (a new
  certificate when they change), and prints the CA hash;
- registration tokens carry that hash (``fmr_<secret>.<hash hex>``); a node pins the CA with
  it (or ``--ca-hash``), an old-format token without ``--ca-hash`` is refused with a clear reason;
- a wrong pin, or a man in the middle with another CA, is refused before a token, password or
  key request is sent; later connections are verified against the pinned CA, host name
  included;
- plain ``http://`` is refused unless ``FERRYMAN_CONTROL_INSECURE_HTTP=1``, which warns;
- ``ferryman up`` runs the control plane on https:// and prints the CA hash.
"""

from __future__ import annotations

import datetime
import http.server
import json
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from control.ca import CertificateAuthority
from control.tls import parse_hosts, server_certificate
from dataplane.basics import pki
from dataplane.basics.controltls import ControlTlsError, ca_pin, fetch_pinned_ca, parse_pin, split_token
from dataplane.controllink import http as httpclient
from dataplane.controllink import trust

from controlplane import ROOT, Control, environment

pytestmark = pytest.mark.timeout(120)

WRONG_PIN = "sha256:" + "ab" * 32


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Control]:
    with Control.running(tmp_path_factory.mktemp("control") / "data") as ctl:
        yield ctl


def _run(*args: str, data_dir: Path, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "dataplane", *args], cwd=ROOT, env=environment(data_dir, **env),
                          input=stdin, capture_output=True, text=True, timeout=60,
                          stdin=None if stdin is not None else subprocess.DEVNULL)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def _register(url: str, token: str, directory: Path, *extra: str, **env: str) -> subprocess.CompletedProcess[str]:
    return _run("connector", "register", "--control", url, "--token", token, "--dir", str(directory),
                "--name", f"c-{os.urandom(3).hex()}", *extra, data_dir=directory.parent, **env)


# ---------------------------------------------------------------------------- a man in the middle


class _Mitm:
    """An HTTPS server on loopback with a certificate from a CA of its own, answering ``/v1/ca`` with
    that CA and everything else with 200 ``{}``: someone between the caller and the control plane."""

    def __init__(self, directory: Path, serve_first: bytes = b"") -> None:
        """``serve_first``: PEM served at ``/v1/ca`` before the middle's own CA (e.g. the real CA, which
        is public)."""
        pki.make_directory(str(directory))
        pki.create_ca(str(directory))
        ca = CertificateAuthority.open(str(directory))
        cert, key = ca.issue_server(["127.0.0.1", "localhost"], 30)
        (directory / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / "server.key").write_bytes(key)
        self.ca_pem = ca.bundle()
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *_args: object) -> None:
                pass

            def _answer(self) -> None:
                outer.requests.append(f"{self.command} {self.path}")
                body = serve_first + outer.ca_pem if self.path.endswith("/v1/ca") else b"{}"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer  # noqa: N815

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(directory / "server.pem", directory / "server.key")
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mitm(tmp_path: Path) -> Iterator[_Mitm]:
    m = _Mitm(tmp_path / "mitm-ca")
    try:
        yield m
    finally:
        m.close()


# ---------------------------------------------------------------------------- the pin


def test_pins_parse_strictly_and_tokens_carry_the_pin(control: Control) -> None:
    pin = control.ca_hash
    assert pin == ca_pin(x509.load_pem_x509_certificate(control.ca_pem)) and pin.startswith("sha256:")
    assert parse_pin(pin.upper().replace("SHA256:", "sha256:")) == pin == parse_pin(pin.removeprefix("sha256:"))
    for bad, why in (("sha1:" + "ab" * 20, "only sha256 pins"), ("sha256:abc", "64 hex digits"), ("", "64 hex")):
        with pytest.raises(ControlTlsError, match=why):
            parse_pin(bad)
    token = control.token("connector")
    secret, carried = split_token(token)
    assert secret.startswith("fmr_") and carried == pin and token == f"{secret}.{pin.removeprefix('sha256:')}"
    with pytest.raises(ControlTlsError, match="registration token's CA hash"):
        split_token(secret + ".nothex")
    # The control plane prints the hash at start.
    assert f"CA hash {pin}" in control.log.read_text()


def test_a_token_pins_the_ca_and_an_old_token_needs_the_hash(control: Control, tmp_path: Path) -> None:
    done = _register(control.url, control.token(), tmp_path / "new")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "new" / "control-ca.pem").read_bytes() == control.ca_pem
    assert json.loads((tmp_path / "new" / "node.json").read_text())["control_ca"] == "control-ca.pem"

    old, _ = split_token(control.token())  # a token as older control planes made it: no hash
    refused = _register(control.url, old, tmp_path / "old")
    assert refused.returncode == 2
    assert "the registration token carries no CA hash (it was made by an older control plane)" in refused.stderr
    assert "--ca-hash" in refused.stderr and not (tmp_path / "old").exists()
    done = _register(control.url, old, tmp_path / "old", "--ca-hash", control.ca_hash)
    assert done.returncode == 0, done.stderr

    differs = _register(control.url, control.token(), tmp_path / "both", "--ca-hash", WRONG_PIN)
    assert differs.returncode == 2 and "differs from the CA hash the registration token carries" in differs.stderr


def test_a_wrong_pin_is_refused_before_anything_is_sent(control: Control, tmp_path: Path) -> None:
    token = control.token()
    secret, _ = split_token(token)
    done = _register(control.url, f"{secret}.{WRONG_PIN.removeprefix('sha256:')}", tmp_path / "id")
    assert done.returncode == 1
    assert (f"the control plane at {control.url} presented a CA with hash {control.ca_hash}, not the pinned "
            f"{WRONG_PIN}: refusing it") in done.stderr
    assert not (tmp_path / "id").exists()
    assert _register(control.url, token, tmp_path / "id").returncode == 0  # the token was not spent

    login = _run("client", "login", "--control", control.url, "--ca-hash", WRONG_PIN, "--user", "x@corp.example",
                 "--password-stdin", data_dir=tmp_path / "client", stdin="a password\n")
    assert login.returncode == 1 and f"not the pinned {WRONG_PIN}" in login.stderr
    assert not (tmp_path / "client").exists()

    admin = _run("admin", "--control", control.url, "--key-file", str(control.data_dir / "admin.key"),
                 "--ca-hash", WRONG_PIN, "apps", "list", data_dir=tmp_path / "nothing")
    assert admin.returncode == 1 and f"not the pinned {WRONG_PIN}" in admin.stderr


def test_a_man_in_the_middle_with_another_ca_is_refused(control: Control, mitm: _Mitm, tmp_path: Path) -> None:
    # First contact: the real pin does not match the CA the middle presents.
    token = control.token()
    done = _register(mitm.url, token, tmp_path / "id")
    assert done.returncode == 1 and "presented a CA with hash" in done.stderr and "refusing it" in done.stderr
    assert mitm.requests == ["GET /v1/ca"]  # the token never went there
    assert not (tmp_path / "id").exists()

    # Later connections: verified against the pinned CA, so the middle's certificate is refused.
    registered = control.register_node(tmp_path / "node")
    context = trust.context_for(mitm.url, registered.directory, registered.record.control_ca)
    with pytest.raises(httpclient.HttpError, match="the certificate is not trusted"):
        httpclient.request_blocking(mitm.url, "GET", "/v1/node/config", ssl_context=context, timeout=10)
    assert len(mitm.requests) == 1
    answer = httpclient.request_blocking(control.url, "GET", "/health", ssl_context=context, timeout=10)
    assert answer.status == 200

    # The admin CLI on the control plane's host checks against its CA file the same way.
    env = {"FERRYMAN_DATA_DIR": str(control.data_dir)}
    admin = subprocess.run([sys.executable, "-m", "dataplane", "admin", "--control", mitm.url, "apps", "list"],
                           cwd=ROOT, env=environment(control.data_dir, **env), capture_output=True, text=True,
                           timeout=60)
    assert admin.returncode == 1 and "the certificate is not trusted" in admin.stderr
    assert len(mitm.requests) == 1

    # A CA file given with FERRYMAN_CONTROL_CA is held to a pin given too.
    ca_file = tmp_path / "mitm-ca.pem"
    ca_file.write_bytes(mitm.ca_pem)
    with pytest.raises(ControlTlsError, match="holds a CA with hash"):
        trust.first_contact(control.url, pin=control.ca_hash, ca_file=str(ca_file))


def test_host_names_are_checked(tmp_path: Path) -> None:
    with Control.running(tmp_path / "data", env={"FERRYMAN_CONTROL_HOSTS": "127.0.0.1"}) as ctl:
        port = ctl.url.rsplit(":", 1)[1]
        by_name = f"https://localhost:{port}"
        done = _register(by_name, ctl.token(), tmp_path / "id")
        assert done.returncode == 1
        assert "certificate is not valid for 'localhost'" in done.stderr, done.stderr
        assert not (tmp_path / "id").exists()
        assert _register(ctl.url, ctl.token(), tmp_path / "id").returncode == 0  # 127.0.0.1 is named


def test_the_certificate_follows_the_hosts(tmp_path: Path) -> None:
    ca = CertificateAuthority.open(str(tmp_path / "ca"))
    hosts = parse_hosts("control.corp.example, 10.0.0.7,[::1]")
    assert hosts == ["control.corp.example", "10.0.0.7", "::1"]
    assert "localhost" in parse_hosts("") and "127.0.0.1" in parse_hosts("")
    with pytest.raises(ValueError, match="FERRYMAN_CONTROL_HOSTS: 'bad host!' is neither"):
        parse_hosts("ok.example,bad host!")
    cert_path, key_path, issued = server_certificate(ca, str(tmp_path), hosts, 180)
    assert issued and oct(os.stat(key_path).st_mode & 0o777) == "0o600"
    first = pki.read_certificates(cert_path)[0]
    san = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"control.corp.example"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"10.0.0.7", "::1"}
    assert server_certificate(ca, str(tmp_path), hosts, 180)[2] is False  # kept while it fits
    assert server_certificate(ca, str(tmp_path), ["control.corp.example"], 180)[2] is True  # hosts changed
    late = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=150)
    assert server_certificate(ca, str(tmp_path), ["control.corp.example"], 180, now=late)[2] is True  # renewed


def test_only_the_pinned_ca_is_kept_from_a_bundle(control: Control, tmp_path: Path) -> None:
    """The real CA is public: a middle may serve it, with its own CA appended. The pin matches the
    first, and only that one is trusted, so the middle's certificate is refused before the token
    is sent."""
    middle = _Mitm(tmp_path / "mitm-ca", serve_first=control.ca_pem)
    try:
        assert trust.first_contact(middle.url, pin=control.ca_hash) == control.ca_pem
        done = _register(middle.url, control.token(), tmp_path / "id")
        assert done.returncode == 1 and "the certificate is not trusted" in done.stderr, done.stderr
        assert middle.requests == ["GET /v1/ca", "GET /v1/ca"]  # the registration never reached it
        assert not (tmp_path / "id").exists()
    finally:
        middle.close()


# ---------------------------------------------------------------------------- plain HTTP


def test_plain_http_only_with_the_insecure_flag(control: Control, tmp_path: Path) -> None:
    # The default control plane does not speak plain HTTP at all.
    plain = control.url.replace("https://", "http://")
    with pytest.raises(httpclient.HttpError):
        httpclient.request_blocking(plain, "GET", "/health", timeout=5)

    with Control.running(tmp_path / "data", env={"FERRYMAN_CONTROL_INSECURE_HTTP": "1"}) as ctl:
        assert ctl.url.startswith("http://")
        assert "INSECURE: FERRYMAN_CONTROL_INSECURE_HTTP=1: the control plane serves plain HTTP" in ctl.log.read_text()
        refused = _register(ctl.url, ctl.token(), tmp_path / "id")
        assert refused.returncode == 2
        assert "plain http:// to the control plane is refused" in refused.stderr
        assert "FERRYMAN_CONTROL_INSECURE_HTTP=1" in refused.stderr and not (tmp_path / "id").exists()
        login = _run("client", "login", "--control", ctl.url, "--user", "x@corp.example", "--password-stdin",
                     data_dir=tmp_path / "client", stdin="a password\n")
        assert login.returncode == 1 and "plain http:// to the control plane is refused" in login.stderr

        done = _register(ctl.url, ctl.token(), tmp_path / "id", FERRYMAN_CONTROL_INSECURE_HTTP="1")
        assert done.returncode == 0, done.stderr
        assert "INSECURE: FERRYMAN_CONTROL_INSECURE_HTTP=1: registering over plain HTTP" in done.stderr
        assert not (tmp_path / "id" / "control-ca.pem").exists()
        # A CA is never taken over plain HTTP, pin or not.
        with pytest.raises(ControlTlsError, match="never taken over plain HTTP"):
            fetch_pinned_ca(ctl.url, ctl.ca_hash)


# ---------------------------------------------------------------------------- ferryman up


@pytest.mark.timeout(150)
def test_ferryman_up_uses_https_and_prints_the_ca_hash(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "dataplane", "up", "--workdir", str(tmp_path / "fabric"),
                           "--duration", "1"], cwd=ROOT, env=environment(tmp_path), capture_output=True, text=True,
                          timeout=140)
    assert done.returncode == 0, done.stderr
    ca = (tmp_path / "fabric" / "control" / "ca" / "ca.pem").read_bytes()
    pin = ca_pin(x509.load_pem_x509_certificate(ca))
    assert f"control plane CA hash: {pin}" in done.stderr
    api = [line for line in done.stderr.splitlines() if line.startswith("control ")]
    assert api and "API https://127.0.0.1:" in api[0], done.stderr
    assert "--control https://127.0.0.1:" in done.stderr and "sha256 ok" in done.stdout
    for name in ("edge-1", "connector-1"):
        record = json.loads((tmp_path / "fabric" / "nodes" / name / "identity" / "node.json").read_text())
        assert record["control"].startswith("https://") and record["control_ca"] == "control-ca.pem"
    session = json.loads((tmp_path / "fabric" / "nodes" / "client-1" / "client" / "session.json").read_text())
    assert session["control"].startswith("https://") and session["control_ca"] == "control-ca.pem"
