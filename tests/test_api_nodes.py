"""Tests of the control plane's node routes (``control/api/nodes.py``, guarded by
``guards.require_node``), served for real:
``python -m dataplane control`` in a subprocess (one per module, SQLite in a temporary data
directory), spoken to over HTTP with urllib, nodes registered with ``dataplane.controllink.registration``
and their requests signed by ``dataplane.controllink.signer.NodeSigner``.

Covered:

- ``GET /v1/node/config``: the snapshot at once for ``after=-1`` (public ``--edge`` first,
  ``X-Ferryman-Config-Version``), a long-poll answered within 2 s of an admin change, a
  long-poll with nothing new answered 204 after its wait, ``wait`` out of range (400);
- ``require_node``: every refusal with its own message: no or non-Bearer header, garbage
  token, certificate of another CA, signature by a key other than the certificate's,
  token bound to another path or method, replayed token, clock skew, expired certificate
  (401), a CA-signed certificate never issued to a node and a revoked node (403);
- ``POST /v1/node/heartbeat``: what the admin API then shows; invalid bodies (400);
- ``POST /v1/node/renew``: a new certificate for the same identity (an edge keeps its
  subjectAltNames), old and new certificate both accepted, revocation of both, a CSR
  that is not PEM (422).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from joserfc import jwt
from joserfc.jwk import ECKey

from dataplane.basics import pki, statefile
from dataplane.basics.pki import new_key_and_csr
from dataplane.contract.nodeauth import body_hash
from dataplane.controllink.signer import NodeSigner
from dataplane.controllink.registration import Registration

import controlplane
from controlplane import PUBLIC_EDGE, Control, Reply

pytestmark = pytest.mark.timeout(60)

CONFIG = "/v1/node/config"
HEARTBEAT = "/v1/node/heartbeat"
RENEW = "/v1/node/renew"


# ---------------------------------------------------------------------------- control plane process


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Control]:
    with Control.running(tmp_path_factory.mktemp("control"), edges=[PUBLIC_EDGE]) as control:
        yield control


# ---------------------------------------------------------------------------- nodes and certificates


def _register(control: Control, directory: Path, role: str = "connector", name: str | None = None,
              addresses: list[str] | None = None) -> Registration:
    return control.register_node(directory, role, name, addresses)


@pytest.fixture
def connector(control: Control, tmp_path: Path) -> tuple[Registration, NodeSigner]:
    identity = _register(control, tmp_path / "connector")
    return identity, NodeSigner(identity.cert, identity.key)


@pytest.fixture
def edge(control: Control, tmp_path: Path) -> tuple[Registration, NodeSigner]:
    identity = _register(control, tmp_path / "edge", "edge", addresses=[f"127.0.0.1:{controlplane.free_port()}"])
    return identity, NodeSigner(identity.cert, identity.key)


def _craft(directory: Path, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, *, name: str,
           role: str = "connector", not_before: datetime.datetime | None = None,
           not_after: datetime.datetime | None = None) -> tuple[str, str, x509.Certificate]:
    """A node certificate shaped like ``control.ca``'s, signed by ``ca_key``; (cert path, key path, cert)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                                 x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after or now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = str(directory / f"{name}.pem"), str(directory / f"{name}.key")
    statefile.write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    statefile.write_file(key_path, pki.key_pem(key), 0o600)
    return cert_path, key_path, cert


def _save_renewed(directory: Path, name: str, key_pem: bytes, cert_pem: str) -> NodeSigner:
    directory.mkdir(parents=True, exist_ok=True)
    statefile.write_file(str(directory / f"{name}.pem"), cert_pem.encode(), 0o644)
    statefile.write_file(str(directory / f"{name}.key"), key_pem, 0o600)
    return NodeSigner(str(directory / f"{name}.pem"), str(directory / f"{name}.key"))


