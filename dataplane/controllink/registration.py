"""A node's side of registration: ``ferryman connector register`` and ``ferryman edge register``.

``register(...)`` makes a fresh key and CSR (``pki.new_key_and_csr``), sends the CSR with
the one-time token to the control plane's ``POST /v1/register`` (``controllink.http`` +
msgspec: the data plane does not import ``control``), and on success stores what came back in one
directory (default ``FERRYMAN_DATA_DIR/identity``):

- ``<name>.key`` (0600), ``<name>.pem`` and ``ca.pem`` through ``pki.write_node_files``;
- ``node.json`` (0600, written last): node id, role, name, connector group, control-plane
  URL, the edges to dial, the certificate's serial and expiry, and the three file names
  (relative to the directory).

A node started with no ``FERRYMAN_TLS_*`` settings uses ``FERRYMAN_DATA_DIR/identity/node.json``
when it exists (``dataplane.cli.nodes``; ``registered_settings`` below says what it supplies).

Nothing is written unless the control plane signed a certificate for the node asked for:
the private key exists only in memory until then. Refusals (HTTP 4xx: unknown, used or
expired token, a name already registered, an unusable address) are reported with the
control plane's own message; an unreachable control plane with the reason. Each becomes a
``RegisterError`` carrying the exit code (1 for the control plane's refusals and network
failures, 2 for local input errors found before anything was sent).
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import shlex
import socket
import ssl
import sys
import urllib.parse
from typing import Any

import msgspec

from ..basics import pki, statefile
from ..basics.controltls import (
    ControlTlsError,
    check_scheme,
    insecure_warning,
    parse_pin,
    split_token,
    trust_hint,
    verifying_context,
)
from ..basics.settings import CommonSettings
from ..basics.hostport import parse_hostport
from ..basics.pki import new_key_and_csr, write_node_files
from ..basics.version import VERSION
from . import trust
from .http import HttpError, HttpResponse, request_blocking

IDENTITY_DIR = "identity"  # under FERRYMAN_DATA_DIR
NODE_FILE = "node.json"
REGISTER_PATH = "/v1/register"
REQUEST_TIMEOUT = 30.0  # seconds for the whole registration request
MAX_RESPONSE = 1 << 20  # bytes; a registration answer is a few KiB
MAX_ADDRESSES = 16  # as the API accepts
ROLES = ("connector", "edge")


class RegisterError(Exception):
    """Registration failed; the message is for people, ``exit_code`` for the shell."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Registered(msgspec.Struct):
    """The control plane's answer to ``POST /v1/register`` (fields it adds later are ignored)."""

    node_id: str
    role: str
    name: str
    certificate_pem: str
    ca_pem: str
    serial: str
    not_after: str
    edges: list[str]
    group: str | None = None


class NodeRecord(msgspec.Struct, kw_only=True):
    """``node.json``: what a registration produced. File names are relative to its directory."""

    node_id: str
    role: str
    name: str
    group: str | None = None
    control: str
    edges: list[str] = []
    serial: str = ""
    not_after: str = ""
    registered_at: str = ""
    ca: str = pki.CA_CERT
    cert: str
    key: str
    control_ca: str = ""  # the control plane's CA pinned at registration (file name); "" for plain HTTP


class Registration(msgspec.Struct, frozen=True):
    """A stored registration: its directory (absolute) and its record."""

    directory: str
    record: NodeRecord

    @property
    def ca(self) -> str:
        return os.path.join(self.directory, self.record.ca)

    @property
    def cert(self) -> str:
        return os.path.join(self.directory, self.record.cert)

    @property
    def key(self) -> str:
        return os.path.join(self.directory, self.record.key)

    @property
    def path(self) -> str:
        return os.path.join(self.directory, NODE_FILE)


# ---------------------------------------------------------------------------- defaults, checks


def default_directory(data_dir: str) -> str:
    return os.path.join(data_dir, IDENTITY_DIR)


def default_name() -> str:
    """This host's name as a node name (its first label if the full name is not usable)."""
    host = socket.gethostname()
    for candidate in (host, host.split(".", 1)[0]):
        try:
            pki.check_name(candidate)
        except pki.PkiError:
            continue
        return candidate
    raise RegisterError(f"the host name {host!r} is not usable as a node name: pass --name NAME "
                        "(1-63 letters, digits, '.', '_' or '-')", 2)


