"""The trust boundary end to end: what nodes and clients say about themselves decides nothing.

Real processes (control plane, edge, connectors, an echo backend) through a managed fabric.
Where a test must say things a well-behaved client agent never says (an expired token, a
refused one, a hostile process name) it plays the client itself: a tunnel built from the
project's own transport, presenting the signed-in device's certificate and access tokens
signed with the control plane's own key. Covered:

- a connector serves the group the control plane registered it into: one whose HELLO names
  another group is refused (GOAWAY ``group_mismatch``), one the control plane does not know
  serves no group, and neither carries another group's flows;
- live flows are decided again with the principal of the tunnel's current token: a
  refreshed token keeps them through a configuration change after the first token
  expired, a refused token cuts them at once with the reason;
- clients are not told the connector's own address (OPEN_OK ``bound``), and the process a
  client reports is recorded as reported, bounded and made printable;
- an edge registered with the control plane refuses to start from an application file.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from control.ca import CertificateAuthority
from control.tokens import TokenSigner
from dataplane.basics import pki
from dataplane.basics.metrics import Stats
from dataplane.transport.tunnel import Tunnel, TunnelHandler
from dataplane.wire import events as ev
from dataplane.wire.connection import WireConfig
from dataplane.wire.frames import Open

pytestmark = pytest.mark.timeout(150)

FAST = {"FERRYMAN_HEARTBEAT_INTERVAL": "0.5", "FERRYMAN_RECONNECT_MAX": "1", "FERRYMAN_RECONNECT_MIN": "0.2"}


# ---------------------------------------------------------------------------- a client played by the test


class ProbeClient(TunnelHandler):
    """The client side of one tunnel: opens flows, records answers, echoes and resets."""

    def __init__(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        self.stats = Stats("client", name)
        self.up: asyncio.Future[Tunnel] = loop.create_future()
        self.answers: dict[int, asyncio.Future[tuple[str, str]]] = {}
        self.resets: dict[int, asyncio.Future[tuple[str, str]]] = {}
        self.received: dict[int, bytearray] = {}
        self.changed = asyncio.Event()

    def tunnel_up(self, tunnel: Tunnel) -> None:
        if not self.up.done():
            self.up.set_result(tunnel)

    def tunnel_down(self, tunnel: Tunnel) -> None:
        self.changed.set()

    def flow_accepted(self, tunnel: Tunnel, event: ev.FlowAccepted) -> None:
        self.answers[event.flow_id].set_result(("ok", event.bound))

    def flow_rejected(self, tunnel: Tunnel, event: ev.FlowRejected) -> None:
        self.answers[event.flow_id].set_result((event.code, event.reason))

    def flow_reset(self, tunnel: Tunnel, event: ev.FlowReset) -> None:
        self.resets[event.flow_id].set_result((event.code, event.reason))
        self.changed.set()

    def data_received(self, tunnel: Tunnel, event: ev.DataReceived) -> None:
        self.received[event.flow_id] += event.data
        tunnel.acknowledge(event.flow_id, len(event.data))
        self.changed.set()

    async def open(self, tunnel: Tunnel, request: Open) -> tuple[int, tuple[str, str]]:
        fid = tunnel.open_flow(request)
        loop = asyncio.get_running_loop()
        self.answers[fid], self.resets[fid], self.received[fid] = loop.create_future(), loop.create_future(), bytearray()
        return fid, await asyncio.wait_for(self.answers[fid], 10)

    async def echo(self, tunnel: Tunnel, fid: int, data: bytes) -> bytes:
        """Send ``data`` on flow ``fid`` and wait for as many bytes back (fewer if the flow is reset)."""
        start = len(self.received[fid])
        if not tunnel.has_flow(fid):
            return b""
        assert tunnel.send_data(fid, data) == len(data)
        async with asyncio.timeout(10):
            while len(self.received[fid]) < start + len(data) and not self.resets[fid].done():
                self.changed.clear()
                await self.changed.wait()
        return bytes(self.received[fid][start:])


class Device:
    """The fabric's signed-in client device: its certificate, its session, and tokens minted for it."""

    def __init__(self, fab) -> None:
        directory = os.path.join(fab.workdir, "nodes", "client-1", "client")
        with open(os.path.join(directory, "session.json")) as fh:
            self.session = json.load(fh)
        self.cert = os.path.join(directory, self.session["cert"])
        self.key = os.path.join(directory, self.session["key"])
        self.ca = os.path.join(directory, self.session["ca"])
        self.signer = TokenSigner.open(os.path.join(fab.workdir, "control"))
        self.edge = (fab.edge_host, fab.edge_port)

    def token(self, *, expires_in: float = 3600, device: str | None = None) -> str:
        """An access token of the signed-in session that expires ``expires_in`` seconds from now."""
        s = self.session
        token, _ = self.signer.issue(user_id=s["user_id"], upn=s["upn"], groups=[], amr=["pwd"],
                                     auth_time=_utc(time.time() - 60), session_id=s["session_id"],
                                     device_id=device or s["device_id"],
                                     now=time.time() + expires_in - self.signer.lifetime)
        return token

    async def connect(self, client: ProbeClient, token: str) -> Tunnel:
        wire = WireConfig(role="client", node=self.session["device_id"], token=token)
        await asyncio.get_running_loop().create_connection(
            lambda: Tunnel(client, wire, dialer=True, accept_roles=("edge",), keepalive=10, handshake_timeout=10,
                           write_buffer_high=1 << 20, label="probe"),
            self.edge[0], self.edge[1], ssl=pki.client_context(self.cert, self.key, self.ca),
            server_hostname=self.edge[0])
        return await asyncio.wait_for(client.up, 10)


