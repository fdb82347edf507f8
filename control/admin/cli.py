"""The ``ferryman admin`` parser and entry point (``main``).

The connection and output options (``--control``, ``--key-file``, ``--key``, ``--json``,
``--timeout``) are accepted before or after the command words. The commands are the data
of the resource modules (``apps``, ``webapps``, ``nodes``, ``access``, ``identity``, ``logs``, ``apply``),
added in the order ``COMMANDS`` gives.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from . import access, apps, identity, logs, nodes, webapps
from .apply import APPLY
from .client import DEFAULT_TIMEOUT, AdminError, Client, admin_key, control_url, tls_context, usage
from .commands import Command, Group, add_commands
from .output import Ctx

COMMANDS: list[Group | Command] = [
    apps.APPS, apps.SEGMENTS, webapps.WEBAPPS, nodes.GROUPS, nodes.CONNECTORS, nodes.EDGES, nodes.CERTS, apps.DNS, apps.PROFILE,
    nodes.TOKENS, nodes.KEYS, access.ASSIGNMENTS, access.LOCATIONS, access.POLICIES, identity.USERS,
    identity.USER_GROUPS, identity.DEVICES, identity.SESSIONS, logs.LOGS, logs.DISCOVERY, logs.AUDIT, APPLY,
]


def _global_options(parser: argparse.ArgumentParser, *, in_subcommand: bool) -> None:
    """The connection and output options; accepted before or after the command words."""
    default: Any = argparse.SUPPRESS if in_subcommand else None
    parser.add_argument("--control", metavar="URL", default=default,
                        help="control plane URL (default: https://FERRYMAN_CONTROL_LISTEN)")
    parser.add_argument("--ca-hash", metavar="sha256:HEX", default=default,
                        help="the control plane's CA hash: its CA is checked against it (default: "
                             "FERRYMAN_CONTROL_CA, else FERRYMAN_DATA_DIR/ca/ca.pem)")
    parser.add_argument("--key-file", metavar="PATH", default=default,
                        help="file holding the admin key (default: FERRYMAN_DATA_DIR/admin.key)")
    parser.add_argument("--key", metavar="KEY", default=default,
                        help="the admin key itself (visible in the process list: prefer --key-file)")
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS if in_subcommand else False,
                        help="print the API's JSON instead of tables")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        default=argparse.SUPPRESS if in_subcommand else DEFAULT_TIMEOUT,
                        help=f"HTTP timeout (default {DEFAULT_TIMEOUT:g})")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, in_subcommand=True)
    parser = argparse.ArgumentParser(
        prog="ferryman admin",
        description="Administer the control plane through its admin REST API. Tables by default, --json for scripts.")
    _global_options(parser, in_subcommand=False)
    resources = parser.add_subparsers(dest="resource", required=True, metavar="COMMAND")
    add_commands(resources, common, COMMANDS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``ferryman admin ...``; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as exc:  # argparse: usage errors (2) and --help (0)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        if args.timeout <= 0:
            raise usage("--timeout must be positive")
        url = control_url(args.control)
        key, source = admin_key(args.key, args.key_file)
        context = tls_context(url, args.ca_hash)
        return int(args.func(Ctx(Client(url, key, source, args.timeout, context), args.json), args))
    except AdminError as exc:
        print(f"ferryman admin: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130
