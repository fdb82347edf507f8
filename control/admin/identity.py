"""``ferryman admin`` commands for identities: ``users``, ``user-groups``, ``devices`` and sign-in ``sessions``.

Passwords (``users create|update --password-stdin``) are never taken from the command line,
where other local users could read them: they are typed twice at a hidden prompt when
standard input is a terminal, else read from its first line (``read_password``).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .access import RISK_LEVELS
from .client import AdminError, quote, usage, why_failed
from .commands import Command, Group, arg, one_of, said, shown
from .output import Ctx, fields, listing, when, yes_no

USER_RISK_LEVELS = ("none", *RISK_LEVELS)


def read_password(upn: str) -> str:
    """The password of ``--password-stdin``: typed twice at a hidden prompt when standard input is
    a terminal, else the first line of standard input (its line ending removed). Passwords are
    never taken from the command line, where other local users could see them."""
    stdin = sys.stdin
    if stdin is None:
        raise AdminError("--password-stdin: there is no standard input to read the password from")
    if stdin.isatty():
        try:
            password = getpass.getpass(f"new password for {upn}: ")
            again = getpass.getpass("the same password again: ")
        except EOFError:
            raise AdminError("--password-stdin: no password typed; nothing changed") from None
        if password != again:
            raise AdminError("--password-stdin: the two passwords differ; nothing changed")
    else:
        try:
            password = stdin.readline()
        except (OSError, UnicodeDecodeError) as exc:
            raise AdminError(f"--password-stdin: cannot read standard input: {why_failed(exc)}") from None
        password = password.removesuffix("\n").removesuffix("\r")
    if not password:
        raise AdminError("--password-stdin: the password is empty (give it on the first line of standard input, "
                         "e.g. `printf '%s\\n' \"$PASSWORD\" | ferryman admin users ...`, or type it at the prompt "
                         "when standard input is a terminal)")
    return password


# ---------------------------------------------------------------------------- users


def _group_names(ctx: Ctx) -> Callable[[list[str]], str]:
    """User group ids as names (fetched once, when first needed: only for the human output)."""
    names: dict[str, str] | None = None

    def render(ids: list[str]) -> str:
        nonlocal names
        if not ids:
            return ""
        if names is None:
            names = {g["id"]: g["name"] for g in ctx.client.json("GET", "/v1/user-groups")}
        return ", ".join(names.get(i, i) for i in ids)
    return render


def _user_detail(ctx: Ctx) -> Callable[[dict[str, Any]], str]:
    groups = _group_names(ctx)
    return lambda u: fields([
        ("id", u["id"]), ("UPN", u["upn"]), ("display name", u["display_name"]), ("disabled", yes_no(u["disabled"])),
        ("risk level", u["risk_level"]), ("password", "set" if u["has_password"] else "none (cannot sign in)"),
        ("TOTP", "enabled" if u["totp_enabled"] else "not set up"), ("groups", groups(u["groups"])),
        ("OIDC account", f"{u['oidc_subject']} at {u['oidc_issuer']}" if u.get("oidc_subject") else "not linked"),
        ("console role", u.get("console_role") or "none"),
        ("created", when(u["created_at"])), ("updated", when(u["updated_at"]))])


def _users_table(ctx: Ctx, empty: str) -> Callable[[Any], str]:
    groups = _group_names(ctx)
    return listing(empty, ("UPN", "NAME", "DISABLED", "RISK", "PASSWORD", "TOTP", "GROUPS", "ID"),
                   lambda u: (u["upn"], u["display_name"], yes_no(u["disabled"]), u["risk_level"],
                              yes_no(u["has_password"]), yes_no(u["totp_enabled"]), groups(u["groups"]), u["id"]))


def users_create(ctx: Ctx, args: argparse.Namespace) -> int:
    """``users create``, with the password of ``--password-stdin``."""
    body: dict[str, Any] = {"upn": args.upn}
    if args.name is not None:
        body["display_name"] = args.name
    if args.password_stdin:
        body["password"] = read_password(args.upn)
    detail = _user_detail(ctx)

    def human(u: dict[str, Any]) -> str:
        hint = ("" if u["has_password"] else
                f"\n\nno password: the user cannot sign in until one is set (`ferryman admin users update "
                f"{u['upn']} --password-stdin`)")
        return f"created user {u['upn']!r}\n\n{detail(u)}{hint}"

    ctx.show(ctx.client.call("POST", "/v1/users", body), human)
    return 0


def users_update(ctx: Ctx, args: argparse.Namespace) -> int:
    """``users update``: only what is given, with the password of ``--password-stdin``."""
    body: dict[str, Any] = {}
    for key, value in (("upn", args.rename), ("display_name", args.name), ("risk_level", args.risk),
                       ("disabled", args.disabled), ("oidc_subject", args.oidc_subject),
                       ("console_role", args.console_role)):
        if value is not None:
            body[key] = value
    if not body and not args.password_stdin:
        raise usage("users update: nothing to change (see `ferryman admin users update -h`)")
    if args.password_stdin:
        body["password"] = read_password(args.user)
    detail = _user_detail(ctx)
    ctx.show(ctx.client.call("PATCH", f"/v1/users/{quote(args.user)}", body),
             lambda u: f"updated user {u['upn']!r}\n\n{detail(u)}")
    return 0


def _session_row(s: dict[str, Any]) -> Sequence[object]:
    return (s["id"], s["status"], s["device_id"], ",".join(s["amr"]), when(s["auth_time"]), when(s["expires_at"]),
            when(s["last_refresh_at"]), when(s["revoked_at"]))


_USER = arg("user", metavar="USER", help="id or UPN")

USERS = Group("users", "users (named by id or UPN)", (
    Command("list", "list users", path="/v1/users", show=lambda data, _a, ctx: _users_table(ctx, "no users")(data)),
    Command("show", "show a user", (_USER,), path="/v1/users/{user}",
            show=lambda data, _a, ctx: _user_detail(ctx)(data)),
    Command(
        "create", "create a user", (
            arg("upn", metavar="UPN", help="user principal name, e.g. alice@corp.example"),
            arg("--name", default=None, metavar="DISPLAY", help="display name"),
            arg("--password-stdin", action="store_true",
                help="set a password: read from the first line of standard input, or typed at a hidden prompt "
                     "when it is a terminal (none: the user cannot sign in until one is set)"),
        ), run=users_create),
    Command(
        "update", "change a user (only what is given)", (
            _USER,
            arg("--rename", default=None, metavar="UPN", help="new UPN"),
            arg("--name", default=None, metavar="DISPLAY", help="new display name"),
            arg("--risk", choices=USER_RISK_LEVELS, default=None, help="risk level (for policy conditions)"),
            one_of(arg("--disable", dest="disabled", action="store_const", const=True, default=None,
                       help="refuse sign-in and refreshes"),
                   arg("--enable", dest="disabled", action="store_const", const=False, help="allow sign-in again")),
            arg("--password-stdin", action="store_true",
                help="set a new password: read from the first line of standard input, or typed at a hidden "
                     "prompt when it is a terminal"),
            arg("--oidc-subject", default=None, metavar="SUB",
                help="link the user to this account (the ID token's sub) at the control plane's OIDC provider; "
                     "'' unlinks. An account not linked signs in only if its verified email is the user's UPN"),
            arg("--console-role", choices=("admin", "reader", "none"), default=None,
                help="web console role: admin (everything), reader (sees everything, changes nothing) or none; "
                     "console sign-in also needs TOTP"),
        ), run=users_update),
    Command("delete", "delete a user with its devices (revoked), sessions and memberships", (_USER,),
            method="DELETE", path="/v1/users/{user}",
            show=said(lambda a: f"deleted user {a.user!r} (its devices are revoked, its sessions and group "
                                f"memberships gone)")),
    Command("reset-totp", "remove a user's TOTP second factor and recovery codes (e.g. a lost phone)", (_USER,),
            method="POST", path="/v1/users/{user}/totp/reset",
            show=shown(lambda u: f"reset the TOTP second factor of user {u['upn']!r}: its secret and recovery codes "
                                 f"are gone, and it may enrol again")),
    Command("sessions", "list a user's sign-in sessions, newest first", (_USER,), path="/v1/users/{user}/sessions",
            show=lambda data, a, _ctx: listing(f"user {a.user!r} has no sign-in sessions",
                                               ("ID", "STATUS", "DEVICE", "AMR", "SIGNED IN", "EXPIRES", "LAST REFRESH",
                                                "REVOKED"), _session_row)(data)),
))

# ---------------------------------------------------------------------------- user groups

_GROUP = arg("group", metavar="GROUP", help="id or name")

USER_GROUPS = Group("user-groups", "user groups (named by id or name)", (
    Command("list", "list user groups", path="/v1/user-groups",
            show=shown(listing("no user groups", ("NAME", "MEMBERS", "ID", "CREATED"),
                               lambda g: (g["name"], g["members"], g["id"], when(g["created_at"]))))),
    Command("create", "create a user group", (arg("name"),), method="POST", path="/v1/user-groups",
            body=lambda a: {"name": a.name}, show=shown(lambda g: f"created user group {g['name']!r} ({g['id']})")),
    Command("rename", "rename a user group", (_GROUP, arg("new_name", metavar="NEW")), method="PATCH",
            path="/v1/user-groups/{group}", body=lambda a: {"name": a.new_name},
            show=lambda g, a, _ctx: f"renamed user group {a.group!r} to {g['name']!r}"),
    Command("delete", "delete a user group with its memberships and application assignments", (_GROUP,),
            method="DELETE", path="/v1/user-groups/{group}",
            show=said(lambda a: f"deleted user group {a.group!r} (with its memberships and application "
                                f"assignments)")),
    Command("members", "list a user group's members", (_GROUP,), path="/v1/user-groups/{group}/members",
            show=lambda data, a, ctx: _users_table(ctx, f"user group {a.group!r} has no members")(data)),
    Command("add-member", "add a user to a user group", (_GROUP, _USER), method="POST",
            path="/v1/user-groups/{group}/members", body=lambda a: {"user": a.user},
            show=shown(lambda m: f"added user {m['upn']!r} to user group {m['group']!r}")),
    Command("remove-member", "remove a user from a user group", (_GROUP, _USER), method="DELETE",
            path="/v1/user-groups/{group}/members/{user}",
            show=said(lambda a: f"removed user {a.user!r} from user group {a.group!r}")),
))

# ---------------------------------------------------------------------------- devices


def _device_os(d: dict[str, Any]) -> str:
    return f"{d['os']} {d['os_version']}".strip()


def _device_detail(d: dict[str, Any]) -> str:
    return fields([("id", d["id"]), ("user", f"{d['upn'] or '(deleted)'} ({d['user_id']})"), ("name", d["name"]),
                   ("OS", d["os"]), ("OS version", d["os_version"]), ("compliant", yes_no(d["compliant"])),
                   ("registered", when(d["created_at"])), ("last seen", when(d["last_seen"])),
                   ("certificate", d["cert_serial"]), ("valid until", when(d["cert_not_after"])),
                   ("revoked", when(d["revoked_at"]) or "no")])


def _devices_table(data: Any, args: argparse.Namespace, _ctx: Ctx) -> str:
    empty = "no devices" if args.user is None else f"user {args.user!r} has no devices"
    return listing(empty, ("ID", "USER", "NAME", "OS", "COMPLIANT", "LAST SEEN", "REVOKED"),
                   lambda d: (d["id"], d["upn"], d["name"], _device_os(d), yes_no(d["compliant"]),
                              when(d["last_seen"]), when(d["revoked_at"])))(data)


def _device_update(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.compliant is not None:
        body["compliant"] = args.compliant == "yes"
    for key, value in (("os", args.os), ("os_version", args.os_version), ("name", args.name)):
        if value is not None:
            body[key] = value
    if not body:
        raise usage("devices update: nothing to change (give --compliant, --os, --os-version and/or --name)")
    return body


DEVICES = Group("devices", "users' registered devices", (
    Command(
        "list", "list devices, oldest first", (
            arg("--user", default=None, metavar="USER", help="only this user's (id or UPN)"),
        ), path="/v1/devices", query=lambda a: {"user": a.user}, show=_devices_table),
    Command("show", "show a device", (arg("id"),), path="/v1/devices/{id}", show=shown(_device_detail)),
    Command(
        "update", "set a device's compliance, OS and/or name (only what is given)", (
            arg("id"),
            arg("--compliant", choices=("yes", "no"), default=None, help="compliant (for policy conditions)"),
            arg("--os", default=None, metavar="OS", help="operating system, e.g. Windows"),
            arg("--os-version", default=None, metavar="VERSION", help="operating system version"),
            arg("--name", default=None, help="device name"),
        ), method="PATCH", path="/v1/devices/{id}", body=_device_update,
        show=shown(lambda d: f"updated device {d['id']}\n\n{_device_detail(d)}")),
    Command(
        "revoke", "revoke a device: its certificate and live sessions", (
            arg("id"),
            arg("--reason", default="", help="why (kept in the audit log)"),
        ), method="POST", path="/v1/devices/{id}/revoke", body=lambda a: {"reason": a.reason},
        show=shown(lambda d: f"revoked device {d['id']} of {d['upn'] or d['user_id']!r}: its certificate and live "
        f"sessions; edges refuse it within seconds")),
))

# ---------------------------------------------------------------------------- sessions


def _session_detail(ctx: Ctx) -> Callable[[dict[str, Any]], str]:
    def render(s: dict[str, Any]) -> str:
        user = s["user_id"]
        try:  # the UPN too, if the user can still be read
            upn = ctx.client.json("GET", f"/v1/users/{quote(user)}")["upn"]
        except AdminError:
            pass
        else:
            user = f"{upn} ({user})"
        return fields([("id", s["id"]), ("user", user), ("device", s["device_id"]), ("status", s["status"]),
                       ("AMR", ", ".join(s["amr"])), ("signed in", when(s["auth_time"])),
                       ("created", when(s["created_at"])), ("expires", when(s["expires_at"])),
                       ("last refresh", when(s["last_refresh_at"])), ("revoked", when(s["revoked_at"]) or "no")])
    return render


SESSIONS = Group("sessions", "sign-in sessions (a user's: `users sessions USER`)", (
    Command("show", "show a sign-in session", (arg("id"),), path="/v1/sessions/{id}",
            show=lambda data, _a, ctx: _session_detail(ctx)(data)),
    Command(
        "revoke", "end a session: its refresh token stops working, edges refuse its access tokens", (
            arg("id"),
            arg("--reason", default="", help="why (kept in the audit log)"),
        ), method="POST", path="/v1/sessions/{id}/revoke", body=lambda a: {"reason": a.reason},
        show=shown(lambda s: f"revoked session {s['id']}: its refresh token stops working and edges refuse its "
        f"access tokens")),
))
