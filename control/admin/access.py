"""``ferryman admin`` commands for access: who an application is assigned to (``assignments``),
named ``locations`` and conditional-access ``policies``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from .args import parse_duration
from .client import quote, usage
from .commands import Arg, Command, Group, arg, one_of, said, shown
from .output import Ctx, duration_text, fields, listing, when

POLICY_STATES = ("on", "off", "report_only")
POLICY_GRANTS = ("block", "require_mfa", "require_compliant_device")
RISK_LEVELS = ("low", "medium", "high")


def _ref(item: dict[str, Any], label: str) -> str:
    """A target's name, or its id marked deleted when it no longer exists."""
    return item[label] if item.get(label) else f"{item['id']} (deleted)"


# ---------------------------------------------------------------------------- assignments


def _assignment_target(a: dict[str, Any]) -> tuple[str, str, str]:
    if a["user"] is not None:
        return "user", _ref(a["user"], "upn"), a["user"]["id"]
    return "group", _ref(a["group"], "name"), a["group"]["id"]


def _assignment_body(args: argparse.Namespace) -> dict[str, str]:
    return {"user": args.user} if args.user is not None else {"group": args.group}


def _assigned(a: dict[str, Any]) -> str:
    kind, name, ident = _assignment_target(a)
    return f"assigned application {a['application']!r} to {kind} {name!r} ({ident})"


def _unassigned(args: argparse.Namespace) -> str:
    kind, name = ("user", args.user) if args.user is not None else ("group", args.group)
    return f"application {args.app!r} is no longer assigned to {kind} {name!r}"


_TARGET = (
    arg("app"),
    one_of(arg("--user", default=None, metavar="USER", help="a user id or UPN"),
           arg("--group", default=None, metavar="GROUP", help="a user group id or name"), required=True),
)

ASSIGNMENTS = Group("assignments", "who an application is assigned to (users and groups)", (
    Command("list", "list the users and groups an application is assigned to", (arg("app"),),
            path="/v1/applications/{app}/assignments",
            show=lambda data, a, _ctx: listing(f"application {a.app!r} is assigned to nobody", ("TYPE", "NAME", "ID"),
                                               _assignment_target)(data)),
    Command("add", "assign an application to a user or a group", _TARGET, method="POST",
            path="/v1/applications/{app}/assignments", body=_assignment_body, show=shown(_assigned)),
    Command("remove", "remove an assignment", _TARGET, method="DELETE", path="/v1/applications/{app}/assignments",
            body=_assignment_body, show=said(_unassigned)),
))

# ---------------------------------------------------------------------------- named locations


def _location_text(verb: str) -> Callable[[dict[str, Any]], str]:
    return lambda loc: f"{verb} named location {loc['name']!r}: {', '.join(loc['cidrs'])}"


