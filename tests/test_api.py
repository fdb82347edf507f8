"""Tests of the control plane's REST API, served for real: ``python -m dataplane control`` in a
subprocess (uvicorn on uvloop, SQLite in ``tmp_path``), spoken to over HTTP with urllib.

Covered: admin-key authentication (401s with a JSON body), the bootstrap key file, audit
records (actor, before/after), overlap and validation errors, node registration end to end
(token → CSR → certificate that chains to the returned CA; used / expired / unknown tokens
refused with 403 and distinct messages), revocation, admin keys, and the OpenAPI document.
PostgreSQL is covered by the store's own tests; this module runs the SQLite path only.
"""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from dataplane.basics import pki
from dataplane.basics.pki import new_key_and_csr, write_node_files

from controlplane import PUBLIC_EDGE, Control, start
from controlplane import stop as _stop

pytestmark = pytest.mark.timeout(60)


def _start(data_dir: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    return start(data_dir, log, edges=[PUBLIC_EDGE])


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Control]:
    with Control.running(tmp_path_factory.mktemp("control"), edges=[PUBLIC_EDGE]) as control:
        yield control


def _token(control: Control, role: str = "connector", **extra: Any) -> str:
    token = control.token(role, **extra)
    assert token.startswith("fmr_")
    return token


def _register(control: Control, token: str, name: str, **extra: Any) -> tuple[int, Any, bytes]:
    key_pem, csr_pem = new_key_and_csr(name)
    status, body, _ = control.call("POST", "/v1/register",
                                   {"token": token, "csr_pem": csr_pem.decode(), "name": name, **extra}, key=None)
    return status, body, key_pem


# ---------------------------------------------------------------------------- authentication


def test_bootstrap_key_file_is_private_and_never_logged(control: Control) -> None:
    key_file = control.data_dir / "admin.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert control.key.startswith("fmk_")
    log = control.log.read_text()
    assert str(key_file) in log
    assert control.key not in log
    status, body, _ = control.call("GET", "/v1/admin-keys")
    assert status == 200
    assert [k["name"] for k in body] == ["bootstrap"]