def _refused(reply: Reply, status: int, message: str) -> None:
    got, body, headers = reply
    assert got == status, body
    assert body["code"] == ("unauthorized" if status == 401 else "forbidden")
    assert body["error"].startswith("node credential refused: ")
    assert message in body["error"], body["error"]
    if status == 401:
        assert headers["WWW-Authenticate"] == 'Bearer realm="ferryman-node"'


def _config_version(control: Control) -> int:
    status, body, _ = control.admin("GET", "/v1/config-version")
    assert status == 200
    return body["version"]


def _published_version(control: Control, signer: NodeSigner) -> int:
    """The store's configuration version, once the control plane serves it to nodes.

    A change (registering a node is one) reaches the served snapshot within half a second.
    """
    version = _config_version(control)
    status, snapshot, _ = control.node(signer, "GET", f"{CONFIG}?after={version - 1}&wait=5")
    assert status == 200 and snapshot["version"] == version, snapshot
    return version


# ---------------------------------------------------------------------------- configuration


def test_config_without_a_version_is_answered_at_once(control: Control, connector) -> None:
    _, signer = connector
    version = _published_version(control, signer)
    started = time.monotonic()
    status, snapshot, headers = control.node(signer, "GET", f"{CONFIG}?after=-1&wait=30")
    assert status == 200, snapshot
    assert time.monotonic() - started < 2
    assert snapshot["version"] == version
    assert headers["X-Ferryman-Config-Version"] == str(snapshot["version"])
    assert snapshot["edges"][0] == PUBLIC_EDGE
    assert {"issued_at", "applications", "groups", "dns_suffixes", "revoked_serials"} <= set(snapshot)
    assert "default" in [g["name"] for g in snapshot["groups"]]
    # Without ``after`` the node holds nothing either.
    status, again, _ = control.node(signer, "GET", CONFIG)
    assert (status, again["version"]) == (200, snapshot["version"])


def test_config_long_poll_is_answered_within_two_seconds_of_a_change(control: Control, edge) -> None:
    _, signer = edge
    version = _published_version(control, signer)
    answer: dict[str, Any] = {}

    def poll() -> None:
        answer["reply"] = control.node(signer, "GET", f"{CONFIG}?after={version}&wait=20", timeout=30)
        answer["at"] = time.monotonic()

    waiter = threading.Thread(target=poll, daemon=True)
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive(), answer  # nothing newer yet: the request waits
    status, _, _ = control.admin("POST", "/v1/applications",
                                 {"name": "long-poll-app", "segments": [{"destination": "10.77.0.0/16", "ports": 443}]})
    changed = time.monotonic()
    assert status == 201
    waiter.join(10)
    status, snapshot, headers = answer["reply"]
    assert status == 200, snapshot
    assert answer["at"] - changed < 2.0, f"answered {answer['at'] - changed:.2f}s after the change"
    assert snapshot["version"] > version and headers["X-Ferryman-Config-Version"] == str(snapshot["version"])
    (app,) = [a for a in snapshot["applications"] if a["name"] == "long-poll-app"]
    assert app["segments"] == [{"destination": "10.77.0.0/16", "ports": "443", "protocol": "tcp"}]


def test_a_long_poll_waiting_when_its_node_is_revoked_gets_403_not_the_snapshot(control: Control, edge) -> None:
    """The revocation is itself a new configuration version, and it wakes the node's waiting
    long-poll: that poll must not hand the revoked edge the snapshot (users, policies, keys)."""
    identity, signer = edge
    version = _published_version(control, signer)
    answer: dict[str, Any] = {}

    def poll() -> None:
        answer["reply"] = control.node(signer, "GET", f"{CONFIG}?after={version}&wait=20", timeout=30)

    waiter = threading.Thread(target=poll, daemon=True)
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive(), answer  # nothing newer yet: the request waits
    status, _, _ = control.admin("POST", "/v1/revocations", {"node_type": "edge", "node_id": identity.record.node_id,
                                                            "reason": "test"})
    assert status == 201
    waiter.join(10)
    assert not waiter.is_alive()
    _refused(answer["reply"], 403, f"certificate {identity.record.serial} of edge {identity.record.name!r} is revoked")


