"""Tests of sign-in and the identity admin API, served for real: ``python -m dataplane control``
in a subprocess (SQLite in a temporary directory), spoken to over HTTP with urllib.

Covered: password sign-in and the access token (verified with joserfc against
``GET /v1/auth/keys``, every claim), one message for an unknown user and a wrong password,
disabled accounts, the per-account-and-address rate limit (429), TOTP enrolment and sign-in with a
code (used once) or a recovery code (used once), refresh-token rotation and reuse detection,
device registration (a client certificate with CN = device id, chaining to the CA),
compliance changes moving the configuration version, device and session revocation,
sign-out, bearer-token refusals, admin validation errors and audit records with actors.
The module's control plane runs with ``FERRYMAN_ACCESS_TOKEN_MINUTES=7``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from email.message import Message
from pathlib import Path
from typing import Any

import pyotp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from joserfc import jwt
from joserfc.jwk import KeySet, OKPKey

from control.tokens import KEY_FILE, TokenSigner, verify_access_token
from dataplane.basics import pki
from dataplane.basics.pki import new_key_and_csr

from controlplane import Control

pytestmark = [
    pytest.mark.timeout(60),
]

TOKEN_MINUTES = 7
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Control]:
    with Control.running(tmp_path_factory.mktemp("control"),
                         env={"FERRYMAN_ACCESS_TOKEN_MINUTES": str(TOKEN_MINUTES)}) as control:
        yield control


def make_user(control: Control, upn: str, password: str | None = PASSWORD, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"upn": upn, "display_name": upn.split("@")[0].title(), **extra}
    if password is not None:
        body["password"] = password
    status, user, _ = control.call("POST", "/v1/users", body)
    assert status == 201, user
    return user


def sign_in(control: Control, upn: str, password: str = PASSWORD, **extra: Any) -> tuple[int, Any, Message]:
    return control.call("POST", "/v1/auth/sign-in", {"upn": upn, "password": password, **extra}, key=None)


def signed_in(control: Control, upn: str, **extra: Any) -> dict[str, Any]:
    status, body, _ = sign_in(control, upn, **extra)
    assert status == 200, body
    return body


def claims_of(control: Control, token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of an access token verified with joserfc against the published keys."""
    status, keys, headers = control.call("GET", "/v1/auth/keys", key=None)
    assert status == 200 and keys["issuer"] == "ferryman"
    assert "max-age=300" in headers["Cache-Control"]
    decoded = jwt.decode(token, KeySet.import_key_set({"keys": keys["keys"]}), algorithms=["Ed25519"])
    return dict(decoded.header), dict(decoded.claims)


def wait_for_fresh_totp_step() -> None:
    """Sleep past a TOTP step boundary that is less than 2 s away, so a code stays in its window."""
    left = 30 - time.time() % 30
    if left < 2:
        time.sleep(left + 0.05)


# ---------------------------------------------------------------------------- sign-in and the access token


def test_password_sign_in_gives_an_access_token_with_every_claim(control: Control) -> None:
    user = make_user(control, "Alice@Corp.Example")
    status, group, _ = control.call("POST", "/v1/user-groups", {"name": "engineering"})
    assert status == 201, group
    status, member, _ = control.call("POST", "/v1/user-groups/engineering/members", {"user": "alice@corp.example"})
    assert status == 201 and member == {"group_id": group["id"], "group": "engineering", "user_id": user["id"],
                                        "upn": "alice@corp.example"}
    before = time.time()
    body = signed_in(control, "ALICE@corp.example")
    assert body["token_type"] == "Bearer" and body["expires_in"] == TOKEN_MINUTES * 60
    assert body["refresh_token"].startswith(f"fmrt_{body['session_id']}.")
    assert body["user"] == {"id": user["id"], "upn": "alice@corp.example", "display_name": "Alice",
                            "groups": [group["id"]]}
    assert "device" not in body
    header, claims = claims_of(control, body["access_token"])
    status, keys, _ = control.call("GET", "/v1/auth/keys", key=None)
    (jwk,) = keys["keys"]
    assert set(jwk) == {"kty", "crv", "x", "kid", "use", "alg"}
    assert (jwk["kty"], jwk["crv"], jwk["use"], jwk["alg"]) == ("OKP", "Ed25519", "sig", "Ed25519")
    assert jwk["kid"] == OKPKey.import_key({"kty": "OKP", "crv": "Ed25519", "x": jwk["x"]}).thumbprint()
    assert header["alg"] == "Ed25519" and header["kid"] == jwk["kid"]
    assert set(claims) == {"iss", "sub", "upn", "groups", "amr", "auth_time", "sid", "iat", "exp", "jti"}
    assert claims["iss"] == "ferryman" and claims["sub"] == user["id"] and claims["upn"] == "alice@corp.example"
    assert claims["groups"] == [group["id"]] and claims["amr"] == ["pwd"] and claims["sid"] == body["session_id"]
    assert isinstance(claims["auth_time"], int) and before - 2 <= claims["auth_time"] <= time.time() + 1
    assert claims["exp"] - claims["iat"] == TOKEN_MINUTES * 60 and len(claims["jti"]) == 32
    # The reference verifier agrees, and the key is the one in the data directory (0600).
    assert verify_access_token(body["access_token"], keys["keys"]).sid == body["session_id"]
    key_file = control.data_dir / KEY_FILE
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert TokenSigner.open(str(control.data_dir)).kid == jwk["kid"]
    # A second sign-in is a second session with its own token id.
    again = signed_in(control, "alice@corp.example")
    assert again["session_id"] != body["session_id"]
    assert claims_of(control, again["access_token"])[1]["jti"] != claims["jti"]


