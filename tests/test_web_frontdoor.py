"""End-to-end tests of the HTTPS front door with real clients (curl, an h2 client) and real backends.

A ``FrontDoor`` listens on a free loopback port with TLS (test CA); real ``http.server``
backends sit behind it, reached through a real TCP dialer. curl signs in through the real
redirect dance (password + TOTP), then every test checks bytes end to end: single sign-on
to a second host, sign-out everywhere, per-request authorization and revocation, forged
and expired cookies, passthrough, the assertion verified against the published JWKS,
identity-header stripping, header and body translation, streaming uploads/downloads over
HTTP/1.1 and HTTP/2, ``Expect: 100-continue``, pipelining, the per-session backend pool,
backend TLS verification, and the transaction records.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import time
from pathlib import Path
from urllib.parse import urlencode

import pyotp
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from dataplane.edge.web import Principal, WebApp
from dataplane.edge.web.session import COOKIE, AppSession
from web_support import (
    ALICE, BOB, Backend, Door, H2Client, OidcFake, User, cookie_line, curl, jar_cookies, read_response,
    sign_in_with_curl, start_door, stop_door, tls_socket,
)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def door(tmp_path: Path):
    d = start_door(tmp_path)
    wiki = Backend("wiki", "wiki.internal")
    docs = Backend("docs", "docs.internal")
    opened = Backend("open", "open.internal")
    d.backends.update(wiki=wiki, docs=docs, open=opened)
    d.set_apps([
        d.app("wiki", "wiki.test", wiki, translate_body=True,
              header_sso={"upn": "X-Remote-User", "groups": "X-Remote-Groups", "email": "X-Email"}),
        d.app("docs", "docs.test", docs),
        d.app("open", "open.test", opened, preauth="passthrough"),
    ])
    yield d
    stop_door(d)


def signed_in(d: Door, tmp_path: Path, user: User = ALICE, host: str = "wiki.test", name: str = "jar") -> str:
    jar = str(tmp_path / name)
    r = sign_in_with_curl(d, jar, host, user)
    assert r.status == 200 and r.body == f"hello from backend {host.split('.')[0]}".encode(), r
    return jar


def test_sign_in_then_http1_and_http2(door: Door, tmp_path: Path) -> None:
    first = curl(door, door.url("wiki.test", "/hello?secret=1"))
    assert first.status == 302
    assert first.header("location").startswith(f"https://auth.test:{door.port}/.ferryman/sign_in?host=wiki.test%3A")
    assert "__Host-ferryman-s-" in first.header("set-cookie") and "Secure" in first.header("set-cookie")
    jar = signed_in(door, tmp_path)
    app_cookie = jar_cookies(jar, "wiki.test")[COOKIE]
    assert app_cookie.startswith("1.") and len(app_cookie) < 1000
    for http2 in (False, True):
        r = curl(door, door.url("wiki.test", "/hello?q=x"), jar=jar, http2=http2)
        assert (r.status, r.body, r.version) == (200, b"hello from backend wiki", "HTTP/2" if http2 else "HTTP/1.1")
    who = curl(door, door.url("wiki.test", "/.ferryman/"), jar=jar)
    assert who.status == 200 and ALICE.upn.encode() in who.body and b"pwd, mfa" in who.body
    robots = curl(door, door.url("wiki.test", "/robots.txt"), jar=jar)
    assert robots.body == b"User-agent: *\nDisallow: /\n"
    assert curl(door, door.url("auth.test", "/robots.txt")).body == b"User-agent: *\nDisallow: /\n"
    rec = door.wait_record(lambda r: r.app == "wiki" and r.path == "/hello" and r.protocol == "HTTP/2")
    assert (rec.method, rec.host, rec.action, rec.upn, rec.user_id, rec.protocol) == (
        "GET", f"wiki.test:{door.port}", "allow", ALICE.upn, ALICE.user_id, "HTTP/2")
    assert rec.bytes_out == len(b"hello from backend wiki") and rec.bytes_in == 0
    assert rec.user_agent.startswith("curl/") and rec.session_id and rec.source.startswith("127.0.0.1:")
    assert rec.duration > 0 and rec.connector == "connector-test"
    first_rec = next(r for r in door.records if r.path == "/hello" and r.status == 302)
    assert first_rec.action == "deny" and first_rec.code == "sign_in_required" and "secret" not in first_rec.path


def test_single_sign_on_and_sign_out_everywhere(door: Door, tmp_path: Path) -> None:
    jar = signed_in(door, tmp_path)
    assert len(door.users.sessions) == 1
    # the second host: redirects through the sign-in host and back, no form, no second sign-in
    r = curl(door, door.url("docs.test", "/hello"), "-L", jar=jar)
    assert (r.status, r.body) == (200, b"hello from backend docs")
    assert len(door.users.sessions) == 1
    sid = next(iter(door.users.sessions))
    assert COOKIE in jar_cookies(jar, "docs.test")
    # sign out on docs: GET shows a form, POST (CSRF-checked) ends the session everywhere
    form = curl(door, door.url("docs.test", "/.ferryman/sign_out"), jar=jar)
    csrf = re.search(rb'name="csrf" value="([^"]+)"', form.body).group(1).decode()
    bad = curl(door, door.url("docs.test", "/.ferryman/sign_out"), "-H", "Content-Type: application/x-www-form-urlencoded",
               jar=jar, data=b"csrf=wrong")
    assert bad.status == 403 and b"csrf_refused" in bad.body
    out = curl(door, door.url("docs.test", "/.ferryman/sign_out"), "-L", "-H",
               "Content-Type: application/x-www-form-urlencoded", "-H", f"Origin: https://docs.test:{door.port}",
               jar=jar, data=urlencode({"csrf": csrf}).encode())
    assert out.status == 200 and b'name="password"' in out.body  # back at the sign-in form
    assert door.users.sign_outs == [sid]
    for host in ("wiki.test", "docs.test"):
        again = curl(door, door.url(host, "/hello"), jar=jar)
        assert again.status == 302 and "/.ferryman/sign_in" in again.header("location"), host


def test_sign_in_refusals(door: Door, tmp_path: Path) -> None:
    jar = str(tmp_path / "jar")
    first = curl(door, door.url("wiki.test", "/hello"), jar=jar)
    form = curl(door, first.header("location"), jar=jar)
    assert form.status == 200 and b"wiki" in form.body and b"<script" not in form.body
    assert form.header("x-frame-options") == "DENY" and "default-src 'none'" in form.header("content-security-policy")
    csrf = re.search(rb'name="csrf" value="([^"]+)"', form.body).group(1).decode()
    nonce = re.search(rb'name="nonce" value="([^"]+)"', form.body).group(1).decode()

    def post(**fields: str) -> object:
        body = {"csrf": csrf, "nonce": nonce, "host": door.host("wiki.test"), "upn": ALICE.upn, **fields}
        return curl(door, door.url("auth.test", "/.ferryman/sign_in"), "-H",
                    "Content-Type: application/x-www-form-urlencoded", jar=jar, data=urlencode(body).encode())

    wrong = post(password="nope")
    assert wrong.status == 401 and b"The user name or password is wrong." in wrong.body
    no_otp = post(password=ALICE.password)
    assert no_otp.status == 401 and b"one-time code" in no_otp.body
    bad_otp = post(password=ALICE.password, otp="000000" if pyotp.TOTP(ALICE.totp).now() != "000000" else "111111")
    assert bad_otp.status == 401 and b"The one-time code is wrong." in bad_otp.body
    no_csrf = post(password=ALICE.password, csrf="x" * 30)
    assert no_csrf.status == 403
    other = post(password=ALICE.password, host="nowhere.test:1")
    assert other.status == 400 and b"unknown_app" in other.body
    cross = curl(door, door.url("auth.test", "/.ferryman/sign_in"), "-H", "Content-Type: application/x-www-form-urlencoded",
                 "-H", "Origin: https://evil.test", jar=jar,
                 data=urlencode({"csrf": csrf, "nonce": nonce, "host": door.host("wiki.test"), "upn": ALICE.upn,
                                 "password": ALICE.password, "otp": pyotp.TOTP(ALICE.totp).now()}).encode())
    assert cross.status == 403
    assert door.door.counters["web_csrf_refused"] == 2
    assert not door.users.sessions


def test_sign_in_rate_limited(tmp_path: Path) -> None:
    from dataplane.edge.web import WebSettings
    d = start_door(tmp_path, WebSettings(sign_in_rate=3))
    try:
        b = Backend("wiki", "wiki.internal")
        d.backends["wiki"] = b
        d.set_apps([d.app("wiki", "wiki.test", b)])
        statuses = []
        for _ in range(5):
            r = curl(d, d.url("auth.test", "/.ferryman/sign_in"), "-H", "Content-Type: application/x-www-form-urlencoded",
                     data=b"upn=x&password=y")
            statuses.append(r.status)
            last = r
        assert statuses[:3] == [403, 403, 403] and statuses[3:] == [429, 429]  # CSRF refusals count too
        assert int(last.header("retry-after")) >= 1
    finally:
        stop_door(d)


def test_unknown_host_and_denials(door: Door, tmp_path: Path) -> None:
    r = curl(door, door.url("other.test", "/hello"))
    assert r.status == 404 and b"No application is published at this address." in r.body
    assert not any(rec[1] == "/hello" for b in door.backends.values() for rec in b.seen)
    jar = signed_in(door, tmp_path)
    door.rules.need_device.add("wiki")
    denied = curl(door, door.url("wiki.test", "/hello"), jar=jar)
    assert denied.status == 403
    assert b"A compliant device is required: this browser has no Ferryman client agent." in denied.body
    rec = door.wait_record(lambda r: r.code == "device_required")
    assert (rec.action, rec.code, rec.policy, rec.status) == ("deny", "device_required", "compliant-devices", 403)
    door.rules.need_device.clear()
    assert curl(door, door.url("wiki.test", "/hello"), jar=jar).status == 200
    door.rules.allowed["wiki"] = {"u-someone-else"}
    assert b"You are not assigned to wiki." in curl(door, door.url("wiki.test", "/hello"), jar=jar).body
    door.rules.allowed.clear()
    # revoked from the snapshot: the very next request is refused
    sid = next(iter(door.users.sessions))
    door.rules.revoked.add(sid)
    r = curl(door, door.url("wiki.test", "/hello"), jar=jar, http2=True)
    assert r.status == 403 and b"Your session was ended by an administrator." in r.body
    door.rules.revoked.clear()
    # revoked on this edge: the cookie is refused (sign-in again)
    door.loop.call(door.door.revoke_session, sid)
    assert curl(door, door.url("wiki.test", "/hello"), jar=jar).status == 302
    # non-GET without a session: 401, not a redirect
    post = curl(door, door.url("docs.test", "/echo"), data=b"x")
    assert post.status == 401 and b"sign_in_required" in post.body


def test_reason_is_escaped(door: Door, tmp_path: Path) -> None:
    jar = signed_in(door, tmp_path)
    door.rules.allowed["wiki"] = set()
    original = door.rules.authorize

    def evil(app, principal, facts):
        v = original(app, principal, facts)
        import msgspec
        return msgspec.structs.replace(v, reason="<script>alert(1)</script> & more")

    door.rules.authorize = evil
    r = curl(door, door.url("wiki.test", "/hello"), jar=jar)
    assert r.status == 403 and b"&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in r.body and b"<script>" not in r.body


def test_forged_expired_and_foreign_cookies(door: Door, tmp_path: Path) -> None:
    jar = signed_in(door, tmp_path)
    good = jar_cookies(jar, "wiki.test")[COOKIE]
    sealer = door.door.sso.sealer
    principal = sealer.open(AppSession, door.host("wiki.test"), good).principal
    now = int(time.time())
    expired = sealer.seal(door.host("wiki.test"), AppSession(principal, now - 1, now - 100))
    tampered = good[:-6] + ("AAAAAA" if not good.endswith("AAAAAA") else "BBBBBB")
    forged_principal = Principal(user_id="u-admin", upn="admin@corp.example", session_id="s-x", expires=now + 999)
    from dataplane.edge.web import KeyRing
    from dataplane.edge.web.session import Sealer
    forged = Sealer(KeyRing.generate()).seal(door.host("wiki.test"), AppSession(forged_principal, now + 999, now))
    cases = {"expired": expired, "forged": tampered, "forged2": forged, "other_host": good}
    for name, value in cases.items():
        host = "docs.test" if name == "other_host" else "wiki.test"
        r = curl(door, door.url(host, "/hello"), "-H", f"Cookie: {COOKIE}={value}")
        assert r.status == 302 and "/.ferryman/sign_in" in r.header("location"), name
    c = door.door.counters
    assert c["web_cookie_refused_expired"] == 1 and c["web_cookie_refused_forged"] == 3
    assert not any(seen[1] == "/hello" for seen in door.backends["docs"].seen)
    # a code for one host replayed, or used on another host, is refused
    r = curl(door, door.url("wiki.test", "/.ferryman/callback?code=1.k1.AAAA"))
    assert r.status == 400 and b"bad_code" in r.body


def test_passthrough(door: Door) -> None:
    r = curl(door, door.url("open.test", "/headers"), "-H", "X-Ferryman-Jwt-Assertion: forged", "-H",
             "X-Forwarded-For: 6.6.6.6")
    assert r.status == 200
    seen = json.loads(r.body)
    assert "x-ferryman-jwt-assertion" not in seen and seen["x-forwarded-for"] == "127.0.0.1"
    assert curl(door, door.url("open.test", "/robots.txt")).body == b"User-agent: *\nAllow: /\n"  # the backend's
    assert door.dialer.principals[-1] is None
    rec = door.wait_record(lambda r: r.app == "open" and r.path == "/robots.txt")
    assert rec.app == "open" and rec.action == "allow" and rec.code == "passthrough" and rec.upn == ""


def test_identity_headers_and_assertion(door: Door, tmp_path: Path) -> None:
    jar = signed_in(door, tmp_path)
    door.rules.groups[ALICE.user_id] = ("g-eng", "g-ops")
    r = curl(door, door.url("wiki.test", "/headers"), "-H", "X-Forwarded-For: 6.6.6.6", "-H", "X-Remote-User: root",
             "-H", "X-Ferryman-User: root", "-H", "Forwarded: for=6.6.6.6", "-H", "Cookie: mine=1", jar=jar)
    seen = json.loads(r.body)
    assert seen["host"] == f"wiki.internal:{door.backends['wiki'].port}"
    assert seen["x-forwarded-for"] == "127.0.0.1" and seen["x-forwarded-proto"] == "https"
    assert seen["x-forwarded-host"] == door.host("wiki.test")
    assert seen["x-remote-user"] == ALICE.upn and seen["x-remote-groups"] == "g-eng,g-ops"
    assert seen["x-email"] == ALICE.upn
    assert "x-ferryman-user" not in seen and "forwarded" not in seen
    assert "__Host-ferryman" not in seen.get("cookie", "") and "mine=1" in seen.get("cookie", "")
    keys = curl(door, door.url("auth.test", "/.ferryman/jwks.json"))
    assert keys.status == 200 and keys.header("content-type") == "application/jwk-set+json"
    decoded = jwt.decode(seen["x-ferryman-jwt-assertion"], KeySet.import_key_set(json.loads(keys.body)),
                         algorithms=["ES256"])
    c = decoded.claims
    assert c["aud"] == f"https://wiki.test:{door.port}" and c["iss"] == f"https://auth.test:{door.port}"
    assert (c["sub"], c["upn"], c["groups"], c["app"]) == (ALICE.user_id, ALICE.upn, ["g-eng", "g-ops"], "wiki")
    assert c["sid"] == next(iter(door.users.sessions)) and 0 < c["exp"] - time.time() <= 60
    assert curl(door, door.url("wiki.test", "/.ferryman/jwks.json")).body == keys.body


def test_translation(door: Door, tmp_path: Path) -> None:
    jar = signed_in(door, tmp_path)
    wiki = door.backends["wiki"]
    internal = f"http://wiki.internal:{wiki.port}"
    external = f"https://wiki.test:{door.port}"
    r = curl(door, door.url("wiki.test", "/redirect"), jar=jar)
    assert r.status == 302 and r.header("location") == f"{external}/next"
    assert r.header("content-location") == f"{external}/redirect" and r.header("refresh") == f"5; url={external}/next"
    assert r.header("set-cookie") == "app=1; Path=/"
    page = curl(door, door.url("wiki.test", "/page"), jar=jar, http2=True)
    assert f'href="{external}/next"'.encode() in page.body and f'href="{external}/style.css"'.encode() in page.body
    assert f'var internal = "{internal}/api"'.encode() in page.body  # JavaScript untouched
    assert f'srcset="{external}/a.png 1x, {external}/b.png 2x"'.encode() in page.body
    assert page.header("content-length") == ""
    css = curl(door, door.url("wiki.test", "/style.css"), jar=jar)
    assert css.body == f'body {{ background: url("{external}/bg.png") }} @import "{external}/more.css";'.encode()
    gz = curl(door, door.url("wiki.test", "/gz-page"), "--compressed", jar=jar)
    assert gz.header("content-encoding") == "gzip"
    assert gz.body == f'<html><body><a id="l" href="{external}/x">x</a></body></html>'.encode() * 200
    docs = curl(door, door.url("docs.test", "/page"), "-L", jar=jar)  # body translation off for docs
    assert f"http://docs.internal:{door.backends['docs'].port}".encode() in docs.body


def test_streaming_bodies(door: Door, tmp_path: Path) -> None:
    jar = signed_in(door, tmp_path, host="docs.test")
    body = hashlib.sha256(b"x").digest() * (20 * 1024 * 1024 // 32)  # 20 MiB
    digest = hashlib.sha256(body).hexdigest()
    for http2 in (False, True):
        r = curl(door, door.url("docs.test", "/echo"), jar=jar, data=body, http2=http2)
        assert r.status == 200 and r.header("x-sha256") == digest and hashlib.sha256(r.body).hexdigest() == digest
    chunked = curl(door, door.url("docs.test", "/echo"), "-H", "Transfer-Encoding: chunked", jar=jar, data=body)
    assert chunked.header("x-sha256") == digest and chunked.header("x-request-chunked") == "True"
    h2_unknown = curl(door, door.url("docs.test", "/echo"), "-H", "Transfer-Encoding: chunked", jar=jar, data=body,
                      http2=True)
    assert h2_unknown.header("x-sha256") == digest  # HTTP/2 without content-length → chunked to the backend
    big = curl(door, door.url("docs.test", "/big?n=30000000"), jar=jar, http2=True)
    expected = (hashlib.sha256(b"seed").digest() * 2048)
    assert len(big.body) == 30000000 and big.body[:len(expected)] == expected
    rec = door.wait_record(lambda r: r.path == "/echo" and r.protocol == "HTTP/2" and r.bytes_out == len(body))
    assert rec.bytes_in == len(body)


def test_expect_continue(door: Door, tmp_path: Path) -> None:
    jar = signed_in(door, tmp_path, host="docs.test")
    body = b"z" * (3 * 1024 * 1024)
    r = curl(door, door.url("docs.test", "/echo"), "-v", "-H", "Expect: 100-continue", jar=jar, data=body)
    assert r.status == 200 and r.header("x-length") == str(len(body))
    # refused before the body: no 100, no upload; the connection closes after the 401
    s = tls_socket(door, "docs.test", ["http/1.1"])
    s.sendall(f"POST /echo HTTP/1.1\r\nHost: docs.test:{door.port}\r\nContent-Length: 1000000\r\n"
              "Expect: 100-continue\r\n\r\n".encode())
    status, headers, _ = read_response(s)
    assert status == 401 and headers["connection"] == "close"
    s.close()


def test_pipelining_and_keep_alive(door: Door) -> None:
    s = tls_socket(door, "open.test", ["http/1.1"])
    host = door.host("open.test")
    s.sendall((f"GET /hello HTTP/1.1\r\nHost: {host}\r\n\r\n" f"GET /conn HTTP/1.1\r\nHost: {host}\r\n\r\n"
               f"GET /hello?2 HTTP/1.1\r\nHost: {host}\r\n\r\n").encode())
    data = b""
    s.settimeout(10)
    while data.count(b"HTTP/1.1 200") < 3 or not data.endswith(b"hello from backend open"):
        chunk = s.recv(65536)
        assert chunk
        data += chunk
    parts = data.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert parts[0].endswith(b"hello from backend open") and parts[2].endswith(b"hello from backend open")
    assert b"connection: keep-alive" in parts[0]
    s.close()


def test_backend_pool_is_per_session(door: Door, tmp_path: Path) -> None:
    jar_a = signed_in(door, tmp_path, ALICE, "docs.test", "a")
    jar_b = signed_in(door, tmp_path, BOB, "docs.test", "b")
    a = {curl(door, door.url("docs.test", "/conn"), jar=jar_a).body for _ in range(4)}
    b = {curl(door, door.url("docs.test", "/conn"), jar=jar_b).body for _ in range(4)}
    assert len(a) == 1 and len(b) == 1 and not a & b  # reused within a session, never across users
    assert door.door.pool.reused >= 6
    sid_a = door.door.sso.sealer.open(AppSession, door.host("docs.test"),
                                      jar_cookies(jar_a, "docs.test")[COOKIE]).principal.session_id
    assert door.loop.call(door.door.pool.drop, None, sid_a) == 1


def test_pooled_connection_closed_by_the_backend_is_not_used_again(door: Door, tmp_path: Path) -> None:
    """A connection the backend closed while it sat in the pool is not used for the next request."""
    jar = signed_in(door, tmp_path, ALICE, "docs.test", "a")
    first = curl(door, door.url("docs.test", "/conn-then-close"), jar=jar)
    assert first.status == 200 and first.body.isdigit()
    opened = door.door.pool.opened
    second = curl(door, door.url("docs.test", "/conn"), jar=jar)
    assert second.status == 200 and second.body.isdigit()
    assert door.door.pool.opened == opened + 1
    third = curl(door, door.url("docs.test", "/conn"), jar=jar)
    assert third.body == second.body and door.door.pool.opened == opened + 1  # the new one is pooled and reused


def test_pooled_connection_that_closes_unanswered_is_retried_once(door: Door, tmp_path: Path) -> None:
    """A pooled connection the backend closes on the next request without any answer (its idle
    timeout crossing the request): that request (a GET, bodiless, so begun in callbacks) goes to a
    new connection, once, on the ordinary path; a POST is not retried (502)."""
    jar = signed_in(door, tmp_path, ALICE, "docs.test", "a")
    first = curl(door, door.url("docs.test", "/conn-then-drop"), jar=jar)
    assert first.status == 200 and len(door.door.pool) == 1
    retries, opened = door.door.counters["web_backend_retry"], door.door.pool.opened
    direct = door.door.counters["web_direct"]
    second = curl(door, door.url("docs.test", "/conn"), jar=jar)
    assert second.status == 200 and second.body.isdigit() and door.door.counters["web_direct"] == direct + 1
    assert door.door.counters["web_backend_retry"] == retries + 1 and door.door.pool.opened == opened + 1
    third = curl(door, door.url("docs.test", "/conn"), jar=jar)
    assert third.body == second.body and door.door.pool.opened == opened + 1  # the new one is pooled and reused
    assert curl(door, door.url("docs.test", "/conn-then-drop"), jar=jar).status == 200
    refused = curl(door, door.url("docs.test", "/echo"), "-X", "POST", jar=jar)
    assert refused.status == 502 and door.door.counters["web_backend_retry"] == retries + 1
    assert door.door.in_flight == 0


def test_backend_tls_verification(tmp_path: Path) -> None:
    d = start_door(tmp_path)
    try:
        signed = Backend("tls", "backend.internal", tls=(d.pki.backend_cert, d.pki.backend_key), tmp=tmp_path)
        selfsigned = Backend("self", "backend.internal", tls=(d.pki.selfsigned_cert, d.pki.selfsigned_key), tmp=tmp_path)
        d.backends.update(tls=signed, self=selfsigned)
        cases = [
            (signed, dict(backend_ca=d.pki.backend_ca_pem), 200),
            (signed, {}, 502),  # not in the system store
            (selfsigned, {}, 502),
            (selfsigned, dict(backend_ca=d.pki.backend_ca_pem), 502),
            (selfsigned, dict(verify_backend=False), 200),
        ]
        for backend, options, status in cases:
            d.set_apps([d.app("tls", "tls.test", backend, preauth="passthrough", **options)])
            r = curl(d, d.url("tls.test", "/hello"))
            assert r.status == status, (options, r)
            if status == 502:
                assert b"The application&#39;s certificate could not be verified." in r.body
                assert b"backend.internal" not in r.body  # no internal details
            else:
                assert r.body == f"hello from backend {backend.server.name}".encode()
    finally:
        stop_door(d)


def test_oidc_hook(tmp_path: Path) -> None:
    d = start_door(tmp_path, oidc=OidcFake())
    try:
        b = Backend("wiki", "wiki.internal")
        d.backends["wiki"] = b
        d.set_apps([d.app("wiki", "wiki.test", b)])
        jar = str(tmp_path / "jar")
        first = curl(d, d.url("wiki.test", "/hello"), jar=jar)
        form = curl(d, first.header("location"), jar=jar)
        assert b"Sign in with Test IdP" in form.body
        start = curl(d, d.url("auth.test", "/.ferryman/oidc/start?" + first.header("location").split("?", 1)[1]), jar=jar)
        assert start.status == 302 and start.header("location").startswith("https://idp.test/authorize?state=")
        state = start.header("location").split("state=")[1]
        wrong = curl(d, d.url("auth.test", "/.ferryman/oidc/callback?state=other&code=ok"), jar=jar)
        assert wrong.status == 400 and b"bad_state" in wrong.body
        r = curl(d, d.url("auth.test", f"/.ferryman/oidc/callback?state={state}&code=ok"), "-L", jar=jar)
        assert (r.status, r.body) == (200, b"hello from backend wiki")
    finally:
        stop_door(d)


def test_misdirected_with_custom_certificate(door: Door) -> None:
    custom = Backend("custom", "custom.internal")
    door.backends["custom"] = custom
    apps = list(door.door.routes[h].app for h in door.door.routes)
    door.set_apps(apps + [WebApp(name="custom", external_url=f"https://custom.test:{door.port}",
                                 internal_url=custom.internal_url, preauth="passthrough",
                                 certificate=door.pki.custom_cert, certificate_key=door.pki.custom_key)])
    r = curl(door, door.url("custom.test", "/hello"), "-v")
    assert (r.status, r.body) == (200, b"hello from backend custom")
    s = tls_socket(door, "custom.test", ["http/1.1"])
    assert s.getpeercert()["subject"] == ((("commonName", "custom.test"),),)
    s.sendall(f"GET /hello HTTP/1.1\r\nHost: open.test:{door.port}\r\n\r\n".encode())
    status, _, _ = read_response(s)
    assert status == 421
    s.close()


def test_trailers_and_hop_by_hop(door: Door) -> None:
    c = H2Client(door, "open.test")
    sid = c.request("GET", "/trailers", [(b"te", b"trailers")])
    status, _, body, _ = c.response(sid)
    trailers = [dict(e.headers) for e in c.events if type(e).__name__ == "TrailersReceived" and e.stream_id == sid]
    assert (status, body) == (200, b"hello") and trailers == [{b"x-checksum": b"abc123"}]
    c.close()
    s = tls_socket(door, "open.test", ["http/1.1"])
    s.sendall(f"GET /trailers HTTP/1.1\r\nHost: open.test:{door.port}\r\nTE: trailers\r\n\r\n".encode())
    status, headers, rest = read_response(s)
    while not rest.endswith(b"\r\n\r\n"):
        rest += s.recv(65536)
    assert headers["transfer-encoding"] == "chunked" and rest == b"5\r\nhello\r\n0\r\nx-checksum: abc123\r\n\r\n"
    s.close()
    hop = curl(door, door.url("open.test", "/hop"), http2=True)
    assert hop.body == b"hop" and "x-secret" not in hop.headers and "alt-svc" not in hop.headers
    assert "keep-alive" not in hop.headers


def test_cors_preflight_bypass(door: Door) -> None:
    wiki = door.backends["wiki"]
    apps = [r.app for r in door.door.routes.values() if r.app.name != "wiki"]
    preflight = ["-X", "OPTIONS", "-H", "Origin: https://portal.test", "-H", "Access-Control-Request-Method: POST"]
    assert curl(door, door.url("wiki.test", "/api"), *preflight).status == 401  # off by default: sign in first
    door.set_apps(apps + [door.app("wiki", "wiki.test", wiki, cors_preflight_bypass=True)])
    r = curl(door, door.url("wiki.test", "/api"), *preflight)
    assert r.status == 204 and r.header("access-control-allow-origin") == "https://portal.test"
    assert "x-ferryman-jwt-assertion" not in {k.lower() for k in wiki.seen[-1][2]}
    assert curl(door, door.url("wiki.test", "/api"), "-X", "OPTIONS").status == 401  # not a preflight


def test_persistent_cookie_option_and_code_replay(door: Door, tmp_path: Path) -> None:
    docs = door.backends["docs"]
    apps = [r.app for r in door.door.routes.values() if r.app.name != "docs"]
    door.set_apps(apps + [door.app("docs", "docs.test", docs, cookie_persistent=True, cookie_same_site="Strict")])
    jar = signed_in(door, tmp_path)  # on wiki; docs by single sign-on below, step by step
    first = curl(door, door.url("docs.test", "/hello"), jar=jar)
    to_auth = curl(door, first.header("location"), jar=jar)
    assert to_auth.status == 303
    callback = to_auth.header("location")
    assert callback.startswith(door.url("docs.test", "/.ferryman/callback?code="))
    done = curl(door, callback, jar=jar)
    assert done.status == 302 and done.header("location") == "/hello"
    cookies = done.headers["set-cookie"]
    session = next(c for c in cookies if c.startswith(COOKIE + "="))
    assert "Max-Age=" in session and "SameSite=Strict" in session and "HttpOnly" in session
    max_age = int(re.search(r"Max-Age=(\d+)", session).group(1))
    assert 3500 < max_age <= 3600  # never past the access token's end
    assert any(c.startswith("__Host-ferryman-s-") and "Max-Age=0" in c for c in cookies)  # state cleared
    replay = curl(door, callback, jar=jar)
    assert replay.status == 400  # the state cookie is gone and the code was used
    stolen = curl(door, callback)  # another browser (no state cookie) cannot use it either
    assert stolen.status == 400 and b"bad_state" in stolen.body


def test_refresh_through_the_sign_in_host(tmp_path: Path) -> None:
    d = start_door(tmp_path, access_lifetime=31)  # REFRESH_MARGIN is 30 s
    try:
        b, docs = Backend("wiki", "wiki.internal"), Backend("docs", "docs.internal")
        d.backends.update(wiki=b, docs=docs)
        d.set_apps([d.app("wiki", "wiki.test", b), d.app("docs", "docs.test", docs)])
        jar = signed_in(d, tmp_path)
        assert d.users.refreshes == 0
        time.sleep(1.5)  # the sign-in host's access token is now within the margin of its end
        r = curl(d, d.url("docs.test", "/hello"), "-L", jar=jar)
        assert (r.status, r.body) == (200, b"hello from backend docs")
        assert d.users.refreshes == 1  # the single-sign-on round trip refreshed it, once

        async def twice():
            import asyncio
            from dataplane.edge.web.session import AuthSession
            token = jar_cookies(jar, "auth.test")[COOKIE]
            session = d.door.sso.sealer.open(AuthSession, d.host("auth.test"), token)
            return await asyncio.gather(d.door.sso._refresh(session.refresh_token, "127.0.0.1"),
                                        d.door.sso._refresh(session.refresh_token, "127.0.0.1"))

        a, b2 = d.loop.run(twice())
        assert a == b2 and d.users.refreshes == 2  # concurrent refreshes of one token: one call, one result
    finally:
        stop_door(d)


def test_abandoned_sign_ins_do_not_grow_cookies(door: Door, tmp_path: Path) -> None:
    jar = str(tmp_path / "jar")
    for _ in range(4):
        curl(door, door.url("wiki.test", "/hello"), jar=jar)
    olds = {n for n in jar_cookies(jar, "wiki.test") if n.startswith("__Host-ferryman-s-")}
    assert len(olds) == 4
    r = curl(door, door.url("wiki.test", "/hello"), jar=jar)
    cleared = {c.split("=")[0] for c in r.headers["set-cookie"] if "Max-Age=0" in c}
    assert cleared == olds  # the abandoned sign-ins' cookies are deleted, the new one set
    assert len([c for c in r.headers["set-cookie"] if "Max-Age=300" in c]) == 1


def test_every_request_is_authorized(door: Door, tmp_path: Path) -> None:
    jar = signed_in(door, tmp_path)
    before = door.rules.calls
    for _ in range(5):
        assert curl(door, door.url("wiki.test", "/hello"), jar=jar, http2=True).status == 200
    assert door.rules.calls == before + 5


def test_cookie_key_rotation(door: Door, tmp_path: Path) -> None:
    from dataplane.edge.web import KeyRing
    from dataplane.edge.web.session import b64e
    jar = signed_in(door, tmp_path)
    assert curl(door, door.url("wiki.test", "/hello"), jar=jar).status == 200
    new = "k2:" + b64e(b"\x07" * 32)
    # the new key first (current), the old one still opened: existing cookies keep working
    door.loop.call(door.door.set_cookie_keys, KeyRing.from_text(f"{new},{door.cookie_keys}"))
    assert curl(door, door.url("wiki.test", "/hello"), jar=jar).status == 200
    # drop the old key: its cookies are refused at once (even ones already opened and remembered)
    door.loop.call(door.door.set_cookie_keys, KeyRing.from_text(new))
    r = curl(door, door.url("wiki.test", "/hello"), jar=jar)
    assert r.status == 302 and door.door.counters["web_cookie_refused_unknown_key"] >= 1


def test_draining_shuts_the_listening_port(tmp_path: Path) -> None:
    """An edge draining stops taking web connections: the listening socket is shut down (not only
    closed: a worker's is shared with its supervisor). On uvloop the server's sockets refuse
    shutdown(), which raised out of the drain and ended the edge with a traceback."""
    d = start_door(tmp_path)
    try:
        socket.create_connection(("127.0.0.1", d.port), timeout=5).close()  # listening
        d.loop.call(d.door.stop_listening)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", d.port), timeout=5).close()
    finally:
        stop_door(d)
