"""Request and response header rules of the proxy: hop-by-hop removal, identity headers, SSO.

Header lists are ``[(lower-case name bytes, value bytes)]`` everywhere in the front door.

To the backend (``backend_request_headers``):

- hop-by-hop fields are removed (RFC 9110 §7.6.1: ``Connection`` and every field it names,
  ``Keep-Alive``, ``Proxy-Connection``, ``TE``, ``Trailer``, ``Transfer-Encoding``,
  ``Upgrade``; ``Proxy-Authorization`` is meant for a proxy and never forwarded) — the
  proxy sets its own framing, and ``Upgrade``/``Connection`` only for a WebSocket;
- identity and client-address headers a client may have sent are removed, whatever their
  value: ``X-Ferryman-*``, every header name the app uses for header-based SSO,
  ``Forwarded``, ``X-Forwarded-*``, ``X-Real-IP``, ``X-Client-IP``, ``True-Client-IP``,
  ``X-Original-URL``/``X-Rewrite-URL``. The edge is the first hop a backend may trust, so
  ``X-Forwarded-For`` is *replaced* by the client's address as the edge saw it (not
  appended to what the client claimed), with ``X-Forwarded-Proto: https`` and
  ``X-Forwarded-Host`` (the external host). ``Forwarded`` (RFC 7239) is not added: the
  ``X-Forwarded-*`` trio is what backend frameworks read, and sending both invites them to
  disagree;
- the edge's own cookies (``__Host-ferryman*``) are cut out of ``Cookie`` (the session never
  reaches a backend); HTTP/2's split ``cookie`` fields are joined with ``"; "`` (RFC 9113 §8.2.3);
- a name with ``_`` that reads as one of the above when ``_`` is read as ``-``
  (``X_Forwarded_For``, ``X_Remote_User``) is removed too: CGI/WSGI-style servers give both
  spellings to the application under one name;
- header-SSO values are sanitised: control characters (CR, LF, NUL, ...) are removed,
  lists are joined with ``,``, and values are capped at ``MAX_SSO_VALUE`` bytes.

From the backend (``backend_response_headers``): hop-by-hop fields go, and so does
``Alt-Svc`` (it would advertise the backend's own endpoints to the browser).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
                        b"upgrade", b"proxy-authorization", b"proxy-authenticate", b"http2-settings"})
CLIENT_ADDRESS = frozenset({b"forwarded", b"x-real-ip", b"x-client-ip", b"true-client-ip", b"x-original-url",
                            b"x-rewrite-url", b"x-original-forwarded-for", b"cf-connecting-ip", b"fastly-client-ip"})
RESPONSE_DROP = frozenset({b"alt-svc"})
MAX_SSO_VALUE = 4096
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
OWN_COOKIE_PREFIX = "__Host-ferryman"
_OWN_COOKIE = OWN_COOKIE_PREFIX.lower().encode()


def is_token(name: bytes) -> bool:
    return _TOKEN.fullmatch(name) is not None  # fullmatch: '$' would let a trailing newline through


def connection_tokens(headers: Headers) -> set[bytes]:
    out: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            for t in value.split(b","):
                t = t.strip()
                if t:
                    out.add(t.lower())
    return out


def sanitize_value(value: str | bytes) -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else value
    return _CONTROL.sub(b"", raw)[:MAX_SSO_VALUE].strip()


def strip_own_cookies(values: list[bytes]) -> bytes | None:
    """One ``Cookie`` value without the edge's cookies, or ``None`` when nothing is left."""
    kept: list[str] = []
    for value in values:
        for item in value.decode("latin-1").split(";"):
            item = item.strip()
            if item and not item.startswith(OWN_COOKIE_PREFIX):
                kept.append(item)
    return "; ".join(kept).encode("latin-1") if kept else None


def _underscore_alias(name: bytes, drop: set[bytes]) -> bool:
    """Whether ``name`` with ``_`` read as ``-`` is a header the edge removes or sets itself.

    CGI, WSGI, PHP and Rack servers (and some others) present ``X-Remote-User`` and
    ``X_Remote_User`` to the application under one name (``HTTP_X_REMOTE_USER``), so a client's
    ``X_Remote_User: admin`` could stand in for the edge's header-SSO identity, its assertion or
    ``X-Forwarded-For``; such a spelling is removed like the header it aliases."""
    canon = name.replace(b"_", b"-")
    return (canon in HOP_BY_HOP or canon in CLIENT_ADDRESS or canon == b"host"
            or canon.startswith((b"x-ferryman-", b"x-forwarded-"))
            or any(canon == n.replace(b"_", b"-") for n in drop))