def test_unknown_user_and_wrong_password_get_the_same_answer(control: Control) -> None:
    make_user(control, "carol@corp.example")
    make_user(control, "nopass@corp.example", password=None)
    answers = [sign_in(control, "carol@corp.example", "wrong password")[:2],
               sign_in(control, "nobody@corp.example", PASSWORD)[:2],
               sign_in(control, "nopass@corp.example", PASSWORD)[:2],
               sign_in(control, "not a upn", PASSWORD)[:2]]
    assert answers == [(401, {"error": "user name or password is wrong", "code": "auth_failed"})] * 4


def test_disabled_account_is_refused_and_disabling_is_configuration(control: Control) -> None:
    user = make_user(control, "dave@corp.example")
    session = signed_in(control, "dave@corp.example")
    before = control.version()
    status, body, _ = control.call("PATCH", f"/v1/users/{user['id']}", {"disabled": True})
    assert status == 200 and body["disabled"] is True
    assert control.version() == before + 1
    assert sign_in(control, "dave@corp.example")[:2] == (401, {"error": "account is disabled",
                                                               "code": "account_disabled"})
    assert sign_in(control, "dave@corp.example", "wrong password")[1]["code"] == "auth_failed"
    status, body, _ = control.call("POST", "/v1/auth/refresh", {"refresh_token": session["refresh_token"]}, key=None)
    assert (status, body) == (401, {"error": "account is disabled", "code": "account_disabled"})
    status, body, _ = control.call("PATCH", "/v1/users/dave@corp.example", {"disabled": False})
    assert status == 200 and body["disabled"] is False
    signed_in(control, "dave@corp.example")


def test_failed_sign_ins_are_rate_limited_per_user_name_and_address(control: Control) -> None:
    make_user(control, "erin@corp.example")
    make_user(control, "frank@corp.example")
    for _ in range(10):
        assert sign_in(control, "erin@corp.example", "guess guess")[0] == 401
    status, body, headers = sign_in(control, "Erin@corp.example")  # even the right password waits
    assert status == 429 and body["code"] == "rate_limited"
    assert body["error"].startswith("too many failed sign-ins for 'erin@corp.example' from this address "
                                    "(10 within 300 s): try again in ")
    assert 1 <= int(headers["Retry-After"]) <= 300
    signed_in(control, "frank@corp.example")  # other user names are not affected


# ---------------------------------------------------------------------------- TOTP


