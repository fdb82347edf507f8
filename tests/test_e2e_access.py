"""Zero trust end to end: every flow is a decision about a person and a device, and it is logged.

Real processes (control plane, edge, connector, client agent signed in with ``ferryman
client login``), real bytes through the client's SOCKS5 listener, decisions read back from
the control plane's traffic log. Covered:

- a flow allowed for the assigned, signed-in user, and its traffic-log record checked
  field by field against the flow;
- the same flow denied by each condition with the reason the user can act on: named
  location, device OS, user risk, sign-in age (block), compliant device, MFA, no
  assignment; report-only allows and logs ``report``;
- sign-in with password + TOTP satisfies the MFA policy;
- continuous access: disabling the user, revoking the session, revoking the device and a
  policy change each cut a live flow within 5 seconds, logged with that reason;
- application discovery over quick access, and promoting a destination to a per-app app.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request

import pyotp
import pytest

from dataplane.basics.version import SOFTWARE

pytestmark = pytest.mark.timeout(120)

FAST = {"FERRYMAN_HEARTBEAT_INTERVAL": "0.5", "FERRYMAN_RECONNECT_MAX": "1"}
APP = "forward-1"


def _socks_env() -> tuple[dict[str, str], int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {**FAST, "FERRYMAN_SOCKS_LISTEN": f"127.0.0.1:{port}"}, port


def _session(fab) -> dict:
    with open(os.path.join(fab.workdir, "nodes", "client-1", "client", "session.json")) as fh:
        return json.load(fh)


def _attempt(xfer, socks: int, port: int, payload: bytes = b"ping") -> int:
    """One SOCKS CONNECT through the fabric; 0 and the echo checked when allowed, else the reply
    code (-1: opened, then reset — an access change reached the edge during the exchange)."""
    s, code = xfer.socks_connect(socks, "127.0.0.1", port)
    with s:
        if code == 0:
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                echoed = xfer.recv_all(s)
            except ConnectionResetError:
                return -1
            assert echoed == payload
    return code


def _profile_has(fab, xfer, app: str) -> None:
    """Wait until the client agent's forwarding profile (its cached copy) names ``app``."""
    path = os.path.join(fab.workdir, "nodes", "client-1", "client", "profile.json")

    def named() -> bool:
        try:
            with open(path) as fh:
                return app in {a["name"] for a in json.load(fh)["applications"]}
        except (OSError, ValueError):
            return False

    xfer.wait_for(named, 5.0, f"the client's profile to name {app!r}", interval=0.1)


