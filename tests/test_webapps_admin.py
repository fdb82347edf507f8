"""Web apps in the control plane: ``/v1/webapps`` (fields checked, one web app per external
host, assignments, audit, configuration version, snapshots), ``ferryman admin webapps`` and
``ferryman admin apply`` with ``[[webapps]]``, against one real control plane process."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from control.snapshot import connector_view
from dataplane.contract.snapshot import ConfigSnapshot, SnapApp, SnapConnector, SnapWebApp
from tests.controlplane import PUBLIC_EDGE, ROOT, Control, environment

pytestmark = pytest.mark.timeout(90)

WIKI = {"name": "wiki", "external_url": "https://wiki.corp.example", "internal_url": "http://10.1.2.3:8080/w"}


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Control]:
    with Control.running(tmp_path_factory.mktemp("webapps"), edges=[PUBLIC_EDGE]) as running:
        yield running


def admin(control: Control, *args: str) -> subprocess.CompletedProcess[str]:
    env = environment(control.data_dir)
    env["FERRYMAN_CONTROL_LISTEN"] = urllib.parse.urlsplit(control.url).netloc
    return subprocess.run([sys.executable, "-m", "dataplane", "admin", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_create_read_update_delete_with_audit_and_version(control: Control) -> None:
    before = control.version()
    status, body, _ = control.admin("POST", "/v1/webapps", WIKI)
    assert status == 201, body
    assert body["preauth"] == "ferryman" and body["conditional_access"] is True
    assert (body["translate_headers"], body["translate_body"], body["websocket"]) == (True, False, True)
    assert control.version() == before + 2  # the application row and the web app, one audit record each
    status, body, _ = control.admin("PATCH", "/v1/webapps/wiki", {"preauth": "passthrough",
                                                                  "header_sso": {"upn": "X-Remote-User"}})
    assert status == 200, body
    assert body["conditional_access"] is False and body["header_sso"] == {"upn": "X-Remote-User"}
    status, records, _ = control.admin("GET", "/v1/audit?object_type=web_app")
    assert [r["action"] for r in records][:2] == ["web_app.update", "web_app.create"]
    assert records[0]["before"]["preauth"] == "ferryman" and records[0]["after"]["preauth"] == "passthrough"
    status, body, _ = control.admin("PATCH", "/v1/webapps/wiki", {"preauth": "passthrough"})
    assert status == 200 and control.admin("GET", "/v1/audit?object_type=web_app")[1][0]["id"] == records[0]["id"]
    # A web app is an application without segments: segments are refused, assignments work.
    status, body, _ = control.admin("POST", "/v1/applications/wiki/segments", {"destination": "10.0.0.1",
                                                                              "ports": "80"})
    assert status == 422 and "is a web app" in body["error"]
    status, body, _ = control.admin("DELETE", "/v1/webapps/wiki")
    assert status == 204
    assert control.admin("GET", "/v1/webapps/wiki")[0] == 404
    assert control.admin("GET", "/v1/applications/wiki")[0] == 404


@pytest.mark.parametrize(("change", "status", "words"), [
    ({"external_url": "http://wiki.corp.example"}, 422, "external_url must start with https://"),
    ({"internal_url": "ftp://10.1.2.3/"}, 422, "internal_url must start with http:// or https://"),
    ({"internal_url": "http://10.1.2.3:8080/?q=1"}, 422, "must not have a query"),
    ({"external_url": "https://bad_host!.example"}, 422, "is not a valid host name"),
    ({"header_sso": {"upn": "Host"}}, 422, "a header the front door sets"),
    ({"header_sso": {"upn": "X-User\n"}}, 422, "which is not a header name"),  # "$" alone lets a final newline by
    ({"external_url": "https://wiki.corp.example\n"}, 422, "must not contain spaces or control characters"),
    ({"backend_ca": "not a certificate"}, 422, "backend_ca holds no"),
    ({"connector_group": "nowhere"}, 404, "nowhere"),
    ({"preauth": "maybe"}, 400, "preauth"),
])
def test_bad_fields_are_refused_precisely(control: Control, change: dict, status: int, words: str) -> None:
    got, body, _ = control.admin("POST", "/v1/webapps", {**WIKI, "name": "bad", **change})
    assert got == status, body
    assert words in json.dumps(body), body
    assert control.admin("GET", "/v1/webapps/bad")[0] == 404


def test_one_web_app_per_external_host_and_assignments(control: Control) -> None:
    assert control.admin("POST", "/v1/webapps", {**WIKI, "name": "one"})[0] == 201
    try:
        status, body, _ = control.admin("POST", "/v1/webapps", {**WIKI, "name": "two",
                                                               "external_url": "https://WIKI.corp.example:443/x"})
        assert status == 409 and "external host wiki.corp.example is already used by web app 'one'" in body["error"]
        assert control.admin("POST", "/v1/users", {"upn": "amy@corp.example", "password": "a-long-password-1"})[0] \
            == 201
        status, body, _ = control.admin("POST", "/v1/webapps/one/assignments", {"user": "amy@corp.example"})
        assert status == 201 and body["user"]["upn"] == "amy@corp.example"
        status, body, _ = control.admin("GET", "/v1/webapps/one/assignments")
        assert [a["user"]["upn"] for a in body] == ["amy@corp.example"]
        assert control.admin("POST", "/v1/applications", {"name": "plain", "segments": [
            {"destination": "10.9.9.9", "ports": "22"}]})[0] == 201
        status, body, _ = control.admin("GET", "/v1/webapps/plain/assignments")
        assert status == 404 and "web app 'plain' does not exist" in body["error"]
    finally:
        control.admin("DELETE", "/v1/webapps/one")
        control.admin("DELETE", "/v1/applications/plain")


def test_connector_view_gets_the_backend_only() -> None:
    web = SnapWebApp(name="wiki", external_url="https://wiki.corp.example", internal_url="https://127.0.0.1:8443/w",
                     connector_group="lab", header_sso={"upn": "X-User"})
    other = SnapWebApp(name="hr", external_url="https://hr.corp.example", internal_url="http://10.0.0.5",
                       connector_group="default")
    snapshot = ConfigSnapshot(version=3, issued_at="x", web_apps=[web, other],
                              applications=[SnapApp(name="wiki", kind="per_app", connector_group="lab",
                                                    users=["u1"])],
                              connectors=[SnapConnector(id="c1", name="c1", group="lab")])
    view = connector_view(snapshot, "c1")
    assert view.web_apps == []
    (app,) = [a for a in view.applications if a.segments]
    assert (app.name, [(s.destination, s.ports, s.protocol) for s in app.segments], app.users) == \
        ("wiki", [("127.0.0.1", "8443", "tcp")], [])


def test_cli_and_apply(control: Control, tmp_path: Path) -> None:
    created = admin(control, "webapps", "create", "cli", "--external-url", "https://cli.corp.example",
                    "--internal-url", "http://10.3.3.3:80", "--preauth", "passthrough", "--translate-body", "on",
                    "--header-sso", "upn=X-Remote-User")
    assert created.returncode == 0, created.stderr
    assert "passthrough: no sign-in" in created.stdout and "translate body" in created.stdout
    listed = admin(control, "webapps", "list")
    assert "https://cli.corp.example" in listed.stdout and "(no conditional access)" in listed.stdout
    bad = admin(control, "webapps", "create", "x", "--external-url", "https://cli.corp.example",
                "--internal-url", "http://10.3.3.3")
    assert bad.returncode == 1 and "already used by web app 'cli'" in bad.stderr

    spec = tmp_path / "apps.toml"
    spec.write_text('[[apps]]\nname = "ssh"\nsegments = [{destination = "10.7.0.0/16", ports = "22"}]\n\n'
                    '[[webapps]]\nname = "cli"\nexternal_url = "https://cli.corp.example"\n'
                    'internal_url = "http://10.3.3.3:80"\npreauth = "ferryman"\n\n'
                    '[[webapps]]\nname = "docs"\nexternal_url = "https://docs.corp.example"\n'
                    'internal_url = "https://10.4.4.4"\nverify_backend = false\n')
    applied = admin(control, "apply", str(spec), "--prune")
    assert applied.returncode == 0, applied.stderr
    assert "update     cli" in applied.stdout and "create     docs" in applied.stdout
    assert control.admin("GET", "/v1/webapps/cli")[1]["preauth"] == "ferryman"
    assert control.admin("GET", "/v1/webapps/docs")[1]["verify_backend"] is False
    again = admin(control, "apply", str(spec), "--prune")
    assert "nothing to do" in again.stdout, again.stdout
    spec.write_text('[[webapps]]\nname = "docs"\nexternal_url = "http://docs.corp.example"\n'
                    'internal_url = "https://10.4.4.4"\n')
    refused = admin(control, "apply", str(spec))
    assert refused.returncode == 1 and "web app 'docs': external_url must start with https://" in refused.stderr


def make_cert(hosts: list[str], *, days: float = 30, start_days: float = -1) -> tuple[str, str, str]:
    """(chain PEM, key PEM, CA PEM): a leaf for ``hosts`` signed by a fresh CA."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.now(UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test custom-domain CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=2))
          .not_valid_after(now + timedelta(days=60)).add_extension(x509.BasicConstraints(ca=True, path_length=0),
                                                                   critical=True).sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now + timedelta(days=start_days)).not_valid_after(now + timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return (leaf.public_bytes(pem).decode() + ca.public_bytes(pem).decode(),
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode(),
            ca.public_bytes(pem).decode())


def test_custom_domain_certificate_is_checked_and_its_key_never_shown(control: Control) -> None:
    chain, key, _ = make_cert(["*.corp.example"])
    app = {**WIKI, "name": "custom", "external_url": "https://custom.corp.example"}
    status, body, _ = control.admin("POST", "/v1/webapps", {**app, "certificate": chain, "certificate_key": key})
    assert status == 201, body
    try:
        assert len(body["certificate_sha256"]) == 64 and body["certificate_not_after"]
        assert "PRIVATE" not in json.dumps(body)
        status, records, _ = control.admin("GET", "/v1/audit?object_type=web_app")
        assert "PRIVATE" not in json.dumps(records)
        refused = control.admin("PATCH", "/v1/webapps/custom", {"external_url": "https://custom.other.example"})
        assert refused[0] == 422 and "does not cover the external host custom.other.example" in refused[1]["error"]
        cleared = control.admin("PATCH", "/v1/webapps/custom", {"certificate": "", "certificate_key": ""})
        assert cleared[0] == 200 and cleared[1]["certificate_sha256"] == ""
    finally:
        control.admin("DELETE", "/v1/webapps/custom")
    other_chain, other_key, _ = make_cert(["*.corp.example"])
    expired_chain, expired_key, _ = make_cert(["custom.corp.example"], days=-1, start_days=-10)
    wrong_chain, wrong_key, _ = make_cert(["elsewhere.example"])
    for chain_pem, key_pem, words in ((chain, other_key, "is not the key of the certificate"),
                                      (expired_chain, expired_key, "the certificate expired"),
                                      (wrong_chain, wrong_key, "does not cover the external host custom.corp.example"),
                                      (chain, "", "needs both the PEM chain")):
        status, body, _ = control.admin("POST", "/v1/webapps", {**app, "certificate": chain_pem,
                                                               "certificate_key": key_pem})
        assert status == 422 and words in body["error"], body
    assert other_chain
