"""How ``ferryman admin`` reaches the control plane: where (``--control``), with which key
(``--key-file`` / ``--key``), and the HTTP client (standard library urllib) for its admin
REST API. Nothing here touches the database.

- ``control_url``: ``--control URL`` (``https://HOST:PORT``; a bare ``HOST:PORT`` gets
  ``https://``, or ``http://`` with ``FERRYMAN_CONTROL_INSECURE_HTTP=1``), or several
  comma-separated: the control-plane nodes sharing one database, tried in turn when one cannot
  be reached. Default: built from ``FERRYMAN_CONTROL_LISTEN`` (a wildcard listen address such
  as ``0.0.0.0`` or ``[::]`` becomes the loopback address), so on the control plane's own host
  no flag is needed.
- ``tls_context``: how the control plane's HTTPS certificate is checked: against
  ``FERRYMAN_CONTROL_CA`` (a PEM file), else the CA learned over TLS and kept only when its
  hash is ``--ca-hash`` (``dataplane.basics.controltls.fetch_pinned_ca``), else the CA of the
  control plane on this host (``FERRYMAN_DATA_DIR/tls/ca.pem``, written at its start; or
  ``FERRYMAN_DATA_DIR/ca/ca.pem``). Host names are checked. Several control-plane nodes share
  one CA, so one context checks every URL of the list: a node whose certificate does not
  chain to it is passed over like one that cannot be reached. ``http://`` is refused unless
  ``FERRYMAN_CONTROL_INSECURE_HTTP=1`` (then warned).
- ``admin_key``: ``--key-file PATH`` (default ``FERRYMAN_DATA_DIR/admin.key``, the bootstrap
  key the control plane writes on first start) or ``--key KEY`` (visible to other local
  users in the process list: prefer the file).
- ``Client``: every call, and every failure as an ``AdminError`` with a clear message
  (exit status 1 for a refusal, 2 for a usage error: ``usage``).
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

import msgspec

from dataplane.basics import settings as settings_mod
from dataplane.basics.controltls import (
    CA_VARIABLE,
    ControlTlsError,
    ca_pin,
    check_scheme,
    control_urls,
    fetch_pinned_ca,
    insecure_warning,
    load_ca_pem,
    parse_pin,
    read_ca_file,
    refuse_node_certificate,
    trust_hint,
    verifying_context,
)

ADMIN_KEY_FILE = "admin.key"  # as written by control.server (not imported: that pulls in the server)
DEFAULT_TIMEOUT = 30.0
_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


class AdminError(Exception):
    """A refusal to report as one line on stderr; ``status`` is the exit status (1 refused, 2 usage)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def usage(message: str) -> AdminError:
    return AdminError(message, 2)


# ---------------------------------------------------------------------------- HTTP


def why_failed(reason: object) -> str:
    """A short text for why a connection failed."""
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve the host name ({reason.strerror})"
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, ssl.SSLCertVerificationError):
        return f"TLS error: the certificate is not trusted ({reason.verify_message or reason.reason}); {trust_hint()}"
    if isinstance(reason, ssl.SSLError):
        return f"TLS error: {reason.reason or reason}"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror[:1].lower() + reason.strerror[1:]
    return str(reason) or type(reason).__name__


class _Unreachable(Exception):
    """One control URL could not be connected to; the message says why."""