def test_a_connector_is_sent_only_what_it_needs_and_an_edge_everything(control: Control, connector, edge) -> None:
    """Least knowledge: users, devices, policies, locations, sessions, assignments and token keys
    go to edges only; a connector learns its own record and group, that group's applications'
    segments, the edges and the revocations."""
    registration, connector_signer = connector
    _, edge_signer = edge
    upn = f"least-{secrets.token_hex(3)}@corp.example"
    assert control.admin("POST", "/v1/users", {"upn": upn, "password": "correct horse battery"})[0] == 201
    assert control.admin("POST", "/v1/named-locations", {"name": f"hq-{secrets.token_hex(3)}",
                                                         "cidrs": ["198.51.100.0/24"]})[0] == 201
    assert control.admin("POST", "/v1/policies", {"name": f"mfa-{secrets.token_hex(3)}", "state": "on",
                                                  "grant": "require_mfa"})[0] == 201
    status, signed, _ = control.request("POST", "/v1/auth/sign-in", {"upn": upn, "password": "correct horse battery"})
    assert status == 200, signed
    assert control.admin("POST", f"/v1/sessions/{signed['session_id']}/revoke", {})[0] == 200
    app_name = f"least-{secrets.token_hex(3)}"
    status, _, _ = control.admin("POST", "/v1/applications", {"name": app_name, "segments": [
        {"destination": "10.78.0.0/16", "ports": 22}]})
    assert status == 201
    assert control.admin("POST", f"/v1/applications/{app_name}/assignments", {"user": upn})[0] == 201
    version = _config_version(control)
    deadline = time.monotonic() + 5
    while True:  # the served snapshot follows the store within half a second
        _, full, _ = control.node(edge_signer, "GET", f"{CONFIG}?after=-1")
        if full["version"] == version or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    _, narrow, _ = control.node(connector_signer, "GET", f"{CONFIG}?after=-1")
    assert full["version"] == narrow["version"] == version
    # The edge: everything it decides flows and files connectors with.
    for field in ("users", "locations", "policies", "revoked_sessions", "token_keys", "applications", "connectors"):
        assert full[field], field
    assert registration.record.node_id in [c["id"] for c in full["connectors"]]
    # The connector: nothing about people; of the applications only its own group's, with their
    # segments (what it may dial) and without their assignments.
    for field in ("users", "devices", "locations", "policies", "revoked_sessions", "token_keys"):
        assert narrow[field] == [], field
    mine = [a for a in full["applications"] if a["connector_group"] == "default"]
    assert mine and any(a["users"] or a["groups"] for a in full["applications"])
    assert narrow["applications"] == [{**a, "users": [], "groups": []} for a in mine]
    assert narrow["token_issuer"] == ""
    (own,) = narrow["connectors"]
    assert (own["id"], own["name"], own["group"]) == (registration.record.node_id, registration.record.name,
                                                      "default")
    assert own["serials"] == [registration_serial(registration)]
    assert [g["name"] for g in narrow["groups"]] == ["default"]
    assert narrow["edges"] == full["edges"] and narrow["revoked_serials"] == full["revoked_serials"]


def registration_serial(registration: Registration) -> str:
    with open(registration.cert, "rb") as fh:
        return format(x509.load_pem_x509_certificate(fh.read()).serial_number, "x")


def test_config_long_poll_without_a_change_ends_with_204(control: Control, connector) -> None:
    _, signer = connector
    version = _published_version(control, signer)
    started = time.monotonic()
    status, body, headers = control.node(signer, "GET", f"{CONFIG}?after={version}&wait=1")
    elapsed = time.monotonic() - started
    assert (status, body) == (204, None)
    assert 0.9 <= elapsed < 3, elapsed
    assert "X-Ferryman-Config-Version" not in headers
    # wait=0: asked and answered at once.
    started = time.monotonic()
    assert control.node(signer, "GET", f"{CONFIG}?after={version}&wait=0")[0] == 204
    assert time.monotonic() - started < 1


