"""Browser sign-in at the edge's HTTPS front door through the control plane's external OIDC
provider (``FERRYMAN_WEB_OIDC_LABEL``; ``/v1/node/web-oidc``): real control plane, edge,
connector, backend and a real (small) OIDC provider; curl is the browser, hop by hop."""

from __future__ import annotations

import os
import re
import subprocess
from urllib.parse import parse_qs, urljoin, urlsplit

import pytest

from dataplane.controllink import http
from dataplane.fabric import WEB_DOMAIN, Fabric
from tests.test_e2e_webapps import curl
from tests.test_oidc import CLIENT_ID, CLIENT_SECRET, Provider
from tests.web_support import Backend, Reply, free_port, parse_curl

pytestmark = pytest.mark.timeout(120)


def hop(fab: Fabric, url: str, jar: str) -> Reply:
    """One browser request (no redirect followed); the control plane's CA and the front door's trusted."""
    if url.startswith(fab.control_url):
        ca = os.path.join(fab.workdir, "control", "ca", "ca.pem")
        out = subprocess.run(["curl", "-sS", "--max-time", "20", "--cacert", ca, "-D", "-", "-o", "-", "-b", jar,
                              "-c", jar, url], capture_output=True, timeout=30)
        assert out.stdout, out.stderr
        return parse_curl(out.stdout)
    if url.startswith("http://127.0.0.1:"):  # the provider
        out = subprocess.run(["curl", "-sS", "--max-time", "20", "-D", "-", "-o", "-", url], capture_output=True,
                             timeout=30)
        return parse_curl(out.stdout)
    return curl(fab, url, jar=jar)


def test_a_browser_signs_in_through_the_oidc_provider_bound_to_that_browser(tmp_path) -> None:
    provider = Provider()
    provider.start()
    backend = Backend("wiki", internal_host="127.0.0.1")
    port = free_port()
    fab = Fabric(str(tmp_path / "fab"), [], managed=True, control_port=port, webapps=[
        {"name": "wiki", "external_url": f"https://wiki.{WEB_DOMAIN}", "internal_url": backend.internal_url}],
        env={"FERRYMAN_DRAIN_GRACE": "1", "FERRYMAN_OIDC_ISSUER": provider.issuer,
             "FERRYMAN_OIDC_CLIENT_ID": CLIENT_ID, "FERRYMAN_OIDC_CLIENT_SECRET": CLIENT_SECRET,
             "FERRYMAN_OIDC_REDIRECT_URI": f"https://127.0.0.1:{port}/v1/auth/oidc/callback",
             "FERRYMAN_WEB_OIDC_LABEL": "Sign in with Example ID", "FERRYMAN_WEB_SIGN_IN_RATE": "2"})
    try:
        fab.start(timeout=30)
        provider.user = {"sub": "ext-1", "email": fab.user, "email_verified": True}
        jar, other = str(tmp_path / "jar"), str(tmp_path / "other")
        first = hop(fab, fab.web_url("wiki", "/hello"), jar)
        assert first.status == 302
        form = hop(fab, first.header("location"), jar)
        assert form.status == 200 and b"Sign in with Example ID" in form.body
        fields = {n: re.search(rb'name="%s" value="([^"]+)"' % n.encode(), form.body).group(1).decode()
                  for n in ("host", "nonce")}
        start = hop(fab, fab.web_url("login", f"/.ferryman/oidc/start?host={fields['host']}&nonce={fields['nonce']}"),
                    jar)
        assert start.status in (302, 303), start
        authorize = start.header("location")
        assert authorize.startswith(provider.issuer + "/authorize?"), authorize
        back = hop(fab, authorize, jar)  # the provider signs the user in, back to the control plane
        assert back.status == 302 and back.header("location").startswith(fab.control_url + "/v1/auth/oidc/callback")
        to_door = hop(fab, back.header("location"), jar)
        assert to_door.status == 303, to_door
        door = to_door.header("location")
        assert door.startswith(fab.web_url("login", "/.ferryman/oidc/callback?")), door
        query = parse_qs(urlsplit(door).query)
        assert set(query) == {"state", "login", "handoff"}
        # Another browser (without this one's state cookie) that gets the same URL is refused ...
        stolen = hop(fab, door, other)
        assert stolen.status == 400 and b"another browser" in stolen.body
        # ... and the browser that started the sign-in gets in, and on to the app's page.
        done = hop(fab, door, jar)
        assert done.status in (302, 303), done
        url = urljoin(door, done.header("location"))
        page = hop(fab, url, jar)
        while page.status in (302, 303):
            url = urljoin(url, page.header("location"))
            page = hop(fab, url, jar)
        assert (page.status, page.body) == (200, b"hello from backend wiki")
        # The handoff is good once.
        again = hop(fab, door, jar)
        assert again.status >= 400
        # Starts count against the sign-in rate per source address (burst 2, 2 a minute here): of
        # three more in a row at least one is 429 (the bucket holds at most 2).
        start_url = fab.web_url("login", f"/.ferryman/oidc/start?host={fields['host']}&nonce={fields['nonce']}")
        answers = [hop(fab, start_url, other) for _ in range(3)]
        assert {a.status for a in answers} <= {302, 303, 429}
        limited = [a for a in answers if a.status == 429]
        assert limited and limited[0].header("retry-after"), answers
        # Only edges may start or collect a web sign-in.
        answer = http.request_blocking(fab.control_url, "POST", "/v1/node/web-oidc/start", timeout=10,
                                       body=b'{"return_to": "https://evil.example/.ferryman/oidc/callback", '
                                            b'"state": "aaaaaaaaaaaaaaaaaaaaaaaa"}',
                                       headers={"Content-Type": "application/json"}, ssl_context=fab.control_tls)
        assert answer.status == 401, answer.body
    finally:
        fab.stop()
        backend.stop()
        provider.server.shutdown()
        provider.server.server_close()
