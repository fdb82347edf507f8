"""End to end with the control plane: real processes, real certificates, real bytes.

Each test runs a managed fabric (``Fabric(managed=True)``): ``ferryman control`` on
SQLite, edge and connector(s) registered through it with one-time tokens, a client
certificate issued by its admin API, and edge and connectors running from its
configuration. Covered:

- an application added through the admin API reaches the running edge (and connector)
  within two seconds: a SOCKS5 CONNECT refused before is accepted after;
- heartbeats: nodes are shown active with their tunnels, flows and configuration
  version, and a killed connector turns inactive after three missed heartbeats;
- control plane down: flows keep working, an edge restarted meanwhile comes up from its
  cached configuration, and after the control plane returns a change reaches the edge;
- revocation: a revoked connector's tunnels are cut within five seconds and it cannot
  come back, while the other connector carries the traffic; a revoked client
  certificate and an expired one are refused by the edge.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import ssl
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dataplane.basics import pki, statefile
from dataplane.basics.pki import new_key_and_csr

pytestmark = pytest.mark.timeout(90)

FAST = {"FERRYMAN_HEARTBEAT_INTERVAL": "0.3", "FERRYMAN_RECONNECT_MAX": "1"}


def _socks_env() -> tuple[dict[str, str], int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {**FAST, "FERRYMAN_SOCKS_LISTEN": f"127.0.0.1:{port}"}, port


def _socks_code(xfer, socks_port: int, port: int) -> int:
    s, code = xfer.socks_connect(socks_port, "127.0.0.1", port)
    s.close()
    return code


def _tunnelled(xfer, fab, socks_port: int, port: int) -> bool:
    """A SOCKS CONNECT to 127.0.0.1:port that went through the edge (its flow count moved), not
    dialed directly by the client agent (a destination its forwarding profile does not cover)."""
    before = xfer.metric(xfer.scrape(fab.metrics["edge-1"]), "ferryman_flows_opened_total")
    if _socks_code(xfer, socks_port, port) != 0:
        return False
    return xfer.metric(xfer.scrape(fab.metrics["edge-1"]), "ferryman_flows_opened_total") > before


def _add_app(fab, name: str, port: int) -> int:
    app = fab.admin("POST", "/v1/applications", {"name": name, "segments": [
        {"destination": "127.0.0.1", "ports": str(port), "protocol": "tcp"}]})
    assert app["name"] == name
    fab.admin("POST", f"/v1/applications/{name}/assignments", {"user": fab.user})
    return fab.admin("GET", "/v1/config-version")["version"]


def _node(fab, kind: str, name: str) -> dict:
    (node,) = [n for n in fab.admin("GET", f"/v1/{kind}") if n["name"] == name]
    return node


def _echo_works(xfer, port: int, data: bytes) -> bool:
    try:
        return xfer.echo(port, data, timeout=5) == data
    except OSError:  # reset while the client reconnects to the restarted edge
        return False


def _log(fab, name: str) -> str:
    with open(fab.logs[name], encoding="utf-8", errors="replace") as fh:
        return fh.read()


def test_an_application_added_through_the_api_reaches_the_running_edge_within_two_seconds(backend, fabric, xfer):
    first, second = backend("echo"), backend("echo")
    env, socks = _socks_env()
    fab = fabric([first], env=env, managed=True)
    assert xfer.echo(fab.forward_ports[0], b"through the control plane's configuration") == \
        b"through the control plane's configuration"
    # Not an application yet: the client's profile does not cover it, so it goes direct, not to the edge.
    assert not _tunnelled(xfer, fab, socks, second.port)

    version = _add_app(fab, "second", second.port)
    changed = time.monotonic()
    xfer.wait_for(lambda: _tunnelled(xfer, fab, socks, second.port), 2.0, "the new application at the edge")
    took = time.monotonic() - changed
    assert took < 2.0, f"the change took {took:.2f}s to reach the client and the edge"
    s, code = xfer.socks_connect(socks, "127.0.0.1", second.port)
    with s:
        assert code == 0
        s.sendall(b"new app")
        s.shutdown(socket.SHUT_WR)
        assert xfer.recv_all(s) == b"new app"
    # Both nodes run the new version, say so in their metrics and in their heartbeats.
    for name in ("edge-1", "connector-1"):
        xfer.wait_metric(fab.metrics[name], "ferryman_config_version", version, timeout=2.0)
    xfer.wait_for(lambda: _node(fab, "connectors", "connector-1")["config_version"] == version, 3.0,
                  "the connector's heartbeat to report the new version")
    assert "configuration updated" in _log(fab, "connector-1")


def test_heartbeats_show_nodes_active_and_a_dead_connector_inactive(backend, fabric, xfer):
    echo = backend("echo")
    fab = fabric([echo], env=FAST, connectors=2, managed=True)
    version = fab.admin("GET", "/v1/config-version")["version"]

    def healthy() -> bool:
        connectors = [_node(fab, "connectors", f"connector-{i}") for i in (1, 2)]
        edge = _node(fab, "edges", "edge-1")
        return (all(c["status"] == "active" and c["tunnels"] == 2 and c["config_version"] == version
                    for c in connectors)
                and edge["status"] == "active" and edge["tunnels"] == 5 and edge["config_version"] == version)

    xfer.wait_for(healthy, 5.0, "both connectors and the edge to report 2, 2 and 5 tunnels")
    connector = _node(fab, "connectors", "connector-1")
    assert connector["external_addr"] == "127.0.0.1" and connector["internal_addr"] == "127.0.0.1"
    assert connector["version"].startswith("ferryman") or connector["version"]

    fab.kill("connector-2")
    killed = time.monotonic()
    xfer.wait_for(lambda: _node(fab, "connectors", "connector-2")["status"] == "inactive", 3.0,
                  "the killed connector to turn inactive")
    # Three intervals of 0.3 s without a heartbeat, then the next look at the list.
    assert time.monotonic() - killed >= 0.6
    assert _node(fab, "connectors", "connector-1")["status"] == "active"


def test_nodes_keep_forwarding_while_the_control_plane_is_down_and_catch_up_after(backend, fabric, xfer):
    first, second = backend("echo"), backend("echo")
    env, socks = _socks_env()
    fab = fabric([first], env=env, managed=True)
    fab.kill("control")
    payload = os.urandom(256 * 1024)
    assert xfer.echo(fab.forward_ports[0], payload) == payload

    # An edge restarted while the control plane is down runs from its cached configuration.
    fab.kill("edge-1", signal.SIGTERM)
    fab.restart("edge-1")
    assert "configuration loaded from the cache" in _log(fab, "edge-1")
    xfer.wait_for(lambda: _echo_works(xfer, fab.forward_ports[0], b"x" * 1000), 15.0,
                  "traffic through the restarted edge")

    fab.restart("control")
    _add_app(fab, "after-outage", second.port)
    changed = time.monotonic()
    xfer.wait_for(lambda: _tunnelled(xfer, fab, socks, second.port), 15.0, "the change after the outage")
    # The nodes retry at most RETRY_MAX (10 s) apart while the control plane is down.
    assert time.monotonic() - changed < 12.0
    assert "control plane reachable again" in _log(fab, "edge-1")


def test_a_revoked_connector_is_cut_within_five_seconds_and_stays_out(backend, fabric, xfer):
    echo = backend("echo")
    fab = fabric([echo], env=FAST, connectors=2, managed=True)
    xfer.wait_metric(fab.metrics["edge-1"], "ferryman_edge_connector_tunnels", 4)
    revoked = fab.admin("POST", "/v1/revocations", {"node_type": "connector", "node_id": fab.node_id("connector-1"),
                                                     "reason": "test: host compromised"})
    assert len(revoked) == 1 and revoked[0]["node_name"] == "connector-1"
    start = time.monotonic()
    xfer.wait_for(lambda: xfer.metric(xfer.scrape(fab.metrics["edge-1"]), "ferryman_edge_connector_tunnels") == 2,
                  5.0, "the revoked connector's tunnels to be cut")
    took = time.monotonic() - start
    assert took < 5.0
    time.sleep(1.5)  # the connector keeps redialing; the edge keeps refusing it
    samples = xfer.scrape(fab.metrics["edge-1"])
    assert xfer.metric(samples, "ferryman_edge_connector_tunnels") == 2
    assert xfer.metric(samples, "ferryman_tunnels_closed_total", reason="certificate_revoked") >= 3
    assert "certificate_revoked" in _log(fab, "edge-1")
    for _ in range(5):  # every flow now goes to connector-2
        assert xfer.echo(fab.forward_ports[0], b"still served") == b"still served"
    assert xfer.metric(xfer.scrape(fab.metrics["connector-1"]), "ferryman_tunnels") == 0


def _expired_client(fab, directory: str) -> tuple[str, str]:
    ca_cert, ca_key = pki.load_ca(os.path.join(fab.workdir, "control", "ca"))
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "client"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, "expired-client")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=30)).not_valid_after(now - datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = os.path.join(directory, "expired.pem"), os.path.join(directory, "expired.key")
    statefile.write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    statefile.write_file(key_path, pki.key_pem(key), 0o600)
    return cert_path, key_path


def _tls_to_edge(fab, cert: str, key: str) -> str:
    """Dial the edge with this client certificate; what happened ("open" or the error)."""
    # Built by hand: pki.client_context refuses to load an expired certificate at all.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(os.path.join(fab.workdir, "control", "ca", pki.CA_CERT))
    ctx.load_cert_chain(cert, key)
    try:
        with socket.create_connection(("127.0.0.1", fab.edge_port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.settimeout(5)
            data = tls.recv(1)  # TLS 1.3: a refused client certificate shows up at the first read
            return "open" if data else "closed"
    except (ssl.SSLError, OSError) as exc:
        return f"error: {exc}"


def test_revoked_and_expired_client_certificates_are_refused(backend, fabric, xfer, tmp_path):
    echo = backend("echo")
    fab = fabric([echo], env=FAST, managed=True)
    # A client certificate issued through the admin API works...
    key_pem, csr_pem = new_key_and_csr("laptop-7")
    issued = fab.admin("POST", "/v1/client-certificates", {"name": "laptop-7", "csr_pem": csr_pem.decode()})
    cert_path, key_path = str(tmp_path / "laptop-7.pem"), str(tmp_path / "laptop-7.key")
    statefile.write_file(cert_path, issued["certificate_pem"].encode(), 0o644)
    statefile.write_file(key_path, key_pem, 0o600)
    assert _tls_to_edge(fab, cert_path, key_path) == "open"
    # ...until it is revoked: then the edge closes the tunnel right after the handshake.
    fab.admin("POST", "/v1/revocations", {"serial": issued["serial"], "reason": "laptop lost"})
    xfer.wait_for(lambda: _tls_to_edge(fab, cert_path, key_path) != "open", 3.0, "the revoked client to be refused")
    assert "is revoked" in _log(fab, "edge-1")

    expired_cert, expired_key = _expired_client(fab, str(tmp_path))
    outcome = _tls_to_edge(fab, expired_cert, expired_key)
    assert outcome != "open", outcome
    xfer.wait_for(lambda: "certificate has expired" in _log(fab, "edge-1"), 3.0,
                  "the edge to log the expired certificate")
