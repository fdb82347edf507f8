"""``ferryman admin`` commands for what client agents are given: applications (``apps``), their
``segments``, private DNS suffixes (``dns``) and the forwarding profile's fail mode (``profile``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from .args import parse_segment
from .commands import Command, Group, arg, said, shown
from .output import fields, listing, segment_text, table, when

# ---------------------------------------------------------------------------- applications, segments


def _app_row(app: dict[str, Any]) -> Sequence[object]:
    return (app["name"], app["kind"], app["connector_group"], ", ".join(segment_text(s) for s in app["segments"]))


def app_detail(app: dict[str, Any]) -> str:
    """An application's fields, then its segments with their ids."""
    head = fields([("name", app["name"]), ("kind", app["kind"]), ("connector group", app["connector_group"]),
                   ("created", when(app["created_at"])), ("updated", when(app["updated_at"]))])
    if not app["segments"]:
        return head + "\nno segments"
    rows = [(s["id"], s["destination"], s["kind"], s["ports"], s["protocol"]) for s in app["segments"]]
    return head + "\n\n" + table(("ID", "DESTINATION", "KIND", "PORTS", "PROTOCOL"), rows)


def _app_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"name": args.name, "kind": "quick_access" if args.quick_access else "per_app",
                            "segments": args.segment}
    if args.group is not None:
        body["connector_group"] = args.group
    return body


APPS = Group("apps", "applications", (
    Command("list", "list applications", path="/v1/applications",
            show=shown(listing("no applications", ("NAME", "KIND", "GROUP", "SEGMENTS"), _app_row))),
    Command("show", "show an application and its segments (with their ids)", (arg("name"),),
            path="/v1/applications/{name}", show=shown(app_detail)),
    Command(
        "create", "create an application", (
            arg("name"),
            arg("--group", default=None, help="connector group (default: the default group)"),
            arg("--quick-access", action="store_true",
                help="the quick access application (at most one; may overlap per-app segments)"),
            arg("--segment", action="append", default=[], type=parse_segment, metavar="DEST:PORTS[/PROTO]",
                help="a segment, e.g. 10.20.0.0/16:22,3389 or *.corp.example:443/tcp (repeatable)"),
        ), method="POST", path="/v1/applications", body=_app_body,
        show=shown(lambda app: f"created application {app['name']!r}\n\n{app_detail(app)}")),
    Command("delete", "delete an application", (arg("name"),), method="DELETE", path="/v1/applications/{name}",
            show=said(lambda a: f"deleted application {a.name!r}")),
))

SEGMENTS = Group("segments", "segments of an application", (
    Command(
        "add", "add a segment to an application", (
            arg("app"),
            arg("segment", type=parse_segment, metavar="DEST:PORTS[/PROTO]"),
        ), method="POST", path="/v1/applications/{app}/segments", body=lambda a: a.segment,
        show=lambda s, a, _ctx: f"added segment {s['id']} to {a.app!r}: {segment_text(s)}"),
    Command(
        "remove", "remove a segment (ids: `apps show APP`)", (
            arg("app"),
            arg("segment_id", type=int, metavar="SEGMENT_ID"),
        ), method="DELETE", path="/v1/applications/{app}/segments/{segment_id}",
        show=said(lambda a: f"removed segment {a.segment_id} from {a.app!r}")),
))

# ---------------------------------------------------------------------------- private DNS, forwarding profile

DNS = Group("dns", "private DNS suffixes", (
    Command("list", "list private DNS suffixes", path="/v1/dns-suffixes",
            show=shown(listing("no private DNS suffixes", ("SUFFIX", "CREATED"),
                               lambda d: (d["suffix"], when(d["created_at"]))))),
    Command("add", "add a private DNS suffix", (arg("suffix"),), method="POST", path="/v1/dns-suffixes",
            body=lambda a: {"suffix": a.suffix}, show=shown(lambda d: f"added private DNS suffix {d['suffix']!r}")),
    Command("remove", "remove a private DNS suffix", (arg("suffix"),), method="DELETE",
            path="/v1/dns-suffixes/{suffix}", show=said(lambda a: f"removed private DNS suffix {a.suffix!r}")),
))


def _profile_text(p: dict[str, Any]) -> str:
    return (f"fail mode: {p['fail_mode']} (client agents "
            f"{'refuse' if p['fail_mode'] == 'closed' else 'dial directly'} private destinations while "
            f"no edge is reachable); changed {when(p['updated_at'])}")


PROFILE = Group("profile", "the forwarding profile client agents follow (fail mode)", (
    Command("show", "show the forwarding profile's fail mode", path="/v1/forwarding-profile",
            show=shown(_profile_text)),
    Command(
        "set", "set the fail mode", (
            arg("--fail-mode", required=True, choices=["closed", "open"],
                help="closed: refuse private destinations while no edge is reachable; open: dial them directly"),
        ), method="PUT", path="/v1/forwarding-profile", body=lambda a: {"fail_mode": a.fail_mode},
        show=shown(lambda p: f"fail mode is now {p['fail_mode']}")),
))
