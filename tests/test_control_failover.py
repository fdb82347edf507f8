"""Several control URLs without PostgreSQL: the node HTTP client and ``ferryman admin`` pass over a
control URL that cannot be reached, keep the one that answered, and refuse malformed lists;
``GET /ready`` of a single SQLite control plane.

Every URL is verified against the one pinned CA: an HTTPS server whose certificate comes from
another CA (``impostor``) is passed over like a dead one, never trusted; and when the CA is
learned by its hash on first contact (``--ca-hash``), an impostor presenting its own CA stops
the command instead of being passed over.
"""

from __future__ import annotations

import asyncio
import http.server
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

import controlplane
from controlplane import Control
from control.admin.client import AdminError, control_url
from control.ca import CertificateAuthority
from dataplane.basics import pki
from dataplane.basics.controltls import ControlTlsError, check_scheme
from dataplane.controllink import http as httpclient
from dataplane.controllink.registration import RegisterError, control_base

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Control]:
    with Control.running(tmp_path_factory.mktemp("control")) as control:
        yield control


@pytest.fixture(scope="module")
def impostor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The https:// URL of a server on 127.0.0.1 with a certificate from a CA of its own (not the
    control plane's), which hands out that CA at ``/v1/ca`` like a control plane would."""
    directory = tmp_path_factory.mktemp("impostor")
    cert_pem, key_pem = pki.new_ca()
    ca = CertificateAuthority.from_pem(cert_pem, key_pem, "the impostor")
    cert, server_key = ca.issue_server(["127.0.0.1"], 1)
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM) + ca.bundle())
    (directory / "key.pem").write_bytes(server_key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            body = ca.bundle() if self.path == "/v1/ca" else b"{}"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _dead_url() -> str:
    return f"https://127.0.0.1:{controlplane.free_port()}"  # nothing listens there


def test_the_node_client_passes_over_a_dead_url_and_keeps_the_live_one(control: Control) -> None:
    dead = _dead_url()
    base = f"{dead},{control.url}"

    async def twice() -> list[int]:
        first = await httpclient.request(base, "GET", "/health", timeout=10, ssl_context=control.tls)
        assert httpclient._preferred[base] == 1  # the live one is tried first from now on
        second = await httpclient.request(base, "GET", "/health", timeout=10, ssl_context=control.tls)
        return [first.status, second.status]

    assert asyncio.run(twice()) == [200, 200]


def test_the_node_client_passes_over_a_url_whose_certificate_is_not_from_the_pinned_ca(
        control: Control, impostor: str) -> None:
    base = f"{impostor},{control.url}"
    answer = asyncio.run(httpclient.request(base, "GET", "/health", timeout=10, ssl_context=control.tls))
    assert answer.status == 200 and httpclient._preferred[base] == 1
    with pytest.raises(httpclient.HttpError) as caught:  # the impostor alone: never trusted
        asyncio.run(httpclient.request(f"{impostor},{_dead_url()}", "GET", "/health", timeout=10,
                                       ssl_context=control.tls))
    assert "the certificate is not trusted" in str(caught.value), caught.value


def test_the_node_client_names_every_url_when_none_answers() -> None:
    one, two = _dead_url(), _dead_url()
    with pytest.raises(httpclient.HttpError) as caught:
        asyncio.run(httpclient.request(f"{one},{two}", "GET", "/health", timeout=10))
    message = str(caught.value)
    assert message.startswith("no control-plane node answered") and "Connection refused" in message
    assert one.rsplit(":", 1)[1] in message and two.rsplit(":", 1)[1] in message


def test_control_url_lists_are_checked() -> None:
    assert control_base("http://a:1/, https://b") == "http://a:1,https://b"
    for bad in ("http://a:1,,http://b:2", "http://a:1,ftp://b", "http://a:1, "):
        with pytest.raises(RegisterError):
            control_base(bad)
    assert control_url("a:1,https://b:2/") == "https://a:1,https://b:2"  # https unless plain HTTP is allowed
    with pytest.raises(AdminError) as caught:
        control_url("https://a:1,")
    assert caught.value.status == 2 and "empty URL" in str(caught.value)
    assert check_scheme("https://a:1, https://b:2", False) == "https"
    with pytest.raises(ControlTlsError) as refused:
        check_scheme("https://a:1,http://b:2", True)  # one TLS-less node would undo the others' TLS
    assert "mixes https:// and http://" in str(refused.value)
    with pytest.raises(ControlTlsError) as refused:
        check_scheme("https://a:1,http://b:2", False)
    assert "plain http:// to the control plane is refused" in str(refused.value)


def _admin(control: Control, urls: str, *flags: str, data_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``ferryman admin apps list`` with ``--control urls``; the admin key is passed, and the CA is
    the one on the control plane's host unless ``data_dir`` (another directory) says otherwise."""
    env = controlplane.environment(data_dir or control.data_dir)
    return subprocess.run([sys.executable, "-m", "dataplane", "admin", "--control", urls, *flags,
                           "--key-file", str(control.data_dir / "admin.key"), "apps", "list", "--json"],
                          cwd=controlplane.ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_admin_fails_over_between_control_urls(control: Control, impostor: str, tmp_path: Path) -> None:
    done = _admin(control, f"{_dead_url()},{impostor},{control.url}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("[")
    # first contact by the CA hash, from a host without the CA: the first URL that answers gives it
    done = _admin(control, f"{_dead_url()},{control.url}", "--ca-hash", control.ca_hash, data_dir=tmp_path)
    assert done.returncode == 0, done.stderr
    # an impostor's CA is refused, not passed over for the next URL
    done = _admin(control, f"{impostor},{control.url}", "--ca-hash", control.ca_hash, data_dir=tmp_path)
    assert done.returncode != 0 and "not the pinned" in done.stderr and "Traceback" not in done.stderr, done.stderr
    # the impostor alone, with the CA of this host: its certificate is not trusted
    done = _admin(control, impostor)
    assert done.returncode == 1 and "not trusted" in done.stderr and "Traceback" not in done.stderr, done.stderr
    dead_one, dead_two = _dead_url(), _dead_url()
    done = _admin(control, f"{dead_one},{dead_two}")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("ferryman admin: cannot reach any control-plane node: "), done.stderr
    assert dead_one in done.stderr and dead_two in done.stderr


def test_ready_on_sqlite(control: Control) -> None:
    status, body, _ = control.request("GET", "/ready")
    assert (status, body) == (200, {"status": "ready", "problems": []})


def test_a_client_agent_never_captures_any_of_its_control_urls() -> None:
    """The transparent capture leaves alone every control-plane node of the session, not only the first."""
    from types import SimpleNamespace

    from dataplane.basics.settings import ClientSettings
    from dataplane.client.node import Client

    agent = SimpleNamespace(edges=[("edge.example", 8443)], settings=ClientSettings(),
                            keeper=SimpleNamespace(session=SimpleNamespace(
                                control="https://control-a.example:8080,https://control-b.example")))
    assert Client._own_targets(agent) == [("edge.example", 8443), ("control-a.example", 8080),
                                          ("control-b.example", 443)]
