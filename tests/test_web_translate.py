"""Unit and property tests of internal → external URL translation (headers, HTML, CSS, gzip).

The streaming rewriters must give the same bytes whatever the chunking: hypothesis feeds
generated HTML and CSS (and fixed documents) in arbitrary splits and compares with the
one-shot result; script bodies, comments and event handlers must come out untouched.
"""

from __future__ import annotations

import gzip
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataplane.edge.web.translate import (
    BodyTranslator, CssRewriter, HtmlRewriter, UrlMap, body_kind, rewrite_css, rewrite_html, translate_header,
)

pytestmark = pytest.mark.timeout(120)

M = UrlMap("http://wiki.corp.local:8080/wiki", "https://wiki.example.com")
SAME = UrlMap("http://app.internal", "https://app.example.com:8443")


def test_url_forms() -> None:
    assert M.url("http://wiki.corp.local:8080/wiki/Page?a=1#f") == "https://wiki.example.com/Page?a=1#f"
    assert M.url("HTTP://WIKI.corp.local:8080/wiki") == "https://wiki.example.com/"
    assert M.url("//wiki.corp.local:8080/wiki/x") == "https://wiki.example.com/x"
    assert M.url("/wiki/x") == "/x"  # root-relative, prefixes differ
    assert M.url("/other") == "/other"
    assert M.url("x/y") == "x/y"
    assert M.url("http://wiki.corp.local:8081/wiki/x") == "http://wiki.corp.local:8081/wiki/x"  # another port
    assert M.url("http://wiki.corp.local:8080.evil.com/x") == "http://wiki.corp.local:8080.evil.com/x"
    assert M.url("https://wiki.corp.local:8080/wiki/x") == "https://wiki.corp.local:8080/wiki/x"  # other scheme
    assert M.url("javascript:alert(1)") == "javascript:alert(1)"
    assert SAME.url("http://app.internal/a") == "https://app.example.com:8443/a"
    assert SAME.url("http://app.internal:80/a") == "https://app.example.com:8443/a"
    assert SAME.url("/a") == "/a"
    assert M.path_to_internal("/Page?x=1") == "/wiki/Page?x=1"
    prefixed = UrlMap("http://h:1/", "https://e.example.com/app")
    assert prefixed.path_to_internal("/app/x") == "/x"
    assert prefixed.path_to_internal("/other") is None


def test_headers() -> None:
    assert translate_header(M, b"location", b"http://wiki.corp.local:8080/wiki/next") == b"https://wiki.example.com/next"
    assert translate_header(M, b"content-location", b"/wiki/a") == b"/a"
    assert translate_header(M, b"refresh", b"5; url=http://wiki.corp.local:8080/wiki/n") == \
        b"5; url=https://wiki.example.com/n"
    assert translate_header(M, b"refresh", b"5") == b"5"
    assert translate_header(M, b"set-cookie", b"sid=1; Domain=wiki.corp.local; Path=/wiki/x; Secure") == \
        b"sid=1; Path=/x; Secure"
    assert translate_header(M, b"set-cookie", b"sid=1; domain=.corp.local; path=/wiki") == b"sid=1; Path=/"
    assert translate_header(M, b"set-cookie", b"t=1; Domain=other.example") == b"t=1; Domain=other.example"
    assert translate_header(M, b"x-other", b"http://wiki.corp.local:8080/wiki/") == b"http://wiki.corp.local:8080/wiki/"


DOC = (b'<!DOCTYPE html><html><head><meta http-equiv="refresh" content="0; url=http://wiki.corp.local:8080/wiki/r">'
       b'<link rel=stylesheet href=http://wiki.corp.local:8080/wiki/s.css><style>a{background:url(/wiki/bg.png)}'
       b'@import "http://wiki.corp.local:8080/wiki/i.css";</style>'
       b'<script>var u = "http://wiki.corp.local:8080/wiki/api"; if (a<b) { x = "<a href=\'/wiki/no\'>"; }</script>'
       b'</head><body onload="go(\'http://wiki.corp.local:8080/wiki/js\')"><!-- <a href="/wiki/c"> -->'
       b'<a HREF="http://wiki.corp.local:8080/wiki/A" class=x>A</a><img src=\'/wiki/i.png\' '
       b'srcset="/wiki/1.png 1x, http://wiki.corp.local:8080/wiki/2.png 2x" alt="a > b">'
       b'<form action="/wiki/f"><button formaction="/wiki/g">go</button></form><textarea><a href="/wiki/t">'
       b'</textarea><div style="background:url(\'/wiki/d.png\')">caf\xc3\xa9</div><p>1 < 2</p></body></html>')


