"""Web apps end to end: control plane, edge (HTTPS front door), connector and a real backend,
as separate processes, driven with the real curl over HTTP/1.1 and HTTP/2.

One managed fabric per test publishes ``wiki`` (``https://wiki.ferryman.localhost:<port>``,
backend ``http://127.0.0.1:<port>``: loopback, which the connector dials only because the
web app names it) and checks: a passthrough app on a custom domain (its own certificate),
the sign-in redirect and sign-in with the control plane's
user, the page and a 1 MiB body byte for byte through edge → connector → backend on both
protocols, the identity headers the backend receives, the traffic log's HTTP fields, and
continuous access (a removed assignment or a policy that now blocks refuses the very next
request with its reason); Chromium signs in, uses two apps and a WebSocket, signs out.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from types import SimpleNamespace
from urllib.parse import quote, urlencode

import pytest

from dataplane.fabric import WEB_DOMAIN, Fabric
from tests.browser import WEB_ARGS, chromium
from conftest import metric, scrape
from tests.web_support import Backend, Reply, WsClient, cookie_line, free_port, parse_curl

pytestmark = pytest.mark.timeout(120)


def curl(fab: Fabric, url: str, *args: str, jar: str | None = None, http2: bool = False,
         data: bytes | None = None, cacert: str = "", prefix: Sequence[str] = ()) -> Reply:
    """``prefix``: a command curl runs under (e.g. ``taskset -c 1``)."""
    cmd = [*prefix, "curl", "-sS", "--max-time", "20", "--cacert", cacert or fab.web_ca, "-D", "-", "-o", "-",
           "--http2" if http2 else "--http1.1", "--resolve", f"wiki.corp.example:{fab.web_port}:127.0.0.1"]
    for host in ("wiki", "open", "login"):
        cmd += ["--resolve", f"{host}.{WEB_DOMAIN}:{fab.web_port}:127.0.0.1"]
    if jar:
        cmd += ["-b", jar, "-c", jar]
    if data is not None:
        cmd += ["--data-binary", "@-"]
    proc = subprocess.run([*cmd, *args, url], input=data, capture_output=True, timeout=30)
    assert proc.stdout, proc.stderr.decode(errors="replace")
    return parse_curl(proc.stdout)


def sign_in(fab: Fabric, jar: str, url: str, http2: bool = False, prefix: Sequence[str] = ()) -> Reply:
    """The browser's dance: app → 302 to the sign-in host → form → POST → back to the app."""
    first = curl(fab, url, jar=jar, http2=http2, prefix=prefix)
    assert first.status == 302, first
    location = first.header("location")
    assert location.startswith(f"https://login.{WEB_DOMAIN}:{fab.web_port}/"), location
    form = curl(fab, location, jar=jar, http2=http2, prefix=prefix)
    assert form.status == 200, form
    fields = {name: re.search(rb'name="%s" value="([^"]+)"' % name.encode(), form.body).group(1).decode()
              for name in ("csrf", "nonce", "host")}
    body = urlencode({**fields, "upn": fab.user, "password": fab.password, "otp": ""}).encode()
    return curl(fab, fab.web_url("login", "/.ferryman/sign_in"), "-L", "-H",
                "Content-Type: application/x-www-form-urlencoded", "-H",
                f"Origin: https://login.{WEB_DOMAIN}:{fab.web_port}", jar=jar, data=body, http2=http2, prefix=prefix)


