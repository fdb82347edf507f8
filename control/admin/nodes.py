"""``ferryman admin`` commands for the fabric's nodes and credentials: connector ``groups``,
``connectors``, ``edges``, ``certs`` (client certificates, revocation by serial), registration
``tokens`` and admin API ``keys``.
"""

from __future__ import annotations

import argparse
from typing import Any

import msgspec

from .args import parse_duration
from .client import AdminError, usage
from .commands import Command, Group, Render, arg, one_of, shown
from .output import Ctx, fields, listing, when, yes_no

# ---------------------------------------------------------------------------- connector groups


def _networks(values: list[str] | None) -> list[str]:
    """``--allow``/``--deny`` values: each may hold several networks separated by commas."""
    return [n.strip() for v in values or () for n in v.split(",") if n.strip()]


def _group_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"name": args.name, "region": args.region}
    if args.allow:
        body["allowed_addresses"] = _networks(args.allow)
    if args.deny:
        body["denied_addresses"] = _networks(args.deny)
    return body


def _group_update(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.region is not None:
        body["region"] = args.region
    if args.allow is not None or args.no_allow:
        body["allowed_addresses"] = _networks(args.allow)
    if args.deny is not None or args.no_deny:
        body["denied_addresses"] = _networks(args.deny)
    if not body:
        raise usage("groups update: nothing to change (give --region, --allow/--no-allow and/or --deny/--no-deny)")
    return body


def _dial_lists(g: dict[str, Any]) -> str:
    allowed = ", ".join(g["allowed_addresses"]) or "any address"
    denied = ", ".join(g["denied_addresses"]) or "none"
    return f"connectors dial {allowed}; denied: {denied}"


def _group_detail(g: dict[str, Any]) -> str:
    return fields([("name", g["name"]), ("region", g["region"]), ("default", yes_no(g["is_default"])),
                   ("allowed addresses", ", ".join(g["allowed_addresses"]) or "any (no allow list)"),
                   ("denied addresses", ", ".join(g["denied_addresses"]) or "none"),
                   ("created", when(g["created_at"]))])


_ALLOW_HELP = ("network (CIDR) or address the group's connectors may dial; repeatable or comma-separated; with an "
               "allow list they dial nothing outside it")
_DENY_HELP = "network (CIDR) or address the group's connectors never dial (deny wins); repeatable or comma-separated"

GROUPS = Group("groups", "connector groups", (
    Command("list", "list connector groups", path="/v1/connector-groups",
            show=shown(listing("no connector groups", ("NAME", "REGION", "DEFAULT", "ALLOWED", "DENIED", "CREATED"),
                               lambda g: (g["name"], g["region"], yes_no(g["is_default"]),
                                          ",".join(g["allowed_addresses"]) or "any",
                                          ",".join(g["denied_addresses"]) or "-", when(g["created_at"]))))),
    Command("show", "show a connector group and its dial lists", (arg("name"),),
            path="/v1/connector-groups/{name}", show=shown(_group_detail)),
    Command(
        "create", "create a connector group", (
            arg("name"),
            arg("--region", default="", help="free-form region label"),
            arg("--allow", action="append", metavar="CIDR", help=_ALLOW_HELP),
            arg("--deny", action="append", metavar="CIDR", help=_DENY_HELP),
        ), method="POST", path="/v1/connector-groups", body=_group_body,
        show=shown(lambda g: f"created connector group {g['name']!r}"
                             + (f" (region {g['region']})" if g["region"] else "")
                             + (f": {_dial_lists(g)}" if g["allowed_addresses"] or g["denied_addresses"] else ""))),
    Command(
        "update", "change a connector group's region or dial lists (a list given replaces the old one)", (
            arg("name"),
            arg("--region", default=None, help="free-form region label"),
            one_of(arg("--allow", action="append", metavar="CIDR", help=_ALLOW_HELP + " (replaces the allow list)"),
                   arg("--no-allow", action="store_true", help="remove the allow list (connectors dial any address "
                                                                "that nothing else refuses)")),
            one_of(arg("--deny", action="append", metavar="CIDR", help=_DENY_HELP + " (replaces the deny list)"),
                   arg("--no-deny", action="store_true", help="remove the deny list")),
        ), method="PATCH", path="/v1/connector-groups/{name}", body=_group_update,
        show=shown(lambda g: f"updated connector group {g['name']!r}: {_dial_lists(g)} "
                             f"(its connectors apply it within seconds)")),
))

# ---------------------------------------------------------------------------- connectors, edges


def _node_detail(node: dict[str, Any]) -> str:
    pairs: list[tuple[str, object]] = [("id", node["id"]), ("name", node["name"])]
    if "group" in node:
        pairs.append(("group", node["group"]))
    if "address" in node:
        pairs.append(("address", node["address"]))
    pairs += [("status", node["status"]), ("last seen", when(node["last_seen"])), ("version", node["version"])]
    if "external_addr" in node:
        pairs += [("external address", node["external_addr"]), ("internal address", node["internal_addr"])]
    if "tunnels" in node:
        pairs += [("tunnels", node["tunnels"]), ("active flows", node["active_flows"]),
                  ("config version", "-" if node["config_version"] is None else node["config_version"])]
    pairs += [("registered", when(node["created_at"])), ("certificate", node["cert_serial"]),
              ("valid until", when(node["cert_not_after"])), ("revoked", yes_no(node["revoked"]))]
    return fields(pairs)


def _node_listing(role: str, place: str, where: str) -> Render:
    """The table of connectors (``place`` GROUP, field ``group``) or edges (ADDRESS, ``address``)."""
    return shown(listing(f"no {role}s", ("ID", "NAME", place, "STATUS", "LAST SEEN", "TUNNELS", "FLOWS", "CONFIG",
                                         "VERSION", "REVOKED"),
                         lambda n: (n["id"], n["name"], n[where], n["status"], when(n["last_seen"]), n["tunnels"],
                                    n["active_flows"], "-" if n["config_version"] is None else n["config_version"],
                                    n["version"], yes_no(n["revoked"]))))


def _revoked(role: str) -> Render:
    def render(rows: list[dict[str, Any]], args: argparse.Namespace, _ctx: Ctx) -> str:
        return (f"revoked {len(rows)} certificate{'s' if len(rows) != 1 else ''} "
                f"({', '.join(r['serial'] for r in rows)}) of {role} "
                f"{(rows[0]['node_name'] if rows else None) or args.id!r} ({args.id}); "
                f"edges cut its tunnels once they hold the next configuration version")
    return render


def _node_group(role: str, help_: str, place: str, where: str, revoke_help: str) -> Group:
    """The same three commands for connectors and for edges."""
    return Group(f"{role}s", help_, (
        Command("list", f"list {role}s", path=f"/v1/{role}s", show=_node_listing(role, place, where)),
        Command("show", f"show {'an' if role == 'edge' else 'a'} {role}", (arg("id"),), path=f"/v1/{role}s/{{id}}",
                show=shown(_node_detail)),
        Command(
            "revoke", revoke_help, (
                arg("id"),
                arg("--reason", default="", help="why (kept in the revocation list and the audit log)"),
            ), method="POST", path="/v1/revocations",
            body=lambda a: {"node_type": role, "node_id": a.id, "reason": a.reason}, show=_revoked(role)),
    ))


CONNECTORS = _node_group("connector", "registered connectors", "GROUP", "group",
                         "revoke a connector's certificates (edges cut its tunnels)")
EDGES = _node_group("edge", "registered edges", "ADDRESS", "address", "revoke an edge's certificates")

# ---------------------------------------------------------------------------- certificates


def certs_client(ctx: Ctx, args: argparse.Namespace) -> int:
    """``certs client``: a key and CSR made here, the certificate signed by the control plane, all written to --dir."""
    from dataplane.basics.pki import PkiError, new_key_and_csr, write_node_files

    try:
        key_pem, csr_pem = new_key_and_csr(args.name)
    except PkiError as exc:
        raise usage(str(exc)) from None
    body: dict[str, Any] = {"name": args.name, "csr_pem": csr_pem.decode()}
    if args.days is not None:
        body["lifetime_days"] = args.days
    issued = ctx.client.json("POST", "/v1/client-certificates", body)
    try:
        files = write_node_files(args.dir, args.name, key_pem, issued["certificate_pem"].encode(),
                               issued["ca_pem"].encode())
    except PkiError as exc:
        raise AdminError(f"certificate {issued['serial']} was issued but cannot be stored: {exc}; "
                         f"revoke it with `ferryman admin certs revoke {issued['serial']}`") from None
    ctx.show(msgspec.json.encode({**issued, "cert": files.cert, "key": files.key, "ca": files.ca}),
             lambda c: fields([("serial", c["serial"]), ("valid until", when(c["not_after"])),
                               ("certificate", c["cert"]), ("key", c["key"]), ("CA", c["ca"])]))
    return 0


CERTS = Group("certs", "certificates: client certificates, revocation by serial", (
    Command(
        "client", "issue a client certificate: key and CSR made here, signed by the control plane", (
            arg("name", help="client (device) name, its certificate's CN"),
            arg("--dir", required=True, help="where to write NAME.key (0600), NAME.pem and ca.pem"),
            arg("--days", type=int, default=None, help="lifetime in days (default: the control plane's)"),
        ), run=certs_client),
    Command(
        "revoke", "revoke one certificate by serial (hex)", (
            arg("serial"),
            arg("--reason", default="", help="why (kept in the revocation list and the audit log)"),
        ), method="POST", path="/v1/revocations", body=lambda a: {"serial": a.serial.lower(), "reason": a.reason},
        show=shown(lambda rows: f"revoked certificate {rows[0]['serial']}; edges refuse it once they hold the next "
        f"configuration version")),
    Command("revoked", "list revoked certificates", path="/v1/revocations",
            show=shown(listing("no revoked certificates", ("SERIAL", "AT", "NODE", "REASON"),
                               lambda r: (r["serial"], when(r["at"]),
                                          f"{r['node_type']} {r['node_name']}" if r["node_type"] else "-",
                                          r["reason"])))),
))

# ---------------------------------------------------------------------------- registration tokens, admin keys


def _token_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"role": args.role, "ttl_seconds": args.ttl}
    if args.group is not None:
        body["group"] = args.group
    return body


