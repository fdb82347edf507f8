"""TLS to the control plane: the CA pin, the client-side contexts, and the first contact.

The control plane serves HTTPS with a certificate from its own CA (``control.tls``). A node,
a client or the admin CLI trusts that CA either from a PEM file given to it
(``FERRYMAN_CONTROL_CA``) or, on first contact, by its *pin*: ``sha256:<hex>``, the SHA-256 of
the CA certificate's DER SubjectPublicKeyInfo (the form of ``kubeadm join
--discovery-token-ca-cert-hash``), given out of band: inside a registration token
(``fmr_<secret>.<pin hex>``) or as ``--ca-hash``.

- ``ca_pin(cert)``: the pin of a CA certificate; ``parse_pin(text, source)``: a pin as typed
  (``sha256:<64 hex>``, or the bare hex), normalized, or ``ControlTlsError``.
- ``token_with_pin`` / ``split_token``: a registration token and the pin it carries.
- ``verifying_context(ca_pem)``: trusts only that CA, checks the host name.
- ``fetch_pinned_ca(base, pin)``: the first contact. ``GET /v1/ca`` over TLS *without*
  verification (nothing is trusted yet), then the answer is kept only if its SPKI hash equals
  the pin; every later connection is verified against it. A CA bundle is never fetched over
  plain HTTP.
- ``refuse_node_certificate(peercert, where)``: every verified connection to the control plane
  refuses a certificate naming a node role (an edge's chains to the same CA and may name the
  same host).
- ``check_scheme(url, insecure, source)``: ``http://`` is refused unless
  ``FERRYMAN_CONTROL_INSECURE_HTTP=1``; ``insecure_warning`` is the loud warning logged then.

Several control-plane nodes sharing one database: a control URL may list several,
comma-separated (``control_urls``). They present certificates from one CA (the CA is shared
through the database), so one pin and one context serve them all: ``check_scheme`` checks
every URL (all ``https://``, or all ``http://`` when allowed), and ``fetch_pinned_ca`` takes
the CA from the first node that answers; a node presenting a CA with another hash is refused
outright (never passed over for the next), and every later connection to any of them is
verified against the pinned CA, host name included.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import re
import socket
import ssl
import urllib.parse

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .pki import is_ca_certificate

PIN_PREFIX = "sha256:"
CA_PATH = "/v1/ca"  # the control plane's CA certificate (PEM), no credential
MAX_CA_BYTES = 64 * 1024
INSECURE_VARIABLE = "FERRYMAN_CONTROL_INSECURE_HTTP"
CA_VARIABLE = "FERRYMAN_CONTROL_CA"
_HEX64 = re.compile(r"[0-9a-f]{64}")


class ControlTlsError(ValueError):
    """The control plane cannot be trusted (or a pin, CA or URL is unusable); the message says why."""


def control_urls(text: str) -> list[str]:
    """The base URLs of a control URL (one, or several comma-separated), stripped, without trailing slashes."""
    return [part.strip().rstrip("/") for part in text.split(",") if part.strip()]


def ca_pin(cert: x509.Certificate) -> str:
    """``sha256:<hex>`` of the certificate's DER SubjectPublicKeyInfo."""
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return PIN_PREFIX + hashlib.sha256(spki).hexdigest()


def parse_pin(text: str, source: str = "--ca-hash") -> str:
    """``text`` as a normalized pin ``sha256:<64 lower-case hex>``; ``ControlTlsError`` naming ``source``."""
    value = text.strip().lower()
    if value.startswith(PIN_PREFIX):
        value = value[len(PIN_PREFIX):]
    elif ":" in value:
        raise ControlTlsError(f"{source} {text!r}: only sha256 pins are supported (sha256:<64 hex digits>)")
    if not _HEX64.fullmatch(value):
        raise ControlTlsError(f"{source} {text!r}: expected sha256:<64 hex digits> (the control plane's CA hash)")
    return PIN_PREFIX + value


def token_with_pin(token: str, pin: str) -> str:
    """A registration token carrying the CA pin: ``<token>.<pin hex>``."""
    return f"{token}.{parse_pin(pin, 'pin').removeprefix(PIN_PREFIX)}"


