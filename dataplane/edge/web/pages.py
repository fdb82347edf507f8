"""The pages the front door serves itself: errors, sign-in, who is signed in, sign-out.

Jinja2 templates (``templates/``) with autoescape on: every value a page shows (a reason,
a user name, a host) is HTML-escaped. Pages need no JavaScript and load nothing from
elsewhere; they are sent with ``Cache-Control: no-store``, a ``Content-Security-Policy``
that allows only inline styles, ``X-Frame-Options: DENY`` (no clickjacking of the sign-in
form), ``Referrer-Policy: no-referrer`` (a one-time code in a URL never leaks) and
``nosniff``. Error pages say what happened and what to do, never internal details (no
backend addresses, no stack traces).
"""

from __future__ import annotations

import html
import logging
import os
from typing import Any

import jinja2

log = logging.getLogger("ferryman.edge.web")

Headers = list[tuple[bytes, bytes]]

_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")),
    autoescape=True, trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)

TITLES = {
    400: "Bad request", 401: "Sign-in required", 403: "Access denied", 404: "Not found", 405: "Method not allowed",
    408: "Request timeout", 413: "Request body too large", 414: "Address too long", 421: "Misdirected request",
    429: "Too many requests", 431: "Request headers too large", 500: "Internal error", 502: "Application unreachable",
    503: "Application unavailable", 504: "Application timeout",
}
REASONS = {
    200: b"OK", 101: b"Switching Protocols", 204: b"No Content", 302: b"Found", 303: b"See Other", 304: b"Not Modified",
    400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed",
    408: b"Request Timeout", 413: b"Content Too Large", 414: b"URI Too Long", 421: b"Misdirected Request",
    429: b"Too Many Requests", 431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
    502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout",
}

SECURITY_HEADERS: Headers = [
    (b"cache-control", b"no-store"),
    (b"strict-transport-security", b"max-age=31536000"),
    (b"content-security-policy", b"default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
]


def reason_phrase(status: int) -> bytes:
    return REASONS.get(status, b"Status")


def render(template: str, **values: Any) -> bytes:
    return _ENV.get_template(template).render(**values).encode("utf-8")


def html_headers(body: bytes, extra: Headers | None = None) -> Headers:
    headers = [(b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    headers.extend(SECURITY_HEADERS)
    if extra:
        headers.extend(extra)
    return headers


def error_page(status: int, reason: str, code: str = "", *, title: str = "", link: str = "",
               link_text: str = "") -> bytes:
    """The page of a refusal or failure. It is also the answer of last resort (a request whose
    handling failed gets a 500 page), so it never fails itself: should its template not render
    (a broken install), a plain page says the same."""
    title = title or TITLES.get(status, "Error")
    try:
        return render("error.html", status=status, title=title, reason=reason, code=code, link=link,
                      link_text=link_text or "Continue")
    except Exception:  # noqa: BLE001 - see above; logged, and the client still gets its answer
        log.exception("the front door's error page template could not be rendered")
        body = f"<!doctype html><title>{html.escape(title)}</title><h1>{html.escape(title)}</h1>" \
               f"<p>{html.escape(reason)}</p><p>{html.escape(code)}</p>"
        if link:
            body += f'<p><a href="{html.escape(link)}">{html.escape(link_text or "Continue")}</a></p>'
        return body.encode("utf-8")


ROBOTS = b"User-agent: *\nDisallow: /\n"