@pytest.mark.parametrize(("query", "key"), [("after=0&wait=-1", "wait"), ("after=-2", "after"), ("after=x", "after")])
def test_config_parameters_out_of_range_are_refused(control: Control, connector, query: str, key: str) -> None:
    _, signer = connector
    status, body, _ = control.node(signer, "GET", f"{CONFIG}?{query}")
    assert status == 400, body
    assert body["code"] == "validation"
    assert [d["key"] for d in body["detail"]] == [key]


def test_a_long_wait_is_cut_to_the_maximum_and_a_node_ahead_gets_the_store_s_version(control: Control,
                                                                                     connector) -> None:
    _, signer = connector
    status, snapshot, _ = control.node(signer, "GET", f"{CONFIG}?after=-1&wait=500")
    assert status == 200  # not refused: a node configured to wait longer just waits the maximum
    # A node holding a version above the store's (a database restored from a backup) gets the current one at once.
    started = time.monotonic()
    status, body, headers = control.node(signer, "GET", f"{CONFIG}?after={snapshot['version'] + 1000}&wait=30")
    assert status == 200 and body["version"] <= snapshot["version"] + 1 and time.monotonic() - started < 2
    assert headers["X-Ferryman-Config-Version"] == str(body["version"])


def test_a_token_is_bound_to_its_request_body(control: Control, connector) -> None:
    _, signer = connector
    signed = json.dumps({"tunnels": 1}).encode()
    token = signer.token("POST", HEARTBEAT, signed)
    _refused(control.request("POST", HEARTBEAT, {"tunnels": 999}, authorization=f"Bearer {token}"), 401,
             "node credential refused: the token was made for another request body")
    assert control.request("POST", HEARTBEAT, {"tunnels": 1}, authorization=f"Bearer {signer.token('POST', HEARTBEAT, signed)}")[0] == 200


# ---------------------------------------------------------------------------- authentication


@pytest.mark.parametrize(("authorization", "message"), [
    (None, "missing 'Authorization: Bearer <node token>' header"),
    ("Basic xyz", "the Authorization header must be 'Bearer <node token>'"),
    ("Bearer ", "the Authorization header must be 'Bearer <node token>'"),
    ("Bearer not.a-token", "the bearer token is not a compact JWS"),
    ("Bearer " + "x" * 20000, "the token is longer than 16384 characters"),
])
def test_missing_or_malformed_credentials_are_refused(control: Control, authorization: str | None,
                                                      message: str) -> None:
    _refused(control.request("GET", f"{CONFIG}?after=-1", authorization=authorization), 401, message)
    _refused(control.request("POST", HEARTBEAT, {"tunnels": 1}, authorization=authorization), 401, message)


def test_certificate_of_another_ca_is_refused(control: Control, tmp_path: Path) -> None:
    other = tmp_path / "other-ca"
    pki.make_directory(str(other))
    pki.create_ca(str(other))
    ca_cert, ca_key = pki.load_ca(str(other))
    cert, key, _ = _craft(tmp_path / "foreign", ca_cert, ca_key, name="foreign-1")
    signer = NodeSigner(cert, key)
    _refused(control.node(signer, "GET", f"{CONFIG}?after=-1"), 401,
             "the certificate was not issued by this control plane's CA")


def _hand_made(signer: NodeSigner, key: ECKey, target: str, method: str = "GET", lifetime: int = 60) -> str:
    """A token like ``NodeSigner.token``'s (x5c: the signer's certificate), signed with ``key``."""
    now = int(time.time())
    claims = {"sub": signer.subject, "iat": now, "exp": now + lifetime, "htm": method, "htu": target,
              "bsh": body_hash(b""), "jti": secrets.token_urlsafe(16)}
    x5c = base64.b64encode(signer.certificate.public_bytes(serialization.Encoding.DER)).decode()
    return jwt.encode({"alg": "ES256", "typ": "JWT", "x5c": [x5c]}, claims, key, algorithms=["ES256"])