def _utc(seconds: float):
    import datetime

    return datetime.datetime.fromtimestamp(seconds, datetime.UTC)


def _edge_version(fab) -> int:
    return int(_metric(fab, "edge-1", "ferryman_config_version"))


def _metric(fab, node: str, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://{fab.metrics[node]}/metrics", timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the metrics of {node}")


def _config_change(fab, xfer, label: str) -> None:
    """A configuration change the edge has taken (a new private DNS suffix)."""
    fab.admin("POST", "/v1/dns-suffixes", {"suffix": f"{label}.example"})
    version = fab.admin("GET", "/v1/config-version")["version"]
    xfer.wait_for(lambda: _edge_version(fab) >= version, 5.0, f"the edge to take configuration version {version}")


# ---------------------------------------------------------------------------- continuous access follows the token


def test_live_flows_follow_the_refreshed_token_and_a_refused_one_cuts_them(backend, fabric, xfer):
    echo = backend("echo")
    fab = fabric([echo], env=FAST, managed=True)
    device = Device(fab)

    async def scenario() -> dict[str, object]:
        client = ProbeClient("probe")
        # A token that edges accept for 10 more seconds only (its expiry plus their clock leeway).
        tunnel = await device.connect(client, device.token(expires_in=-50))
        fid, answer = await client.open(tunnel, Open(host="127.0.0.1", port=echo.port))
        assert answer[0] == "ok", answer
        assert await client.echo(tunnel, fid, b"first") == b"first"
        started = time.monotonic()
        tunnel.send_auth(device.token())  # the client refreshed its token
        await asyncio.sleep(max(0.0, 11.0 - (time.monotonic() - started)))
        # The first token is now past what any edge accepts; a configuration change decides the flow again.
        await asyncio.to_thread(_config_change, fab, xfer, "refreshed")
        await asyncio.sleep(0.5)
        out: dict[str, object] = {"after_change": await client.echo(tunnel, fid, b"second"),
                                  "reset_after_change": client.resets[fid].result() if client.resets[fid].done()
                                  else None}
        # A refreshed token the edge refuses (issued to another device): the live flow is cut at once.
        tunnel.send_auth(device.token(device="not-this-device"))
        out["cut"] = await asyncio.wait_for(client.resets[fid], 5)
        _, out["new_open"] = await client.open(tunnel, Open(host="127.0.0.1", port=echo.port))
        tunnel.close("shutdown", "test over")
        return out

    out = xfer.run_async(scenario, 60)
    assert out["reset_after_change"] is None and out["after_change"] == b"second", out
    code, reason = out["cut"]  # type: ignore[misc]
    assert code == "sign_in_required"
    assert reason == ("access revoked: sign-in required: the access token was issued to device 'not-this-device', "
                      f"not to this device ({device.session['device_id']})")
    assert out["new_open"][0] == "sign_in_required"  # type: ignore[index]
    log = Path(fab.logs["edge-1"]).read_text()
    assert "refreshed access token refused; its live flows are cut" in log


# ---------------------------------------------------------------------------- least knowledge


def test_clients_learn_nothing_of_the_connector_and_the_reported_process_is_bounded(backend, fabric, xfer):
    echo = backend("echo")
    fab = fabric([echo], env=FAST, managed=True)
    device = Device(fab)
    hostile = "evil\nprocess\x1b[31m" + "x" * 238  # 255 characters, the most a frame field carries

    async def scenario() -> tuple[str, str, bytes]:
        client = ProbeClient("probe")
        tunnel = await device.connect(client, device.token())
        fid, (status, bound) = await client.open(tunnel, Open(host="127.0.0.1", port=echo.port, process=hostile))
        data = await client.echo(tunnel, fid, b"ping")
        tunnel.send_fin(fid)
        await asyncio.sleep(0.3)
        tunnel.close("shutdown", "test over")
        return status, bound, data

    status, bound, data = xfer.run_async(scenario, 30)
    assert (status, data) == ("ok", b"ping")
    assert bound == ""  # the connector's own source address stays with the edge

    def record() -> dict | None:
        rows = [r for r in fab.admin("GET", "/v1/traffic?limit=100") if r["destination_port"] == echo.port
                and r["process"].startswith("evil")]
        return rows[0] if rows else None

    found = xfer.wait_for(record, 10.0, "the flow's traffic record", interval=0.2)
    assert found["process"] == ("evil?process?[31m" + "x" * 238)[:128]


# ---------------------------------------------------------------------------- who serves which connector group


def _register_connector(fab, name: str, group: str) -> dict[str, str]:
    """A connector registered into ``group``; returns the environment it runs with."""
    env = {**os.environ, **fab.env, "FERRYMAN_DATA_DIR": os.path.join(fab.workdir, "nodes", name)}
    token = fab.admin("POST", "/v1/registration-tokens", {"role": "connector", "group": group})["token"]
    done = subprocess.run([sys.executable, "-m", "dataplane", "connector", "register", "--control", fab.control_url,
                           "--token", token, "--name", name], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return env


def _stranger(fab, name: str) -> dict[str, str]:
    """A connector certificate of the control plane's CA that no registration recorded."""
    directory = os.path.join(fab.workdir, "nodes", name)
    ca = CertificateAuthority.open(os.path.join(fab.workdir, "control", "ca"))
    key_pem, csr_pem = pki.new_key_and_csr(name)
    issued = ca.sign_csr(csr_pem, role="connector", name=name)
    files = pki.write_node_files(directory, name, key_pem, issued.cert_pem, ca.bundle())
    return {**os.environ, **fab.env, "FERRYMAN_DATA_DIR": directory, "FERRYMAN_TLS_CA": files.ca,
            "FERRYMAN_TLS_CERT": files.cert, "FERRYMAN_TLS_KEY": files.key}


def _run_connector(fab, name: str, env: dict[str, str], procs: list, **extra: str) -> Path:
    log = Path(fab.workdir) / "logs" / f"{name}.log"
    with open(log, "ab") as out:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "dataplane", "connector", "--edges", f"{fab.edge_host}:{fab.edge_port}"],
            env={**env, **extra}, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    return log


def _socks_code(xfer, socks: int, port: int) -> int:
    s, code = xfer.socks_connect(socks, "127.0.0.1", port)
    with s:
        if code == 0:
            s.sendall(b"ping")
            s.shutdown(socket.SHUT_WR)
            assert xfer.recv_all(s) == b"ping"
    return code


def test_a_connector_cannot_serve_a_group_it_was_not_registered_into(backend, fabric, xfer):
    echo, lab_echo = backend("echo"), backend("echo")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        socks = probe.getsockname()[1]
    fab = fabric([echo], env={**FAST, "FERRYMAN_SOCKS_LISTEN": f"127.0.0.1:{socks}"}, managed=True)
    fab.admin("POST", "/v1/connector-groups", {"name": "lab"})
    fab.admin("POST", "/v1/applications", {"name": "lab-app", "connector_group": "lab", "segments": [
        {"destination": "127.0.0.1", "ports": str(lab_echo.port)}]})
    fab.admin("POST", "/v1/applications/lab-app/assignments", {"user": fab.user})
    edge_log = Path(fab.logs["edge-1"])
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # Registered into lab and saying so: it serves lab's application.
        lab_env = _register_connector(fab, "lab-1", "lab")
        _run_connector(fab, "lab-1", lab_env, procs)
        xfer.wait_for(lambda: _socks_code(xfer, socks, lab_echo.port) == 0, 10.0, "a flow through lab-1")

        # The same connector naming the default group in its HELLO is refused, and says why.
        procs.pop().terminate()
        log = _run_connector(fab, "lab-1", lab_env, procs, FERRYMAN_CONNECTOR_GROUP="default")
        xfer.wait_for(lambda: "group_mismatch" in log.read_text(), 10.0, "lab-1 to be refused")
        assert ("connector 'lab-1' names group 'default' in its HELLO, but serves group 'lab' according to the "
                "control plane's configuration") in log.read_text()
        assert "connector refused: its HELLO names another group than its own" in edge_log.read_text()
        # A connector certificate the control plane never registered serves no group at all.
        stranger = _run_connector(fab, "stranger-1", _stranger(fab, "stranger-1"), procs,
                                  FERRYMAN_CONNECTOR_GROUP="default")
        xfer.wait_for(lambda: "connector 'stranger-1'" in edge_log.read_text(), 10.0, "the stranger's tunnel")
        assert "is not in the control plane's configuration" in edge_log.read_text()

        # Without the default group's own connector, neither of them carries its flows.
        fab.kill("connector-1")
        xfer.wait_for(lambda: _socks_code(xfer, socks, echo.port) != 0, 5.0, "connector-1's flows to stop")
        for _ in range(5):
            assert _socks_code(xfer, socks, echo.port) != 0
        assert "no connector of group 'default' is connected" in edge_log.read_text()
        assert "group_mismatch" in log.read_text() and stranger.exists()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


def _echo_ok(xfer, port: int) -> bool:
    try:
        return xfer.echo(port, b"ping", timeout=10) == b"ping"
    except OSError:
        return False


def test_an_edge_without_control_plane_takes_connector_groups_from_its_application_file(backend, fabric, xfer):
    """The static rule: with a ``connectors`` list in the application file, the file decides; a
    connector naming another group is refused and an unlisted one serves nothing."""
    echo = backend("echo")
    fab = fabric([echo], env=FAST, connectors=3)
    assert _echo_ok(xfer, fab.forward_ports[0])
    apps_path = Path(fab.workdir) / "apps.json"
    apps = json.loads(apps_path.read_text())
    # connector-1 now belongs to lab (its HELLO still says default), connector-2 to default, connector-3 unlisted.
    apps["connectors"] = [{"name": "connector-1", "group": "lab"}, {"name": "connector-2", "group": "default"}]
    apps_path.write_text(json.dumps(apps))
    fab.kill("edge-1")
    fab.restart("edge-1")
    edge_log = Path(fab.logs["edge-1"])
    xfer.wait_for(lambda: "connector 'connector-3' (certificate" in edge_log.read_text(), 10.0,
                  "connector-3 to come back, serving no group")
    xfer.wait_for(lambda: "group_mismatch" in Path(fab.logs["connector-1"]).read_text(), 10.0,
                  "connector-1 to be refused")
    assert ("connector 'connector-1' names group 'default' in its HELLO, but serves group 'lab' according to the "
            f"application file {apps_path}") in Path(fab.logs["connector-1"]).read_text()
    xfer.wait_for(lambda: _echo_ok(xfer, fab.forward_ports[0]), 10.0, "a flow through connector-2")
    fab.kill("connector-2")
    xfer.wait_for(lambda: not _echo_ok(xfer, fab.forward_ports[0]), 5.0, "connector-2's flows to stop")
    for _ in range(5):  # connector-1 (refused) and connector-3 (unlisted) carry none of default's flows
        assert not _echo_ok(xfer, fab.forward_ports[0])
    assert "no connector of group 'default' is connected" in edge_log.read_text()
    assert "the application file lists no connectors" in edge_log.read_text()  # the first start, without the list


# ---------------------------------------------------------------------------- an apps file on a registered edge


def test_an_application_file_on_a_registered_edge_is_refused(tmp_path):
    from controlplane import Control

    with Control.running(tmp_path / "control") as control:
        data = tmp_path / "edge"
        control.register_node(data / "identity", "edge", "edge-1", [f"127.0.0.1:{control_free_port()}"])
        apps = tmp_path / "apps.json"
        apps.write_text(json.dumps({"apps": [{"name": "echo", "segments": [
            {"destination": "127.0.0.1", "ports": "7"}]}]}))
        env = {k: v for k, v in os.environ.items() if not k.startswith("FERRYMAN_")}
        env["FERRYMAN_DATA_DIR"] = str(data)
        try:
            done = subprocess.run([sys.executable, "-m", "dataplane", "edge", "--listen",
                                   f"127.0.0.1:{control_free_port()}", "--apps", str(apps)],
                                  env=env, capture_output=True, text=True, timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("the edge started from an application file although it is registered with a control plane")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "ferryman edge: FERRYMAN_APPS_FILE (--apps) cannot be used by an edge registered with the control plane: "
        "its applications, assignments and conditional-access policies all come from the control plane, and an "
        "application file would bypass them. Load the file there (`ferryman admin apply FILE`) and unset "
        "FERRYMAN_APPS_FILE, or run the edge without a control plane (FERRYMAN_TLS_CA, FERRYMAN_TLS_CERT and "
        "FERRYMAN_TLS_KEY from `ferryman pki init`)")


def control_free_port() -> int:
    from controlplane import free_port

    return free_port()