def test_html_document() -> None:
    out = rewrite_html(M, DOC)
    assert b'content="0; url=https://wiki.example.com/r"' in out
    assert b"href=https://wiki.example.com/s.css>" in out
    assert b"url(/bg.png)" in out and b'@import "https://wiki.example.com/i.css"' in out
    assert b'var u = "http://wiki.corp.local:8080/wiki/api"' in out  # never JavaScript
    assert b"<a href='/wiki/no'>" in out  # inside the script
    assert b"go('http://wiki.corp.local:8080/wiki/js')" in out  # event handler untouched
    assert b'<!-- <a href="/wiki/c"> -->' in out
    assert b'HREF="https://wiki.example.com/A" class=x' in out
    assert b"src='/i.png'" in out and b'srcset="/1.png 1x, https://wiki.example.com/2.png 2x"' in out
    assert b'alt="a > b"' in out
    assert b'action="/f"' in out and b'formaction="/g"' in out
    assert b'<textarea><a href="/wiki/t"></textarea>' in out  # raw text, not a tag
    assert b"url('/d.png')" in out and b"caf\xc3\xa9" in out and b"<p>1 < 2</p>" in out


def test_css() -> None:
    css = b'a{b:url( "http://wiki.corp.local:8080/wiki/x" )} @IMPORT \'/wiki/y.css\'; c{d:URL(/wiki/z)} e{f:url(data:x)}'
    assert rewrite_css(M, css) == (b'a{b:url( "https://wiki.example.com/x" )} @IMPORT \'/y.css\'; c{d:URL(/z)} '
                                   b'e{f:url(data:x)}')


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted(set(c % (len(data) + 1) for c in cuts))
    out, prev = [], 0
    for p in points + [len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


def _stream(cls, data: bytes, cuts: list[int], max_carry: int = 16384) -> bytes:
    r = cls(M, max_carry)
    return b"".join(r.feed(c) for c in _chunks(data, cuts)) + r.finish()


@given(st.lists(st.integers(min_value=0, max_value=10**6), max_size=40))
@settings(max_examples=300, deadline=None)
def test_html_document_any_split(cuts: list[int]) -> None:
    assert _stream(HtmlRewriter, DOC, cuts) == rewrite_html(M, DOC)


_pieces = st.sampled_from([
    b"<a href=", b'"', b"'", b"http://wiki.corp.local:8080/wiki/", b"/wiki/", b"x", b" ", b">", b"<", b"</", b"<!--",
    b"-->", b"<script>", b"</script>", b"<style>", b"</style>", b"url(", b")", b"@import ", b"<img src=/wiki/i ",
    b"srcset=", b",", b"=", b"\n", b"<!x>", b"<?p?>", b"\xc3\xa9", b"<textarea>", b"</textarea >", b"<p", b"/>",
    b"<meta http-equiv=refresh content='1; url=/wiki/m'>", b"style=\"x:url(/wiki/s)\"", b"<SCRIPT>", b"</ScRiPt>",
])


@given(st.lists(_pieces, max_size=60), st.lists(st.integers(min_value=0, max_value=10**6), max_size=30),
       st.sampled_from([1024, 16384]))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_html_generated_any_split(parts: list[bytes], cuts: list[int], carry: int) -> None:
    doc = b"".join(parts)
    whole = HtmlRewriter(M, carry)
    expected = whole.feed(doc) + whole.finish()
    assert _stream(HtmlRewriter, doc, cuts, carry) == expected


@given(st.lists(_pieces, max_size=60), st.lists(st.integers(min_value=0, max_value=10**6), max_size=30))
@settings(max_examples=300, deadline=None)
def test_css_generated_any_split(parts: list[bytes], cuts: list[int]) -> None:
    doc = b"".join(parts)
    assert _stream(CssRewriter, doc, cuts) == rewrite_css(M, doc)


def test_bounded_carry() -> None:
    """A tag longer than max_carry is passed on as it is, and the rewriter never holds more."""
    r = HtmlRewriter(M, 1024)
    huge = b'<a title="' + b"x" * 5000 + b'" href="/wiki/a">'
    out = b""
    for i in range(0, len(huge), 100):
        out += r.feed(huge[i:i + 100])
        assert len(r.carry) <= 1024 + 100
    out += r.finish()
    assert out == huge
    r = CssRewriter(M, 1024)
    out = r.feed(b"url(" + b"y" * 3000)
    assert len(r.carry) <= 1024
    assert out + r.finish() == b"url(" + b"y" * 3000


def test_gzip_body_streaming() -> None:
    html = b'<html><body><a href="http://wiki.corp.local:8080/wiki/x">x</a></body></html>' * 5000
    packed = gzip.compress(html)
    t = BodyTranslator("html", M, "gzip")
    out = b""
    for i in range(0, len(packed), 1000):
        for piece in t.feed(packed[i:i + 1000]):
            out += piece
    for piece in t.finish():
        out += piece
    assert gzip.decompress(out) == rewrite_html(M, html)
    bomb = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    data = bomb.compress(b"a" * (20 * 1024 * 1024)) + bomb.flush()  # 20 MiB from ~20 KiB
    t = BodyTranslator("css", M, "gzip")
    sizes = [len(p) for p in t.feed(data)]
    assert len(sizes) > 100  # inflated in bounded steps, not at once


def test_body_kind() -> None:
    assert body_kind(b"text/html; charset=UTF-8") == "html"
    assert body_kind(b"application/xhtml+xml") == "html"
    assert body_kind(b"TEXT/CSS") == "css"
    assert body_kind(b"text/html; charset=utf-16") == ""
    assert body_kind(b"application/javascript") == ""
    assert body_kind(b"") == ""