# What the static rules do with a request header name (``_request_rule``): kept, removed, the
# Cookie (own cookies cut out), Upgrade (kept only for a WebSocket), Accept-Encoding (narrowed
# when the body is translated). Remembered per name in a bounded table: names repeat.
_KEEP, _DROP, _COOKIE, _UPGRADE, _ENCODING = range(5)
_RULES: dict[bytes, int] = {}
_RULES_MAX = 4096


def _request_rule(name: bytes) -> int:
    rule = _RULES.get(name)
    if rule is None:
        if b"_" in name and _underscore_alias(name, set()):
            rule = _DROP
        elif name == b"upgrade":
            rule = _UPGRADE
        elif name in HOP_BY_HOP or name in CLIENT_ADDRESS or name in (b"host", b"expect", b"content-length") \
                or name.startswith((b"x-ferryman-", b"x-forwarded-", b":")):
            rule = _DROP  # expect: the edge answers 100-continue itself; content-length: it frames the body
        elif name == b"cookie":
            rule = _COOKIE
        elif name == b"accept-encoding":
            rule = _ENCODING
        else:
            rule = _KEEP
        if len(_RULES) >= _RULES_MAX:
            _RULES.clear()
        _RULES[name] = rule
    return rule


def backend_request_headers(headers: Headers, *, sso_names: Iterable[bytes], keep_upgrade: bool = False,
                            translate_encoding: bool = False) -> Headers:
    """The client's headers a backend may see (hop-by-hop, identity and own cookies removed).

    ``Host`` and ``Content-Length`` are removed too (the caller sets the internal host and frames
    the body). With ``translate_encoding`` (body translation on) ``Accept-Encoding`` is narrowed
    to ``gzip`` (or removed).
    """
    drop = connection_tokens(headers)
    drop.update(n.lower() for n in sso_names)
    if drop:
        drop.update([n.replace(b"_", b"-") for n in drop if b"_" in n])  # an SSO name spelt with '_' has a '-' alias
    out: Headers = []
    cookies: list[bytes] = []
    rules = _RULES
    for name, value in headers:
        rule = rules.get(name)
        if rule is None:
            rule = _request_rule(name)
        if rule == _UPGRADE:
            if keep_upgrade:
                out.append((name, value))
            continue
        if drop and (name in drop or b"_" in name and _underscore_alias(name, drop)):
            continue
        if rule == _KEEP:
            out.append((name, value))
        elif rule == _COOKIE:
            cookies.append(value)
        elif rule == _ENCODING:
            if not translate_encoding:
                out.append((name, value))
            elif b"gzip" in value.lower():
                out.append((name, b"gzip"))
    if cookies:
        joined = strip_own_cookies(cookies)
        if joined is not None:
            out.append((b"cookie", joined))
    if keep_upgrade:
        out.append((b"connection", b"upgrade"))
    return out


def forwarded_headers(client_ip: str, external_host: str) -> Headers:
    return [(b"x-forwarded-for", client_ip.encode("ascii", "replace")), (b"x-forwarded-proto", b"https"),
            (b"x-forwarded-host", external_host.encode("idna") if not external_host.isascii()
             else external_host.encode("ascii"))]


def sso_headers(mapping: Mapping[str, str], claims: Mapping[str, object]) -> Headers:
    """Header-based SSO: for each ``claim → header name`` the claim's sanitised value (absent claims are skipped)."""
    out: Headers = []
    for claim, header in mapping.items():
        value = claims.get(claim)
        if value is None or value == "" or value == ():
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        out.append((header.lower().encode("ascii"), sanitize_value(str(value))))
    return out


_RESPONSE_OUT = HOP_BY_HOP | RESPONSE_DROP


def backend_response_headers(headers: Headers) -> Headers:
    """A new list of the backend's response headers without hop-by-hop ones, ``Alt-Svc`` and
    any ``Set-Cookie`` of a cookie the edge keeps for itself (``is_own_set_cookie``)."""
    drop = connection_tokens(headers)
    return [(n, v) for n, v in headers
            if n not in _RESPONSE_OUT and n not in drop and not (n == b"set-cookie" and is_own_set_cookie(v))]


def is_own_set_cookie(value: bytes) -> bool:
    """Whether a ``Set-Cookie`` value sets one of the edge's own cookies (``__Host-ferryman``,
    ``__Host-ferryman-*``, any case): a backend must not replace a visitor's session on its host
    with another one, nor plant the edge's sign-in or CSRF cookies."""
    return value.split(b"=", 1)[0].strip().lower().startswith(_OWN_COOKIE)


def get(headers: Headers, name: bytes, default: bytes = b"") -> bytes:
    for n, v in headers:
        if n == name:
            return v
    return default


def get_all(headers: Headers, name: bytes) -> list[bytes]:
    return [v for n, v in headers if n == name]
