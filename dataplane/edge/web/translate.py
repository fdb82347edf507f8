"""Translating a web app's internal URLs into its external ones: headers and HTML/CSS bodies.

A backend writes links to itself (``http://wiki.corp.local:8080/wiki/Page``); a browser
outside can only use the external URL (``https://wiki.example.com/Page``). ``UrlMap``
rewrites one URL: absolute (``http://host[:port]/prefix/...``), scheme-relative
(``//host[:port]/...``) and, when the two path prefixes differ, root-relative
(``/prefix/...``) forms; anything else (other hosts, relative paths, ``data:``,
``javascript:``) is left as it is.

Headers (``translate_headers``, default on): ``Location``, ``Content-Location``,
``Refresh`` (``N; url=...``) and ``Set-Cookie`` (``Domain`` of the internal host is
dropped so the cookie belongs to the external host only; ``Path`` under the internal
prefix moves under the external one).

Bodies (``translate_body``, default off): ``HtmlRewriter`` and ``CssRewriter`` are
streaming, byte-oriented (ASCII-compatible charsets; a UTF-16/32 body is not translated)
and split-independent: feeding a body in any chunking gives the same bytes as feeding it
whole (tested with hypothesis). The HTML rewriter changes URL attributes of tags (``href``,
``src``, ``action``, ``formaction``, ``srcset``, ``poster``, ...), ``<meta http-equiv=refresh>``,
``style`` attributes and ``<style>`` blocks (as CSS); it never touches ``<script>`` content,
event-handler attributes or any JavaScript. The CSS rewriter changes ``url(...)`` and
``@import "..."``. Lookahead is bounded: a tag or a CSS construct that does not complete
within ``max_carry`` bytes is passed on untranslated, so at most ``max_carry`` bytes are
ever held back. Comments, ``<script>`` bodies and other raw text stream through with a
carry of a few bytes.

Content encodings: only ``identity`` and ``gzip`` bodies are translated. ``BodyTranslator``
inflates gzip in bounded steps (at most 64 KiB of output per step, so a compression bomb
only costs time, streamed under back-pressure) and deflates the translated output again
with a sync flush per chunk; the response loses its ``Content-Length``. For apps that
translate bodies the proxy narrows the request's ``Accept-Encoding`` to ``gzip`` (if the
client accepted it) so backends do not answer ``br``/``zstd``; a body in any other encoding
passes untranslated and is counted.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from urllib.parse import urlsplit

from ...contract.webapps import DEFAULT_PORTS

INFLATE_STEP = 65536

# --------------------------------------------------------------------------- one URL


def _origin_forms(scheme: str, host: str, port: int) -> list[str]:
    forms = [f"{host}:{port}"]
    if DEFAULT_PORTS.get(scheme) == port:
        forms.append(host)
    return forms


class UrlMap:
    """Internal base URL → external base URL (both ``scheme://host[:port][/prefix]``)."""

    def __init__(self, internal: str, external: str) -> None:
        i, e = urlsplit(internal), urlsplit(external)
        self.int_scheme = i.scheme.lower()
        self.int_host = (i.hostname or "").lower()
        self.int_port = i.port or DEFAULT_PORTS[self.int_scheme]
        self.int_prefix = _prefix(i.path)
        self.ext_scheme = e.scheme.lower()
        self.ext_host = (e.hostname or "").lower()
        self.ext_port = e.port or DEFAULT_PORTS[self.ext_scheme]
        self.ext_prefix = _prefix(e.path)
        ext_authority = self.ext_host if DEFAULT_PORTS[self.ext_scheme] == self.ext_port else \
            f"{self.ext_host}:{self.ext_port}"
        self.ext_origin = f"{self.ext_scheme}://{ext_authority}"
        forms = _origin_forms(self.int_scheme, self.int_host, self.int_port)
        # http://host[:port] and //host[:port], case-insensitive scheme/host, then a path, query, fragment or end
        alts = "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True))
        self._abs = re.compile(rf"(?i)^(?:{re.escape(self.int_scheme)}:)?//(?:{alts})(?=[/?#]|$)")
        self._abs_b = re.compile(self._abs.pattern.encode())
        self.same_prefix = self.int_prefix == self.ext_prefix

    def path_to_internal(self, path: str) -> str | None:
        """An external request path (with its query) → the internal one; ``None`` when outside the prefix."""
        if self.ext_prefix == "/":
            return self.int_prefix + path[1:] if path.startswith("/") else None
        if path.startswith(self.ext_prefix):
            return self.int_prefix + path[len(self.ext_prefix):]
        return None

    def _rest(self, rest: str) -> str:
        """The part after the internal origin → the external path (prefix moved)."""
        if rest.startswith(self.int_prefix):
            return self.ext_prefix + rest[len(self.int_prefix):]
        if rest + "/" == self.int_prefix:
            return self.ext_prefix
        return rest  # outside the internal prefix: same path on the external host

    def url(self, value: str) -> str:
        """One URL from a header or an attribute, translated if it points at the backend."""
        v = value.strip()
        m = self._abs.match(v)
        if m:
            rest = v[m.end():]
            if not rest or rest[0] in "?#":
                rest = "/" + rest
            return self.ext_origin + self._rest(rest)
        if not self.same_prefix and v.startswith("/") and not v.startswith("//"):
            return self._rest(v)
        return value

    def url_bytes(self, value: bytes) -> bytes:
        v = value.strip()
        if not v:
            return value
        if self._abs_b.match(v) or (not self.same_prefix and v[:1] == b"/" and v[:2] != b"//"):
            try:
                return self.url(v.decode("ascii")).encode("ascii")
            except UnicodeError:
                text = v.decode("utf-8", "surrogateescape")
                return self.url(text).encode("utf-8", "surrogateescape")
        return value

    # ------------------------------------------------------------------- headers
    def refresh(self, value: str) -> str:
        """``Refresh: 5; url=http://internal/x`` → the same with the external URL."""
        m = re.match(r"(?i)^(\s*[\d.]+\s*[;,]\s*(?:url\s*=\s*)?)(['\"]?)(.*?)(\2)\s*$", value)
        if not m or not m.group(3):
            return value
        return m.group(1) + m.group(2) + self.url(m.group(3)) + m.group(4)

    def set_cookie(self, value: str) -> str:
        """A ``Set-Cookie`` value with the internal ``Domain`` dropped and ``Path`` moved."""
        parts = value.split(";")
        out = [parts[0]]
        for attr in parts[1:]:
            name, _, val = attr.partition("=")
            key = name.strip().lower()
            if key == "domain":
                domain = val.strip().lstrip(".").lower()
                if domain == self.int_host or self.int_host.endswith("." + domain):
                    continue  # host-only on the external host
                out.append(attr)
            elif key == "path" and not self.same_prefix:
                path = val.strip()
                out.append(f" Path={self._rest(path) if path.startswith('/') else path}")
            else:
                out.append(attr)
        return ";".join(out)


def _prefix(path: str) -> str:
    """``""``/``"/"`` → ``"/"``; ``"/app"``/``"/app/"`` → ``"/app/"``."""
    if not path or path == "/":
        return "/"
    return "/" + path.strip("/") + "/"


TRANSLATED_HEADERS = (b"location", b"content-location", b"refresh", b"set-cookie")


def translate_header(urlmap: UrlMap, name: bytes, value: bytes) -> bytes:
    """One response header (lower-case name) translated; other headers unchanged."""
    if name not in TRANSLATED_HEADERS:
        return value
    try:
        text = value.decode("latin-1")
    except UnicodeError:  # pragma: no cover - latin-1 decodes every byte
        return value
    if name == b"set-cookie":
        out = urlmap.set_cookie(text)
    elif name == b"refresh":
        out = urlmap.refresh(text)
    else:
        out = urlmap.url(text)
    return out.encode("latin-1", "replace")


# --------------------------------------------------------------------------- CSS

_CSS_CANDIDATE = re.compile(rb"(?i)url\(|@import")
_CSS_FULL = re.compile(
    rb"""(?i)(?:url\(\s*(?:"(?P<d>[^"\n]*)"|'(?P<s>[^'\n]*)'|(?P<u>[^)\s'"]*))\s*\)"""
    rb"""|@import\s*(?:"(?P<id>[^"\n]*)"|'(?P<is>[^'\n]*)'))""")
_CSS_TAIL = len(b"@import") - 1


def _css_replace(urlmap: UrlMap, m: re.Match[bytes]) -> bytes:
    for group in ("d", "s", "u", "id", "is"):
        if m.group(group) is not None:
            start, end = m.span(group)
            whole_start = m.start()
            text = m.group(0)
            new = urlmap.url_bytes(m.group(group))
            return text[:start - whole_start] + new + text[end - whole_start:]
    return m.group(0)  # pragma: no cover - one group always matches


class CssRewriter:
    """Streaming ``url()`` / ``@import`` translation; ``feed`` and ``finish`` return output bytes."""

    def __init__(self, urlmap: UrlMap, max_carry: int = 16384) -> None:
        self.urlmap = urlmap
        self.max_carry = max_carry
        self.carry = b""

    def feed(self, data: bytes) -> bytes:
        return self._run(self.carry + data, final=False)

    def finish(self) -> bytes:
        return self._run(self.carry, final=True)

    def _run(self, buf: bytes, final: bool) -> bytes:
        out: list[bytes] = []
        pos = 0
        n = len(buf)
        while True:
            m = _CSS_CANDIDATE.search(buf, pos)
            if m is None:
                keep = 0 if final else min(_CSS_TAIL, n - pos)
                out.append(buf[pos:n - keep])
                self.carry = buf[n - keep:]
                break
            p = m.start()
            window = p + self.max_carry
            full = _CSS_FULL.match(buf, p, min(n, window))
            if full is None and not final and n < window:
                out.append(buf[pos:p])  # undecided: wait for more bytes
                self.carry = buf[p:]
                break
            out.append(buf[pos:p])
            if full is None:
                out.append(m.group(0))
                pos = m.end()
            else:
                out.append(_css_replace(self.urlmap, full))
                pos = full.end()
        return b"".join(out)


def rewrite_css(urlmap: UrlMap, data: bytes, max_carry: int = 16384) -> bytes:
    """The whole of a CSS text translated at once (the same as streaming it)."""
    r = CssRewriter(urlmap, max_carry)
    return r.feed(data) + r.finish()


# --------------------------------------------------------------------------- HTML

URL_ATTRIBUTES = frozenset({b"href", b"src", b"action", b"formaction", b"poster", b"cite", b"background",
                            b"longdesc", b"usemap", b"data", b"codebase", b"manifest", b"icon", b"xlink:href"})
SRCSET_ATTRIBUTES = frozenset({b"srcset", b"imagesrcset"})
LIST_ATTRIBUTES = frozenset({b"ping"})
RAW_TEXT = frozenset({b"script", b"style", b"textarea", b"title", b"xmp", b"noembed", b"noframes", b"iframe",
                      b"noscript", b"plaintext"})
_WS = b" \t\n\r\f"
_NAME_END = frozenset(_WS + b"/>")
_ATTR_NAME_END = frozenset(_WS + b"/>=")
_VALUE_END = frozenset(_WS + b">")
_SPACE = frozenset(_WS)

_DATA, _COMMENT, _BOGUS, _RAW = range(4)


class _Incomplete(Exception):
    pass


def _scan_tag(buf: bytes, i: int, end: int) -> tuple[int, bytes, bool, list[tuple[bytes, int, int]]]:
    """A tag at ``buf[i] == '<'``: (end index, lower-case name, closing, [(attr name, value start, value end)]).
    Raises ``_Incomplete`` when ``buf[:end]`` ends inside the tag."""
    j = i + 1
    closing = buf[j:j + 1] == b"/"
    if closing:
        j += 1
    k = j
    while k < end and buf[k] not in _NAME_END:
        k += 1
    if k >= end:
        raise _Incomplete
    name = buf[j:k].lower()
    j = k
    attrs: list[tuple[bytes, int, int]] = []
    while True:
        while j < end and (buf[j] in _SPACE or buf[j] == 0x2F):  # whitespace and '/'
            j += 1
        if j >= end:
            raise _Incomplete
        if buf[j] == 0x3E:  # '>'
            return j + 1, name, closing, attrs
        k = j + 1  # an attribute name may start with '='
        while k < end and buf[k] not in _ATTR_NAME_END:
            k += 1
        if k >= end:
            raise _Incomplete
        attr = buf[j:k].lower()
        j = k
        while j < end and buf[j] in _SPACE:
            j += 1
        if j >= end:
            raise _Incomplete
        if buf[j] != 0x3D:  # no value
            attrs.append((attr, -1, -1))
            continue
        j += 1
        while j < end and buf[j] in _SPACE:
            j += 1
        if j >= end:
            raise _Incomplete
        q = buf[j]
        if q in (0x22, 0x27):
            e = buf.find(bytes((q,)), j + 1, end)
            if e < 0:
                raise _Incomplete
            attrs.append((attr, j + 1, e))
            j = e + 1
        else:
            k = j
            while k < end and buf[k] not in _VALUE_END:
                k += 1
            if k >= end:
                raise _Incomplete
            attrs.append((attr, j, k))
            j = k


def _srcset(urlmap: UrlMap, value: bytes) -> bytes:
    out = []
    for item in value.split(b","):
        lead = len(item) - len(item.lstrip())
        body = item[lead:]
        url, sep, descriptor = body.partition(b" ")
        out.append(item[:lead] + urlmap.url_bytes(url) + sep + descriptor)
    return b",".join(out)


def _attributes_value(urlmap: UrlMap, name: bytes, attr: bytes, value: bytes,
                      attrs: dict[bytes, bytes], max_carry: int) -> bytes:
    if attr in URL_ATTRIBUTES:
        return urlmap.url_bytes(value)
    if attr in SRCSET_ATTRIBUTES:
        return _srcset(urlmap, value)
    if attr in LIST_ATTRIBUTES:
        return b" ".join(urlmap.url_bytes(v) for v in value.split(b" "))
    if attr == b"style":
        return rewrite_css(urlmap, value, max_carry)
    if attr == b"content" and name == b"meta" and attrs.get(b"http-equiv", b"").strip().lower() == b"refresh":
        return urlmap.refresh(value.decode("latin-1")).encode("latin-1")
    return value


class HtmlRewriter:
    """Streaming HTML translation of URL attributes and inline CSS (see the module docstring)."""

    def __init__(self, urlmap: UrlMap, max_carry: int = 16384) -> None:
        self.urlmap = urlmap
        self.max_carry = max_carry
        self.carry = b""
        self.state = _DATA
        self.raw_end: re.Pattern[bytes] | None = None
        self.raw_tail = 0
        self.css: CssRewriter | None = None

    def feed(self, data: bytes) -> bytes:
        return self._run(self.carry + data, final=False)

    def finish(self) -> bytes:
        out = self._run(self.carry, final=True)
        if self.css is not None:  # an unterminated <style>
            out += self.css.finish()
            self.css = None
        return out

    def _raw_out(self, chunk: bytes) -> bytes:
        return self.css.feed(chunk) if self.css is not None else chunk

    def _run(self, buf: bytes, final: bool) -> bytes:
        out: list[bytes] = []
        pos, n = 0, len(buf)
        self.carry = b""
        while pos < n:
            if self.state == _DATA:
                lt = buf.find(b"<", pos)
                if lt < 0:
                    out.append(buf[pos:])
                    pos = n
                    break
                out.append(buf[pos:lt])
                pos = lt
                if n - lt < 4 and not final:
                    head = buf[lt:n]
                    if b"<!--".startswith(head) or (len(head) < 2):
                        break  # undecided
                nxt = buf[lt + 1:lt + 2]
                if buf.startswith(b"<!--", lt):
                    out.append(b"<!--")
                    pos = lt + 4
                    self.state = _COMMENT
                elif nxt in (b"!", b"?"):
                    out.append(buf[lt:lt + 2])
                    pos = lt + 2
                    self.state = _BOGUS
                elif nxt == b"/" or nxt.isalpha():
                    window = lt + self.max_carry
                    try:
                        end, name, closing, attrs = _scan_tag(buf, lt, min(n, window))
                    except _Incomplete:
                        if not final and n < window:
                            break  # wait for the rest of the tag
                        out.append(b"<")  # too long (or cut off at the end): leave it as it is
                        pos = lt + 1
                        continue
                    out.append(self._tag(buf, lt, end, name, attrs))
                    pos = end
                    if not closing and name in RAW_TEXT:
                        if name == b"plaintext":
                            self.raw_end = None
                        else:
                            self.raw_end = re.compile(rb"(?i)</" + re.escape(name) + rb"[\s/>]")
                        self.raw_tail = len(name) + 2
                        self.css = CssRewriter(self.urlmap, self.max_carry) if name == b"style" else None
                        self.state = _RAW
                else:
                    out.append(b"<")
                    pos = lt + 1
            elif self.state == _COMMENT or self.state == _BOGUS:
                term = b"-->" if self.state == _COMMENT else b">"
                e = buf.find(term, pos)
                if e < 0:
                    keep = 0 if final else min(len(term) - 1, n - pos)
                    out.append(buf[pos:n - keep])
                    pos = n - keep
                    break
                out.append(buf[pos:e + len(term)])
                pos = e + len(term)
                self.state = _DATA
            else:  # _RAW
                m = self.raw_end.search(buf, pos) if self.raw_end is not None else None
                if m is None:
                    keep = 0 if final or self.raw_end is None else min(self.raw_tail, n - pos)
                    out.append(self._raw_out(buf[pos:n - keep]))
                    pos = n - keep
                    break
                out.append(self._raw_out(buf[pos:m.start()]))
                if self.css is not None:
                    out.append(self.css.finish())
                    self.css = None
                pos = m.start()
                self.state = _DATA
        self.carry = buf[pos:]
        return b"".join(out)

    def _tag(self, buf: bytes, start: int, end: int, name: bytes, attrs: list[tuple[bytes, int, int]]) -> bytes:
        if not attrs:
            return buf[start:end]
        values = {a: buf[s:e] for a, s, e in attrs if s >= 0}
        pieces: list[bytes] = []
        cur = start
        for attr, s, e in attrs:
            if s < 0:
                continue
            value = buf[s:e]
            new = _attributes_value(self.urlmap, name, attr, value, values, self.max_carry)
            if new != value:
                pieces.append(buf[cur:s])
                pieces.append(new)
                cur = e
        if not pieces:
            return buf[start:end]
        pieces.append(buf[cur:end])
        return b"".join(pieces)


def rewrite_html(urlmap: UrlMap, data: bytes, max_carry: int = 16384) -> bytes:
    """The whole of an HTML text translated at once (the same as streaming it)."""
    r = HtmlRewriter(urlmap, max_carry)
    return r.feed(data) + r.finish()


# --------------------------------------------------------------------------- response bodies

def body_kind(content_type: bytes) -> str:
    """``html``, ``css`` or ``""`` (not translated) for a ``Content-Type`` value."""
    mime, _, params = content_type.partition(b";")
    mime = mime.strip().lower()
    charset = b""
    for p in params.split(b";"):
        k, _, v = p.partition(b"=")
        if k.strip().lower() == b"charset":
            charset = v.strip().strip(b"\"'").lower()
    if charset.startswith((b"utf-16", b"utf-32", b"ucs-2", b"ucs2")):
        return ""
    if mime in (b"text/html", b"application/xhtml+xml"):
        return "html"
    if mime == b"text/css":
        return "css"
    return ""


class BodyTranslator:
    """A translating body filter: optional gzip inflate → HTML/CSS rewriter → optional gzip deflate.

    ``feed(chunk)`` yields translated output pieces (each a bounded step); ``finish()``
    yields the rest. ``encoding`` is the response's content coding: ``""`` or ``gzip``.
    """

    def __init__(self, kind: str, urlmap: UrlMap, encoding: str = "", max_carry: int = 16384) -> None:
        self.rewriter: HtmlRewriter | CssRewriter = (HtmlRewriter if kind == "html" else CssRewriter)(urlmap, max_carry)
        self.gzip = encoding == "gzip"
        self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if self.gzip else None
        self._deflate = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS) if self.gzip else None

    def _out(self, data: bytes, flush: int = zlib.Z_SYNC_FLUSH) -> bytes:
        if self._deflate is None:
            return data
        return self._deflate.compress(data) + self._deflate.flush(flush)

    def feed(self, chunk: bytes):
        """Translated pieces for one input chunk (a generator: one inflate step at a time)."""
        if self._inflate is None:
            out = self.rewriter.feed(chunk)
            if out:
                yield out
            return
        data = chunk
        while data:
            try:
                plain = self._inflate.decompress(data, INFLATE_STEP)
            except zlib.error as exc:
                raise BodyError(f"the backend's gzip body is corrupt ({exc})") from None
            data = self._inflate.unconsumed_tail
            if plain:
                out = self.rewriter.feed(plain)
                if out:
                    yield self._out(out)

    def finish(self):
        if self._inflate is not None:
            while True:
                try:
                    tail = self._inflate.unconsumed_tail
                    plain = self._inflate.decompress(tail, INFLATE_STEP) if tail else self._inflate.flush()
                except zlib.error as exc:
                    raise BodyError(f"the backend's gzip body is corrupt ({exc})") from None
                if plain:
                    out = self.rewriter.feed(plain)
                    if out:
                        yield self._out(out)
                if not tail:
                    break
        tail = self.rewriter.finish()
        if self._deflate is not None:
            yield self._out(tail, zlib.Z_FINISH)
        elif tail:
            yield tail


class BodyError(ValueError):
    """A body that cannot be translated (corrupt compression)."""


Translate = Callable[[bytes], bytes]