def big(n: int) -> bytes:
    block = hashlib.sha256(b"seed").digest() * 2048
    return (block * (n // len(block) + 1))[:n]


@pytest.fixture
def backend():
    b = Backend("wiki", internal_host="127.0.0.1")
    yield b
    b.stop()


def _wiki(backend: Backend, **options) -> dict:
    return {"name": "wiki", "external_url": f"https://wiki.{WEB_DOMAIN}", "internal_url": backend.internal_url,
            **options}


def test_sign_in_then_pages_over_http1_and_http2_and_the_traffic_log(fabric, backend, tmp_path) -> None:
    from tests.test_webapps_admin import make_cert

    chain, key, ca = make_cert(["wiki.corp.example"])
    (tmp_path / "custom-ca.pem").write_text(ca)
    fab = fabric([], managed=True, webapps=[
        _wiki(backend),
        {"name": "custom", "external_url": "https://wiki.corp.example", "internal_url": backend.internal_url,
         "preauth": "passthrough", "certificate": chain, "certificate_key": key}])
    # A passthrough app on a custom domain: no sign-in, its own certificate (by SNI, from a CA
    # the fabric's does not know), no identity headers; a host no web app owns gets 404.
    custom = f"https://wiki.corp.example:{fab.web_port}"
    reply = curl(fab, custom + "/hello", cacert=str(tmp_path / "custom-ca.pem"))
    assert (reply.status, reply.body) == (200, b"hello from backend wiki")
    seen = json.loads(curl(fab, custom + "/headers", cacert=str(tmp_path / "custom-ca.pem")).body)
    assert "x-ferryman-jwt-assertion" not in seen
    missing = curl(fab, fab.web_url("open", "/hello"))
    assert missing.status == 404 and b"hello from backend" not in missing.body
    # No connector of the app's group is connected: 503; the backend refuses the connector: 502.
    fab.admin("POST", "/v1/connector-groups", {"name": "empty"})
    closed = free_port()
    fab.admin("POST", "/v1/webapps", {"name": "lonely", "external_url": f"https://open.{WEB_DOMAIN}:{fab.web_port}",
                                      "internal_url": backend.internal_url, "connector_group": "empty",
                                      "preauth": "passthrough"})
    fab.admin("PATCH", "/v1/webapps/custom", {"internal_url": f"http://127.0.0.1:{closed}"})
    fab.wait_configured()
    assert curl(fab, fab.web_url("open", "/hello")).status == 503
    assert curl(fab, custom + "/hello", cacert=str(tmp_path / "custom-ca.pem")).status == 502

    jar = str(tmp_path / "jar")
    page = sign_in(fab, jar, fab.web_url("wiki", "/hello"))
    assert page.status == 200, page
    assert page.body == b"hello from backend wiki"

    for http2 in (False, True):
        reply = curl(fab, fab.web_url("wiki", "/big?n=1048576"), jar=jar, http2=http2)
        assert reply.status == 200
        assert reply.version == ("HTTP/2" if http2 else "HTTP/1.1")
        assert hashlib.sha256(reply.body).digest() == hashlib.sha256(big(1048576)).digest()

    seen = json.loads(curl(fab, fab.web_url("wiki", "/headers"), "-H", "X-Ferryman-Jwt-Assertion: forged",
                           jar=jar).body)
    assert seen["x-forwarded-host"] == f"wiki.{WEB_DOMAIN}:{fab.web_port}"
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-ferryman-jwt-assertion"] != "forged"
    assert seen["host"] == f"127.0.0.1:{backend.port}"

    deadline = time.monotonic() + 20
    records: list[dict] = []
    while time.monotonic() < deadline:
        records = fab.admin("GET", "/v1/traffic?app=wiki&limit=50")  # type: ignore[assignment]
        if any(r["http_path"] == "/headers" for r in records):
            break
        time.sleep(0.2)
    hello = [r for r in records if r["http_path"] == "/hello" and r["http_status"] == 200]
    assert hello, records
    record = hello[0]
    assert (record["http_method"], record["application_kind"], record["upn"], record["action"]) == \
        ("GET", "web", fab.user, "allow")
    assert record["http_host"] == f"wiki.{WEB_DOMAIN}:{fab.web_port}"
    assert record["bytes_received"] == len(b"hello from backend wiki")
    assert record["connector_name"] == "connector-1"
    assert "curl" in record["user_agent"]
    env = {**os.environ, "FERRYMAN_DATA_DIR": os.path.join(fab.workdir, "control")}
    shown = subprocess.run([sys.executable, "-m", "dataplane", "admin", "--control", fab.control_url, "logs", "--app",
                            "wiki", "--limit", "50"], env=env, capture_output=True, text=True, timeout=60)
    assert f"GET https://wiki.{WEB_DOMAIN}:{fab.web_port}/hello 200" in shown.stdout, shown.stdout + shown.stderr
    bigs = [r for r in records if r["http_path"] == "/big"]
    assert sorted(r["http_protocol"] for r in bigs) == ["HTTP/1.1", "HTTP/2"], bigs
    assert all(r["bytes_received"] == 1048576 for r in bigs)
    # the front door's events on the edge's /metrics: the 404 and the 503 above, and the
    # HTTP/1.1 /big, which found the session's pooled backend connection: served in callbacks
    samples = scrape(fab.metrics["edge-1"])
    assert metric(samples, "ferryman_web_events_total", event="web_unknown_host") == 1
    assert metric(samples, "ferryman_web_events_total", event="web_dial_no_connector") == 1
    assert metric(samples, "ferryman_web_events_total", event="web_direct") >= 1


def test_a_removed_assignment_or_a_blocking_policy_stops_the_next_request_and_cuts_websockets(fabric, backend, tmp_path) -> None:
    fab = fabric([], managed=True, webapps=[_wiki(backend)])
    jar = str(tmp_path / "jar")
    assert sign_in(fab, jar, fab.web_url("wiki", "/hello")).status == 200
    host = f"wiki.{WEB_DOMAIN}"
    door = SimpleNamespace(port=fab.web_port, pki=SimpleNamespace(ca_path=fab.web_ca))
    ws = WsClient(door, host, "/ws", cookie_line(jar, host))
    try:
        assert ws.status == 101 and ws.accept_ok
        ws.send(b"through edge and connector")
        assert ws.recv()[1] == b"through edge and connector"  # type: ignore[index]
        ws.sock.settimeout(15)
        fab.admin("POST", "/v1/policies", {"name": "no-wiki", "state": "on", "grant": "block",
                                           "applications": ["wiki"]})
        changed = time.monotonic()
        frame = ws.recv()  # the open WebSocket is cut: a close frame or the end of the stream
        assert frame is None or frame[0] == 8, frame
        assert time.monotonic() - changed < 5
    finally:
        ws.close()
    fab.wait_configured()
    denied = curl(fab, fab.web_url("wiki", "/hello"), jar=jar)
    assert denied.status == 403
    assert b"blocked by policy" in denied.body and b"no-wiki" in denied.body
    fab.admin("DELETE", "/v1/policies/no-wiki")
    fab.wait_configured()
    assert curl(fab, fab.web_url("wiki", "/hello"), jar=jar).status == 200

    fab.admin("DELETE", f"/v1/webapps/wiki/assignments?user={quote(fab.user)}")
    fab.wait_configured()
    denied = curl(fab, fab.web_url("wiki", "/hello"), jar=jar)
    assert denied.status == 403
    assert b"is not assigned to application" in denied.body
    assert sum(1 for method, path, _ in backend.seen if path == "/hello") == 2  # the denials never reached it


def test_chromium_signs_in_uses_two_apps_and_a_websocket_signs_out_and_a_denied_user_is_told(
        fabric, backend, tmp_path) -> None:
    docs = Backend("docs", internal_host="127.0.0.1")
    try:
        fab = fabric([], managed=True, webapps=[
            _wiki(backend), {"name": "docs", "external_url": f"https://docs.{WEB_DOMAIN}",
                             "internal_url": docs.internal_url}])
        fab.admin("POST", "/v1/users", {"upn": "bob@ferryman.local", "password": "bob-password-long-1"})
        with chromium(*WEB_ARGS) as browser:
            context = browser.new_context(ignore_https_errors=True)
            context.set_default_timeout(20000)
            page = context.new_page()
            page.goto(fab.web_url("wiki", "/hello"))
            assert page.url.startswith(fab.web_url("login", "/.ferryman/sign_in"))
            page.fill("#upn", fab.user)
            page.fill("#password", fab.password)
            page.click("#submit")
            page.wait_for_url(fab.web_url("wiki", "/hello"))
            assert page.locator("body").inner_text().strip() == "hello from backend wiki"
            echoed = page.evaluate("""url => new Promise((resolve, reject) => {
                const ws = new WebSocket(url);
                ws.onopen = () => ws.send("hello through edge and connector");
                ws.onmessage = e => { resolve(e.data); ws.close(); };
                ws.onerror = () => reject(new Error("websocket failed"));
            })""", f"wss://wiki.{WEB_DOMAIN}:{fab.web_port}/ws")
            assert echoed == "hello through edge and connector"
            page.goto(fab.web_url("docs", "/hello"))  # single sign-on: no form this time
            assert page.url == fab.web_url("docs", "/hello")
            assert page.locator("body").inner_text().strip() == "hello from backend docs"
            page.goto(fab.web_url("docs", "/.ferryman/"))
            page.click("#sign-out")
            page.wait_for_url(lambda url: "/.ferryman/sign_in" in url)
            page.goto(fab.web_url("wiki", "/hello"))
            assert "/.ferryman/sign_in" in page.url and page.locator("#password").is_visible()

            other = browser.new_context(ignore_https_errors=True).new_page()
            other.goto(fab.web_url("wiki", "/hello"))
            other.fill("#upn", "bob@ferryman.local")
            other.fill("#password", "bob-password-long-1")
            other.click("#submit")
            other.wait_for_url(fab.web_url("wiki", "/hello"))
            text = other.locator("body").inner_text()
            assert "bob@ferryman.local is not assigned to application 'wiki'" in text
            assert "hello from backend" not in text
        sessions = fab.admin("GET", f"/v1/users/{quote(fab.user)}/sessions")
        browser_sessions = [s for s in sessions if s["device_id"] is None]  # type: ignore[union-attr]
        assert len(browser_sessions) == 1 and browser_sessions[0]["status"] == "revoked", sessions
    finally:
        docs.stop()