def test_token_signed_by_another_key_than_its_certificate_is_refused(control: Control, connector) -> None:
    identity, signer = connector
    target = f"{CONFIG}?after=-1"
    forged = _hand_made(signer, ECKey.generate_key("P-256"), target)
    _refused(control.request("GET", target, authorization=f"Bearer {forged}"), 401,
             "the token's signature does not verify with its certificate's key")
    # The same token signed with the node's own key passes: only the key was wrong.
    genuine = _hand_made(signer, ECKey.import_key(Path(identity.key).read_bytes()), target)
    assert control.request("GET", target, authorization=f"Bearer {genuine}")[0] == 200


def test_token_made_for_another_request_is_refused(control: Control, connector) -> None:
    _, signer = connector
    target = f"{CONFIG}?after=-1"
    message = "the token was made for another request (method or path differ)"
    # Another path, another query, another method: each is a different request.
    _refused(control.request("GET", target, authorization=f"Bearer {signer.token('GET', HEARTBEAT)}"), 401, message)
    _refused(control.request("GET", target, authorization=f"Bearer {signer.token('GET', CONFIG + '?after=5')}"),
             401, message)
    _refused(control.request("GET", target, authorization=f"Bearer {signer.token('POST', target)}"), 401, message)
    assert control.node(signer, "GET", target)[0] == 200


def test_replayed_token_is_refused(control: Control, connector) -> None:
    _, signer = connector
    target = f"{CONFIG}?after=-1"
    authorization = f"Bearer {signer.token('GET', target)}"
    assert control.request("GET", target, authorization=authorization)[0] == 200
    _refused(control.request("GET", target, authorization=authorization), 401,
             "the token was already used (replayed request)")


def test_token_from_a_skewed_clock_is_refused(control: Control, connector) -> None:
    _, signer = connector
    target = f"{CONFIG}?after=-1"
    for offset in (-3600, 3600):
        token = signer.token("GET", target, now=time.time() + offset)
        reply = control.request("GET", target, authorization=f"Bearer {token}")
        _refused(reply, 401, "from the control plane's clock (more than 300s apart: check the node's clock)")
        # iat is whole seconds: the distance shown is within a second of the offset.
        shown = re.search(r"the token was issued ([+-]\d+)s from", reply[1]["error"])
        assert shown is not None and abs(int(shown.group(1)) + offset) <= 1, reply[1]["error"]
    # Within the skew allowance (CLOCK_SKEW also stretches ``exp``): accepted.
    token = signer.token("GET", target, now=time.time() - 200)
    assert control.request("GET", target, authorization=f"Bearer {token}")[0] == 200


def test_token_living_longer_than_its_lifetime_is_refused(control: Control, connector) -> None:
    identity, signer = connector
    target = f"{CONFIG}?after=-1"
    token = _hand_made(signer, ECKey.import_key(Path(identity.key).read_bytes()), target, lifetime=3600)
    _refused(control.request("GET", target, authorization=f"Bearer {token}"), 401,
             "the token has expired or lives longer than 60s")


def test_expired_certificate_is_refused(control: Control, tmp_path: Path) -> None:
    ca_cert, ca_key = pki.load_ca(str(control.data_dir / "ca"))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert, key, _ = _craft(tmp_path / "expired", ca_cert, ca_key, name="expired-1",
                          not_before=now - datetime.timedelta(days=30), not_after=now - datetime.timedelta(days=1))
    _refused(control.node(NodeSigner(cert, key), "GET", f"{CONFIG}?after=-1"), 401, "the certificate expired at ")
    _refused(control.node(NodeSigner(cert, key), "GET", f"{CONFIG}?after=-1"), 401,
             "register the node again with a new token")


