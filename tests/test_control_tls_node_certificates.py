"""An edge's certificate never passes for the control plane's.

The control plane's CA issues both its own HTTPS certificate and the nodes' certificates; an
edge's carries serverAuth and the host names of the addresses it registered with (here
``127.0.0.1``, a name the control plane's certificate also carries). A server presenting a
real edge certificate — issued by a real control plane at registration — is refused by a
node's calls (``controllink.http``, verified against the pinned CA, host name matching) and
by the admin CLI, before a request (token, password, admin key) is sent; the control
plane's own certificate is still accepted on the same path.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dataplane.controllink import http as httpclient
from dataplane.controllink import trust

from controlplane import ROOT, Control, environment

pytestmark = pytest.mark.timeout(120)


class _EdgeAsControl:
    """A TLS server on loopback with an edge's certificate and key; records every byte it is sent."""

    def __init__(self, cert: str, key: str) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self.listener.getsockname()[1]}"
        self.received = b""
        self.handshakes = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(raw, server_side=True) as conn:
                    self.handshakes += 1
                    conn.settimeout(5)
                    data = conn.recv(65536)
                    self.received += data
                    if data:
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Control]:
    with Control.running(tmp_path_factory.mktemp("control") / "data") as ctl:
        yield ctl


def test_a_server_with_an_edge_certificate_is_not_the_control_plane(control: Control, tmp_path: Path) -> None:
    edge = control.register_node(tmp_path / "edge", role="edge", addresses=["127.0.0.1:7443"])
    fake = _EdgeAsControl(edge.cert, edge.key)
    try:
        node = control.register_node(tmp_path / "node")
        context = trust.context_for(fake.url, node.directory, node.record.control_ca)
        with pytest.raises(httpclient.HttpError, match="presented a Ferryman edge's certificate"):
            httpclient.request_blocking(fake.url, "POST", "/v1/auth/sign-in", body=b'{"password": "secret"}',
                                        ssl_context=context, timeout=10)
        deadline = time.monotonic() + 5  # the client may be done before the server's thread counts its handshake
        while fake.handshakes < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fake.handshakes == 1 and fake.received == b""  # TLS verified (same CA, host name), nothing sent
        # the control plane's own certificate passes the same check
        assert httpclient.request_blocking(control.url, "GET", "/health", ssl_context=context, timeout=10).status == 200

        # the admin CLI, checking against the control plane's CA on its host, sends no admin key there
        admin = subprocess.run([sys.executable, "-m", "dataplane", "admin", "--control", fake.url, "apps", "list"],
                               cwd=ROOT, env=environment(control.data_dir, FERRYMAN_DATA_DIR=str(control.data_dir)),
                               capture_output=True, text=True, timeout=60)
        assert admin.returncode == 1 and "presented a Ferryman edge's certificate" in admin.stderr, admin.stderr
        assert "Traceback" not in admin.stderr
        assert fake.received == b"" and fake.handshakes == 2
    finally:
        fake.close()