@pytest.mark.parametrize("authorization", [None, "Bearer fmk_not-a-key", "Basic Ym9vdHN0cmFwOng=", "Bearer "])
def test_admin_routes_refuse_missing_or_bad_keys(control: Control, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    status, body, got = control.call("GET", "/v1/applications", key=None, headers=headers)
    assert status == 401
    assert body["code"] == "unauthorized"
    assert "admin key" in body["error"] or "Authorization" in body["error"]
    assert got.get("WWW-Authenticate", "").startswith("Bearer")
    # A change is refused too, and leaves nothing behind.
    status, _, _ = control.call("POST", "/v1/dns-suffixes", {"suffix": "unauth.example"}, key=None,
                                headers=headers)
    assert status == 401
    status, suffixes, _ = control.call("GET", "/v1/dns-suffixes")
    assert "unauth.example" not in [s["suffix"] for s in suffixes]


def test_created_admin_key_works_until_revoked(control: Control) -> None:
    status, created, _ = control.call("POST", "/v1/admin-keys", {"name": "ops-alice"})
    assert status == 201 and created["key"].startswith("fmk_") and created["created_by"] == "bootstrap"
    status, _, _ = control.call("POST", "/v1/dns-suffixes", {"suffix": "alice.example"}, key=created["key"])
    assert status == 201
    status, audit, _ = control.call("GET", "/v1/audit?object_type=dns_suffix&actor=ops-alice")
    assert [(r["action"], r["after"]["suffix"]) for r in audit] == [("dns_suffix.create", "alice.example")]

    status, revoked, _ = control.call("POST", "/v1/admin-keys/ops-alice/revoke")
    assert status == 200 and revoked["revoked_at"] is not None
    status, body, _ = control.call("GET", "/v1/applications", key=created["key"])
    assert (status, body["code"]) == (401, "unauthorized")
    status, keys, _ = control.call("GET", "/v1/admin-keys")
    assert {k["name"]: k["revoked_at"] is not None for k in keys} == {"bootstrap": False, "ops-alice": True}
    assert all("key" not in k and "key_hash" not in k for k in keys)
    # The last live key cannot be revoked: nobody could get in again.
    status, body, _ = control.call("POST", "/v1/admin-keys/bootstrap/revoke")
    assert status == 409 and "last live admin key" in body["error"]


# ---------------------------------------------------------------------------- applications, audit, errors


def test_create_application_with_segments_is_audited(control: Control) -> None:
    _, before_version, _ = control.call("GET", "/v1/config-version")
    status, app, _ = control.call("POST", "/v1/applications", {
        "name": "intranet",
        "segments": [{"destination": "*.Corp.Example", "ports": "443,80"},
                     {"destination": "10.20.0.0/16", "ports": [22, "3389"], "protocol": "tcp"}],
    })
    assert status == 201, app
    assert app["name"] == "intranet" and app["kind"] == "per_app" and app["connector_group"] == "default"
    assert [(s["destination"], s["kind"], s["ports"], s["protocol"]) for s in app["segments"]] == [
        ("*.corp.example", "wildcard", "80,443", "tcp"), ("10.20.0.0/16", "cidr", "22,3389", "tcp")]

    status, audit, _ = control.call("GET", "/v1/audit?actor=bootstrap&object_type=application")
    assert status == 200
    (record,) = [r for r in audit if r["object_id"] == str(app["id"])]
    assert record["actor"] == "bootstrap" and record["action"] == "application.create"
    assert record["before"] is None
    assert record["after"]["name"] == "intranet"
    assert [s["destination"] for s in record["after"]["segments"]] == ["*.corp.example", "10.20.0.0/16"]

    status, updated, _ = control.call("PATCH", "/v1/applications/intranet",
                                      {"segments": [{"destination": "10.20.0.0/16", "ports": "22"}]})
    assert status == 200 and [s["ports"] for s in updated["segments"]] == ["22"]
    _, audit, _ = control.call("GET", "/v1/audit?object_type=application&limit=1")
    assert audit[0]["action"] == "application.update"
    assert len(audit[0]["before"]["segments"]) == 2 and len(audit[0]["after"]["segments"]) == 1
    _, after_version, _ = control.call("GET", "/v1/config-version")
    assert after_version["version"] == before_version["version"] + 2

    status, segment, _ = control.call("POST", "/v1/applications/intranet/segments",
                                      {"destination": "db.corp.example", "ports": 5432})
    assert status == 201 and segment["kind"] == "hostname"
    status, _, _ = control.call("DELETE", f"/v1/applications/intranet/segments/{segment['id']}")
    assert status == 204
    status, got, _ = control.call("GET", "/v1/applications/intranet")
    assert status == 200 and [s["destination"] for s in got["segments"]] == ["10.20.0.0/16"]

    future = "2999-01-01T00:00:00Z"
    status, audit, _ = control.call("GET", f"/v1/audit?since={future}")
    assert (status, audit) == (200, [])


def test_overlapping_segment_is_refused_with_the_precise_reason(control: Control) -> None:
    status, _, _ = control.call("POST", "/v1/applications",
                                {"name": "ov-a", "segments": [{"destination": "10.60.0.0/16", "ports": "20-30"}]})
    assert status == 201
    status, body, _ = control.call("POST", "/v1/applications",
                                   {"name": "ov-b", "segments": [{"destination": "10.60.1.0/24", "ports": "22"}]})
    assert status == 409
    assert body == {"error": "segment 10.60.1.0/24:22/tcp of app 'ov-b' overlaps segment 10.60.0.0/16:20-30/tcp "
                             "of app 'ov-a'", "code": "conflict"}
    status, body, _ = control.call("GET", "/v1/applications/ov-b")
    assert (status, body["code"]) == (404, "not_found")
    assert body["error"] == "application 'ov-b' does not exist"
    # Adding the overlapping segment to an existing application is refused the same way.
    status, _, _ = control.call("POST", "/v1/applications", {"name": "ov-c"})
    assert status == 201
    status, body, _ = control.call("POST", "/v1/applications/ov-c/segments",
                                   {"destination": "10.60.2.7", "ports": "25"})
    assert status == 409 and "overlaps segment 10.60.0.0/16:20-30/tcp of app 'ov-a'" in body["error"]


def test_invalid_input_gets_field_level_errors_never_a_traceback(control: Control) -> None:
    status, body, _ = control.call("POST", "/v1/applications",
                                   {"name": "bad-port", "segments": [{"destination": "10.9.0.1", "ports": "70000"}]})
    assert status == 422 and body["code"] == "invalid"
    assert "port 70000 out of range 1-65535" in body["error"] and "bad-port" in body["error"]

    status, body, _ = control.call("POST", "/v1/applications", {"name": 5})
    assert status == 400 and body["code"] == "validation"
    assert body["detail"][0]["key"] == "name" and "Expected `str`" in body["detail"][0]["message"]

    status, body, _ = control.call("POST", "/v1/applications", {"name": "x", "segmentz": []})
    assert status == 400 and "segmentz" in body["error"]

    status, body, _ = control.call("POST", "/v1/applications", raw=b"{not json")
    assert status == 400 and body["code"] == "validation"

    status, body, _ = control.call("GET", "/v1/audit?since=2024-01-01T00:00:00")
    assert status == 400 and body["detail"][0]["key"] == "since"

    status, body, _ = control.call("GET", "/v1/nothing-here")
    assert status == 404 and body["code"] == "not_found"
    assert "Traceback" not in json.dumps(body)


# ---------------------------------------------------------------------------- registration


def test_connector_registration_end_to_end(control: Control, tmp_path: Path) -> None:
    status, group, _ = control.call("POST", "/v1/connector-groups", {"name": "site-a", "region": "eu"})
    assert status == 201
    token = _token(control, "connector", group="site-a", ttl_seconds=600)

    status, body, key_pem = _register(control, token, "site-a-1", version="0.1.0", addresses=["10.1.0.5"])
    assert status == 201, body
    assert body["role"] == "connector" and body["name"] == "site-a-1" and body["group"] == "site-a"
    assert body["edges"][0] == PUBLIC_EDGE

    cert = x509.load_pem_x509_certificate(body["certificate_pem"].encode())
    (ca_cert,) = x509.load_pem_x509_certificates(body["ca_pem"].encode())
    cert.verify_directly_issued_by(ca_cert)  # raises unless it chains to the returned CA
    assert ca_cert.public_bytes(serialization.Encoding.PEM) == (control.data_dir / "ca" / "ca.pem").read_bytes()
    files = write_node_files(str(tmp_path / "node"), "site-a-1", key_pem, body["certificate_pem"].encode(),
                           body["ca_pem"].encode())  # checks key ↔ certificate ↔ CA
    identity = pki.read_node_certificate(files.cert)
    assert (identity.role, identity.name) == ("connector", "site-a-1")
    assert format(identity.serial, "x") == body["serial"]

    status, connector, _ = control.call("GET", f"/v1/connectors/{body['node_id']}")
    assert status == 200
    assert connector["name"] == "site-a-1" and connector["group"] == "site-a"
    assert connector["cert_serial"] == body["serial"] and connector["cert_not_after"] == body["not_after"]
    assert connector["status"] == "inactive" and connector["last_seen"] is None  # no heartbeat yet
    assert connector["version"] == "0.1.0" and connector["internal_addr"] == "10.1.0.5"
    assert not connector["revoked"]

    status, body, _ = _register(control, token, "site-a-2")
    assert status == 403 and body["code"] == "token_used"
    assert "already used" in body["error"] and "connector:site-a-1" in body["error"]

    _, tokens, _ = control.call("GET", "/v1/registration-tokens")
    assert [t["state"] for t in tokens if t["used_by"] == "connector:site-a-1"] == ["used"]
    _, audit, _ = control.call("GET", "/v1/audit?object_type=connector")
    assert any(r["after"]["name"] == "site-a-1" and r["actor"].startswith("registration-token:") for r in audit)


def test_expired_and_unknown_tokens_are_refused_distinctly(control: Control) -> None:
    token = _token(control, ttl_seconds=1)
    time.sleep(1.2)
    status, body, _ = _register(control, token, "late-1")
    assert status == 403 and body["code"] == "token_expired" and "expired at" in body["error"]

    status, body, _ = _register(control, "fmr_" + "x" * 43, "stranger-1")
    assert status == 403 and body["code"] == "token_unknown" and "not known" in body["error"]

    status, connectors, _ = control.call("GET", "/v1/connectors")
    assert not {"late-1", "stranger-1"} & {c["name"] for c in connectors}


def test_refused_registration_does_not_use_up_the_token(control: Control) -> None:
    token = _token(control)
    status, body, _ = control.call("POST", "/v1/register", {"token": token, "csr_pem": "not a csr", "name": "n-1"},
                                   key=None)
    assert status == 422 and body == {"error": "CSR is not a PEM certificate signing request", "code": "invalid_csr"}
    _, csr_pem = new_key_and_csr("n-1")
    status, body, _ = control.call("POST", "/v1/register", {"token": token, "csr_pem": csr_pem.decode(),
                                                            "name": "bad name!"}, key=None)
    assert status == 422 and "node name 'bad name!' is not usable" in body["error"]
    status, body, _ = _register(control, token, "n-1")
    assert status == 201, body


def test_edge_registration_puts_its_hosts_in_the_certificate(control: Control) -> None:
    token = _token(control, "edge")
    status, body, _ = _register(control, token, "edge-x")
    assert status == 422 and "at least one address" in body["error"]
    status, body, _ = _register(control, token, "edge-x", addresses=["edge-x.example.test:8443", "192.0.2.10:8443"])
    assert status == 201, body
    cert = x509.load_pem_x509_certificate(body["certificate_pem"].encode())
    identity = pki.certificate_identity(cert, b"", "edge certificate")
    assert (identity.role, identity.name) == ("edge", "edge-x")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["edge-x.example.test"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["192.0.2.10"]
    assert body["edges"][:1] == [PUBLIC_EDGE] and "edge-x.example.test:8443" in body["edges"]

    _, edges, _ = control.call("GET", "/v1/edges")
    (edge,) = [e for e in edges if e["id"] == body["node_id"]]
    assert edge["address"] == "edge-x.example.test:8443" and edge["cert_serial"] == body["serial"]

    # A second edge of the same name is refused while the first one's certificate is valid.
    status, body, _ = _register(control, _token(control, "edge"), "edge-x", addresses=["edge-x.example.test:8443"])
    assert status == 409 and "already registered" in body["error"]


def test_revoking_a_connector_lists_its_certificate(control: Control) -> None:
    status, registered, _ = _register(control, _token(control), "doomed-1")
    assert status == 201
    status, revoked, _ = control.call("POST", "/v1/revocations",
                                      {"node_type": "connector", "node_id": registered["node_id"],
                                       "reason": "laptop stolen"})
    assert status == 201, revoked
    (revocation,) = revoked
    assert revocation["serial"] == registered["serial"] and revocation["node_name"] == "doomed-1"

    status, revocations, _ = control.call("GET", "/v1/revocations")
    assert status == 200
    (row,) = [r for r in revocations if r["serial"] == registered["serial"]]
    assert (row["node_type"], row["node_id"], row["reason"]) == ("connector", registered["node_id"], "laptop stolen")
    _, connector, _ = control.call("GET", f"/v1/connectors/{registered['node_id']}")
    assert connector["revoked"] is True

    status, body, _ = control.call("POST", "/v1/revocations",
                                   {"node_type": "connector", "node_id": registered["node_id"]})
    assert status == 409 and "already revoked" in body["error"]
    status, body, _ = control.call("POST", "/v1/revocations", {"node_type": "edge", "node_id": "no-such-edge"})
    assert status == 404 and body["error"] == "edge 'no-such-edge' does not exist"
    _, audit, _ = control.call("GET", "/v1/audit?object_type=certificate&actor=bootstrap")
    assert any(r["object_id"] == registered["serial"] for r in audit)

    # Once revoked, the name is free again for a new registration.
    status, again, _ = _register(control, _token(control), "doomed-1")
    assert status == 201 and again["node_id"] != registered["node_id"]


# ---------------------------------------------------------------------------- OpenAPI, restart


def test_openapi_document_lists_the_routes(control: Control) -> None:
    status, doc, _ = control.call("GET", "/schema/openapi.json", key=None)
    assert status == 200
    assert doc["openapi"].startswith("3.")
    paths = doc["paths"]
    for path in ("/v1/applications", "/v1/applications/{name}", "/v1/register", "/v1/registration-tokens",
                 "/v1/connectors", "/v1/revocations", "/v1/audit", "/v1/admin-keys", "/v1/config-version"):
        assert path in paths, path
    assert set(paths["/v1/applications"]) >= {"get", "post"}
    assert doc["components"]["securitySchemes"]["adminKey"]["scheme"] == "bearer"
    assert paths["/v1/register"]["post"].get("security") in ([], None)
    assert paths["/v1/applications"]["get"]["security"] == [{"adminKey": []}]


def test_restart_keeps_state_and_makes_no_second_bootstrap_key(tmp_path: Path) -> None:
    log = tmp_path / "control.log"
    proc, url = _start(tmp_path / "data", log)
    try:
        key = (tmp_path / "data" / "admin.key").read_text().strip()
        first = Control(url, tmp_path / "data", key, proc, log)
        assert first.call("POST", "/v1/dns-suffixes", {"suffix": "corp.example"})[0] == 201
    finally:
        _stop(proc)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal (exit status -SIGTERM).
    assert proc.returncode in (0, -signal.SIGTERM), log.read_text()
    assert "Application shutdown complete" in log.read_text()
    proc, url = _start(tmp_path / "data", log)
    try:
        second = Control(url, tmp_path / "data", key, proc, log)
        status, suffixes, _ = second.call("GET", "/v1/dns-suffixes")
        assert status == 200 and [s["suffix"] for s in suffixes] == ["corp.example"]
        _, keys, _ = second.call("GET", "/v1/admin-keys")
        assert [k["name"] for k in keys] == ["bootstrap"]
        assert log.read_text().count("created admin key") == 1
    finally:
        _stop(proc)
