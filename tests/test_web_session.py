"""Unit tests of the front door's sealed cookies, one-time codes, replay cache and revocations.

Checks that sealed tokens round-trip, stay under the cookie limit, and are refused when
forged, tampered, expired, sealed for another host or another purpose, or sealed with an
unknown key; that key rotation keeps old cookies readable; that the one-time cache refuses
replays and refuses (rather than forgets) when full; and the cookie header attributes.
"""

from __future__ import annotations

import time

import pytest

from dataplane.edge.web.model import Principal
from dataplane.edge.web.session import (
    COOKIE, MAX_COOKIE, AppSession, AuthSession, Code, KeyRing, OneTimeCache, RevokedSessions, Sealer, SealError,
    SignInState, b64e, clear_cookie, cookie_header, parse_cookies, state_cookie_name,
)

pytestmark = pytest.mark.timeout(30)

NOW = 1_800_000_000
P = Principal(user_id="3f1d2c4e-8a9b-4c1d-9e2f-1234567890ab", upn="alice.with.a.long.name@corp.example.com",
              session_id="7a1d2c4e-8a9b-4c1d-9e2f-1234567890ab", device_id="", amr=("pwd", "mfa"),
              auth_time=NOW - 100, expires=NOW + 3600)


def test_app_cookie_round_trip_and_size() -> None:
    s = Sealer(KeyRing.generate())
    token = s.seal("wiki.example.com", AppSession(P, NOW + 3600, NOW))
    assert token.startswith("1.k1.")
    got = s.open(AppSession, "wiki.example.com", token, now=NOW)
    assert got.principal == P and got.exp == NOW + 3600
    assert len(COOKIE) + 1 + len(token) < 600  # far under the 4 KB a browser keeps
    auth = s.seal("auth.example.com", AuthSession(P, "rt_" + "x" * 200, NOW + 86400, NOW))
    assert len(auth) < 1000
    header = cookie_header(COOKIE, token)
    assert header.startswith(b"__Host-ferryman=1.k1.")
    assert b"; Path=/; Secure; HttpOnly; SameSite=Lax" in header
    assert b"Domain" not in header and b"Max-Age" not in header  # a browser-session cookie
    assert b"Max-Age=60" in cookie_header(COOKIE, token, max_age=60)


def test_refused_tokens() -> None:
    keys = KeyRing.generate()
    s = Sealer(keys)
    token = s.seal("wiki.example.com", AppSession(P, NOW + 60, NOW))

    def reason(kind, host, tok, now=NOW) -> str:
        with pytest.raises(SealError) as info:
            s.open(kind, host, tok, now=now)
        return info.value.reason

    assert reason(AppSession, "docs.example.com", token) == "forged"  # another host
    assert reason(AuthSession, "wiki.example.com", token) == "forged"  # another purpose
    assert reason(AppSession, "wiki.example.com", token, now=NOW + 60) == "expired"
    raw = bytearray(token.encode())
    raw[-5] = ord("A") if raw[-5] != ord("A") else ord("B")
    assert reason(AppSession, "wiki.example.com", raw.decode()) == "forged"  # tampered
    assert reason(AppSession, "wiki.example.com", "1.k2." + token.split(".", 2)[2]) == "unknown_key"
    assert reason(AppSession, "wiki.example.com", "garbage") == "malformed"
    assert reason(AppSession, "wiki.example.com", "1.k1.!!!") == "malformed"
    assert reason(AppSession, "wiki.example.com", "") == "malformed"
    assert reason(AppSession, "wiki.example.com", "1.k1." + "A" * 9000) == "malformed"
    forged = Sealer(KeyRing.generate()).seal("wiki.example.com", AppSession(P, NOW + 60, NOW))
    assert reason(AppSession, "wiki.example.com", forged) == "forged"  # someone else's key, same id


def test_key_rotation() -> None:
    old = KeyRing.from_text("k1:" + b64e(b"\x01" * 32))
    token = Sealer(old).seal("h", SignInState("n" * 24, "/x", NOW + 10))
    rotated = KeyRing.from_text("k2:" + b64e(b"\x02" * 32) + ",k1:" + b64e(b"\x01" * 32))
    assert rotated.current == "k2"
    assert Sealer(rotated).open(SignInState, "h", token, now=NOW).return_to == "/x"
    assert Sealer(rotated).seal("h", SignInState("n", "/", NOW)).startswith("1.k2.")
    for bad in ("k1", "k1:AAAA", "bad id!:" + b64e(b"\x01" * 32)):
        with pytest.raises(ValueError):
            KeyRing.from_text(bad)


def test_code_binds_nonce_and_host() -> None:
    s = Sealer(KeyRing.generate())
    code = Code(jti="j1", nonce="n1", principal=P, session_expires=NOW + 999, exp=NOW + 60)
    text = s.seal("wiki.example.com", code)
    assert s.open(Code, "wiki.example.com", text, now=NOW).nonce == "n1"
    with pytest.raises(SealError):
        s.open(Code, "evil.example.com", text, now=NOW)


def test_one_time_cache() -> None:
    cache = OneTimeCache(max_entries=3)
    cache.use("a", exp=100, now=0)
    with pytest.raises(SealError) as info:
        cache.use("a", exp=100, now=1)
    assert info.value.reason == "replayed"
    cache.use("b", exp=100, now=1)
    cache.use("c", exp=100, now=1)
    with pytest.raises(SealError) as info:
        cache.use("d", exp=100, now=2)  # full of unexpired ids: refuse, never forget one
    assert info.value.reason == "busy"
    with pytest.raises(SealError):
        cache.use("a", exp=100, now=2)  # still remembered
    cache.use("d", exp=200, now=100)  # a, b, c expired and are dropped
    assert len(cache) == 1


def test_revoked_sessions_bounded() -> None:
    r = RevokedSessions(max_entries=2)
    end = time.time() + 100
    r.add("s1", end)
    r.add("s2", end + 1)
    r.add("s3", end + 2)  # forgets the one closest to its end
    assert "s1" not in r and "s2" in r and "s3" in r
    r.add("gone", time.time() - 1)
    assert "gone" not in r


def test_cookie_helpers() -> None:
    assert parse_cookies([b"a=1; __Host-ferryman=xyz", b"a=2; b=3"]) == {"a": "1", "__Host-ferryman": "xyz", "b": "3"}
    assert state_cookie_name("abc/def+ghi-jklmnopq") == "__Host-ferryman-s-abcdefghi-jk"
    assert clear_cookie(COOKIE).endswith(b"Max-Age=0")
    with pytest.raises(SealError) as info:
        cookie_header(COOKIE, "x" * MAX_COOKIE)
    assert info.value.reason == "too_large"
