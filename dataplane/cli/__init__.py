"""The ``ferryman`` command (also ``python -m dataplane``): one entry point for every role and tool.

Node processes (``edge``, ``connector``, ``client``), their registration and sign-in, and
``pki`` are in ``cli.nodes``; ``up`` starts a local fabric (``dataplane.fabric``); ``bench``
runs the benchmarks; ``config vars`` prints every ``FERRYMAN_*`` setting; ``control`` serves
the control plane's API (``control.server``); ``admin`` administers it over that API
(``control.admin``). The control plane and the benchmarks are imported only by the
commands that run them. Nothing imports this package.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import fabric
from ..basics import settings
from .nodes import add_node_commands, run_command


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from bench.cli import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["admin"]:
        from control.admin import main as admin_main

        return admin_main(argv[1:])
    parser = argparse.ArgumentParser(prog="ferryman", description="Ferryman zero-trust private access fabric.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_node_commands(sub)
    up = sub.add_parser("up", help="run edge, connector and client locally; with no forward, show traffic flowing")
    up.add_argument("--forward", action="append", default=[], metavar="[HOST:]PORT=DEST:PORT[/udp]",
                    help="port forward through the fabric (repeatable)")
    up.add_argument("--workdir", default=None, help="state directory (default: FERRYMAN_DATA_DIR/fabric)")
    up.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    sub.add_parser("bench", help="benchmarks: Ferryman vs direct, OpenSSH, stunnel (see `ferryman bench -h`)")
    control = sub.add_parser("control", help="run the control plane: admin REST API and node registration")
    control.add_argument("--listen", default=None, metavar="HOST:PORT",
                         help="HOST:PORT of the HTTPS API (default 127.0.0.1:8080; FERRYMAN_CONTROL_LISTEN)")
    control.add_argument("--edge", action="append", default=[], metavar="HOST:PORT",
                         help="public edge address handed to registering nodes (repeatable)")
    sub.add_parser("admin", help="administer the control plane over its API: apps, users, devices, policies, "
                                 "connectors, tokens, logs, apply, audit (see `ferryman admin -h`)")
    config = sub.add_parser("config", help="settings")
    config.add_argument("what", choices=["vars"], help="`vars`: print every FERRYMAN_* variable")
    args = parser.parse_args(argv)
    args.argv = list(argv)  # an edge's supervisor starts its workers with the same command line
    if args.cmd == "up":
        workdir = args.workdir or os.path.join(settings.load(settings.CommonSettings).data_dir, "fabric")
        return fabric.up(workdir, args.forward, args.duration)
    if args.cmd == "control":
        return _control(args)
    if args.cmd == "config":
        print(settings.markdown_table())
        return 0
    return run_command(args)


def _control(args: argparse.Namespace) -> int:
    from control.ca import CaError
    from control.server import serve
    from control.store import StoreError

    try:
        serve(settings.load(settings.ControlSettings, {"control_listen": args.listen}), edges_public=args.edge)
    except (settings.SettingsError, StoreError, CaError, ValueError, OSError) as exc:
        print(f"ferryman control: {exc}", file=sys.stderr)
        return 2
    return 0