class SinkError(Exception):
    """Writing out a streamed answer failed (``Client.stream``); ``error`` is the ``OSError``."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _ControlConnection(http.client.HTTPSConnection):
    """HTTPS to the control plane that refuses a node's certificate after the handshake: an edge's
    certificate chains to the same CA and may name the same host (``refuse_node_certificate``),
    and the admin key must never reach an edge."""

    def connect(self) -> None:
        super().connect()
        try:
            refuse_node_certificate(self.sock.getpeercert(), f"{self.host}:{self.port}")
        except ControlTlsError:
            self.sock.close()
            raise


class _ControlHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_ControlConnection, req, context=self._context)  # type: ignore[attr-defined]


class Client:
    """Calls to the admin API; every failure becomes an ``AdminError`` with a clear message."""

    def __init__(self, base_url: str, key: str, key_source: str, timeout: float = DEFAULT_TIMEOUT,
                 context: ssl.SSLContext | None = None) -> None:
        # Several control-plane nodes' URLs (comma-separated): each call tries them in turn, starting
        # with the one that answered last, moving on when one cannot be connected to (TLS included).
        self.bases = control_urls(base_url) or [base_url]
        self.base_url = self.bases[0]
        self.key = key
        self.key_source = key_source
        self.timeout = timeout
        self.context = context

    def _request(self, base: str, method: str, path: str, body: Any, query: dict[str, Any] | None,
                 accept: str = "application/json") -> urllib.request.Request:
        params = {k: v for k, v in (query or {}).items() if v is not None}
        url = base + path + (f"?{urllib.parse.urlencode(params)}" if params else "")
        data = None if body is None else msgspec.json.encode(body)
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.key}")
        request.add_header("Accept", accept)
        request.add_header("User-Agent", "ferryman-admin")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        return request

    def call(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None) -> bytes:
        """The raw response body (empty for 204) of ``method path``; raises ``AdminError``."""
        return self.stream(method, path, None, query=query, body=body)

    def stream(self, method: str, path: str, sink: Callable[[bytes], None] | None, *,
               query: dict[str, Any] | None = None, body: Any = None, accept: str = "application/json") -> bytes:
        """``method path`` with the response body handed to ``sink`` in chunks as it arrives (returns
        b""), or, without a sink, read whole and returned; raises ``AdminError``. With several
        control URLs, one that cannot be connected to is passed over for the next."""
        first = self.bases.index(self.base_url)
        failures: list[str] = []
        for step in range(len(self.bases)):
            base = self.bases[(first + step) % len(self.bases)]
            try:
                return self._stream_one(base, method, path, sink, query=query, body=body, accept=accept)
            except _Unreachable as exc:
                failures.append(f"{base}: {exc}")
        if len(failures) == 1:
            raise AdminError(f"cannot reach the control plane at {failures[0]}")
        raise AdminError("cannot reach any control-plane node: " + "; ".join(failures))

    def _stream_one(self, base: str, method: str, path: str, sink: Callable[[bytes], None] | None, *,
                    query: dict[str, Any] | None, body: Any, accept: str) -> bytes:
        request = self._request(base, method, path, body, query, accept)
        self.base_url = base
        try:
            opener = urllib.request.build_opener(_ControlHandler(context=self.context)) if self.context \
                else urllib.request.build_opener()
            with opener.open(request, timeout=self.timeout) as response:
                if sink is None:
                    return response.read()
                while chunk := response.read1(65536):
                    try:
                        sink(chunk)
                    except OSError as exc:  # writing it out failed, not the connection
                        raise SinkError(exc) from exc
                return b""
        except urllib.error.HTTPError as exc:
            raise self._refusal(exc) from None
        except ControlTlsError as exc:  # a node's certificate: nothing was sent, another URL may be tried
            raise _Unreachable(str(exc)) from None
        except urllib.error.URLError as exc:  # no connection (or the request could not be sent)
            raise _Unreachable(why_failed(exc.reason)) from None
        except TimeoutError:
            raise AdminError(f"cannot reach the control plane at {self.base_url}: no answer within "
                             f"{self.timeout:g}s") from None
        except OSError as exc:  # the connection broke while the answer was read
            raise AdminError(f"cannot reach the control plane at {self.base_url}: {why_failed(exc)}") from None

    def json(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None) -> Any:
        """``call`` and decode the JSON answer (None for an empty one)."""
        return decode(self.call(method, path, body, query), self.base_url)

    def _refusal(self, exc: urllib.error.HTTPError) -> AdminError:
        try:
            payload = exc.read()
        except OSError:
            payload = b""
        message = f"HTTP {exc.code} {exc.reason}".strip()
        try:
            body = msgspec.json.decode(payload)
        except msgspec.DecodeError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            message = body["error"]
        if exc.code == 401:
            return AdminError(f"admin key refused ({message}); the key came from {self.key_source}")
        return AdminError(message)


def decode(payload: bytes, source: str) -> Any:
    if not payload:
        return None
    try:
        return msgspec.json.decode(payload)
    except msgspec.DecodeError:
        raise AdminError(f"the control plane at {source} answered with something that is not JSON") from None


# ---------------------------------------------------------------------------- connection settings


def _scheme() -> str:
    return "http" if _settings().control_insecure_http else "https"


def _default_url() -> str:
    """``https://HOST:PORT`` of ``FERRYMAN_CONTROL_LISTEN`` (wildcard addresses mean this host)."""
    from dataplane.basics.hostport import parse_hostport

    settings = _settings()
    try:
        host, port = parse_hostport(settings.control_listen, "FERRYMAN_CONTROL_LISTEN")
    except ValueError as exc:
        raise usage(f"{exc} (or pass --control URL)") from None
    host = _WILDCARD_HOSTS.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"{_scheme()}://{host}:{port}"