def _location_update(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.rename is not None:
        body["name"] = args.rename
    if args.cidrs:
        body["cidrs"] = args.cidrs
    if not body:
        raise usage("locations update: nothing to change (give networks and/or --rename NEW)")
    return body


LOCATIONS = Group("locations", "named locations (source networks for policy conditions)", (
    Command("list", "list named locations", path="/v1/named-locations",
            show=shown(listing("no named locations", ("NAME", "NETWORKS", "POLICIES"),
                               lambda loc: (loc["name"], ", ".join(loc["cidrs"]), ", ".join(loc["policies"]))))),
    Command(
        "create", "create a named location", (
            arg("name"),
            arg("cidrs", nargs="+", metavar="CIDR", help="networks or addresses: 10.0.0.0/8 2001:db8::/32 ..."),
        ), method="POST", path="/v1/named-locations", body=lambda a: {"name": a.name, "cidrs": a.cidrs},
        show=shown(_location_text("created"))),
    Command(
        "update", "replace a named location's networks and/or rename it", (
            arg("name"),
            arg("cidrs", nargs="*", metavar="CIDR", help="the new networks (replace all; none: unchanged)"),
            arg("--rename", default=None, metavar="NEW", help="new name (carried into the policies using it)"),
        ), method="PATCH", path="/v1/named-locations/{name}", body=_location_update,
        show=shown(_location_text("updated"))),
    Command("delete", "delete a named location (refused while a policy uses it)", (arg("name"),), method="DELETE",
            path="/v1/named-locations/{name}", show=said(lambda a: f"deleted named location {a.name!r}")),
))

# ---------------------------------------------------------------------------- policies


def _policy_apps(p: dict[str, Any]) -> str:
    return ", ".join(_ref(a, "name") for a in p["applications"]) or "all applications"


def _policy_users(p: dict[str, Any]) -> str:
    users = [_ref(u, "upn") for u in p["users"]] + [f"group {_ref(g, 'name')}" for g in p["groups"]]
    return ", ".join(users) or "everyone"


def _policy_conditions(p: dict[str, Any]) -> str:
    c = p["conditions"]
    parts = []
    if c.get("locations"):
        parts.append(f"from {', '.join(c['locations'])}")
    if c.get("device_os"):
        parts.append(f"device OS {', '.join(c['device_os'])}")
    if c.get("user_risk_at_least"):
        parts.append(f"user risk {c['user_risk_at_least']} or higher")
    if c.get("signin_older_than"):
        parts.append(f"sign-in older than {duration_text(c['signin_older_than'])}")
    return "; ".join(parts) or "always"


def _policy_detail(p: dict[str, Any]) -> str:
    return fields([("name", p["name"]), ("state", p["state"]), ("grant", p["grant"]),
                   ("applications", _policy_apps(p)), ("users", _policy_users(p)),
                   ("when", _policy_conditions(p)), ("created", when(p["created_at"])),
                   ("updated", when(p["updated_at"]))])


def _condition_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The conditions given on the command line (only those given)."""
    out: dict[str, Any] = {}
    if args.location:
        out["locations"] = args.location
    if args.device_os:
        out["device_os"] = args.device_os
    if args.risk_at_least is not None:
        out["user_risk_at_least"] = args.risk_at_least
    if args.signin_older_than is not None:
        out["signin_older_than"] = args.signin_older_than
    return out


def _policy_body(args: argparse.Namespace) -> dict[str, Any]:
    return {"name": args.name, "grant": args.grant, "state": args.state, "applications": args.app,
            "users": args.user, "groups": args.group, "conditions": _condition_flags(args)}


def policies_update(ctx: Ctx, args: argparse.Namespace) -> int:
    """``policies update``: only what is given changes; conditions not given are kept (read first)."""
    if args.all_apps and args.app:
        raise usage("policies update: give either --app or --all-apps, not both")
    if args.all_users and (args.user or args.group):
        raise usage("policies update: give either --user/--group or --all-users, not both")
    body: dict[str, Any] = {}
    for key, value in (("name", args.rename), ("state", args.state), ("grant", args.grant)):
        if value is not None:
            body[key] = value
    if args.app or args.all_apps:
        body["applications"] = args.app
    if args.all_users:
        body["users"], body["groups"] = [], []
    if args.user:
        body["users"] = args.user
    if args.group:
        body["groups"] = args.group
    given = _condition_flags(args)
    if given or args.clear_conditions:
        current: dict[str, Any] = {}
        if not args.clear_conditions:  # the other conditions stay as they are
            current = ctx.client.json("GET", f"/v1/policies/{quote(args.name)}")["conditions"]
        body["conditions"] = {**current, **given}
    if not body:
        raise usage("policies update: nothing to change (see `ferryman admin policies update -h`)")
    ctx.show(ctx.client.call("PATCH", f"/v1/policies/{quote(args.name)}", body),
             lambda p: f"updated policy {p['name']!r}\n\n{_policy_detail(p)}")
    return 0


def _policy_args(*, create: bool) -> tuple[Arg, ...]:
    """The arguments of ``policies create`` and (with --rename, --all-apps, ...) ``policies update``."""
    replaces = "" if create else "; replaces the list"
    return (
        arg("name"),
        *(() if create else (arg("--rename", default=None, metavar="NEW", help="new name"),)),
        arg("--grant", choices=POLICY_GRANTS, required=create, default=None,
            help="what the policy demands when it applies"),
        arg("--state", choices=POLICY_STATES, default="on" if create else None,
            help="on (enforced), off, report_only (logged, never denies)" + (" (default on)" if create else "")),
        arg("--app", action="append", default=[], metavar="APP",
            help=f"target application (repeatable; none: every application{replaces})"),
        arg("--user", action="append", default=[], metavar="USER",
            help=f"target user id or UPN (repeatable; no --user/--group: everyone{replaces})"),
        arg("--group", action="append", default=[], metavar="GROUP",
            help=f"target user group id or name (repeatable{replaces})"),
        *(() if create else (
            arg("--all-apps", action="store_true", help="target every application"),
            arg("--all-users", action="store_true", help="target every user (no user or group list)"),
            arg("--clear-conditions", action="store_true",
                help="drop every condition not given in this command (default: keep them)"),
        )),
        arg("--location", action="append", default=[], metavar="LOCATION",
            help="condition: the source is in this named location (repeatable)"),
        arg("--device-os", action="append", default=[], metavar="OS",
            help="condition: the device's OS is this one, e.g. Windows (repeatable)"),
        arg("--risk-at-least", choices=RISK_LEVELS, default=None,
            help="condition: the user's risk level is this or higher"),
        arg("--signin-older-than", type=parse_duration, default=None, metavar="DURATION",
            help="condition: the sign-in is older than this (3600, 30m, 12h, 7d ...)"),
    )


POLICIES = Group("policies", "conditional-access policies", (
    Command("list", "list policies", path="/v1/policies",
            show=shown(listing("no policies", ("NAME", "STATE", "GRANT", "APPLICATIONS", "USERS", "WHEN"),
                               lambda p: (p["name"], p["state"], p["grant"], _policy_apps(p), _policy_users(p),
                                          _policy_conditions(p))))),
    Command("show", "show a policy", (arg("name"),), path="/v1/policies/{name}", show=shown(_policy_detail)),
    Command("create", "create a policy", _policy_args(create=True), method="POST", path="/v1/policies",
            body=_policy_body, show=shown(lambda p: f"created policy {p['name']!r}\n\n{_policy_detail(p)}")),
    Command("update", "change a policy (only what is given)", _policy_args(create=False), run=policies_update),
    Command("delete", "delete a policy", (arg("name"),), method="DELETE", path="/v1/policies/{name}",
            show=said(lambda a: f"deleted policy {a.name!r}")),
))