def control_base(url: str) -> str:
    """The control plane's base URL (``http(s)://host[:port][/prefix]``) without a trailing slash;
    several control-plane nodes' URLs comma-separated (each checked; tried in turn by
    ``http.request``)."""
    parts = [part.strip() for part in url.split(",")]
    if len(parts) > 1 and not all(parts):
        raise RegisterError(f"--control {url!r}: an empty URL in the comma-separated list", 2)
    return ",".join(_one_base(part) for part in parts)


def _one_base(url: str) -> str:
    text = url.strip()
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise RegisterError(f"--control {url!r}: not a usable URL ({exc})", 2) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RegisterError(f"--control {url!r}: expected https://HOST[:PORT]", 2)
    if parts.query or parts.fragment:
        raise RegisterError(f"--control {url!r}: the URL must not carry a query or fragment", 2)
    return text.rstrip("/")


def _check_writable(directory: str) -> None:
    """Fail before the token is spent when ``directory`` could not be written later."""
    probe = os.path.abspath(directory)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise RegisterError(f"cannot store the identity in {directory}: {probe} is not a directory", 2)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RegisterError(f"cannot store the identity in {directory}: {probe} is not writable", 2)


# ---------------------------------------------------------------------------- node.json


def read_registration(directory: str) -> Registration | None:
    """The registration stored in ``directory``, or None when it has no ``node.json``."""
    directory = os.path.abspath(directory)
    path = os.path.join(directory, NODE_FILE)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise pki.PkiError(f"{path}: {exc.strerror}") from None
    try:
        record = msgspec.json.decode(data, type=NodeRecord)
    except msgspec.MsgspecError as exc:
        raise pki.PkiError(f"{path}: not a Ferryman node record ({exc})") from None
    if record.role not in ROLES:
        raise pki.PkiError(f"{path}: role {record.role!r} is not one of {', '.join(ROLES)}")
    for field in ("ca", "cert", "key"):
        value = getattr(record, field)
        if not value or os.path.basename(value) != value:
            raise pki.PkiError(f"{path}: {field} must be a file name in {directory}, not {value!r}")
    return Registration(directory=directory, record=record)


def registered_settings(registration: Registration) -> dict[str, Any]:
    """The settings a registered node takes from its record: TLS files, and for a connector
    the edges and its connector group."""
    values: dict[str, Any] = {"tls_ca": registration.ca, "tls_cert": registration.cert, "tls_key": registration.key}
    if registration.record.role == "connector":
        if registration.record.edges:
            values["edges"] = ",".join(registration.record.edges)
        if registration.record.group:
            values["connector_group"] = registration.record.group
    return values