def test_ca_signed_certificate_of_no_registered_node_is_forbidden(control: Control, tmp_path: Path) -> None:
    ca_cert, ca_key = pki.load_ca(str(control.data_dir / "ca"))
    cert, key, crafted = _craft(tmp_path / "stray", ca_cert, ca_key, name="stray-1")
    _refused(control.node(NodeSigner(cert, key), "GET", f"{CONFIG}?after=-1"), 403,
             f"certificate {crafted.serial_number:x} was not issued to a registered node")


def test_revoked_node_is_forbidden(control: Control, connector) -> None:
    identity, signer = connector
    assert control.node(signer, "POST", HEARTBEAT, {"tunnels": 1})[0] == 200
    status, revoked, _ = control.admin("POST", "/v1/revocations", {"node_type": "connector",
                                                                   "node_id": identity.record.node_id,
                                                                   "reason": "test"})
    assert status == 201, revoked
    assert [r["serial"] for r in revoked] == [identity.record.serial]
    message = f"certificate {identity.record.serial} of connector {identity.record.name!r} is revoked"
    _refused(control.node(signer, "GET", f"{CONFIG}?after=-1"), 403, message)
    _refused(control.node(signer, "POST", HEARTBEAT, {"tunnels": 1}), 403, message)
    _refused(control.node(signer, "POST", RENEW, {"csr_pem": new_key_and_csr(identity.record.name)[1].decode()}),
             403, message)


def test_tokens_of_no_registered_node_or_a_revoked_one_are_not_remembered(control: Control, tmp_path: Path,
                                                                          connector) -> None:
    """Token ids are remembered (replay protection, a bounded memory shared by every node) only
    for a registered node that is not revoked: a refused caller sending the same token again
    is refused for what it is again, not as a replay, so no such caller can fill that memory."""
    ca_cert, ca_key = pki.load_ca(str(control.data_dir / "ca"))
    cert, key, crafted = _craft(tmp_path / "stray", ca_cert, ca_key, name="stray-2")
    target = f"{CONFIG}?after=-1"
    stray = f"Bearer {NodeSigner(cert, key).token('GET', target)}"
    for _ in range(2):
        _refused(control.request("GET", target, authorization=stray), 403,
                 f"certificate {crafted.serial_number:x} was not issued to a registered node")

    identity, signer = connector
    status, _, _ = control.admin("POST", "/v1/revocations", {"node_type": "connector",
                                                            "node_id": identity.record.node_id, "reason": "test"})
    assert status == 201
    revoked = f"Bearer {signer.token('GET', target)}"
    for _ in range(2):
        _refused(control.request("GET", target, authorization=revoked), 403,
                 f"certificate {identity.record.serial} of connector {identity.record.name!r} is revoked")


# ---------------------------------------------------------------------------- heartbeat


def test_heartbeat_shows_in_the_admin_api(control: Control, connector) -> None:
    identity, signer = connector
    node_id = identity.record.node_id
    _, before, _ = control.admin("GET", f"/v1/connectors/{node_id}")
    assert (before["status"], before["last_seen"], before["config_version"]) == ("inactive", None, None)

    version = _config_version(control)
    status, body, _ = control.node(signer, "POST", HEARTBEAT, {
        "version": "9.9.9-test", "addresses": ["10.1.2.3", " 10.1.2.4 "], "tunnels": 2, "active_flows": 17,
        "config_version": version})
    assert status == 200, body
    assert body == {"node_id": node_id, "status": "active", "heartbeat_interval": 30.0, "config_version": version}

    status, shown, _ = control.admin("GET", f"/v1/connectors/{node_id}")
    assert status == 200
    assert shown["status"] == "active" and shown["last_seen"] is not None
    assert (shown["version"], shown["tunnels"], shown["active_flows"], shown["config_version"]) == (
        "9.9.9-test", 2, 17, version)
    assert shown["internal_addr"] == "10.1.2.3,10.1.2.4"
    assert shown["external_addr"] == "127.0.0.1"
    _, listed, _ = control.admin("GET", "/v1/connectors")
    assert [c["status"] for c in listed if c["id"] == node_id] == ["active"]
    # The heartbeat is what proves the node holds this certificate: its first use is noted (the
    # certificates it replaces are retired only once the new one has been used for the grace).
    with contextlib.closing(sqlite3.connect(f"file:{control.data_dir / 'control.db'}?mode=ro", uri=True)) as db:
        (first_used,) = db.execute("SELECT first_used_at FROM issued_certificates WHERE serial = ?",
                                   (identity.record.serial,)).fetchone()
    assert first_used is not None


