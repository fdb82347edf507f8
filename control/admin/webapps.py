"""``ferryman admin webapps ...``: published web apps (``/v1/webapps``) and who may use them.

``list``, ``show``, ``create``, ``update``, ``delete``; ``assign`` / ``unassign`` (users and
groups, as for any application); ``assignments``. A passthrough app is shown with the
warning that sign-in and conditional access do not apply to it.
"""

from __future__ import annotations

import argparse
from typing import Any

from .client import usage
from .commands import Command, Group, arg, one_of, said, shown
from .output import fields, listing

PASSTHROUGH_NOTE = ("passthrough: no sign-in, and assignments and conditional-access policies do not apply "
                    "(anyone who reaches the edge reaches the app)")
_FLAGS = ("translate_headers", "translate_body", "cookie_http_only", "cookie_persistent", "websocket",
          "verify_backend", "cors_preflight_bypass")


def _on(value: bool) -> str:
    return "on" if value else "off"


def webapp_detail(w: dict[str, Any]) -> str:
    rows: list[tuple[str, object]] = [
        ("name", w["name"]), ("external URL", w["external_url"]), ("internal URL", w["internal_url"]),
        ("connector group", w["connector_group"]),
        ("pre-authentication", w["preauth"] if w["conditional_access"] else PASSTHROUGH_NOTE),
        ("backend timeout", w["backend_timeout"]),
        *((key.replace("_", " "), _on(w[key])) for key in _FLAGS),
        ("header SSO", ", ".join(f"{claim} -> {header}" for claim, header in w["header_sso"].items()) or "none"),
        ("backend CA", "custom bundle" if w["backend_ca"] else "system store"),
        ("certificate", f"custom, SHA-256 {w['certificate_sha256']}, expires {w['certificate_not_after']}"
         if w["certificate_sha256"] else "the edges' own"),
    ]
    return fields(rows)


def _row(w: dict[str, Any]) -> tuple[object, ...]:
    return (w["name"], w["external_url"], w["internal_url"], w["connector_group"],
            w["preauth"] + ("" if w["conditional_access"] else " (no conditional access)"))


def _switch(name: str, help_text: str) -> tuple[Any, ...]:
    return (arg(f"--{name.replace('_', '-')}", dest=name, choices=["on", "off"], default=None, help=help_text),)


def _options() -> tuple[Any, ...]:
    return (
        arg("--group", default=None, help="connector group (default: the default group)"),
        arg("--preauth", choices=["ferryman", "passthrough"], default=None,
            help="ferryman: sign-in and conditional access on every request (default); passthrough: neither"),
        arg("--backend-timeout", dest="backend_timeout", choices=["default", "long"], default=None,
            help="default: 85 s, long: 180 s (FERRYMAN_WEB_BACKEND_TIMEOUT[_LONG])"),
        *_switch("translate_headers", "translate internal URLs in Location and similar headers (default on)"),
        *_switch("translate_body", "translate internal URLs in HTML and CSS bodies (default off)"),
        *_switch("cookie_http_only", "HttpOnly session cookie (default on)"),
        *_switch("cookie_persistent", "session cookie outlives the browser (default off)"),
        *_switch("websocket", "allow WebSockets (default on)"),
        *_switch("verify_backend", "verify the backend's TLS certificate (default on)"),
        *_switch("cors_preflight_bypass", "send CORS preflights to the backend without sign-in (default off)"),
        arg("--header-sso", dest="header_sso", action="append", default=None, metavar="CLAIM=HEADER",
            help="send a claim (sub, upn, email, groups, ...) as a request header (repeatable)"),
        arg("--backend-ca", dest="backend_ca", default=None, metavar="PEM_FILE",
            help="CA bundle that verifies the backend's certificate (default: the system store)"),
        arg("--certificate", default=None, metavar="PEM_FILE",
            help="custom-domain certificate chain (leaf first) covering the external host; needs --certificate-key"),
        arg("--certificate-key", dest="certificate_key", default=None, metavar="PEM_FILE",
            help="its private key (stored sealed, never shown)"),
    )


