"""Web applications' fields, checked the same way by the control plane (when an admin defines
one) and by nodes (the backend a connector may dial for one): pure, no I/O.

- ``external_endpoint(url)``: ``https://host[:port][/prefix]`` → ``Endpoint`` (the key an edge
  matches requests on is ``authority``: ``host`` or ``host:port`` when the port is not 443);
- ``internal_endpoint(url)``: ``http(s)://host[:port][/prefix]`` → ``Endpoint``;
- ``check_header_sso(mapping)``: claim names → request header names a backend may trust;
- ``check_certificate(chain, key, host, now)``: a custom-domain certificate (PEM chain, leaf
  first, and its key) that matches its key, covers the external host and is valid now;
- ``backend_segment(app)``: the one segment (internal host, port, tcp) a connector of the app's
  group is told about, so that its dial check lets it reach exactly that backend.

Every refusal is a ``WebAppFieldError`` naming the field and what is wrong with the value.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from urllib.parse import urlsplit

import msgspec

from .snapshot import SnapSegment, SnapWebApp

PREAUTH = ("ferryman", "passthrough")
BACKEND_TIMEOUTS = ("default", "long")
MAX_URL = 2048
MAX_HEADER_SSO = 20
DEFAULT_PORTS = {"http": 80, "https": 443}
# Headers the front door sets itself (or that frame the message): never mapped from a claim.
RESERVED_HEADERS = frozenset({"host", "cookie", "content-length", "transfer-encoding", "connection", "upgrade",
                              "te", "trailer", "keep-alive", "proxy-authorization", "authorization",
                              "x-ferryman-jwt-assertion", "forwarded"})
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,100}")  # used with fullmatch: "$" would let a final newline through
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


class WebAppFieldError(ValueError):
    """A web application field that cannot be used; the message names the field."""


class Endpoint(msgspec.Struct, frozen=True):
    scheme: str
    host: str  # lower-case host name or IP address (no brackets)
    port: int
    prefix: str  # path prefix without the trailing slash ("" for none)

    @property
    def authority(self) -> str:
        """``host`` or ``host:port`` (IPv6 in brackets), the port left out when it is the scheme's default."""
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return shown if self.port == DEFAULT_PORTS[self.scheme] else f"{shown}:{self.port}"


def _host(field: str, value: str, host: str | None) -> str:
    if not host:
        raise WebAppFieldError(f"{field} {value!r} has no host")
    host = host.lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in host.split(".")):
        raise WebAppFieldError(f"{field} {value!r}: {host!r} is not a valid host name")
    return host


