"""Command-line entry of the data-plane nodes: ``edge``, ``connector``, ``client``, ``pki init``,
and node registration (``connector register``, ``edge register``).

``ferryman edge|connector|client|pki`` land here (``add_node_commands``, ``run_command``). Flags
override ``FERRYMAN_*`` variables of the same meaning. Errors in settings, certificates
or the application file end the process with exit code 2 and one clear line.

``ferryman connector|edge register --control URL --token T`` registers the node with the
control plane (``controllink.registration``). An edge or connector started with none of
``FERRYMAN_TLS_CA/CERT/KEY`` set uses the identity registered in
``FERRYMAN_DATA_DIR/identity/node.json`` when there is one (a connector also takes the
edges and connector group recorded there unless ``--edges``/``--group`` or their variables
are set), and says so in its log.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import msgspec

from ..access.apptable import AppTable
from ..basics import pki
from ..basics.controltls import insecure_warning
from ..basics.logs import setup_logging
from ..basics.settings import (
    ClientSettings,
    CommonSettings,
    ConnectorSettings,
    EdgeSettings,
    NodeSettings,
    SettingsError,
    load,
    read_config_file,
    variable_name,
)
from ..contract.apps import AppsError
from ..basics import statefile
from ..controllink import registration as register
from ..controllink.registration import Registration
from ..transport.credentials import NodeCredentials
from ..transport.proxy import announce_egress
from .process import run_node

log = logging.getLogger("ferryman.identity")


def _tls_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ca", dest="tls_ca", help="CA bundle (FERRYMAN_TLS_CA)")
    parser.add_argument("--cert", dest="tls_cert", help="node certificate (FERRYMAN_TLS_CERT)")
    parser.add_argument("--key", dest="tls_key", help="node private key (FERRYMAN_TLS_KEY)")
    parser.add_argument("--metrics", dest="metrics_addr", help="HOST:PORT for /metrics and /ready")


def _register_command(node: argparse.ArgumentParser, role: str) -> None:
    """``ferryman ROLE register ...``; without it, ``ferryman ROLE`` runs the node as before."""
    sub = node.add_subparsers(dest="node_cmd", metavar="{register}", title="subcommands")
    reg = sub.add_parser("register", help=f"register this {role} with the control plane (one-time token)",
                         description=f"Create a key and CSR, trade them and a one-time registration token for a "
                                     f"{role} certificate from the control plane, and store the identity in DIR.")
    reg.add_argument("--control", required=True, metavar="URL", help="control plane URL, e.g. https://control:8080")
    reg.add_argument("--token", required=True, help="one-time registration token (from the administrator; it "
                                                     "carries the control plane's CA hash)")
    reg.add_argument("--ca-hash", metavar="sha256:HEX", help="the control plane's CA hash, when the token carries "
                                                              "none (or to check the one it carries)")
    reg.add_argument("--name", help="node name (default: this host's name)")
    reg.add_argument("--dir", help="where to store key, certificate, CA and node.json "
                                   "(default: FERRYMAN_DATA_DIR/identity; nodes read that one by themselves)")
    if role == "edge":
        reg.add_argument("--address", action="append", required=True, metavar="HOST:PORT",
                         help="public address connectors and clients dial (repeatable; the first is the edge's "
                              "address, every host goes in its certificate)")


def add_node_commands(sub: Any) -> None:
    edge = sub.add_parser("edge", help="run an edge: accepts client and connector tunnels "
                                       "(`edge register`: get its certificate)")
    _tls_flags(edge)
    edge.add_argument("--listen", dest="edge_listen", help="HOST:PORT for tunnels (FERRYMAN_EDGE_LISTEN)")
    edge.add_argument("--apps", dest="apps_file", help="application file (FERRYMAN_APPS_FILE)")
    edge.add_argument("--https", dest="edge_https_listen", metavar="HOST:PORT",
                      help="HTTPS front door for published web apps (FERRYMAN_EDGE_HTTPS_LISTEN)")
    edge.add_argument("--workers", dest="edge_workers", type=int, metavar="N",
                      help="worker processes sharing the edge's ports; 0: one per core (FERRYMAN_EDGE_WORKERS)")
    edge.add_argument("--worker-of", dest="worker_of", help=argparse.SUPPRESS)  # given by the edge's supervisor
    edge.set_defaults(node="edge")
    _register_command(edge, "edge")

    conn = sub.add_parser("connector", help="run a connector: dials edges, reaches private backends "
                                            "(`connector register`: get its certificate)")
    _tls_flags(conn)
    conn.add_argument("--edges", help="comma-separated edge HOST:PORT list (FERRYMAN_EDGES)")
    conn.add_argument("--group", dest="connector_group", help="connector group (FERRYMAN_CONNECTOR_GROUP)")
    conn.add_argument("--apps", dest="apps_file", help="application file whose IP segments may name loopback, "
                                                       "link-local, metadata or own addresses (FERRYMAN_APPS_FILE)")
    conn.add_argument("--tunnels", dest="connector_tunnels", type=int, help="tunnels to keep (FERRYMAN_CONNECTOR_TUNNELS)")
    conn.add_argument("--transport", dest="transport", choices=["auto", "quic", "tcp"],
                      help="tunnel transport (FERRYMAN_TRANSPORT)")
    conn.set_defaults(node="connector")
    _register_command(conn, "connector")

    client = sub.add_parser("client", help="run the client agent: port forwards and SOCKS5 into the fabric")
    _tls_flags(client)
    client.add_argument("--edges", help="comma-separated edge HOST:PORT list (FERRYMAN_EDGES)")
    client.add_argument("--forward", action="append", default=[], metavar="[HOST:]PORT=DEST:PORT[/udp]",
                        help="local port forward (repeatable)")
    client.add_argument("--socks", dest="socks_listen", help="SOCKS5 listen HOST:PORT (FERRYMAN_SOCKS_LISTEN)")
    client.add_argument("--http", dest="http_listen", help="HTTP CONNECT proxy listen HOST:PORT (FERRYMAN_HTTP_LISTEN)")
    client.add_argument("--dns", dest="dns_listen", help="private DNS resolver listen HOST:PORT (FERRYMAN_DNS_LISTEN)")
    client.add_argument("--transparent", dest="transparent", action="store_const", const="on",
                        help="capture TCP to the profile's private addresses with nftables (Linux, root; "
                             "FERRYMAN_TRANSPARENT=on)")
    client.add_argument("--transport", dest="transport", choices=["auto", "quic", "tcp"],
                        help="tunnel transport (FERRYMAN_TRANSPORT)")
    client.set_defaults(node="client")
    csub = client.add_subparsers(dest="node_cmd", metavar="{login,logout,status}", title="subcommands")
    login = csub.add_parser("login", help="sign in (password, then TOTP if enrolled; or --oidc) and register this "
                                          "device",
                            description="Sign in at the control plane and register this device: a device key is "
                                        "made here, the control plane certifies it; session and key are stored "
                                        "in DIR. `ferryman client` then uses them by itself. With --oidc, sign in "
                                        "through the control plane's OpenID Connect provider in a browser instead "
                                        "of with a password.")
    login.add_argument("--control", required=True, metavar="URL", help="control plane URL, e.g. https://control:8080")
    login.add_argument("--ca-hash", metavar="sha256:HEX", help="the control plane's CA hash (printed by `ferryman "
                                                                "control` at start): the CA is pinned with it on "
                                                                "first contact (or set FERRYMAN_CONTROL_CA)")
    login.add_argument("--user", metavar="UPN", help="user name (UPN), e.g. alice@corp.example (required without "
                                                     "--oidc)")
    login.add_argument("--oidc", action="store_true", help="sign in through the control plane's OIDC provider: "
                                                           "open the printed URL (this machine's loopback) in a "
                                                           "browser on this machine")
    login.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    login.add_argument("--totp", default="", metavar="CODE", help="TOTP code (asked for when needed on a terminal)")
    login.add_argument("--recovery-code", default="", help="a one-time recovery code instead of a TOTP code")
    login.add_argument("--device-name", default="", help="this device's name (default: the host name)")
    login.add_argument("--dir", help="where to store the session (default: FERRYMAN_DATA_DIR/client)")
    logout = csub.add_parser("logout", help="end the signed-in session (at the control plane too) and forget it here",
                             description="Sign out: the control plane ends the session (its refresh token stops "
                                         "working, edges refuse its access tokens) and the session and cached "
                                         "forwarding profile are removed from DIR. The device key and certificate "
                                         "stay; a running agent stops being let through by the edges.")
    logout.add_argument("--dir", help="the session's directory (default: FERRYMAN_DATA_DIR/client)")
    status = csub.add_parser("status", help="what the running client agent reports: user, device, tunnel, "
                                            "flows, profile")
    status.add_argument("--dir", help="the agent's directory (default: FERRYMAN_DATA_DIR/client)")
    status.add_argument("--json", action="store_true", help="the status as JSON")

    p = sub.add_parser("pki", help="certificates for nodes until the control plane issues them")
    psub = p.add_subparsers(dest="pki_cmd", required=True)
    init = psub.add_parser("init", help="create a CA and edge/connector/client certificates in DIR")
    init.add_argument("dir")
    init.add_argument("--edge-host", action="append", default=[], help="name or IP clients dial (repeatable)")
    init.add_argument("--edge", action="append", default=[], help="edge name (repeatable; default edge-1)")
    init.add_argument("--connector", action="append", default=[], help="connector name (repeatable; default connector-1)")
    init.add_argument("--client", action="append", default=[], help="client name (repeatable; default client-1)")
    init.add_argument("--force", action="store_true", help="overwrite existing node certificates")
    init.set_defaults(node="pki")


_NODE_SETTINGS: dict[str, type[NodeSettings]] = {"edge": EdgeSettings, "connector": ConnectorSettings,
                                                 "client": ClientSettings}
_SETTING_FLAGS = ("tls_ca", "tls_cert", "tls_key", "metrics_addr", "edge_listen", "edge_https_listen", "apps_file", "edges", "edge_workers",
                  "connector_group", "connector_tunnels", "socks_listen", "http_listen", "dns_listen", "transport",
                  "transparent")


def run_command(args: argparse.Namespace) -> int:
    if getattr(args, "node_cmd", None) == "register":
        return _register(args)
    if getattr(args, "node_cmd", None) == "login":
        return _login(args)
    if getattr(args, "node_cmd", None) == "logout":
        return _logout(args)
    if getattr(args, "node_cmd", None) == "status":
        return _status(args)
    try:
        if args.node == "pki":
            return _pki_init(args)
        overrides = {k: getattr(args, k, None) for k in _SETTING_FLAGS}
        settings = load(_NODE_SETTINGS[args.node], overrides)
        registered = None
        keeper = None
        if args.node in register.ROLES:
            settings, registered = _use_registration(args.node, settings, overrides)
        elif args.node == "client":
            settings, keeper = _use_signed_in_session(settings, overrides)
        credentials = NodeCredentials(settings, args.node)
        worker_of = getattr(args, "worker_of", None) if args.node == "edge" else None
        setup_logging(settings.log_level, settings.log_format, args.node,
                      credentials.name + (f"/worker-{_worker_index(worker_of)}" if worker_of else ""))
        if registered is not None:
            _log_registered(registered, settings)
        if keeper is not None:
            log.info("FERRYMAN_TLS_* not set: using the signed-in session",
                     extra={"user": keeper.session.upn, "device": keeper.session.device_id,
                            "session": keeper.directory})
            if keeper.tls is None:
                log.warning(insecure_warning(f"calls to the control plane at {keeper.session.control} use"))
        if args.node in ("connector", "client"):
            announce_egress(settings)  # a malformed proxy URL stops the node here; logs the proxy in use
        worker = None
        if args.node == "edge" and getattr(args, "worker_of", None):
            from ..edge.workers import WorkerLink, WorkerSpec

            worker = WorkerLink(WorkerSpec.parse(args.worker_of))
            # The supervisor serves the edge's metrics; every worker serves the front door on its socket.
            settings = msgspec.structs.replace(settings, metrics_addr="")
            credentials = NodeCredentials(settings, args.node)
        node = _build(args, settings, credentials, registered, keeper, follow_edges=not _explicit("edges", overrides),
                      worker=worker)
        if args.node == "edge" and worker is None:
            from ..edge.workers import Supervisor, worker_argv, worker_count

            workers = worker_count(settings.edge_workers)
            if workers > 1:  # checked as an edge above; the workers run it
                node = Supervisor(settings, credentials.name, worker_argv(args.argv), workers)
    except (SettingsError, AppsError, pki.PkiError, register.RegisterError, ValueError) as exc:
        print(f"ferryman {args.node}: {exc}", file=sys.stderr)
        return 2
    run_node(node.run)
    return 0


def _worker_index(worker_of: str) -> str:
    from ..edge.workers import WorkerSpec

    try:
        return str(WorkerSpec.parse(worker_of).index)
    except ValueError:
        return "?"


def _register(args: argparse.Namespace) -> int:
    try:
        settings = load(CommonSettings)
    except SettingsError as exc:
        print(f"ferryman {args.node} register: {exc}", file=sys.stderr)
        return 2
    return register.command(args.node, args, settings)


def _explicit(field: str, overrides: dict[str, Any]) -> bool:
    """Whether a setting was given (flag, environment or config file) rather than defaulted."""
    if overrides.get(field) is not None or os.environ.get(variable_name(field)):
        return True
    config = os.environ.get("FERRYMAN_CONFIG")
    return bool(config) and field in read_config_file(config)


def _use_registration(role: str, settings: NodeSettings,
                      overrides: dict[str, Any]) -> tuple[NodeSettings, Registration | None]:
    """With no FERRYMAN_TLS_* at all, the identity of ``FERRYMAN_DATA_DIR/identity/node.json``, if any."""
    if settings.tls_ca or settings.tls_cert or settings.tls_key:
        return settings, None
    found = register.read_registration(register.default_directory(settings.data_dir))
    if found is None:
        return settings, None
    if found.record.role != role:
        raise SettingsError(f"FERRYMAN_TLS_CA, FERRYMAN_TLS_CERT, FERRYMAN_TLS_KEY not set, and {found.path} is the "
                            f"identity of {found.record.role} {found.record.name!r}, not of this {role}: set the "
                            f"FERRYMAN_TLS_* variables, or another FERRYMAN_DATA_DIR")
    values = {field: value for field, value in register.registered_settings(found).items()
              if field.startswith("tls_") or not _explicit(field, overrides)}
    return load(type(settings), {**overrides, **values}), found


def _log_registered(found: Registration, settings: Any) -> None:
    extra: dict[str, Any] = {"identity": found.path, "node_id": found.record.node_id}
    if found.record.role == "connector":
        extra.update(edges=settings.edges, group=settings.connector_group)
    log.info("FERRYMAN_TLS_* not set: using the registered identity", extra=extra)
    warning = register.expiry_warning(found)
    if warning:
        log.warning(warning)


def _build(args: argparse.Namespace, settings: Any, credentials: NodeCredentials,
           registered: Registration | None, keeper: Any, *, follow_edges: bool, worker: Any = None) -> Any:
    # The node modules are imported by the command that runs them only: every other command
    # (control, admin, login, status, ...) starts without loading the data path.
    if args.node == "edge":
        from ..edge.node import APPS_FILE_ON_REGISTERED_EDGE, Edge

        if settings.apps_file:
            if registered is not None:
                raise SettingsError(APPS_FILE_ON_REGISTERED_EDGE)
            return Edge(settings, credentials, AppTable.load(settings.apps_file), registered, worker)
        if registered is None:
            raise SettingsError("the edge needs its applications: register it with the control plane "
                                "(`ferryman edge register --control URL --token T --address HOST:PORT`), or set "
                                "FERRYMAN_APPS_FILE (or --apps) to an application file")
        return Edge(settings, credentials, None, registered, worker)
    if args.node == "connector":
        from ..connector.node import Connector

        return Connector(settings, credentials, registered, follow_edges=registered is not None and follow_edges)
    from ..client.forwards import Forward
    from ..client.node import Client

    return Client(settings, credentials, [Forward.parse(f) for f in args.forward], keeper)


def _use_signed_in_session(settings: Any, overrides: dict[str, Any]) -> tuple[ClientSettings, Any]:
    """With no FERRYMAN_TLS_* at all, the session of ``ferryman client login`` (FERRYMAN_DATA_DIR/client), if any."""
    from ..client.signin import SignInError, TokenKeeper, default_directory, read_session, session_context

    if settings.tls_ca or settings.tls_cert or settings.tls_key:
        return settings, None
    directory = os.path.abspath(default_directory(settings.data_dir))
    session = read_session(directory)
    if session is None:
        return settings, None
    files = {"tls_ca": os.path.join(directory, session.ca), "tls_cert": os.path.join(directory, session.cert),
             "tls_key": os.path.join(directory, session.key)}
    settings = load(ClientSettings, {**overrides, **files})
    try:
        context = session_context(directory, session, ca_file=settings.control_ca,
                                  insecure=bool(settings.control_insecure_http))
    except SignInError as exc:
        raise ValueError(f"the signed-in session in {directory}: {exc}") from None
    return settings, TokenKeeper(directory, session, lambda _token: None, context)


def _login(args: argparse.Namespace) -> int:
    import getpass

    from ..client.signin import SignInError, default_directory, first_contact, login

    try:
        common = load(CommonSettings)
    except SettingsError as exc:
        print(f"ferryman client login: {exc}", file=sys.stderr)
        return 2
    data_dir = common.data_dir
    directory = os.path.abspath(args.dir or default_directory(data_dir))
    if args.oidc:
        refused = [flag for flag, given in (("--user", args.user), ("--password-stdin", args.password_stdin),
                                            ("--totp", args.totp), ("--recovery-code", args.recovery_code)) if given]
        if refused:
            print(f"ferryman client login: {', '.join(refused)} cannot be used with --oidc (the OIDC provider "
                  f"asks for the user's credentials in the browser)", file=sys.stderr)
            return 2
    elif not args.user:
        print("ferryman client login: --user UPN is required (or --oidc to sign in through the OIDC provider)",
              file=sys.stderr)
        return 2
    if common.control_insecure_http and args.control.strip().lower().startswith("http://"):
        print(f"ferryman client login: {insecure_warning('signing in over')}", file=sys.stderr)
    try:  # the control plane's CA is pinned before a password or a key request is sent
        tls = first_contact(args.control, ca_hash=args.ca_hash or "", ca_file=common.control_ca,
                            insecure=bool(common.control_insecure_http))
    except SignInError as exc:
        print(f"ferryman client login: {exc}", file=sys.stderr)
        return 1
    if args.oidc:
        return _login_oidc(args, directory, data_dir, tls)
    try:
        password = sys.stdin.readline().rstrip("\n") if args.password_stdin else getpass.getpass(f"password for {args.user}: ")
    except (EOFError, KeyboardInterrupt):
        print("ferryman client login: no password given", file=sys.stderr)
        return 2
    totp = args.totp
    for attempt in range(2):
        try:
            session = login(args.control, args.user, password, directory=directory, totp=totp,
                            recovery_code=args.recovery_code, device_name=args.device_name, tls=tls)
            break
        except SignInError as exc:
            if exc.code == "mfa_required" and attempt == 0 and not totp and sys.stdin.isatty() \
                    and not args.password_stdin:
                totp = input("TOTP code: ").strip()
                continue
            hint = " (pass --totp CODE or --recovery-code CODE)" if exc.code == "mfa_required" else ""
            print(f"ferryman client login: {exc}{hint}", file=sys.stderr)
            return 1
        except (pki.PkiError, statefile.StateFileError) as exc:
            print(f"ferryman client login: signed in, but the device identity cannot be stored: {exc}",
                  file=sys.stderr)
            return 1
    return _login_done(session, directory, data_dir)


def _login_oidc(args: argparse.Namespace, directory: str, data_dir: str, tls: Any) -> int:
    from ..client.signin import SignInError, login_oidc

    def show(url: str) -> None:
        print(f"open this URL in a browser to sign in: {url}", file=sys.stderr, flush=True)

    try:
        session = login_oidc(args.control, directory=directory, show_url=show, device_name=args.device_name, tls=tls)
    except KeyboardInterrupt:
        print("ferryman client login: interrupted; not signed in", file=sys.stderr)
        return 130
    except SignInError as exc:
        print(f"ferryman client login: {exc}", file=sys.stderr)
        return 1
    except (pki.PkiError, statefile.StateFileError) as exc:
        print(f"ferryman client login: signed in, but the device identity cannot be stored: {exc}", file=sys.stderr)
        return 1
    return _login_done(session, directory, data_dir)


def _login_done(session: Any, directory: str, data_dir: str) -> int:
    from ..client.signin import CLIENT_DIR, default_directory

    print(f"# signed in as {session.upn} on device {session.device_id}; session and device key in {directory}")
    if directory == os.path.abspath(default_directory(data_dir)):
        print("# `ferryman client` uses them by itself while FERRYMAN_TLS_* are unset")
    else:  # ferryman client looks in FERRYMAN_DATA_DIR/client
        print(f"# `ferryman client` uses them when {directory} is its FERRYMAN_DATA_DIR/{CLIENT_DIR}")
    return 0


def _client_directory(args: argparse.Namespace) -> str:
    from ..client.signin import default_directory

    return os.path.abspath(args.dir) if args.dir else os.path.abspath(default_directory(load(CommonSettings).data_dir))


def _logout(args: argparse.Namespace) -> int:
    from ..client.signin import SignInError, logout

    try:
        directory = _client_directory(args)
        common = load(CommonSettings)
        upn, remote = logout(directory, ca_file=common.control_ca, insecure=bool(common.control_insecure_http))
    except (SettingsError, pki.PkiError, SignInError) as exc:
        print(f"ferryman client logout: {exc}", file=sys.stderr)
        return 1
    if remote:
        print(f"# signed out {upn}: the control plane ended the session; it is removed from {directory}")
    else:
        print(f"# {upn}'s session is removed from {directory}, but the control plane could not be told: "
              f"it ends when its refresh token expires (or revoke it: ferryman admin sessions revoke)", file=sys.stderr)
    return 0


def _status(args: argparse.Namespace) -> int:
    import json

    from ..client import status

    try:
        directory = _client_directory(args)
    except SettingsError as exc:
        print(f"ferryman client status: {exc}", file=sys.stderr)
        return 2
    data, problem = status.read(directory)
    if args.json:
        print(json.dumps({"running": not problem, "problem": problem, "status": data}, indent=1))
    elif data is not None and not problem:
        print(status.render(data))
    if problem:
        if not args.json:
            print(f"ferryman client status: {problem}", file=sys.stderr)
        return 3
    return 0


def _pki_init(args: argparse.Namespace) -> int:
    created = pki.init_pki(
        args.dir,
        edge_hosts=args.edge_host or ["localhost", "127.0.0.1"],
        edges=args.edge or ["edge-1"],
        connectors=args.connector or ["connector-1"],
        clients=args.client or ["client-1"],
        force=args.force,
    )
    for name, files in created.items():
        print(f"{files.role:<10} {name:<16} {files.cert}  {files.key}")
    print(f"CA: {args.dir}/ca.pem")
    return 0
