"""``ferryman client status`` and ``ferryman client logout`` against a running managed fabric.

- status (human and ``--json``) names the signed-in user, the device, the tunnel (edge,
  transport, RTT), the profile version and fail mode and the forward's readiness; with no
  agent running it exits 3 and says so;
- logout ends the session at the control plane (revoked there), removes the session and the
  cached profile from the device, and the running agent's next flow is refused by the edge
  (its token's session is revoked); a second logout says there is no session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(90)


def _client(fab, *args: str) -> subprocess.CompletedProcess[str]:
    directory = os.path.join(fab.workdir, "nodes", "client-1", "client")
    return subprocess.run([sys.executable, "-m", "dataplane", "client", *args, "--dir", directory],
                          capture_output=True, text=True, timeout=60)


def test_status_then_logout(backend, fabric, xfer):
    echo = backend("echo")
    fab = fabric([echo], managed=True)
    session = json.load(open(os.path.join(fab.workdir, "nodes", "client-1", "client", "session.json")))

    def running() -> dict | None:
        done = _client(fab, "status", "--json")
        report = json.loads(done.stdout)
        status = report["status"]
        return report if done.returncode == 0 and status and status["profile"]["version"] is not None \
            and status["tunnel"]["rtt_ms"] is not None else None

    report = xfer.wait_for(running, 25.0, "the agent to report a profile and an RTT", interval=0.5)
    status = report["status"]
    assert report["running"] and report["problem"] == ""
    assert (status["user"], status["device"]) == (fab.user, session["device_id"])
    assert status["tunnel"]["state"] == "up" and status["tunnel"]["edge"] == "edge-1"
    assert status["tunnel"]["transport"] == "tcp" and status["tunnel"]["rtt_ms"] >= 0
    assert status["profile"]["fail_mode"] == "closed" and status["profile"]["applications"] == 1
    assert status["forwards"] == [{"forward": f"127.0.0.1:{fab.forward_ports[0]}=127.0.0.1:{echo.port}",
                                   "ready": True, "reason": ""}]
    human = _client(fab, "status")
    assert human.returncode == 0
    assert f"user      {fab.user}" in human.stdout and "tunnel    up to edge-1" in human.stdout
    assert "fail closed" in human.stdout and "ready" in human.stdout
    assert xfer.echo(fab.forward_ports[0], b"before logout") == b"before logout"

    done = _client(fab, "logout")
    assert done.returncode == 0, done.stderr
    assert f"signed out {fab.user}: the control plane ended the session" in done.stdout
    directory = os.path.join(fab.workdir, "nodes", "client-1", "client")
    assert not os.path.exists(os.path.join(directory, "session.json"))
    assert not os.path.exists(os.path.join(directory, "profile.json"))
    rows = fab.admin("GET", f"/v1/users/{session['user_id']}/sessions")
    (ended,) = [r for r in rows if r["id"] == session["session_id"]]
    assert ended["revoked_at"] is not None and ended["status"] == "revoked"

    # The agent still runs with the old token; the edge refuses its new flows once the
    # revocation reaches it (continuous access).
    def refused() -> bool:
        try:
            return xfer.echo(fab.forward_ports[0], b"after logout", timeout=5) != b"after logout"
        except OSError:
            return True

    xfer.wait_for(refused, 10.0, "the edge to refuse the signed-out session's flows", interval=0.3)
    assert "session" in fab.log_tail("edge-1", 40)

    again = _client(fab, "logout")
    assert again.returncode == 1 and "not signed in" in again.stderr


def test_status_without_a_running_agent(tmp_path):
    done = subprocess.run([sys.executable, "-m", "dataplane", "client", "status", "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 3
    assert f"the client agent is not running (no {tmp_path}/status.json)" in done.stderr
    (tmp_path / "status.json").write_text(json.dumps({"pid": 2 ** 22 + 12345, "updated": 0}))
    done = subprocess.run([sys.executable, "-m", "dataplane", "client", "status", "--json", "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=30)
    report = json.loads(done.stdout)
    assert done.returncode == 3 and not report["running"] and "is not running" in report["problem"]