def _header_sso(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        claim, sep, header = item.partition("=")
        if not sep or not claim or not header:
            raise usage(f"--header-sso {item!r}: write CLAIM=HEADER, e.g. upn=X-Remote-User")
        out[claim.strip()] = header.strip()
    return out


def _body(args: argparse.Namespace, create: bool) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if create:
        body.update(name=args.name, external_url=args.external_url, internal_url=args.internal_url)
    else:
        for key in ("new_name", "external_url", "internal_url"):
            value = getattr(args, key, None)
            if value is not None:
                body["name" if key == "new_name" else key] = value
    if args.group is not None:
        body["connector_group"] = args.group
    for key in ("preauth", "backend_timeout"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    for key in _FLAGS:
        if getattr(args, key) is not None:
            body[key] = getattr(args, key) == "on"
    if args.header_sso is not None:
        body["header_sso"] = _header_sso(args.header_sso)
    for key, flag in (("backend_ca", "--backend-ca"), ("certificate", "--certificate"),
                      ("certificate_key", "--certificate-key")):
        path = getattr(args, key)
        if path is not None:
            try:
                with open(path) as fh:
                    body[key] = fh.read()
            except OSError as exc:
                raise usage(f"{flag} {path}: {exc.strerror}") from None
    return body


def _assignment_body(args: argparse.Namespace) -> dict[str, str]:
    return {"user": args.user} if args.user is not None else {"group": args.group}


def _target(a: dict[str, Any]) -> tuple[str, str, str]:
    if a["user"] is not None:
        return "user", a["user"]["upn"] or "(deleted)", a["user"]["id"]
    return "group", a["group"]["name"] or "(deleted)", a["group"]["id"]


_WHO = one_of(arg("--user", default=None, metavar="USER", help="a user id or UPN"),
              arg("--group", default=None, metavar="GROUP", help="a user group id or name"), required=True)


def _created(w: dict[str, Any]) -> str:
    return f"created web app {w['name']!r}\n\n{webapp_detail(w)}"


WEBAPPS = Group("webapps", "published web apps (the edges' HTTPS front door)", (
    Command("list", "list web apps", path="/v1/webapps",
            show=shown(listing("no web apps", ("NAME", "EXTERNAL URL", "INTERNAL URL", "GROUP", "PREAUTH"), _row))),
    Command("show", "show a web app", (arg("name"),), path="/v1/webapps/{name}", show=shown(webapp_detail)),
    Command("create", "publish a web app", (
        arg("name"),
        arg("--external-url", dest="external_url", required=True, metavar="URL",
            help="https://host[:port][/prefix] browsers open"),
        arg("--internal-url", dest="internal_url", required=True, metavar="URL",
            help="http(s)://host[:port][/prefix] the connector reaches"),
        *_options(),
    ), method="POST", path="/v1/webapps", body=lambda a: _body(a, True), show=shown(_created)),
    Command("update", "change a web app (options left out stay as they are)", (
        arg("name"),
        arg("--name", dest="new_name", default=None, metavar="NEW_NAME", help="rename it"),
        arg("--external-url", dest="external_url", default=None, metavar="URL"),
        arg("--internal-url", dest="internal_url", default=None, metavar="URL"),
        *_options(),
    ), method="PATCH", path="/v1/webapps/{name}", body=lambda a: _body(a, False),
        show=shown(lambda w: f"updated web app {w['name']!r}\n\n{webapp_detail(w)}")),
    Command("delete", "delete a web app (and its assignments)", (arg("name"),), method="DELETE",
            path="/v1/webapps/{name}", show=said(lambda a: f"deleted web app {a.name!r}")),
    Command("assignments", "list who may use a web app", (arg("name"),), path="/v1/webapps/{name}/assignments",
            show=lambda data, a, _ctx: listing(f"web app {a.name!r} is assigned to nobody", ("TYPE", "NAME", "ID"),
                                               _target)(data)),
    Command("assign", "let a user or group use a web app", (arg("name"), _WHO), method="POST",
            path="/v1/webapps/{name}/assignments", body=_assignment_body,
            show=shown(lambda a: "assigned web app {!r} to {} {!r}".format(a["application"], *_target(a)[:2]))),
    Command("unassign", "remove an assignment", (arg("name"), _WHO), method="DELETE",
            path="/v1/webapps/{name}/assignments", body=_assignment_body,
            show=said(lambda a: f"web app {a.name!r} is no longer assigned to "
                                f"{'user ' + repr(a.user) if a.user is not None else 'group ' + repr(a.group)}")),
))
