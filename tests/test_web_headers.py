"""Unit tests of header rules, the identity assertion, rate-limit buckets, app checks and settings.

Header sanitising: hop-by-hop removal (RFC 9110 §7.6.1, including fields named by
``Connection``), client-sent identity and address headers stripped, the edge's own cookies
cut out of ``Cookie``, header-SSO values without CR/LF. The assertion is verified with
joserfc against the published JWKS (signature, claims, expiry). Token buckets answer the
right ``Retry-After``. ``WebApp`` records with mistakes are refused with a message that
names the app and the field.
"""

from __future__ import annotations

import time

import pytest
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from dataplane.edge.web import AssertionSigner, WebApp, WebAppError, WebSettings, jwks
from dataplane.edge.web.exchange import normalize_host
from dataplane.edge.web.headers import (
    backend_request_headers, backend_response_headers, forwarded_headers, sanitize_value, sso_headers,
)
from dataplane.edge.web.limits import KeyedBuckets, TokenBucket, retry_after
from dataplane.edge.web.routes import build_routes

pytestmark = pytest.mark.timeout(30)


def test_request_headers_stripped() -> None:
    client = [
        (b"host", b"wiki.example.com"), (b"user-agent", b"UA"), (b"connection", b"keep-alive, X-Hop"),
        (b"x-hop", b"1"), (b"keep-alive", b"300"), (b"te", b"trailers"), (b"transfer-encoding", b"chunked"),
        (b"upgrade", b"h2c"), (b"proxy-authorization", b"Basic x"), (b"x-ferryman-user", b"admin"),
        (b"x-ferryman-jwt-assertion", b"forged"), (b"x-forwarded-for", b"1.2.3.4"), (b"x-forwarded-host", b"evil"),
        (b"forwarded", b"for=1.2.3.4"), (b"x-real-ip", b"1.2.3.4"), (b"true-client-ip", b"1.2.3.4"),
        (b"x-remote-user", b"root"), (b"cookie", b"a=1; __Host-ferryman=SECRET"),
        (b"cookie", b"__Host-ferryman-s-abc=S; b=2"), (b"authorization", b"Basic app-own"), (b"expect", b"100-continue"),
        (b"accept-encoding", b"gzip, br"),
    ]
    out = backend_request_headers(client, sso_names=[b"x-remote-user"])
    names = [n for n, _ in out]
    assert names == [b"user-agent", b"authorization", b"accept-encoding", b"cookie"]
    assert dict(out)[b"cookie"] == b"a=1; b=2"
    assert dict(out)[b"accept-encoding"] == b"gzip, br"
    narrowed = dict(backend_request_headers(client, sso_names=[], translate_encoding=True))
    assert narrowed[b"accept-encoding"] == b"gzip"
    only_own = backend_request_headers([(b"cookie", b"__Host-ferryman=x")], sso_names=[])
    assert only_own == []
    ws = backend_request_headers([(b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
                                  (b"sec-websocket-key", b"k")], sso_names=[], keep_upgrade=True)
    assert ws == [(b"upgrade", b"websocket"), (b"sec-websocket-key", b"k"), (b"connection", b"upgrade")]
    assert forwarded_headers("203.0.113.9", "wiki.example.com") == [
        (b"x-forwarded-for", b"203.0.113.9"), (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"wiki.example.com")]


def test_response_headers_and_sso() -> None:
    resp = [(b"content-type", b"text/html"), (b"connection", b"close, X-Internal"), (b"x-internal", b"secret"),
            (b"transfer-encoding", b"chunked"), (b"alt-svc", b'h3=":443"'), (b"set-cookie", b"a=1"),
            (b"set-cookie", b"b=2"), (b"content-length", b"10")]
    assert backend_response_headers(resp) == [(b"content-type", b"text/html"), (b"set-cookie", b"a=1"),
                                              (b"set-cookie", b"b=2"), (b"content-length", b"10")]
    assert sanitize_value("evil\r\nX-Admin: 1\x00") == b"evilX-Admin: 1"
    assert sanitize_value("Zoë") == "Zoë".encode()
    out = sso_headers({"upn": "X-Remote-User", "groups": "X-Groups", "email": "X-Email", "missing": "X-None"},
                      {"upn": "alice@corp\r\nX-Injected: yes", "groups": ["g1", "g2"], "email": ""})
    assert out == [(b"x-remote-user", b"alice@corpX-Injected: yes"), (b"x-groups", b"g1,g2")]


def test_assertion_verifies_with_jwks() -> None:
    signer, old = AssertionSigner.generate(), AssertionSigner.generate()
    token = signer.assertion(issuer="https://auth.example.com", audience="https://wiki.example.com", app="wiki",
                             subject="u1", upn="alice@corp.example", session_id="s1", groups=("g1", "g2"),
                             amr=("pwd", "mfa"), auth_time=1000, device_id="", extra={"email": "alice@corp.example"},
                             lifetime=60)
    document = jwks(signer, old)
    assert [k["kid"] for k in document["keys"]] == [signer.kid, old.kid]
    assert all(k["alg"] == "ES256" and k["crv"] == "P-256" and "d" not in k for k in document["keys"])
    decoded = jwt.decode(token, KeySet.import_key_set(document), algorithms=["ES256"])
    c = decoded.claims
    assert decoded.header["kid"] == signer.kid and decoded.header["alg"] == "ES256"
    assert (c["iss"], c["aud"], c["sub"], c["upn"], c["sid"], c["groups"], c["app"]) == (
        "https://auth.example.com", "https://wiki.example.com", "u1", "alice@corp.example", "s1", ["g1", "g2"], "wiki")
    assert c["exp"] - c["iat"] == 60 and c["email"] == "alice@corp.example" and "did" not in c
    jwt.JWTClaimsRegistry(iss={"essential": True, "value": "https://auth.example.com"},
                          aud={"essential": True, "value": "https://wiki.example.com"}).validate(c)
    expired = signer.assertion(issuer="i", audience="a", app="wiki", subject="u", upn="u", session_id="s",
                               lifetime=60, now=time.time() - 600)
    with pytest.raises(JoseError):
        jwt.JWTClaimsRegistry().validate(jwt.decode(expired, KeySet.import_key_set(document)).claims)
    with pytest.raises(JoseError):  # another edge's key
        jwt.decode(token, KeySet.import_key_set(jwks(old)), algorithms=["ES256"])
    again = signer.assertion(issuer="https://auth.example.com", audience="https://wiki.example.com", app="wiki",
                             subject="u1", upn="alice@corp.example", session_id="s1", groups=("g1", "g2"),
                             amr=("pwd", "mfa"), auth_time=1000, extra={"email": "alice@corp.example"}, lifetime=60)
    assert again == token  # cached while more than half its lifetime is left
    assert AssertionSigner.from_pem(signer.private_pem()).kid == signer.kid


def test_token_buckets() -> None:
    b = TokenBucket(rate=10, burst=10, now=0.0)
    assert all(b.take(0.0) == 0.0 for _ in range(10))
    wait = b.take(0.0)
    assert wait == pytest.approx(0.1)
    assert retry_after(wait) == b"1" and retry_after(2.2) == b"3"
    assert b.take(0.1) == 0.0
    keyed = KeyedBuckets(rate=1, burst=2, max_keys=2)
    assert keyed.take("a", 0) == 0 and keyed.take("a", 0) == 0 and keyed.take("a", 0) > 0
    keyed.take("b", 0)
    keyed.take("c", 0)
    assert len(keyed) == 2


def test_app_checks() -> None:
    s = WebSettings()

    def refuse(*apps: WebApp) -> str:
        with pytest.raises(WebAppError) as info:
            build_routes(apps, s, "auth.example.com")
        return str(info.value)

    ok = dict(name="wiki", external_url="https://wiki.example.com", internal_url="http://wiki.internal:8080")
    routes = build_routes([WebApp(**ok)], s, "auth.example.com")
    assert list(routes) == ["wiki.example.com"]
    r = routes["wiki.example.com"]
    assert r.internal_authority == b"wiki.internal:8080" and r.timeout == 85.0 and not r.internal_tls
    assert "must start with https://" in refuse(WebApp(**{**ok, "external_url": "http://wiki.example.com"}))
    assert "http:// or https://" in refuse(WebApp(**{**ok, "internal_url": "ftp://x"}))
    assert "both use external host wiki.example.com" in refuse(WebApp(**ok), WebApp(**{**ok, "name": "wiki2"}))
    assert "sign-in host" in refuse(WebApp(**{**ok, "external_url": "https://auth.example.com"}))
    assert "query" in refuse(WebApp(**{**ok, "internal_url": "http://x:1/?a=1"}))
    assert "header_sso" in refuse(WebApp(**{**ok, "header_sso": {"upn": "Bad Header"}}))
    assert "header_sso" in refuse(WebApp(**{**ok, "header_sso": {"upn": "X-Forwarded-User"}}))
    assert "certificate and key cannot be used" in refuse(WebApp(**{**ok, "certificate": "x", "certificate_key": "y"}))
    assert "needs both" in refuse(WebApp(**{**ok, "certificate": "x"}))
    long = build_routes([WebApp(**{**ok, "backend_timeout": "long", "internal_url": "https://w.internal"})], s, "")
    assert long["wiki.example.com"].timeout == 180.0 and long["wiki.example.com"].internal_authority == b"w.internal"


def test_settings_and_hosts() -> None:
    with pytest.raises(ValueError, match="max_body_size"):
        WebSettings(max_body_size=0)
    with pytest.raises(ValueError, match="h2_stream_window"):
        WebSettings(h2_stream_window=100)
    assert normalize_host(b"Wiki.Example.COM.:443") == "wiki.example.com"
    assert normalize_host("wiki.example.com:8443") == "wiki.example.com:8443"
    assert normalize_host("[::1]:443") == "[::1]"
    for bad in ("", "a b", "x:99999", "x:abc", "évil.com", "a/b"):
        assert normalize_host(bad) == "", bad


def test_front_door_and_control_plane_share_the_field_rules() -> None:
    """One home: the front door refuses exactly what the control plane's checks refuse, with their words."""
    from dataplane.contract.webapps import WebAppFieldError, check_header_sso, external_endpoint, internal_endpoint

    s = WebSettings()
    ok = dict(name="wiki", external_url="https://wiki.example.com", internal_url="http://wiki.internal:8080")
    cases = [("external_url", v, external_endpoint) for v in (
        "https://Wiki.Example.com.:443/a/", "https://wiki.example.com:0", "https://-bad-.example.com",
        "https://wiki.example.com/x?q=1", "https://u@wiki.example.com", "https://[::1]:8443", "https:///x")]
    cases += [("internal_url", v, internal_endpoint) for v in (
        "http://10.0.0.1:99999", "https://wiki.internal/app/", "http://a_b.internal", "HTTP://W.INTERNAL:81")]
    cases += [("header_sso", v, check_header_sso) for v in ({"upn": "Authorization"}, {"upn": "X-User"},
                                                              {"a": "X-U", "b": "x-u"})]
    for field, value, check in cases:
        try:
            check(value)
            expected = None
        except WebAppFieldError as exc:
            expected = str(exc)
        try:
            build_routes([WebApp(**{**ok, field: value})], s, "")
            got = None
        except WebAppError as exc:
            got = str(exc)
        assert (got is None) == (expected is None), (field, value, got, expected)
        assert got is None or got == f"web app 'wiki': {expected}"
    route = build_routes([WebApp(**{**ok, "external_url": "https://Wiki.Example.com.:8443/a/"})], s, "")
    assert list(route) == ["wiki.example.com:8443"]
    assert route["wiki.example.com:8443"].external_url == "https://wiki.example.com:8443/a"