@pytest.mark.parametrize(("body", "key", "message"), [
    ({"tunnels": -1}, "tunnels", "Expected `int` >= 0"),
    ({"tunnels": 1, "flows": 3}, None, "Object contains unknown field `flows`"),
    ({"addresses": "10.0.0.1"}, "addresses", "Expected `array`"),
    ({"config_version": "seven"}, "config_version", "Expected `int | null`"),
    ({"addresses": ["x" * 256]}, "addresses", "Expected `str` of length <= 255"),
    # Control characters: shown to operators as they are (an OSC 52 sequence writes the clipboard
    # of whoever lists the nodes), and PostgreSQL text cannot hold NUL.
    ({"version": "\x1b]52;c;aGVsbG8=\x07"}, "version", "Expected `str` matching regex"),
    ({"addresses": ["10.0.0.1\x00"]}, "addresses", "Expected `str` matching regex"),
    ({"connectors": [{"name": "c\x00", "group": "default"}]}, None, "Expected `str` matching regex"),
])
def test_invalid_heartbeat_is_refused(control: Control, connector, body: dict[str, Any], key: str | None,
                                      message: str) -> None:
    identity, signer = connector
    status, answer, _ = control.node(signer, "POST", HEARTBEAT, body)
    assert status == 400, answer
    assert answer["code"] == "validation" and message in answer["error"], answer
    if key is not None:
        assert key in answer["error"]
    _, shown, _ = control.admin("GET", f"/v1/connectors/{identity.record.node_id}")
    assert shown["last_seen"] is None  # nothing recorded


# ---------------------------------------------------------------------------- renewal


def test_connector_renewal_keeps_both_certificates_until_revoked(control: Control, connector,
                                                                tmp_path: Path) -> None:
    identity, old = connector
    name, node_id = identity.record.name, identity.record.node_id
    key_pem, csr_pem = new_key_and_csr(name)
    status, renewed, _ = control.node(old, "POST", RENEW, {"csr_pem": csr_pem.decode()})
    assert status == 201, renewed
    cert = x509.load_pem_x509_certificate(renewed["certificate_pem"].encode())
    (ca_cert,) = x509.load_pem_x509_certificates(renewed["ca_pem"].encode())
    assert ca_cert.public_bytes(serialization.Encoding.PEM) == (control.data_dir / "ca" / "ca.pem").read_bytes()
    cert.verify_directly_issued_by(ca_cert)
    assert cert.serial_number != old.serial and renewed["serial"] == format(cert.serial_number, "x")
    assert cert.subject == old.certificate.subject  # OU=connector, CN=name
    new_identity = pki.certificate_identity(cert, b"", "renewed certificate")
    assert (new_identity.role, new_identity.name) == ("connector", name)
    lifetime = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    assert datetime.timedelta(days=179) < lifetime <= datetime.timedelta(days=180)

    new = _save_renewed(tmp_path / "renewed", name, key_pem, renewed["certificate_pem"])
    # The old certificate stays valid until it expires (tunnels made with it keep running).
    for signer in (old, new):
        assert control.node(signer, "POST", HEARTBEAT, {"tunnels": 1})[0] == 200
        assert control.node(signer, "GET", f"{CONFIG}?after=-1")[0] == 200
    _, shown, _ = control.admin("GET", f"/v1/connectors/{node_id}")
    assert shown["cert_serial"] == renewed["serial"] != identity.record.serial

    status, revoked, _ = control.admin("POST", "/v1/revocations", {"node_type": "connector", "node_id": node_id,
                                                                   "reason": "key compromised"})
    assert status == 201, revoked
    assert sorted(r["serial"] for r in revoked) == sorted([identity.record.serial, renewed["serial"]])
    assert {(r["node_id"], r["reason"]) for r in revoked} == {(node_id, "key compromised")}
    for signer in (old, new):
        _refused(control.node(signer, "GET", f"{CONFIG}?after=-1"), 403, f"certificate {signer.serial:x} of "
                 f"connector {name!r} is revoked")