def test_totp_enrolment_then_sign_in_with_a_code_or_a_recovery_code(control: Control) -> None:
    user = make_user(control, "grace@corp.example")
    first = signed_in(control, "grace@corp.example")
    status, enrol, _ = control.call("POST", "/v1/auth/totp/enrol", bearer=first["access_token"])
    assert status == 200, enrol
    assert enrol["otpauth_uri"].startswith("otpauth://totp/Ferryman:grace%40corp.example?secret=" + enrol["secret"])
    totp = pyotp.TOTP(enrol["secret"])
    status, body, _ = control.call("POST", "/v1/auth/totp/confirm", {"code": "12345x"}, bearer=first["access_token"])
    assert (status, body["code"]) == (401, "mfa_failed") and body["error"].startswith("TOTP code is wrong")
    signed_in(control, "grace@corp.example")  # not in force before confirmation
    wait_for_fresh_totp_step()
    previous = totp.at(time.time() - 30)  # one step of drift is accepted; now() stays free for the sign-in
    status, confirmed, _ = control.call("POST", "/v1/auth/totp/confirm", {"code": previous},
                                        bearer=first["access_token"])
    assert status == 200, confirmed
    codes = confirmed["recovery_codes"]
    assert len(codes) == 10 and len(set(codes)) == 10
    status, body, _ = control.call("GET", f"/v1/users/{user['id']}")
    assert body["totp_enabled"] is True

    assert sign_in(control, "grace@corp.example")[:2] == (401, {"error": "a TOTP code is required",
                                                                "code": "mfa_required"})
    wrong = "000000" if totp.now() != "000000" else "111111"
    assert sign_in(control, "grace@corp.example", totp_code=wrong)[1]["code"] == "mfa_failed"
    assert sign_in(control, "grace@corp.example", totp_code=previous)[1]["code"] == "mfa_failed"  # used at confirm
    code = totp.now()
    with_code = signed_in(control, "grace@corp.example", totp_code=code)
    assert claims_of(control, with_code["access_token"])[1]["amr"] == ["pwd", "mfa"]
    status, body, _ = sign_in(control, "grace@corp.example", totp_code=code)
    assert (status, body) == (401, {"error": "this TOTP code was already used: wait for the next one",
                                    "code": "mfa_failed"})
    with_recovery = signed_in(control, "grace@corp.example", recovery_code=codes[3])
    assert claims_of(control, with_recovery["access_token"])[1]["amr"] == ["pwd", "mfa"]
    assert sign_in(control, "grace@corp.example", recovery_code=codes[3])[:2] == (
        401, {"error": "recovery code is wrong or was already used", "code": "mfa_failed"})
    status, body, _ = control.call("POST", "/v1/auth/totp/enrol", bearer=with_code["access_token"])
    assert (status, body["code"]) == (409, "conflict") and "an admin must reset it" in body["error"]
    # Refreshing keeps what the sign-in proved.
    status, refreshed, _ = control.call("POST", "/v1/auth/refresh", {"refresh_token": with_code["refresh_token"]},
                                        key=None)
    assert status == 200
    old, new = claims_of(control, with_code["access_token"])[1], claims_of(control, refreshed["access_token"])[1]
    assert new["amr"] == ["pwd", "mfa"] and new["auth_time"] == old["auth_time"] and new["sid"] == old["sid"]
    # An admin resets TOTP (lost phone): the password alone signs in again.
    status, body, _ = control.call("POST", "/v1/users/grace@corp.example/totp/reset")
    assert status == 200 and body["totp_enabled"] is False
    assert claims_of(control, signed_in(control, "grace@corp.example")["access_token"])[1]["amr"] == ["pwd"]


# ---------------------------------------------------------------------------- refresh tokens, sessions


def test_refresh_rotates_and_an_old_refresh_token_revokes_the_session(control: Control) -> None:
    user = make_user(control, "heidi@corp.example")
    body = signed_in(control, "heidi@corp.example")
    first = body["refresh_token"]
    status, second, _ = control.call("POST", "/v1/auth/refresh", {"refresh_token": first}, key=None)
    assert status == 200, second
    assert second["session_id"] == body["session_id"] and second["refresh_token"] != first
    assert set(second) == {"access_token", "token_type", "expires_in", "refresh_token", "session_id"}
    status, third, _ = control.call("POST", "/v1/auth/refresh", {"refresh_token": second["refresh_token"]}, key=None)
    assert status == 200
    before = control.version()
    status, body_reuse, _ = control.call("POST", "/v1/auth/refresh", {"refresh_token": first}, key=None)
    assert status == 401 and body_reuse["code"] == "refresh_reused"
    assert body_reuse["error"] == (f"refresh token was already used: session {body['session_id']} is revoked, "
                                   f"since its refresh token may be stolen; sign in again")
    assert control.version() == before + 1  # edges learn the revoked session
    status, body_after, _ = control.call("POST", "/v1/auth/refresh", {"refresh_token": third["refresh_token"]},
                                         key=None)
    assert status == 401 and body_after["code"] == "session_revoked"
    status, sessions, _ = control.call("GET", f"/v1/users/{user['id']}/sessions")
    assert status == 200 and [(s["id"], s["status"]) for s in sessions] == [(body["session_id"], "revoked")]
    assert sessions[0]["last_refresh_at"] is not None and sessions[0]["amr"] == ["pwd"]
    status, records, _ = control.call("GET", "/v1/audit?object_type=session")
    revoke = next(r for r in records if r["action"] == "session.revoke" and r["object_id"] == body["session_id"])
    assert revoke["actor"] == "control-plane:refresh-token-reuse"
    status, body_bad, _ = control.call("POST", "/v1/auth/refresh", {"refresh_token": "fmrt_garbage"}, key=None)
    assert status == 401 and body_bad["code"] == "refresh_invalid"