def split_token(token: str) -> tuple[str, str | None]:
    """(the token's secret part, the pin it carries or None for a token without one).

    ``ControlTlsError`` when the part after the last ``.`` is not a pin."""
    token = token.strip()
    secret, dot, pin = token.rpartition(".")
    if not dot:
        return token, None
    if not secret:
        raise ControlTlsError("the registration token is malformed: nothing before its CA hash")
    return secret, parse_pin(pin, "the registration token's CA hash")


def load_ca_pem(pem: bytes, source: str) -> x509.Certificate:
    """The first certificate of ``pem``, which must be a CA; ``ControlTlsError`` naming ``source``."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise ControlTlsError(f"{source}: not a PEM certificate") from None
    cert = certs[0]
    if not is_ca_certificate(cert):
        raise ControlTlsError(f"{source}: not a CA certificate (basicConstraints CA:TRUE missing)")
    return cert


def read_ca_file(path: str, source: str = CA_VARIABLE) -> bytes:
    """The PEM of the CA file ``path``, checked to hold a CA certificate."""
    try:
        with open(path, "rb") as fh:
            pem = fh.read(MAX_CA_BYTES + 1)
    except OSError as exc:
        raise ControlTlsError(f"{source}={path}: {exc.strerror or exc}") from None
    load_ca_pem(pem, f"{source}={path}")
    return pem


def verifying_context(ca_pem: bytes) -> ssl.SSLContext:
    """A client context that trusts only the CA in ``ca_pem`` and checks the host name."""
    context = ssl.create_default_context(cadata=ca_pem.decode("ascii", errors="replace"))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


NODE_ROLES = ("edge", "connector", "client")  # the OU of the certificates the CA issues to nodes (``pki.ROLES``)


def node_role_of(peercert: dict | None) -> str:
    """The node role (``OU``) a verified peer certificate names, or ``""`` for any other certificate.

    The control plane's CA also issues the nodes' certificates, and an edge's carries
    serverAuth and the host names it registered with (``localhost`` and ``127.0.0.1`` by
    default, which the control plane's own certificate names too): without this check an edge
    could pass for the control plane to every node, client and admin that trusts the CA, and
    be handed their passwords, tokens and admin key. The control plane's certificate names no
    node role (OU ``control``), nor does one from another CA (``FERRYMAN_CONTROL_CA``)."""
    for rdn in (peercert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "organizationalUnitName" and value in NODE_ROLES:
                return value
    return ""


def refuse_node_certificate(peercert: dict | None, where: str) -> None:
    """``ControlTlsError`` when the control plane at ``where`` presented a node's certificate."""
    role = node_role_of(peercert)
    if role:
        raise ControlTlsError(f"the server at {where} presented a Ferryman {role}'s certificate, not the control "
                              f"plane's: refusing it (a node's certificate chains to the same CA)")


def _unverified_context() -> ssl.SSLContext:
    """Only for the first contact, whose answer is checked against the pin before anything is trusted."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _host_port(base: str) -> tuple[str, str, int, str]:
    parts = urllib.parse.urlsplit(base.strip())
    try:
        port = parts.port
    except ValueError:
        raise ControlTlsError(f"{base!r}: the port is not a number from 1 to 65535") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ControlTlsError(f"{base!r} is not an https:// URL")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80), parts.path.rstrip("/")


def fetch_pinned_ca(base: str, pin: str, timeout: float = 15.0) -> bytes:
    """``fetch_pinned_ca_one`` from the first of ``base``'s URLs (several comma-separated) that can
    be reached; a CA with another hash or an answer that is not a CA stops it at once."""
    urls = control_urls(base) or [base]
    failures: list[str] = []
    for url in urls:
        try:
            return fetch_pinned_ca_one(url, pin, timeout)
        except _Unreachable as exc:
            if len(urls) == 1:
                raise ControlTlsError(str(exc)) from None
            failures.append(str(exc))
    raise ControlTlsError("no control-plane node could be reached: " + "; ".join(failures))


class _Unreachable(ControlTlsError):
    """No answer from one control URL (network or TLS failure): another may be tried."""


def fetch_pinned_ca_one(base: str, pin: str, timeout: float = 15.0) -> bytes:
    """The control plane's CA (PEM) from ``base``'s ``/v1/ca``, once its SPKI hash equals ``pin``: that
    one certificate, never others sent along with it.

    The connection is TLS without verification (the CA is what is being learned); the answer
    is trusted only through the pin. ``ControlTlsError`` for plain HTTP, a network failure, an
    answer that is not a CA, and a CA with another hash."""
    pin = parse_pin(pin)
    scheme, host, port, prefix = _host_port(base)
    if scheme != "https":
        raise ControlTlsError(f"{base}: a CA bundle is never taken over plain HTTP; use https://")
    conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=_unverified_context())
    try:
        conn.request("GET", prefix + CA_PATH, headers={"Accept": "application/x-pem-file", "Connection": "close"})
        response = conn.getresponse()
        body = response.read(MAX_CA_BYTES + 1)
        status = response.status
    except ssl.SSLError as exc:
        raise _Unreachable(f"cannot reach the control plane at {base}: TLS failed ({exc.reason or exc}); "
                           f"is it serving https://?") from None
    except socket.gaierror as exc:
        raise _Unreachable(f"cannot reach the control plane at {base}: host name not resolved "
                           f"({exc.strerror})") from None
    except (OSError, http.client.HTTPException) as exc:
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise _Unreachable(f"cannot reach the control plane at {base}: {why}") from None
    finally:
        conn.close()
    if status != 200:
        raise ControlTlsError(f"the control plane at {base} answered {CA_PATH} with HTTP {status}: "
                              f"is this a Ferryman control plane?")
    if len(body) > MAX_CA_BYTES:
        raise ControlTlsError(f"the control plane at {base} sent a CA bundle larger than {MAX_CA_BYTES} bytes")
    cert = load_ca_pem(body, f"the CA bundle from {base}")
    got = ca_pin(cert)
    if not hmac.compare_digest(got, pin):
        raise ControlTlsError(
            f"the control plane at {base} presented a CA with hash {got}, not the pinned {pin}: refusing it "
            f"(a wrong --ca-hash or token, or someone between you and the control plane)")
    return cert.public_bytes(serialization.Encoding.PEM)  # only the pinned CA: nothing appended to it is trusted


def check_scheme(url: str, insecure: bool, source: str = "--control") -> str:
    """``url``'s scheme when it may be used: ``https``, or ``http`` with the insecure flag. Several
    comma-separated URLs: each is checked, and they must share one scheme."""
    urls = control_urls(url)
    if len(urls) > 1:
        schemes = {_check_one_scheme(one, insecure, source) for one in urls}
        if len(schemes) > 1:
            raise ControlTlsError(f"{source} {url.strip()}: mixes https:// and http:// control-plane URLs; "
                                  f"give every node's https:// URL")
        return schemes.pop()
    return _check_one_scheme(url, insecure, source)


def _check_one_scheme(url: str, insecure: bool, source: str) -> str:
    scheme = urllib.parse.urlsplit(url.strip()).scheme
    if scheme == "http" and not insecure:
        raise ControlTlsError(
            f"{source} {url.strip()}: plain http:// to the control plane is refused (tokens, keys and the CA would "
            f"travel unprotected); use https://, or set {INSECURE_VARIABLE}=1 on a path you trust")
    if scheme not in ("http", "https"):
        raise ControlTlsError(f"{source} {url.strip()!r}: expected an https:// URL")
    return scheme


def insecure_warning(what: str) -> str:
    """The line logged at every start that speaks plain HTTP to (or as) the control plane."""
    return (f"INSECURE: {INSECURE_VARIABLE}=1: {what} plain HTTP: passwords, tokens and keys cross the network "
            f"unencrypted and unauthenticated. Use it only on a path you trust.")


def trust_hint() -> str:
    """What to do when the control plane's certificate is not trusted."""
    return (f"pass --ca-hash sha256:... (printed by `ferryman control` at start and carried by registration "
            f"tokens) or set {CA_VARIABLE} to the control plane's CA certificate (PEM)")
