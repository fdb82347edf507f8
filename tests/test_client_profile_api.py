"""The forwarding profile, served for real (``python -m dataplane control`` in a subprocess):
``GET /v1/client/profile`` with a user's access token (content, long-poll, refusals) and the
admin ``/v1/forwarding-profile`` (fail mode, validation, audit), plus ``ferryman admin profile``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from controlplane import Control

pytestmark = pytest.mark.timeout(60)

PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Control]:
    with Control.running(tmp_path_factory.mktemp("control"), edges=["edge.example.com:8443"]) as control:
        status, _, _ = control.call("POST", "/v1/users", {"upn": "ann@corp.example", "display_name": "Ann",
                                                           "password": PASSWORD})
        assert status == 201
        assert control.admin("POST", "/v1/applications", {"name": "rdp", "segments": [
            {"destination": "10.20.0.0/16", "ports": "3389", "protocol": "tcp"},
            {"destination": "10.20.0.0/16", "ports": "3389", "protocol": "udp"}]})[0] == 201
        assert control.admin("POST", "/v1/dns-suffixes", {"suffix": "corp.example"})[0] == 201
        yield control


def _token(control: Control) -> str:
    status, body, _ = control.call("POST", "/v1/auth/sign-in", {"upn": "ann@corp.example", "password": PASSWORD},
                                   key=None)
    assert status == 200, body
    return body["access_token"]


def _published(control: Control, token: str, version: int) -> tuple:
    """The profile once the control plane publishes ``version`` of the store (within 2 s of a change)."""
    deadline = time.monotonic() + 10
    while True:
        status, profile, headers = control.call("GET", "/v1/client/profile", key=None, bearer=token)
        assert status == 200, profile
        if profile["version"] >= version or time.monotonic() > deadline:
            return status, profile, headers
        time.sleep(0.1)


def test_profile_lists_segments_suffixes_fail_mode_and_edges(control: Control) -> None:
    # The control plane publishes a change within 2 s: ask for the store's version by long-poll.
    version = control.version()
    status, profile, headers = _published(control, _token(control), version)
    assert profile["version"] == int(headers["X-Ferryman-Config-Version"]) == version
    rdp = next(a for a in profile["applications"] if a["name"] == "rdp")
    assert rdp["kind"] == "per_app" and rdp["users"] == [] and rdp["groups"] == []  # no assignments leak
    assert {(s["destination"], s["ports"], s["protocol"]) for s in rdp["segments"]} == {
        ("10.20.0.0/16", "3389", "tcp"), ("10.20.0.0/16", "3389", "udp")}
    assert profile["dns_suffixes"] == ["corp.example"]
    assert profile["fail_mode"] == "closed"
    assert profile["edges"] == ["edge.example.com:8443"]


def test_profile_long_poll_wakes_on_a_fail_mode_change(control: Control) -> None:
    token = _token(control)
    version = control.version()
    _published(control, token, version)
    status, body, _ = control.call("GET", f"/v1/client/profile?after={version}&wait=0.3", key=None, bearer=token)
    assert status == 204
    answers: list = []
    waiter = threading.Thread(target=lambda: answers.append(control.call(
        "GET", f"/v1/client/profile?after={version}&wait=20", key=None, bearer=token)))
    waiter.start()
    time.sleep(0.3)
    started = time.monotonic()
    status, row, _ = control.admin("PUT", "/v1/forwarding-profile", {"fail_mode": "open"})
    assert status == 200 and row["fail_mode"] == "open"
    waiter.join(10)
    assert time.monotonic() - started < 5
    status, profile, _ = answers[0]
    assert status == 200 and profile["fail_mode"] == "open" and profile["version"] > version
    audit = control.admin("GET", "/v1/audit?object_type=forwarding_profile")[1]
    assert audit[0]["action"] == "forwarding_profile.update"
    assert (audit[0]["before"]["fail_mode"], audit[0]["after"]["fail_mode"]) == ("closed", "open")
    # Setting the same mode again changes nothing (no new version, no audit record).
    control.admin("PUT", "/v1/forwarding-profile", {"fail_mode": "open"})
    assert control.version() == profile["version"]
    control.admin("PUT", "/v1/forwarding-profile", {"fail_mode": "closed"})


def test_a_waiting_poll_of_a_session_that_signs_out_is_refused(control: Control) -> None:
    # Signing out bumps the configuration version, which wakes this session's own waiting
    # poll: it must get 401, not the new profile (an agent would re-write profile.json).
    token = _token(control)
    version = control.version()
    _published(control, token, version)
    answers: list = []
    waiter = threading.Thread(target=lambda: answers.append(control.call(
        "GET", f"/v1/client/profile?after={version}&wait=20", key=None, bearer=token)))
    waiter.start()
    time.sleep(0.5)
    assert control.call("POST", "/v1/auth/sign-out", key=None, bearer=token)[0] == 204
    assert control.version() > version
    waiter.join(15)
    assert not waiter.is_alive()
    status, body, _ = answers[0]
    assert status == 401, body
    assert body["error"].startswith("access token refused: session ") and "was revoked" in body["error"], body


def test_profile_refusals(control: Control) -> None:
    status, body, _ = control.call("GET", "/v1/client/profile", key=None)
    assert status == 401 and "missing 'Authorization: Bearer <access token>'" in body["error"]
    status, body, _ = control.call("GET", "/v1/client/profile", key=None, bearer="not-a-jwt")
    assert status == 401 and body["error"].startswith("access token refused")
    token = _token(control)
    assert control.call("POST", "/v1/auth/sign-out", key=None, bearer=token)[0] == 204
    status, body, _ = control.call("GET", "/v1/client/profile", key=None, bearer=token)
    assert status == 401 and "revoked" in body["error"], body
    status, body, _ = control.admin("PUT", "/v1/forwarding-profile", {"fail_mode": "sideways"})
    assert status == 400 and "fail_mode" in str(body)
    status, body, _ = control.call("PUT", "/v1/forwarding-profile", {"fail_mode": "open"}, key=None)
    assert status == 401


def test_admin_cli_profile(control: Control, tmp_path) -> None:
    env = {**os.environ, "FERRYMAN_DATA_DIR": str(control.data_dir)}

    def admin(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dataplane", "admin", "--control", control.url, *args],
                              env=env, capture_output=True, text=True, timeout=30)

    done = admin("profile", "set", "--fail-mode", "open")
    assert done.returncode == 0 and done.stdout.strip() == "fail mode is now open", done.stderr
    done = admin("profile", "show")
    assert done.returncode == 0 and done.stdout.startswith("fail mode: open (client agents dial directly")
    done = admin("--json", "profile", "show")
    assert '"fail_mode": "open"' in done.stdout
    done = admin("profile", "set", "--fail-mode", "closed")
    assert done.returncode == 0