def test_a_refresh_retried_after_a_lost_answer_gets_the_same_tokens(control: Control) -> None:
    make_user(control, "hank@corp.example")
    body = signed_in(control, "hank@corp.example")
    first = body["refresh_token"]
    status, answer, _ = control.call("POST", "/v1/auth/refresh", {"refresh_token": first}, key=None)
    assert status == 200, answer  # ... and this answer never reached the client, which sends the same token again
    before = control.version()
    status, retried, _ = control.call("POST", "/v1/auth/refresh", {"refresh_token": first}, key=None)
    assert status == 200, retried
    assert retried["refresh_token"] == answer["refresh_token"] and retried["session_id"] == body["session_id"]
    assert claims_of(control, retried["access_token"])[1]["sid"] == body["session_id"]
    assert control.version() == before  # nothing was revoked
    status, rows, _ = control.call("GET", "/v1/users/hank@corp.example/sessions")
    assert [r["status"] for r in rows] == ["active"]
    # The session goes on: the new token refreshes, and the first one is now reuse and revokes.
    status, later, _ = control.call("POST", "/v1/auth/refresh", {"refresh_token": retried["refresh_token"]},
                                    key=None)
    assert status == 200, later
    status, reused, _ = control.call("POST", "/v1/auth/refresh", {"refresh_token": first}, key=None)
    assert (status, reused["code"]) == (401, "refresh_reused")


def test_sign_out_and_admin_session_revocation(control: Control) -> None:
    user = make_user(control, "ivan@corp.example")
    mine = signed_in(control, "ivan@corp.example")
    other = signed_in(control, "ivan@corp.example")
    before = control.version()
    status, body, _ = control.call("POST", "/v1/auth/sign-out", bearer=mine["access_token"])
    assert (status, body) == (204, None)
    assert control.version() == before + 1
    status, body, _ = control.call("POST", "/v1/auth/refresh", {"refresh_token": mine["refresh_token"]}, key=None)
    assert status == 401 and body["code"] == "session_revoked"
    status, body, _ = control.call("POST", "/v1/auth/totp/enrol", bearer=mine["access_token"])
    assert status == 401 and body["code"] == "session_revoked" and body["error"].endswith("sign in again")
    status, body, _ = control.call("POST", f"/v1/sessions/{other['session_id']}/revoke", {"reason": "lost laptop"})
    assert status == 200 and body["status"] == "revoked" and body["user_id"] == user["id"]
    assert control.version() == before + 2
    status, body, _ = control.call("POST", f"/v1/sessions/{other['session_id']}/revoke")
    assert status == 409 and body["error"].startswith(f"session {other['session_id']} was already revoked at ")
    status, records, _ = control.call("GET", "/v1/audit?object_type=session")
    actors = {r["object_id"]: r["actor"] for r in records if r["action"] == "session.revoke"}
    assert actors[mine["session_id"]] == f"user:{user['id']}" and actors[other["session_id"]] == "bootstrap"


def test_bearer_routes_refuse_missing_bad_and_foreign_tokens(control: Control, tmp_path: Path) -> None:
    make_user(control, "judy@corp.example")
    status, body, _ = control.call("POST", "/v1/auth/totp/enrol", key=None)
    assert (status, body["error"]) == (401, "missing 'Authorization: Bearer <access token>' header")
    status, body, _ = control.call("POST", "/v1/auth/sign-out", bearer="not-a-token")
    assert (status, body["error"]) == (401, "access token refused: access token is not a compact JWS "
                                            "(header.payload.signature)")
    real = signed_in(control, "judy@corp.example")
    claims = claims_of(control, real["access_token"])[1]
    foreign = TokenSigner.open(str(tmp_path))
    forged, _ = foreign.issue(user_id=claims["sub"], upn=claims["upn"], groups=[], amr=["pwd", "mfa"],
                              auth_time=datetime.now(UTC),
                              session_id=claims["sid"])
    status, body, _ = control.call("POST", "/v1/auth/sign-out", bearer=forged)
    assert status == 401 and body["error"] == (f"access token refused: access token is signed with key "
                                               f"{foreign.kid!r}, which is not one of the issuer's keys")
    status, body, _ = control.call("POST", "/v1/auth/sign-out", bearer=control.key)  # an admin key is no user token
    assert status == 401 and body["error"].startswith("access token refused:")