def test_a_node_renewing_over_and_over_is_refused_after_its_certificates_for_the_day(control: Control,
                                                                                   connector, tmp_path: Path) -> None:
    """A stolen connector key renewing in a loop made every renewal a configuration change for
    every node and grew the serials each snapshot lists: a node gets at most
    FERRYMAN_NODE_CERTIFICATES_PER_DAY (4) certificates in 24 hours, its registration included."""
    identity, signer = connector
    name = identity.record.name
    for i in range(3):
        key_pem, csr_pem = new_key_and_csr(name)
        status, renewed, _ = control.node(signer, "POST", RENEW, {"csr_pem": csr_pem.decode()})
        assert status == 201, renewed
        signer = _save_renewed(tmp_path / f"renewed-{i}", name, key_pem, renewed["certificate_pem"])
    version = _config_version(control)
    status, body, headers = control.node(signer, "POST", RENEW, {"csr_pem": new_key_and_csr(name)[1].decode()})
    assert status == 429, body
    assert f"connector {name!r} was issued 4 certificates in the last 24 hours" in body["error"], body
    assert headers["Retry-After"] == "3600"
    assert _config_version(control) == version  # nothing changed for the other nodes
    _, shown, _ = control.admin("GET", f"/v1/connectors/{identity.record.node_id}")
    assert shown["cert_serial"] == format(signer.serial, "x")  # the last certificate stays the current one
    assert control.node(signer, "POST", HEARTBEAT, {"tunnels": 1})[0] == 200


def test_edge_renewal_keeps_its_host_names(control: Control, tmp_path: Path) -> None:
    identity = _register(control, tmp_path / "edge", "edge", "edge-r",
                         addresses=["edge-r.example.test:8443", "192.0.2.44:8443"])
    signer = NodeSigner(identity.cert, identity.key)
    key_pem, csr_pem = new_key_and_csr("edge-r")
    status, renewed, _ = control.node(signer, "POST", RENEW, {"csr_pem": csr_pem.decode()})
    assert status == 201, renewed
    cert = x509.load_pem_x509_certificate(renewed["certificate_pem"].encode())
    assert cert.subject == signer.certificate.subject
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["edge-r.example.test"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["192.0.2.44"]
    old_san = signer.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san == old_san
    new = _save_renewed(tmp_path / "edge-renewed", "edge-r", key_pem, renewed["certificate_pem"])
    assert control.node(new, "POST", HEARTBEAT, {"addresses": ["192.0.2.44"]})[0] == 200
    _, edges, _ = control.admin("GET", "/v1/edges")
    (edge,) = [e for e in edges if e["id"] == identity.record.node_id]
    assert edge["cert_serial"] == renewed["serial"] and edge["status"] == "active"
    assert (edge["external_addr"], edge["internal_addr"]) == ("127.0.0.1", "192.0.2.44")


def test_renewal_with_a_csr_that_is_not_pem_is_refused(control: Control, connector) -> None:
    identity, signer = connector
    status, body, _ = control.node(signer, "POST", RENEW, {"csr_pem": "not a CSR"})
    assert status == 422, body
    assert body == {"error": "CSR is not a PEM certificate signing request", "code": "invalid_csr"}
    _, shown, _ = control.admin("GET", f"/v1/connectors/{identity.record.node_id}")
    assert shown["cert_serial"] == identity.record.serial  # nothing changed
    status, body, _ = control.node(signer, "POST", RENEW, {"csr": "x"})
    assert status == 400 and "csr" in body["error"]