def _unix(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _records(fab, **query: str) -> list[dict]:
    params = "&".join(f"{k}={v}" for k, v in query.items())
    return fab.admin("GET", f"/v1/traffic?limit=1000{'&' + params if params else ''}")


def _newest_after(fab, xfer, mark: int, what: str, at_open: bool = False, **match: object) -> dict:
    """The first traffic record with an id above ``mark`` whose fields equal ``match`` (waits for
    shipping); ``at_open``: refused when opened, not cut by the change while it was opening."""
    def find() -> dict | None:
        for record in reversed(_records(fab)):
            if record["id"] > mark and all(record.get(k) == v for k, v in match.items()) and not (
                    at_open and record["close_reason"].startswith("access revoked: ")):
                return record
        return None
    return xfer.wait_for(find, 8.0, what, interval=0.2)  # type: ignore[return-value]


def _mark(fab) -> int:
    rows = _records(fab)
    return rows[0]["id"] if rows else 0


def _denied(fab, xfer, socks: int, port: int, code: str, policy: str = "") -> dict:
    """Wait until a flow is refused by the edge with ``code`` (and ``policy``); return its deny record.

    Records of earlier attempts may still be on their way, so the record is matched on its
    reason and policy, not only on being new."""
    mark = _mark(fab)
    xfer.wait_for(lambda: _attempt(xfer, socks, port) > 0, 3.0, f"the flow to be refused ({code})")
    assert _attempt(xfer, socks, port) > 0  # refused at OPEN now (the first may have been cut while opening)
    match: dict[str, object] = {"action": "deny", "reason_code": code}
    if policy:
        match["policy"] = policy
    return _newest_after(fab, xfer, mark, f"a deny record with {code} {policy}", at_open=True, **match)


def _policy(fab, name: str, grant: str, state: str = "on", **conditions: object) -> None:
    fab.admin("POST", "/v1/policies", {"name": name, "state": state, "grant": grant, "applications": [APP],
                                       "conditions": conditions})


def _allowed_again(xfer, socks: int, port: int) -> None:
    xfer.wait_for(lambda: _attempt(xfer, socks, port) == 0, 3.0, "the flow to be allowed again")


def test_an_allowed_flow_and_its_traffic_record(backend, fabric, xfer):
    echo = backend("echo")
    env, socks = _socks_env()
    fab = fabric([echo], env=env, managed=True)
    session = _session(fab)
    mark = _mark(fab)
    payload = os.urandom(300_000)
    started = time.time()
    assert _attempt(xfer, socks, echo.port, payload) == 0
    assert _attempt(xfer, socks, echo.port, b"second flow, same tunnel") == 0
    first = _newest_after(fab, xfer, mark, "the first flow's record", bytes_sent=len(payload))
    second = _newest_after(fab, xfer, first["id"], "the second flow's record", bytes_sent=24)

    assert first["action"] == "allow" and first["reason_code"] == "" and first["close_reason"] == "closed"
    assert (first["upn"], first["user_id"]) == (fab.user, session["user_id"])
    assert first["device_id"] == session["device_id"] and first["device_os"] == os.uname().sysname
    assert first["device_os_version"] == platform.release()[:64] and first["client_version"] == SOFTWARE
    assert first["display_name"] == fab.admin("GET", f"/v1/users/{fab.user}")["display_name"]
    assert first["source_ip"] == "127.0.0.1" and 0 < first["source_port"] < 65536
    # the SOCKS5 app's own address on the device, as the client agent reported it
    assert first["local_source_ip"] == "127.0.0.1" and 0 < first["local_source_port"] < 65536
    assert (first["destination_ip"], first["destination_port"], first["destination_fqdn"]) == (
        "127.0.0.1", echo.port, "")
    assert (first["transport"], first["network"]) == ("tcp", "IPv4")
    assert (first["application"], first["application_kind"]) == (APP, "per_app")
    assert first["segment"] == f"127.0.0.1:{echo.port}/tcp"
    assert first["bytes_sent"] == len(payload) and first["bytes_received"] == len(payload)
    assert first["connector_name"] == "connector-1" and first["connector_address"] == "127.0.0.1"
    assert first["edge"] == "edge-1"
    (connector,) = [c for c in fab.admin("GET", "/v1/connectors") if c["name"] == "connector-1"]
    assert first["connector_id"] == connector["id"]  # the id the API lists: logs filter by it
    assert [r["id"] for r in fab.admin("GET", f"/v1/traffic?connector={connector['id']}&limit=1000")
            if r["id"] == first["id"]] == [first["id"]]
    assert len(first["connection_id"]) == 24 and first["connection_id"] != second["connection_id"]
    assert first["transaction_id"] == second["transaction_id"]  # same client tunnel
    start = first["start"]
    assert start <= first["end"] and first["duration_ms"] >= 0
    assert abs(time.mktime(time.strptime(start[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone - started) < 30
    # Filters and the JSON Lines export see the same record.
    assert [r["id"] for r in _records(fab, user=fab.user, app=APP, action="allow")][:2] == [second["id"], first["id"]]
    assert first["id"] in [r["id"] for r in _records(fab, user=fab.user, app=APP, action="allow", connector="connector-1")]
    # No flow of this test was refused. (A readiness probe of the client may have been, while the
    # edge's configuration did not yet name the device that had just signed in.)
    assert [r for r in _records(fab, action="deny", app=APP) if _unix(r["start"]) >= started] == []
    request = urllib.request.Request(f"{fab.control_url}/v1/traffic/export?app={APP}",
                                     headers={"Authorization": f"Bearer {fab.admin_key}"})
    with urllib.request.urlopen(request, timeout=10, context=fab.control_tls) as response:
        assert response.headers["Content-Type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.read().splitlines()]
    assert first in lines and second in lines


def test_each_condition_denies_with_its_reason_and_report_only_allows(backend, fabric, xfer):
    echo = backend("echo")
    env, socks = _socks_env()
    fab = fabric([echo], env=env, managed=True)
    port = echo.port
    assert _attempt(xfer, socks, port) == 0
    device = _session(fab)["device_id"]

    fab.admin("POST", "/v1/named-locations", {"name": "loopback", "cidrs": ["127.0.0.0/8"]})
    _policy(fab, "block-loopback", "block", locations=["loopback"])
    record = _denied(fab, xfer, socks, port, "blocked_by_policy", "block-loopback")
    assert record["close_reason"] == f"access to '{APP}' is blocked by policy 'block-loopback'"
    assert (record["policy"], record["rule"]) == ("block-loopback", "block")
    fab.admin("DELETE", "/v1/policies/block-loopback")
    _allowed_again(xfer, socks, port)

    _policy(fab, "block-this-os", "block", device_os=[os.uname().sysname])
    assert _denied(fab, xfer, socks, port, "blocked_by_policy", "block-this-os")["rule"] == "block"
    fab.admin("DELETE", "/v1/policies/block-this-os")
    _allowed_again(xfer, socks, port)

    fab.admin("PATCH", f"/v1/users/{fab.user}", {"risk_level": "high"})
    _policy(fab, "risky-users", "block", user_risk_at_least="medium")
    assert _denied(fab, xfer, socks, port, "blocked_by_policy", "risky-users")["rule"] == "block"
    fab.admin("PATCH", f"/v1/users/{fab.user}", {"risk_level": "none"})
    _allowed_again(xfer, socks, port)
    fab.admin("DELETE", "/v1/policies/risky-users")

    _policy(fab, "fresh-sign-in", "block", signin_older_than=1)
    assert _denied(fab, xfer, socks, port, "blocked_by_policy", "fresh-sign-in")["rule"] == "block"
    fab.admin("DELETE", "/v1/policies/fresh-sign-in")
    _allowed_again(xfer, socks, port)

    _policy(fab, "managed-devices", "require_compliant_device")
    record = _denied(fab, xfer, socks, port, "device_not_compliant", "managed-devices")
    assert record["close_reason"] == (f"a compliant device is required for app '{APP}' "
                                      f"(policy 'managed-devices')")
    fab.admin("PATCH", f"/v1/devices/{device}", {"compliant": True})  # what an MDM would do
    _allowed_again(xfer, socks, port)
    fab.admin("DELETE", "/v1/policies/managed-devices")

    mark = _mark(fab)
    _policy(fab, "would-block", "block", state="report_only")
    fab.wait_configured()  # the edge runs the policy; report-only must still allow
    assert _attempt(xfer, socks, port) == 0
    record = _newest_after(fab, xfer, mark, "a report record", action="report")
    assert (record["policy"], record["rule"], record["reason_code"]) == ("would-block", "block", "")
    fab.admin("DELETE", "/v1/policies/would-block")

    fab.admin("DELETE", f"/v1/applications/{APP}/assignments?user={fab.user}")
    record = _denied(fab, xfer, socks, port, "not_assigned")
    assert record["close_reason"] == f"{fab.user} is not assigned to application '{APP}'"
    assert record["upn"] == fab.user and record["application"] == APP


def test_mfa_policy_is_met_by_signing_in_with_totp(backend, fabric, xfer):
    echo = backend("echo")
    env, socks = _socks_env()
    fab = fabric([echo], env=env, managed=True)
    _policy(fab, "mfa", "require_mfa")
    record = _denied(fab, xfer, socks, echo.port, "mfa_required", "mfa")
    assert record["close_reason"] == (f"MFA required for app '{APP}' (policy 'mfa'): sign in again with your "
                                      f"second factor")

    # The user enrols TOTP with the access token the client holds, then signs in again with a code.
    token = _session(fab)["access_token"]

    def auth(path: str, body: dict) -> dict:
        request = urllib.request.Request(fab.control_url + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Authorization": f"Bearer {token}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10, context=fab.control_tls) as response:
            return json.loads(response.read())

    secret = auth("/v1/auth/totp/enrol", {})["secret"]
    recovery = auth("/v1/auth/totp/confirm", {"code": pyotp.TOTP(secret).now()})["recovery_codes"]
    assert len(recovery) == 10
    fab.kill("client-1", 15)
    env_login = {**os.environ, "FERRYMAN_DATA_DIR": os.path.join(fab.workdir, "nodes", "client-1")}
    login = [sys.executable, "-m", "dataplane", "client", "login", "--control", fab.control_url, "--ca-hash",
             fab.ca_hash, "--user", fab.user, "--password-stdin"]
    refused = subprocess.run(login, env=env_login, input=fab.password + "\n", capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 1 and "a TOTP code is required" in refused.stderr
    assert "--totp CODE" in refused.stderr
    time.sleep(30 - time.time() % 30 + 0.5)  # the next TOTP step: a code is accepted once
    done = subprocess.run([*login, "--totp", pyotp.TOTP(secret).now()], env=env_login, input=fab.password + "\n",
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    fab.restart("client-1")
    assert _attempt(xfer, socks, echo.port) == 0
    mark = _mark(fab)
    assert _attempt(xfer, socks, echo.port) == 0
    record = _newest_after(fab, xfer, mark, "the allowed MFA flow", action="allow")
    assert (record["policy"], record["rule"]) == ("mfa", "require_mfa")


def _live_flow(xfer, socks: int, port: int) -> socket.socket:
    s, code = xfer.socks_connect(socks, "127.0.0.1", port)
    assert code == 0
    s.sendall(b"hello")
    assert s.recv(5) == b"hello"
    return s


def _cut_within(s: socket.socket, seconds: float) -> float:
    """Seconds until the live flow ``s`` is closed or reset (it must be within ``seconds``)."""
    start = time.monotonic()
    s.settimeout(seconds)
    try:
        while True:
            if not s.recv(65536):
                break
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the live flow was still open {seconds}s after access was withdrawn")
    return time.monotonic() - start


@pytest.mark.parametrize("withdraw", ["disable_user", "revoke_session", "revoke_device", "policy_block"])
def test_withdrawing_access_cuts_a_live_flow_within_five_seconds(backend, fabric, xfer, withdraw):
    echo = backend("echo")
    env, socks = _socks_env()
    fab = fabric([echo], env=env, managed=True)
    session = _session(fab)
    live = _live_flow(xfer, socks, echo.port)
    mark = _mark(fab)
    if withdraw == "disable_user":
        fab.admin("PATCH", f"/v1/users/{fab.user}", {"disabled": True})
        code = "user_disabled"
    elif withdraw == "revoke_session":
        fab.admin("POST", f"/v1/sessions/{session['session_id']}/revoke", {})
        code = "session_revoked"
    elif withdraw == "revoke_device":
        fab.admin("POST", f"/v1/devices/{session['device_id']}/revoke", {})
        code = "certificate_revoked"  # its certificate is revoked too: the whole tunnel goes
    else:
        _policy(fab, "lockdown", "block")
        code = "blocked_by_policy"
    with live:
        took = _cut_within(live, 5.0)
    assert took < 5.0
    record = _newest_after(fab, xfer, mark, "the cut flow's record", reason_code=code)
    if withdraw == "revoke_device":
        assert "revoked" in record["close_reason"] and session["device_id"] in record["close_reason"]
    else:
        assert record["close_reason"].startswith("access revoked: ")
    assert record["action"] == "allow" and record["bytes_sent"] == 5 and record["bytes_received"] == 5


def test_a_signed_in_client_leaves_an_edge_whose_certificate_is_revoked_and_does_not_return(backend, fabric, xfer):
    """The client learns revocations with its profile: the tunnel to an edge revoked since it came
    up is cut at once, and the edge is refused at the handshake afterwards (the revoked edge itself
    goes on holding the tunnel: only its peers can end it)."""
    echo = backend("echo")
    env, socks = _socks_env()
    fab = fabric([echo], env=env, managed=True)
    assert _attempt(xfer, socks, echo.port) == 0
    client = fab.metrics["client-1"]
    assert xfer.metric(xfer.scrape(client), "ferryman_tunnels") == 1
    revoked = fab.admin("POST", "/v1/revocations", {"node_type": "edge", "node_id": fab.node_id("edge-1"),
                                                     "reason": "test: edge key stolen"})
    serial = revoked[0]["serial"]
    xfer.wait_for(lambda: xfer.metric(xfer.scrape(client), "ferryman_tunnels") == 0, 5.0,
                  "the client's tunnel to the revoked edge to be cut")
    assert xfer.metric(xfer.scrape(client), "ferryman_tunnels_closed_total", reason="certificate_revoked") == 1
    refused = f"certificate {int(serial, 16):x} is revoked"
    xfer.wait_for(lambda: refused in _log(fab, "client-1"), 10.0, "a redial of the revoked edge to be refused")
    assert xfer.metric(xfer.scrape(client), "ferryman_tunnels") == 0
    assert _attempt(xfer, socks, echo.port) != 0  # fail closed: no edge, no private flow


def _log(fab, name: str) -> str:
    with open(fab.logs[name], encoding="utf-8", errors="replace") as fh:
        return fh.read()


def test_discovery_over_quick_access_and_promotion(backend, fabric, xfer):
    echo, other = backend("echo"), backend("echo")
    env, socks = _socks_env()
    fab = fabric([echo], env=env, managed=True)
    fab.admin("POST", "/v1/applications", {"name": "Quick Access", "kind": "quick_access",
                                           "segments": [{"destination": "127.0.0.0/8", "ports": "1-65535"}]})
    fab.admin("POST", "/v1/applications/Quick Access/assignments".replace(" ", "%20"), {"user": fab.user})
    _profile_has(fab, xfer, "Quick Access")  # until then the client dials 127.0.0.1 directly
    xfer.wait_for(lambda: _attempt(xfer, socks, other.port) == 0, 3.0, "a flow through quick access")
    assert _attempt(xfer, socks, other.port) == 0

    def found() -> dict | None:
        rows = [d for d in fab.admin("GET", "/v1/discovery") if d["port"] == other.port]
        return rows[0] if rows and rows[0]["flows"] >= 2 else None

    discovered = xfer.wait_for(found, 8.0, "the destination in the discovery report", interval=0.2)
    assert (discovered["destination"], discovered["protocol"], discovered["users"], discovered["devices"]) == (
        "127.0.0.1", "tcp", 1, 1)
    assert discovered["bytes"] == 2 * 2 * 4 and discovered["first_seen"] <= discovered["last_seen"]
    # The per-app application the echo forward uses is not quick access: not discovered.
    assert all(d["port"] != echo.port for d in fab.admin("GET", "/v1/discovery"))

    app = fab.admin("POST", "/v1/discovery/applications", {"name": "discovered-echo", "destination": "127.0.0.1",
                                                           "ports": str(other.port)})
    assert app["name"] == "discovered-echo" and app["kind"] == "per_app"
    fab.admin("POST", "/v1/applications/discovered-echo/assignments", {"user": fab.user})
    mark = _mark(fab)
    _profile_has(fab, xfer, "discovered-echo")
    fab.wait_configured()  # the edge runs the configuration with the assignment too
    assert _attempt(xfer, socks, other.port) == 0
    record = _newest_after(fab, xfer, mark, "a flow through the new per-app app", action="allow")
    assert (record["application"], record["application_kind"]) == ("discovered-echo", "per_app")


def test_the_client_refreshes_its_token_and_hands_it_to_the_edge(backend, fabric, xfer):
    echo = backend("echo")
    env, socks = _socks_env()
    fab = fabric([echo], env=env, managed=True)
    fab.kill("client-1", 15)
    path = os.path.join(fab.workdir, "nodes", "client-1", "client", "session.json")
    with open(path) as fh:
        before = json.load(fh)
    # As if most of the token's lifetime had passed: the client refreshes as soon as it starts.
    with open(path, "w") as fh:
        json.dump({**before, "access_expires": int(time.time()) + 30, "access_lifetime": 3600}, fh)
    fab.restart("client-1")
    xfer.wait_for(lambda: "access token refreshed" in open(fab.logs["client-1"]).read(), 10.0,
                  "the client's refresh")
    xfer.wait_for(lambda: "access token renewed" in open(fab.logs["edge-1"]).read(), 5.0,
                  "the edge to take the new token (AUTH)")
    with open(path) as fh:
        after = json.load(fh)
    assert after["refresh_token"] != before["refresh_token"]  # rotated
    assert after["access_token"] != before["access_token"] and after["access_expires"] > time.time() + 3000
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert _attempt(xfer, socks, echo.port) == 0