def _token_created(t: dict[str, Any]) -> str:
    target = f"a connector in group {t['group']!r}" if t["role"] == "connector" else "an edge"
    return (f"registration token {t['id']} for {target}, single use, valid until {when(t['expires_at'])}.\n"
            f"It is shown this once:\n{t['token']}")


TOKENS = Group("tokens", "one-time node registration tokens", (
    Command(
        "create", "issue a registration token (shown once)", (
            arg("--role", required=True, choices=["connector", "edge"]),
            arg("--group", default=None, help="connector group of the connector (default: the default group)"),
            arg("--ttl", type=parse_duration, default=86400, metavar="DURATION",
                help="lifetime: 3600, 30m, 1h, 7d ... (default 24h)"),
        ), method="POST", path="/v1/registration-tokens", body=_token_body, show=shown(_token_created)),
    Command("list", "list registration tokens (never the tokens themselves)", path="/v1/registration-tokens",
            show=shown(listing("no registration tokens",
                               ("ID", "ROLE", "GROUP", "STATE", "EXPIRES", "CREATED BY", "USED BY"),
                               lambda t: (t["id"], t["role"], t["group"], t["state"], when(t["expires_at"]),
                                          t["created_by"], t["used_by"])))),
))

KEYS = Group("keys", "admin API keys", (
    Command("list", "list admin keys", path="/v1/admin-keys",
            show=shown(listing("no admin keys", ("NAME", "CREATED", "CREATED BY", "LAST USED", "REVOKED"),
                               lambda k: (k["name"], when(k["created_at"]), k["created_by"], when(k["last_used_at"]),
                                          when(k["revoked_at"]))))),
    Command("create", "create an admin key (shown once)", (arg("name"),), method="POST", path="/v1/admin-keys",
            body=lambda a: {"name": a.name},
            show=shown(lambda k: f"admin key {k['name']!r} created. It is shown this once:\n{k['key']}")),
    Command("revoke", "revoke an admin key", (arg("name"),), method="POST", path="/v1/admin-keys/{name}/revoke",
            show=shown(lambda k: f"revoked admin key {k['name']!r}")),
))