# ---------------------------------------------------------------------------- devices


def test_device_registration_compliance_and_revocation(control: Control) -> None:
    user = make_user(control, "ken@corp.example")
    make_user(control, "lou@corp.example")
    key_pem, csr_pem = new_key_and_csr("ken-laptop")
    before = control.version()
    body = signed_in(control, "ken@corp.example",
                     device={"csr_pem": csr_pem.decode(), "name": "Ken's laptop", "os": "linux", "os_version": "6.8"})
    assert control.version() == before + 1  # a new device is configuration
    device = body["device"]
    cert = x509.load_pem_x509_certificate(device["certificate_pem"].encode())
    ca = x509.load_pem_x509_certificate(device["ca_pem"].encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device["id"]
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "client"
    assert pki.issued_by(cert, ca) and format(cert.serial_number, "x") == device["serial"]
    identity = pki.certificate_identity(cert, cert.public_bytes(serialization.Encoding.DER), "device certificate")
    assert (identity.role, identity.name) == ("client", device["id"])
    assert claims_of(control, body["access_token"])[1]["did"] == device["id"]

    status, devices, _ = control.call("GET", "/v1/devices?user=ken@corp.example")
    assert status == 200 and [(d["id"], d["name"], d["os"], d["os_version"], d["compliant"], d["cert_serial"])
                              for d in devices] == [(device["id"], "Ken's laptop", "linux", "6.8", False,
                                                     device["serial"])]
    assert devices[0]["upn"] == "ken@corp.example" and devices[0]["last_seen"] is not None
    # Signing in again on the same device binds the session to it.
    again = signed_in(control, "ken@corp.example", device_id=device["id"])
    assert "device" not in again and claims_of(control, again["access_token"])[1]["did"] == device["id"]
    status, body_other, _ = sign_in(control, "lou@corp.example", device_id=device["id"])
    assert (status, body_other) == (403, {"error": f"device {device['id']!r} is not a device of lou@corp.example",
                                          "code": "device_refused"})
    status, body_both, _ = sign_in(control, "ken@corp.example", device_id=device["id"],
                                   device={"csr_pem": csr_pem.decode()})
    assert status == 422 and "not both" in body_both["error"]
    status, body_csr, _ = sign_in(control, "ken@corp.example", device={"csr_pem": "not a csr"})
    assert (status, body_csr) == (422, {"error": "CSR is not a PEM certificate signing request",
                                        "code": "invalid_csr"})
    # What an MDM says moves the configuration version.
    before = control.version()
    status, patched, _ = control.call("PATCH", f"/v1/devices/{device['id']}", {"compliant": True,
                                                                               "os_version": "6.9"})
    assert status == 200 and patched["compliant"] is True and patched["os_version"] == "6.9"
    assert control.version() == before + 1
    status, body_bad, _ = control.call("PATCH", f"/v1/devices/{device['id']}", {"compliant": "yes"})
    assert status == 400 and body_bad["code"] == "validation"
    # Revocation: the certificate is revoked, the device's sessions end, the device cannot sign in again.
    status, revoked, _ = control.call("POST", f"/v1/devices/{device['id']}/revoke", {"reason": "stolen"})
    assert status == 200 and revoked["revoked_at"] is not None
    status, revocations, _ = control.call("GET", "/v1/revocations")
    assert any(r["serial"] == device["serial"] and r["reason"] == "stolen" for r in revocations)
    status, body_refresh, _ = control.call("POST", "/v1/auth/refresh", {"refresh_token": again["refresh_token"]},
                                           key=None)
    assert (status, body_refresh["code"]) == (401, "device_revoked")
    assert body_refresh["error"].startswith(f"device {device['id']} of this session is revoked")
    status, body_signin, _ = sign_in(control, "ken@corp.example", device_id=device["id"])
    assert (status, body_signin["code"]) == (403, "device_refused")
    status, records, _ = control.call("GET", "/v1/audit?object_type=device")
    actions = [(r["action"], r["actor"]) for r in reversed(records) if r["object_id"] == device["id"]]
    assert actions == [("device.create", f"user:{user['id']}"), ("device.certificate", f"user:{user['id']}"),
                       ("device.update", "bootstrap"), ("device.revoke", "bootstrap")]


# ---------------------------------------------------------------------------- admin API


def test_admin_identity_routes_validate_and_audit(control: Control) -> None:
    status, body, _ = control.call("GET", "/v1/users", key=None)
    assert status == 401  # admin routes need the admin key
    user = make_user(control, "mallory@corp.example")
    status, body, _ = control.call("POST", "/v1/users", {"upn": "MALLORY@corp.example"})
    assert (status, body) == (409, {"error": "user 'mallory@corp.example' already exists", "code": "conflict"})
    status, body, _ = control.call("POST", "/v1/users", {"upn": "x@corp.example", "pasword": "typo typo"})
    assert status == 400 and "pasword" in body["error"]
    status, body, _ = control.call("PATCH", f"/v1/users/{user['id']}", {"risk_level": "severe"})
    assert status == 400 and body["code"] == "validation"
    status, body, _ = control.call("PATCH", f"/v1/users/{user['id']}", {"password": "short"})
    assert (status, body) == (422, {"error": "password must be at least 8 characters long", "code": "invalid"})
    before = control.version()
    status, body, _ = control.call("PATCH", f"/v1/users/{user['id']}", {"risk_level": "high",
                                                                       "password": "a new password"})
    assert status == 200 and body["risk_level"] == "high"
    assert control.version() == before + 1
    assert signed_in(control, "mallory@corp.example", password="a new password")["user"]["id"] == user["id"]
    status, body, _ = control.call("GET", "/v1/users/nobody@corp.example")
    assert (status, body) == (404, {"error": "user 'nobody@corp.example' does not exist", "code": "not_found"})
    status, body, _ = control.call("POST", "/v1/user-groups/nope/members", {"user": user["id"]})
    assert (status, body) == (404, {"error": "user group 'nope' does not exist", "code": "not_found"})
    status, group, _ = control.call("POST", "/v1/user-groups", {"name": "red team"})
    assert status == 201
    assert control.call("POST", f"/v1/user-groups/{group['id']}/members", {"user": "mallory@corp.example"})[0] == 201
    status, members, _ = control.call("GET", "/v1/user-groups/red team/members".replace(" ", "%20"))
    assert status == 200 and [m["upn"] for m in members] == ["mallory@corp.example"]
    before = control.version()
    assert control.call("DELETE", f"/v1/user-groups/{group['id']}/members/{user['id']}")[0] == 204
    assert control.call("DELETE", f"/v1/user-groups/{group['id']}")[0] == 204
    assert control.version() == before + 2
    assert control.call("DELETE", f"/v1/users/{user['id']}")[0] == 204
    assert control.call("GET", f"/v1/users/{user['id']}")[0] == 404
    assert sign_in(control, "mallory@corp.example", "a new password")[1]["code"] == "auth_failed"
    status, records, _ = control.call("GET", "/v1/audit?object_type=user")
    mine = [(r["action"], r["actor"]) for r in reversed(records) if r["object_id"] == user["id"]]
    assert mine == [("user.create", "bootstrap"), ("user.update", "bootstrap"), ("user.set_password", "bootstrap"),
                    ("user.delete", "bootstrap")]
    status, sessions, _ = control.call("GET", "/v1/audit?object_type=session&actor=user:" + user["id"])
    assert status == 200 and [r["action"] for r in sessions] == ["session.create"]
    # No secret ever reaches the audit log.
    status, everything, _ = control.call("GET", "/v1/audit?limit=1000")
    text = json.dumps(everything)
    assert PASSWORD not in text and "a new password" not in text and "$argon2" not in text and "fmrt_" not in text


def test_openapi_document_lists_the_identity_routes(control: Control) -> None:
    status, doc, _ = control.call("GET", "/schema/openapi.json", key=None)
    assert status == 200
    for path in ("/v1/auth/sign-in", "/v1/auth/refresh", "/v1/auth/keys", "/v1/auth/totp/enrol",
                 "/v1/auth/totp/confirm", "/v1/auth/sign-out", "/v1/users", "/v1/users/{user_ref}",
                 "/v1/user-groups/{group_ref}/members", "/v1/devices/{device_id}", "/v1/sessions/{session_id}/revoke"):
        assert path in doc["paths"], path
    assert doc["paths"]["/v1/auth/sign-in"]["post"].get("security", []) == []
    assert doc["paths"]["/v1/auth/sign-out"]["post"]["security"] == [{"accessToken": []}]
    assert "accessToken" in doc["components"]["securitySchemes"]