def _endpoint(field: str, value: object, schemes: tuple[str, ...]) -> Endpoint:
    if not isinstance(value, str) or not value:
        raise WebAppFieldError(f"{field} must be a URL ({' or '.join(s + '://...' for s in schemes)})")
    if len(value) > MAX_URL:
        raise WebAppFieldError(f"{field} is longer than {MAX_URL} characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7f for c in value):  # urlsplit would quietly drop some
        raise WebAppFieldError(f"{field} {value!r} must not contain spaces or control characters")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise WebAppFieldError(f"{field} {value!r} is not a URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        raise WebAppFieldError(f"{field} must start with {' or '.join(s + '://' for s in schemes)}, not {value!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise WebAppFieldError(f"{field} {value!r} must not have a query, fragment or user info")
    if port == 0:
        raise WebAppFieldError(f"{field} {value!r}: port 0 cannot be reached")
    prefix = parts.path.rstrip("/")
    if prefix and not prefix.startswith("/"):
        raise WebAppFieldError(f"{field} {value!r}: the path must start with '/'")
    return Endpoint(scheme, _host(field, value, parts.hostname), port or DEFAULT_PORTS[scheme], prefix)


def external_endpoint(url: object) -> Endpoint:
    """Where browsers reach the app: ``https://host[:port][/prefix]``."""
    return _endpoint("external_url", url, ("https",))


def internal_endpoint(url: object) -> Endpoint:
    """Where the connector reaches the app: ``http://`` or ``https://host[:port][/prefix]``."""
    return _endpoint("internal_url", url, ("http", "https"))


def check_header_sso(mapping: object) -> dict[str, str]:
    """``{claim: header}``: header-based single sign-on, checked (header names are tokens, not one
    the front door sets itself, not ``X-Forwarded-*``, each used once)."""
    if not isinstance(mapping, Mapping):
        raise WebAppFieldError("header_sso must map claim names to request header names")
    if len(mapping) > MAX_HEADER_SSO:
        raise WebAppFieldError(f"header_sso maps at most {MAX_HEADER_SSO} claims")
    out: dict[str, str] = {}
    seen: set[str] = set()
    for claim, header in mapping.items():
        if not isinstance(claim, str) or not _TOKEN.fullmatch(claim):
            raise WebAppFieldError(f"header_sso: claim name {claim!r} is not a plain name")
        if not isinstance(header, str) or not _TOKEN.fullmatch(header):
            raise WebAppFieldError(f"header_sso: {claim!r} maps to {header!r}, which is not a header name")
        low = header.lower()
        if low in RESERVED_HEADERS or low.startswith("x-forwarded-"):
            raise WebAppFieldError(f"header_sso: {claim!r} maps to {header!r}, a header the front door sets or "
                                   "that frames the request")
        if low in seen:
            raise WebAppFieldError(f"header_sso: header {header!r} is mapped twice")
        seen.add(low)
        out[claim] = header
    return out


MAX_CERTIFICATE = 65536  # characters of a PEM chain (and of its key)


def _covers(pattern: str, host: str) -> bool:
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == host


def check_certificate(chain: object, key: object, host: str, now: float) -> float:
    """Check a custom-domain certificate for external host ``host``; its expiry (Unix seconds).

    The chain is PEM, leaf first; the key (PEM, unencrypted) must be the leaf's; the leaf must
    name ``host`` in its subject alternative names (one ``*.`` wildcard label allowed) and be
    valid at ``now``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if not isinstance(chain, str) or not chain.strip() or not isinstance(key, str) or not key.strip():
        raise WebAppFieldError("a custom-domain certificate needs both the PEM chain (certificate) and its key "
                               "(certificate_key)")
    if len(chain) > MAX_CERTIFICATE or len(key) > MAX_CERTIFICATE:
        raise WebAppFieldError(f"certificate and certificate_key are at most {MAX_CERTIFICATE} characters each")
    try:
        certs = x509.load_pem_x509_certificates(chain.encode())
    except ValueError as exc:
        raise WebAppFieldError(f"certificate is not a PEM certificate chain ({exc})") from None
    try:
        private = serialization.load_pem_private_key(key.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise WebAppFieldError(f"certificate_key is not an unencrypted PEM private key ({exc})") from None
    leaf = certs[0]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(serialization.Encoding.DER, spki) != \
            leaf.public_key().public_bytes(serialization.Encoding.DER, spki):
        raise WebAppFieldError("certificate_key is not the key of the certificate (the chain's first one)")
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = names.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns = []
    if not any(_covers(name, host) for name in dns):
        raise WebAppFieldError(f"the certificate does not cover the external host {host} (it names "
                               f"{', '.join(dns) or 'no DNS names'})")
    not_after = leaf.not_valid_after_utc.timestamp()
    if not_after <= now:
        raise WebAppFieldError(f"the certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if leaf.not_valid_before_utc.timestamp() > now + 300:
        raise WebAppFieldError(f"the certificate is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    return not_after


def backend_segment(app: SnapWebApp) -> SnapSegment:
    """The segment that names ``app``'s backend for a connector's dial check."""
    end = internal_endpoint(app.internal_url)
    return SnapSegment(destination=end.host, ports=str(end.port), protocol="tcp")