def expiry_warning(registration: Registration, now: datetime.datetime | None = None) -> str | None:
    """A sentence for the log when the certificate has expired (it cannot be renewed then), else None.

    A certificate that is only due for renewal is renewed by the node's control link.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    try:
        cert = pki.read_certificates(registration.cert)[0]
    except pki.PkiError:
        return None  # loading the node's files reports unreadable files with their reason
    if now < cert.not_valid_after_utc:
        return None
    return (f"the certificate {registration.cert} expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC: "
            f"edges refuse it and the control plane will not renew it; register again with a new token")


# ---------------------------------------------------------------------------- HTTP


def _post(base: str, body: bytes, context: ssl.SSLContext | None) -> HttpResponse:
    try:
        return request_blocking(base, "POST", REGISTER_PATH, body=body, timeout=REQUEST_TIMEOUT, max_body=MAX_RESPONSE,
                                headers={"Content-Type": "application/json", "Accept": "application/json"},
                                user_agent=f"ferryman/{VERSION}", ssl_context=context)
    except HttpError as exc:
        raise RegisterError(f"cannot reach the control plane at {base}: {exc}") from None


def _refusal(base: str, status: int, payload: bytes, headers: dict[str, str]) -> RegisterError:
    message = ""
    try:
        body = json.loads(payload)
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            message = body["error"]
    except ValueError:
        pass
    if not message:
        message = f"HTTP {status} {http.client.responses.get(status, '')}".rstrip()
        location = headers.get("location")
        if 300 <= status < 400 and location:
            message += f" (redirected to {location}: pass that URL to --control)"
    if status == 404:
        message += f" (no {base}{REGISTER_PATH}: is --control the URL of a Ferryman control plane?)"
    return RegisterError(f"the control plane at {base} refused the registration: {message}")


# ---------------------------------------------------------------------------- registering


def _pin(token: str, ca_hash: str) -> str | None:
    """The CA pin: the one the token carries and/or ``--ca-hash`` (they must agree)."""
    try:
        _secret, token_pin = split_token(token)
        flag_pin = parse_pin(ca_hash) if ca_hash.strip() else None
    except ControlTlsError as exc:
        raise RegisterError(str(exc), 2) from None
    if token_pin and flag_pin and token_pin != flag_pin:
        raise RegisterError(f"--ca-hash {flag_pin} differs from the CA hash the registration token carries "
                            f"({token_pin}): one of them is not from this control plane", 2)
    return flag_pin or token_pin


def register(role: str, control: str, token: str, *, name: str | None, directory: str,
             addresses: list[str] | None = None, ca_hash: str = "", ca_file: str = "",
             insecure: bool = False) -> Registration:
    """Register this node as a ``role`` with the control plane at ``control``; store and return the registration.

    The control plane's CA is pinned first (``trust.first_contact``): ``ca_file``
    (``FERRYMAN_CONTROL_CA``), else ``ca_hash`` or the hash the token carries; ``http://`` only
    with ``insecure``. A token without a hash (an older control plane's) needs ``ca_hash`` or
    ``ca_file``."""
    if role not in ROLES:
        raise RegisterError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}", 2)
    base = control_base(control)
    token = token.strip()
    if not token:
        raise RegisterError("--token is empty: pass the registration token the administrator created", 2)
    name = default_name() if name is None else name.strip()
    try:
        pki.check_name(name)
    except pki.PkiError as exc:
        raise RegisterError(str(exc), 2) from None
    addresses = [a.strip() for a in addresses or []]
    if role == "edge" and not addresses:
        raise RegisterError("an edge registers with --address HOST:PORT: the address connectors and clients dial", 2)
    if len(addresses) > MAX_ADDRESSES:
        raise RegisterError(f"at most {MAX_ADDRESSES} --address values", 2)
    for number, address in enumerate(addresses, 1):
        try:
            parse_hostport(address, "--address" if len(addresses) == 1 else f"--address {number}")
        except ValueError as exc:
            raise RegisterError(str(exc), 2) from None
    directory = os.path.abspath(directory)
    try:
        existing = read_registration(directory)
    except pki.PkiError as exc:
        raise RegisterError(f"{exc}: remove it or register into another --dir", 2) from None
    if existing is not None and existing.record.role != role:
        raise RegisterError(f"{directory} holds the identity of {existing.record.role} {existing.record.name!r}: "
                            f"register this {role} into another --dir", 2)
    _check_writable(directory)
    pin = _pin(token, ca_hash)
    try:
        scheme = check_scheme(base, insecure)
    except ControlTlsError as exc:
        raise RegisterError(str(exc), 2) from None
    if scheme == "https" and pin is None and not ca_file:
        raise RegisterError(f"the registration token carries no CA hash (it was made by an older control plane): "
                            f"{trust_hint()}", 2)
    try:
        control_ca = trust.first_contact(base, pin=pin, ca_file=ca_file, insecure=insecure)
    except ControlTlsError as exc:
        raise RegisterError(str(exc)) from None
    context = verifying_context(control_ca) if control_ca is not None else None

    key_pem, csr_pem = new_key_and_csr(name)
    body = msgspec.json.encode({"token": token, "csr_pem": csr_pem.decode(), "name": name,
                                "version": VERSION[:64], "addresses": addresses, "role": role})
    answer_http = _post(base, body, context)
    if answer_http.status not in (200, 201):
        raise _refusal(base, answer_http.status, answer_http.body, answer_http.headers)
    try:
        answer = msgspec.json.decode(answer_http.body, type=Registered)
    except msgspec.MsgspecError as exc:
        raise RegisterError(f"the control plane at {base} sent an answer that is not a registration ({exc})") from None

    if answer.role != role:
        raise RegisterError(
            f"the registration token was issued for a {answer.role}: the control plane registered {answer.role} "
            f"{answer.name!r} (node id {answer.node_id}) instead of {role} {name!r}. Nothing was written; ask an "
            f"administrator to revoke node {answer.node_id} and to create a {role} registration token"
        )
    if answer.name != name:
        raise RegisterError(
            f"the control plane registered {role} {answer.name!r} (node id {answer.node_id}) when {name!r} was "
            f"asked for. Nothing was written; ask an administrator to revoke node {answer.node_id}"
        )
    spent = f"the control plane registered {role} {name!r} (node id {answer.node_id})"
    try:
        files = write_node_files(directory, name, key_pem, answer.certificate_pem.encode(), answer.ca_pem.encode())
        pinned = trust.save(directory, control_ca)
    except (pki.PkiError, statefile.StateFileError) as exc:
        raise RegisterError(f"{spent}, but its identity cannot be stored: {exc}. Ask an administrator to revoke "
                            f"node {answer.node_id}, then register again with a new token") from None
    record = NodeRecord(
        node_id=answer.node_id, role=answer.role, name=name, group=answer.group, control=base,
        edges=list(answer.edges), serial=answer.serial, not_after=answer.not_after,
        registered_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        ca=os.path.basename(files.ca), cert=os.path.basename(files.cert), key=os.path.basename(files.key),
        control_ca=pinned,
    )
    try:
        statefile.write_private(os.path.join(directory, NODE_FILE),
                                msgspec.json.format(msgspec.json.encode(record)) + b"\n")
    except statefile.StateFileError as exc:
        raise RegisterError(f"{spent} and stored its certificate and key in {directory}, but not {NODE_FILE}: {exc}. "
                            f"Point the FERRYMAN_TLS_* variables at those files yourself") from None
    return Registration(directory=directory, record=record)


def update_record(registration: Registration, **changes: Any) -> Registration:
    """Rewrite ``node.json`` with ``changes`` (e.g. a renewed certificate's serial and expiry)."""
    record = msgspec.structs.replace(registration.record, **changes)
    statefile.write_private(registration.path, msgspec.json.format(msgspec.json.encode(record)) + b"\n")
    return Registration(directory=registration.directory, record=record)


def environment(registration: Registration) -> list[tuple[str, str]]:
    """The ``FERRYMAN_*`` variables that run this node with its registration."""
    values = registered_settings(registration)
    names = {"tls_ca": "FERRYMAN_TLS_CA", "tls_cert": "FERRYMAN_TLS_CERT", "tls_key": "FERRYMAN_TLS_KEY",
             "edges": "FERRYMAN_EDGES", "connector_group": "FERRYMAN_CONNECTOR_GROUP"}
    return [(names[field], value) for field, value in values.items()]


def report(registration: Registration, automatic: bool, data_dir: str) -> str:
    """What ``register`` prints on stdout: ``#`` comments and ``VAR=value`` lines (sourceable by sh)."""
    r = registration.record
    group = f", connector group {r.group}" if r.group else ""
    lines = [
        f"# registered {r.role} {r.name!r} (node id {r.node_id}{group}) with the control plane at {r.control}",
        f"# certificate serial {r.serial}, valid until {r.not_after}; key, certificate and CA in "
        f"{registration.directory} "
        f"(key mode 0600)",
    ]
    if automatic:
        lines.append(f"# `ferryman {r.role}` uses this identity by itself while FERRYMAN_TLS_* are unset "
                     f"(FERRYMAN_DATA_DIR={data_dir}); otherwise set:")
    else:
        lines.append(f"# run `ferryman {r.role}` with:")
    lines.extend(f"{name}={shlex.quote(value)}" for name, value in environment(registration))
    if r.role == "connector" and not r.edges:
        lines.append("# the control plane knows no edge yet: set FERRYMAN_EDGES (or --edges) to the edges to dial")
    return "\n".join(lines)


def command(role: str, args: Any, settings: CommonSettings) -> int:
    """``ferryman connector|edge register``: register, print the variables, return the exit code."""
    data_dir = settings.data_dir
    directory = os.path.abspath(args.dir or default_directory(data_dir))
    if settings.control_insecure_http and urllib.parse.urlsplit(args.control.strip()).scheme == "http":
        print(f"ferryman {role} register: {insecure_warning('registering over')}", file=sys.stderr)
    try:
        registration = register(role, args.control, args.token, name=args.name, directory=directory,
                                addresses=getattr(args, "address", None), ca_hash=args.ca_hash or "",
                                ca_file=settings.control_ca, insecure=bool(settings.control_insecure_http))
    except RegisterError as exc:
        print(f"ferryman {role} register: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"ferryman {role} register: interrupted", file=sys.stderr)
        return 130
    automatic = directory == os.path.abspath(default_directory(data_dir))
    print(report(registration, automatic, data_dir), flush=True)
    return 0