def _settings() -> settings_mod.ControlSettings:
    try:
        return settings_mod.load(settings_mod.ControlSettings)
    except settings_mod.SettingsError as exc:
        raise usage(str(exc)) from None


def control_url(value: str | None) -> str:
    """The ``--control`` URL checked, or several comma-separated (control-plane nodes sharing one
    database: ``Client`` fails over between them)."""
    if value is None:
        return _default_url()
    parts = value.split(",")
    if len(parts) > 1:
        if not all(part.strip() for part in parts):
            raise usage(f"--control {value!r}: an empty URL in the comma-separated list")
        return ",".join(control_url(part) for part in parts)
    url = value.strip().rstrip("/")
    if "://" not in url:
        url = f"{_scheme()}://{url}"
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise usage(f"--control {value!r}: expected a URL like https://HOST:PORT")
    try:
        parsed.port  # noqa: B018 - raises for a port that is not a number in range
    except ValueError:
        raise usage(f"--control {value!r}: the port is not a number from 1 to 65535") from None
    return url


def tls_context(url: str, ca_hash: str | None) -> ssl.SSLContext | None:
    """The context that checks the control plane at ``url`` (None: plain HTTP, allowed and warned on stderr)."""
    settings = _settings()
    try:
        if check_scheme(url, bool(settings.control_insecure_http)) == "http":
            print(f"ferryman admin: {insecure_warning('the admin API is called over')}", file=sys.stderr)
            return None
        pin = parse_pin(ca_hash) if ca_hash else None
        if settings.control_ca:
            pem = read_ca_file(settings.control_ca)
            if pin is not None and ca_pin(load_ca_pem(pem, settings.control_ca)) != pin:
                raise ControlTlsError(f"{CA_VARIABLE}={settings.control_ca} is not the CA with hash {pin}")
        elif pin is not None:
            pem = fetch_pinned_ca(url, pin, DEFAULT_TIMEOUT)
        else:
            # the control plane's own CA, on its host: the one its HTTPS certificate chains to (shared by
            # every node on PostgreSQL), else the CA directory (an older start)
            candidates = [os.path.join(settings.data_dir, "tls", "ca.pem"),  # as written by control.tls
                          os.path.join(settings.data_dir, "ca", "ca.pem")]
            local = next((path for path in candidates if os.path.exists(path)), "")
            if not local:
                raise ControlTlsError(f"no way to check the control plane at {url}: {trust_hint()}")
            pem = read_ca_file(local, "the control plane's CA")
        return verifying_context(pem)
    except ControlTlsError as exc:
        raise AdminError(str(exc), 2 if "refused" in str(exc) or "no way" in str(exc) else 1) from None


def admin_key(key: str | None, key_file: str | None) -> tuple[str, str]:
    """(key, where it came from)."""
    if key is not None and key_file is not None:
        raise usage("give either --key or --key-file, not both")
    if key is not None:
        if not key.strip():
            raise usage("--key is empty")
        return key.strip(), "--key"
    path = key_file if key_file is not None else os.path.join(_settings().data_dir, ADMIN_KEY_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read().strip()
    except FileNotFoundError:
        hint = "" if key_file is not None else (" (the control plane writes it to FERRYMAN_DATA_DIR on first "
                                                "start; set FERRYMAN_DATA_DIR, or pass --key-file or --key)")
        raise usage(f"admin key file {path} not found{hint}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise usage(f"cannot read the admin key file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not text:
        raise usage(f"admin key file {path} is empty")
    return text, path


def quote(value: str | int) -> str:
    """``value`` as one segment of a URL path."""
    return urllib.parse.quote(str(value), safe="")
