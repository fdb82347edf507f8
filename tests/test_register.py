"""Node registration from the node's side: ``python -m dataplane connector|edge register`` as a
real subprocess against the real control plane (``python -m dataplane control``, SQLite in
``tmp_path``), with tokens made through the admin API.

Covered: a connector's identity files (key 0600, certificate role/name, chain to the control
plane's CA, ``node.json``, the printed ``FERRYMAN_*`` values); a used, expired or unknown
token and an unreachable control plane (exit 1, the reason on stderr, no traceback, nothing
written or overwritten); an edge's certificate carrying its ``--address`` host; refusals found
before the token is spent (bad name, another role's identity in the directory); a token of
the other role. End to end: an edge and a connector registered through the control plane
and started with nothing but ``FERRYMAN_DATA_DIR`` (they pick up their registered identities),
plus a client agent signed in with ``ferryman client login``, carry bytes to an echo backend
of an application created through the admin API.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from control.ca import CertificateAuthority
from dataplane.basics import pki
from dataplane.basics.pki import new_key_and_csr, write_node_files

from controlplane import PUBLIC_EDGE, ROOT, Control
from controlplane import environment as _environment
from controlplane import free_port as _free_port
from controlplane import stop as _stop

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------------------- helpers


def _start_control(data_dir: Path, edges: list[str]) -> Control:
    return Control.launch(data_dir, edges=edges)


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Control]:
    ctl = _start_control(tmp_path_factory.mktemp("control"), [PUBLIC_EDGE])
    try:
        yield ctl
    finally:
        _stop(ctl.proc)


def _register(role: str, url: str, token: str, *args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = _environment(data_dir)
    result = subprocess.run([sys.executable, "-m", "dataplane", role, "register", "--control", url, "--token", token,
                             *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def _variables(stdout: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in stdout.splitlines() if line and not line.startswith("#"))


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _subject(cert: x509.Certificate) -> tuple[str, str]:
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    return str(ou), str(cn)


# ---------------------------------------------------------------------------- connector


def test_connector_register_writes_identity_and_a_used_token_overwrites_nothing(control: Control,
                                                                                tmp_path: Path) -> None:
    token = control.token("connector")
    directory = tmp_path / "identity"
    done = _register("connector", control.url, token, "--dir", str(directory), "--name", "connector-a",
                     data_dir=tmp_path)
    assert done.returncode == 0, done.stderr

    key, cert_path, ca_path, node_file = (directory / "connector-a.key", directory / "connector-a.pem",
                                          directory / "ca.pem", directory / "node.json")
    assert sorted(p.name for p in directory.iterdir()) == ["ca.pem", "connector-a.key", "connector-a.pem",
                                                            "control-ca.pem", "node.json"]
    assert (directory / "control-ca.pem").read_bytes() == control.ca_pem  # pinned by the token's CA hash
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(node_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    cert = _load_cert(cert_path)
    assert _subject(cert) == ("connector", "connector-a")
    assert ca_path.read_bytes() == control.ca_pem
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(control.ca_pem))
    # what the node's TLS layer checks: key matches, chains to the CA, not expired
    pki.client_context(str(cert_path), str(key), str(ca_path))

    record = json.loads(node_file.read_text())
    assert record["role"] == "connector" and record["name"] == "connector-a"
    assert record["group"] == "default"
    assert record["control"] == control.url
    assert record["edges"] == [PUBLIC_EDGE]
    assert record["serial"] == format(cert.serial_number, "x")
    assert (record["ca"], record["cert"], record["key"]) == ("ca.pem", "connector-a.pem", "connector-a.key")
    assert record["control_ca"] == "control-ca.pem"
    assert record["node_id"]

    assert _variables(done.stdout) == {
        "FERRYMAN_TLS_CA": str(ca_path), "FERRYMAN_TLS_CERT": str(cert_path), "FERRYMAN_TLS_KEY": str(key),
        "FERRYMAN_EDGES": PUBLIC_EDGE, "FERRYMAN_CONNECTOR_GROUP": "default",
    }
    assert f"node id {record['node_id']}" in done.stdout

    # The same token again, into the same directory: refused, nothing replaced.
    before = _snapshot(directory)
    again = _register("connector", control.url, token, "--dir", str(directory), "--name", "connector-a",
                      data_dir=tmp_path)
    assert again.returncode == 1
    assert "used" in again.stderr
    assert "registration token was already used" in again.stderr  # the control plane's own message
    assert again.stdout == ""
    assert _snapshot(directory) == before


def test_expired_token_is_refused_and_nothing_is_written(control: Control, tmp_path: Path) -> None:
    token = control.token("connector", ttl_seconds=1)
    time.sleep(1.5)
    directory = tmp_path / "identity"
    done = _register("connector", control.url, token, "--dir", str(directory), "--name", "connector-late",
                     data_dir=tmp_path)
    assert done.returncode == 1
    assert "expired" in done.stderr
    assert not directory.exists()


def test_unknown_token_is_refused(control: Control, tmp_path: Path) -> None:
    directory = tmp_path / "identity"
    done = _register("connector", control.url, "fmr_not-a-real-token", "--ca-hash", control.ca_hash, "--dir",
                     str(directory), "--name", "c-x", data_dir=tmp_path)
    assert done.returncode == 1
    assert "registration token is not known" in done.stderr
    assert not directory.exists()


def test_unreachable_control_plane(tmp_path: Path) -> None:
    url = f"https://127.0.0.1:{_free_port()}"
    directory = tmp_path / "identity"
    done = _register("connector", url, "fmr_whatever." + "0" * 64, "--dir", str(directory), "--name", "connector-a",
                     data_dir=tmp_path)
    assert done.returncode == 1
    assert f"cannot reach the control plane at {url}: " in done.stderr
    assert not directory.exists()


def test_local_errors_spend_no_token(control: Control, tmp_path: Path) -> None:
    """A bad name, a bad URL, or a directory holding another role's identity stop before
    anything is sent: the token still works afterwards."""
    token = control.token("connector")
    bad_name = _register("connector", control.url, token, "--dir", str(tmp_path / "a"), "--name", "no spaces",
                         data_dir=tmp_path)
    assert bad_name.returncode == 2 and "node name 'no spaces' is not usable" in bad_name.stderr
    bad_url = _register("connector", "control.example:8080", token, "--dir", str(tmp_path / "a"), "--name", "c-1",
                        data_dir=tmp_path)
    assert bad_url.returncode == 2 and "expected https://HOST[:PORT]" in bad_url.stderr
    assert not (tmp_path / "a").exists()

    taken = tmp_path / "taken"
    key_pem, csr_pem = new_key_and_csr("edge-z")
    ca = CertificateAuthority.open(str(control.data_dir / "ca"))
    issued = ca.sign_csr(csr_pem, role="edge", name="edge-z", hosts=["127.0.0.1"])
    write_node_files(str(taken), "edge-z", key_pem, issued.cert_pem, ca.bundle())
    (taken / "node.json").write_text(json.dumps({"node_id": "e1", "role": "edge", "name": "edge-z", "control": "x",
                                                 "cert": "edge-z.pem", "key": "edge-z.key"}))
    other_role = _register("connector", control.url, token, "--dir", str(taken), "--name", "connector-b",
                           data_dir=tmp_path)
    assert other_role.returncode == 2
    assert "holds the identity of edge 'edge-z'" in other_role.stderr
    assert not (taken / "connector-b.key").exists()

    done = _register("connector", control.url, token, "--dir", str(tmp_path / "b"), "--name", "connector-b",
                     data_dir=tmp_path)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------- edge


def test_edge_register_puts_its_address_in_the_certificate(control: Control, tmp_path: Path) -> None:
    directory = tmp_path / "identity"
    missing = _register("edge", control.url, control.token("edge"), "--dir", str(directory), "--name", "edge-a",
                        data_dir=tmp_path)
    assert missing.returncode == 2 and "--address" in missing.stderr

    token = control.token("edge")
    done = _register("edge", control.url, token, "--dir", str(directory), "--name", "edge-a",
                     "--address", "edge-a.example.test:9443", data_dir=tmp_path)
    assert done.returncode == 0, done.stderr
    cert = _load_cert(directory / "edge-a.pem")
    assert _subject(cert) == ("edge", "edge-a")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["edge-a.example.test"]
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(control.ca_pem))
    assert stat.S_IMODE((directory / "edge-a.key").stat().st_mode) == 0o600
    record = json.loads((directory / "node.json").read_text())
    assert record["role"] == "edge" and record["group"] is None
    assert "edge-a.example.test:9443" in record["edges"]
    assert set(_variables(done.stdout)) == {"FERRYMAN_TLS_CA", "FERRYMAN_TLS_CERT", "FERRYMAN_TLS_KEY"}
    # An address HOST:PORT parser takes but the CA does not: the control plane's message, token unspent.
    token = control.token("edge")
    bad = _register("edge", control.url, token, "--dir", str(tmp_path / "x"), "--name", "edge-b",
                    "--address", "bad..example.test:1", data_dir=tmp_path)
    assert bad.returncode == 1
    assert "neither an IP address nor a DNS name" in bad.stderr
    assert not (tmp_path / "x").exists()
    good = _register("edge", control.url, token, "--dir", str(tmp_path / "x"), "--name", "edge-b",
                     "--address", "edge-b.example.test:1", data_dir=tmp_path)
    assert good.returncode == 0, good.stderr
    bad = _register("edge", control.url, token, "--dir", str(tmp_path / "y"), "--name", "edge-c",
                    "--address", "bad host:1", data_dir=tmp_path)
    assert bad.returncode == 2 and "--address" in bad.stderr


def test_a_connector_token_used_for_an_edge_is_refused_and_not_spent(control: Control, tmp_path: Path) -> None:
    directory = tmp_path / "identity"
    token = control.token("connector")
    done = _register("edge", control.url, token, "--dir", str(directory), "--name", "edge-m",
                     "--address", "127.0.0.1:9443", data_dir=tmp_path)
    assert done.returncode == 1
    assert "registration token is for a connector, not for an edge" in done.stderr, done.stderr
    assert not directory.exists()
    # The refusal did not use the token up: the connector it was meant for registers with it.
    done = _register("connector", control.url, token, "--dir", str(tmp_path / "conn"), "--name", "connector-m",
                     data_dir=tmp_path)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------- end to end


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "dataplane", *args], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _wait_ready(nodes: dict[str, tuple[subprocess.Popen[bytes], str, Path]], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    pending = dict(nodes)
    while pending:
        for name, (proc, metrics, log) in list(pending.items()):
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode}:\n{log.read_text()}")
            if _http_status(f"http://{metrics}/ready") == 200:
                del pending[name]
        if pending and time.monotonic() > deadline:
            logs = "\n".join(f"--- {n}\n{log.read_text()}" for n, (_, _, log) in pending.items())
            pytest.fail(f"not ready within {timeout:g}s: {', '.join(pending)}\n{logs}")
        time.sleep(0.05)


def _echo(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    return b"".join(chunks)


def test_registered_nodes_carry_traffic(tmp_path: Path, backend) -> None:
    ctl = _start_control(tmp_path / "control", [])  # no configured edges: nodes get the registered one
    procs: list[subprocess.Popen[bytes]] = []
    try:
        echo = backend("echo")
        edge_port = _free_port()
        edge_addr = f"127.0.0.1:{edge_port}"
        edge_data, conn_data, client_dir = tmp_path / "edge-node", tmp_path / "connector-node", tmp_path / "client"

        # Registered into the default directory (FERRYMAN_DATA_DIR/identity), no --dir.
        edge_reg = _register("edge", ctl.url, ctl.token("edge"), "--name", "edge-1", "--address", edge_addr,
                             data_dir=edge_data)
        assert edge_reg.returncode == 0, edge_reg.stderr
        conn_reg = _register("connector", ctl.url, ctl.token("connector"), "--name", "connector-1",
                             data_dir=conn_data)
        assert conn_reg.returncode == 0, conn_reg.stderr
        assert _variables(conn_reg.stdout)["FERRYMAN_EDGES"] == edge_addr
        assert "uses this identity by itself" in conn_reg.stdout

        # The application, a user assigned to it, and the user signed in on the client's device.
        assert ctl.admin("POST", "/v1/applications", {"name": "echo", "segments": [
            {"destination": "127.0.0.1", "ports": str(echo.port), "protocol": "tcp"}]})[0] == 201
        assert ctl.admin("POST", "/v1/users", {"upn": "ada@corp.example", "password": "correct horse battery"})[0] == 201
        assert ctl.admin("POST", "/v1/applications/echo/assignments", {"user": "ada@corp.example"})[0] == 201
        login = subprocess.run([sys.executable, "-m", "dataplane", "client", "login", "--control", ctl.url,
                                "--ca-hash", ctl.ca_hash, "--user", "ada@corp.example", "--password-stdin"], cwd=ROOT, env=_environment(client_dir),
                               input="correct horse battery\n", capture_output=True, text=True, timeout=60)
        assert login.returncode == 0, login.stderr

        metrics = {name: f"127.0.0.1:{_free_port()}" for name in ("edge-1", "connector-1", "client-1")}
        logs = {name: tmp_path / f"{name}.log" for name in metrics}
        forward_port = _free_port()

        # Edge and connector: nothing but their data directory (and where to listen / what to serve).
        edge = _spawn(["edge", "--listen", edge_addr],
                      _environment(edge_data, FERRYMAN_METRICS_ADDR=metrics["edge-1"]), logs["edge-1"])
        procs.append(edge)
        connector = _spawn(["connector"], _environment(conn_data, FERRYMAN_METRICS_ADDR=metrics["connector-1"],
                                                       FERRYMAN_DRAIN_GRACE="1"), logs["connector-1"])
        procs.append(connector)
        client_env = _environment(client_dir, FERRYMAN_METRICS_ADDR=metrics["client-1"])
        client_proc = _spawn(["client", "--edges", edge_addr, "--forward",
                              f"127.0.0.1:{forward_port}=127.0.0.1:{echo.port}"], client_env, logs["client-1"])
        procs.append(client_proc)
        _wait_ready({name: (proc, metrics[name], logs[name])
                     for name, proc in zip(metrics, (edge, connector, client_proc))})

        for size in (1, 64 * 1024, 1 << 20):
            data = os.urandom(size)
            assert _echo(forward_port, data) == data

        for name in ("edge-1", "connector-1"):
            text = logs[name].read_text()
            assert "using the registered identity" in text, text
            assert str((tmp_path / f"{name.split('-')[0]}-node" / "identity" / "node.json")) in text
        assert f"edges={edge_addr}" in logs["connector-1"].read_text()
    finally:
        for proc in reversed(procs):
            _stop(proc)
        _stop(ctl.proc)


# ---------------------------------------------------------------------------- in process


def _stored_identity(directory: Path, role: str, name: str, edges: list[str], group: str | None) -> None:
    ca = CertificateAuthority.open(str(directory.parent / "ca"))
    key_pem, csr_pem = new_key_and_csr(name)
    issued = ca.sign_csr(csr_pem, role=role, name=name, hosts=["127.0.0.1"] if role == "edge" else None)
    write_node_files(str(directory), name, key_pem, issued.cert_pem, ca.bundle())
    (directory / "node.json").write_text(json.dumps({
        "node_id": "n-1", "role": role, "name": name, "group": group, "control": "http://127.0.0.1:1",
        "edges": edges, "cert": f"{name}.pem", "key": f"{name}.key"}))


def test_nodes_pick_up_the_registered_identity_unless_told_otherwise(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from dataplane.cli import nodes
    from dataplane.basics.settings import ConnectorSettings, EdgeSettings, SettingsError, load

    for key in list(os.environ):
        if key.startswith("FERRYMAN_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("FERRYMAN_DATA_DIR", str(tmp_path))
    identity = tmp_path / "identity"
    _stored_identity(identity, "connector", "connector-q", ["e1.example.test:8443", "e2.example.test:8443"], "east")
    no_flags = {"edges": None, "connector_group": None, "tls_ca": None, "tls_cert": None, "tls_key": None}

    settings, found = nodes._use_registration("connector", load(ConnectorSettings, no_flags), no_flags)
    assert found is not None and found.record.name == "connector-q"
    assert (settings.tls_ca, settings.tls_cert, settings.tls_key) == (
        str(identity / "ca.pem"), str(identity / "connector-q.pem"), str(identity / "connector-q.key"))
    assert settings.edges == "e1.example.test:8443,e2.example.test:8443"
    assert settings.connector_group == "east"

    # An explicit edge list or group wins (flag or variable); TLS settings switch the whole thing off.
    flags = {**no_flags, "edges": "flag.example.test:1"}
    monkeypatch.setenv("FERRYMAN_CONNECTOR_GROUP", "west")
    settings, _ = nodes._use_registration("connector", load(ConnectorSettings, flags), flags)
    assert (settings.edges, settings.connector_group) == ("flag.example.test:1", "west")
    assert settings.tls_cert == str(identity / "connector-q.pem")
    monkeypatch.setenv("FERRYMAN_TLS_CERT", "/elsewhere.pem")
    settings, found = nodes._use_registration("connector", load(ConnectorSettings, no_flags), no_flags)
    assert found is None and settings.tls_ca == "" and settings.tls_cert == "/elsewhere.pem"
    monkeypatch.delenv("FERRYMAN_TLS_CERT")

    # The other role's identity is refused with a reason, not silently ignored.
    with pytest.raises(SettingsError, match="identity of connector 'connector-q', not of this edge"):
        nodes._use_registration("edge", load(EdgeSettings, no_flags), no_flags)
