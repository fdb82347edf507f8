"""``ferryman admin``: the control plane's admin REST API from the command line.

Every command is one or a few calls to ``/v1/...`` (``control.api``) over HTTP with the
standard library (urllib); nothing here touches the database. Output is an aligned table
for people, or with ``--json`` the API's own JSON for scripts.

Where it connects and with which key:

- ``--control URL`` (``http://HOST:PORT``; a bare ``HOST:PORT`` gets ``http://``). Default:
  built from ``FERRYMAN_CONTROL_LISTEN`` (a wildcard listen address such as ``0.0.0.0``
  or ``[::]`` becomes the loopback address), so on the control plane's own host no flag is
  needed;
- ``--key-file PATH`` (default ``FERRYMAN_DATA_DIR/admin.key``, the bootstrap key the
  control plane writes on first start) or ``--key KEY`` (visible to other local users in
  the process list: prefer the file).

Commands: ``apps``, ``segments``, ``groups``, ``connectors``, ``edges``, ``certs``, ``dns``,
``profile`` (the forwarding profile's fail mode: ``show|set --fail-mode closed|open``), ``tokens``, ``keys``, ``assignments`` (who an application is assigned to: ``list|add|remove
APP --user U | --group G``), ``locations`` (named locations: ``list|create|update|delete``),
``policies`` (conditional access: ``list|show|create|update|delete``), ``users``
(``list|show|create|update|delete|reset-totp|sessions``), ``user-groups``
(``list|create|rename|delete|members|add-member|remove-member``), ``devices``
(``list|show|update|revoke``), ``sessions`` (sign-in sessions: ``show|revoke``), ``logs`` (traffic
log records, newest first, filtered; ``--export FILE|-`` streams every matching record as JSON
Lines), ``discovery`` (destinations used through quick access: ``list``, and ``promote`` one to a
per-app application), ``audit`` and ``apply FILE``.

Passwords (``users create|update --password-stdin``) are never taken from the command line,
where other local users could read them: they are typed twice at a hidden prompt when standard
input is a terminal, else read from its first line.

``apply`` takes the data plane's application file (``dataplane.apps``; each app may also
say ``kind = "quick_access"``) as the declared state and makes the control plane match it,
like ``kubectl apply``:

1. the file is validated locally first, with the store's own rules (segment syntax,
   duplicates, overlaps between per-app applications, at most one quick-access
   application, connector groups that exist, an application's kind never changes); a
   file that fails changes nothing;
2. the plan compares canonical forms (normalised destinations, merged port ranges, in
   file order): applications that already match are not touched (no audit record, no
   configuration version bump); ``--prune`` deletes the applications the file does not
   name, otherwise they are kept and listed;
3. changes run as deletions, then updates, then creations, so segments can move between
   applications; when updates would swap segments between two applications, the ones
   involved are first narrowed to the segments they keep (an extra audited step).
   The API has no multi-change transaction: if the control plane refuses a change (say,
   another admin added an overlapping segment meanwhile) apply stops there, says how many
   changes were made, and a second run picks up from the new state.

Exit status: 0 done, 1 refused (by the API or by local validation), 2 usage error
(bad flags, no admin key, unusable settings).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from dataplane.basics import settings as settings_mod

ADMIN_KEY_FILE = "admin.key"  # as written by control.server (not imported: that pulls in the server)
APP_KINDS = ("per_app", "quick_access")
DEFAULT_TIMEOUT = 30.0
_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
_DURATION_RE = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


class AdminError(Exception):
    """A refusal to report as one line on stderr; ``status`` is the exit status (1 refused, 2 usage)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _usage(message: str) -> AdminError:
    return AdminError(message, 2)


# ---------------------------------------------------------------------------- HTTP


def _reason(reason: object) -> str:
    """A short text for why a connection failed."""
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve the host name ({reason.strerror})"
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, ssl.SSLError):
        return f"TLS error: {reason.reason or reason}"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror[:1].lower() + reason.strerror[1:]
    return str(reason) or type(reason).__name__


class SinkError(Exception):
    """Writing out a streamed answer failed (``Client.stream``); ``error`` is the ``OSError``."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class Client:
    """Calls to the admin API; every failure becomes an ``AdminError`` with a clear message."""

    def __init__(self, base_url: str, key: str, key_source: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.base_url = base_url
        self.key = key
        self.key_source = key_source
        self.timeout = timeout

    def _request(self, method: str, path: str, body: Any, query: dict[str, Any] | None,
                 accept: str = "application/json") -> urllib.request.Request:
        params = {k: v for k, v in (query or {}).items() if v is not None}
        url = self.base_url + path + (f"?{urllib.parse.urlencode(params)}" if params else "")
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
        b""), or, without a sink, read whole and returned; raises ``AdminError``."""
        request = self._request(method, path, body, query, accept)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
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
        except urllib.error.URLError as exc:
            raise AdminError(f"cannot reach the control plane at {self.base_url}: {_reason(exc.reason)}") from None
        except TimeoutError:
            raise AdminError(f"cannot reach the control plane at {self.base_url}: no answer within "
                             f"{self.timeout:g}s") from None
        except OSError as exc:  # the connection broke while the answer was read
            raise AdminError(f"cannot reach the control plane at {self.base_url}: {_reason(exc)}") from None

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


def _default_url() -> str:
    """``http://HOST:PORT`` of ``FERRYMAN_CONTROL_LISTEN`` (wildcard addresses mean this host)."""
    from dataplane.basics.hostport import parse_hostport

    settings = _settings()
    try:
        host, port = parse_hostport(settings.control_listen, "FERRYMAN_CONTROL_LISTEN")
    except ValueError as exc:
        raise _usage(f"{exc} (or pass --control URL)") from None
    host = _WILDCARD_HOSTS.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _settings() -> settings_mod.ControlSettings:
    try:
        return settings_mod.load(settings_mod.ControlSettings)
    except settings_mod.SettingsError as exc:
        raise _usage(str(exc)) from None


def control_url(value: str | None) -> str:
    if value is None:
        return _default_url()
    url = value.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise _usage(f"--control {value!r}: expected a URL like http://HOST:PORT")
    try:
        parsed.port  # noqa: B018 - raises for a port that is not a number in range
    except ValueError:
        raise _usage(f"--control {value!r}: the port is not a number from 1 to 65535") from None
    return url


def admin_key(key: str | None, key_file: str | None) -> tuple[str, str]:
    """(key, where it came from)."""
    if key is not None and key_file is not None:
        raise _usage("give either --key or --key-file, not both")
    if key is not None:
        if not key.strip():
            raise _usage("--key is empty")
        return key.strip(), "--key"
    path = key_file if key_file is not None else os.path.join(_settings().data_dir, ADMIN_KEY_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read().strip()
    except FileNotFoundError:
        hint = "" if key_file is not None else (" (the control plane writes it to FERRYMAN_DATA_DIR on first "
                                                "start; set FERRYMAN_DATA_DIR, or pass --key-file or --key)")
        raise _usage(f"admin key file {path} not found{hint}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _usage(f"cannot read the admin key file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not text:
        raise _usage(f"admin key file {path} is empty")
    return text, path


# ---------------------------------------------------------------------------- output helpers


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Aligned columns, two spaces apart, no trailing blanks."""
    cells = [[str(h) for h in headers]] + [["-" if c is None or c == "" else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in cells]
    return "\n".join(lines)


def fields(pairs: Sequence[tuple[str, object]]) -> str:
    """``key: value`` lines with aligned values."""
    width = max(len(k) for k, _ in pairs) + 1
    return "\n".join(f"{(k + ':').ljust(width)} {'-' if v is None or v == '' else v}".rstrip() for k, v in pairs)


def when(value: str | None) -> str | None:
    """An API time (RFC 3339, UTC) as ``2024-05-01 12:00:00Z``."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def segment_text(segment: dict[str, Any]) -> str:
    """``destination:ports/protocol`` (IPv6 destinations in brackets), as the API's messages say it."""
    destination = segment["destination"]
    if ":" in destination:
        destination = f"[{destination}]"
    return f"{destination}:{segment['ports']}/{segment['protocol']}"


def yes_no(value: object) -> str:
    return "yes" if value else "no"


# ---------------------------------------------------------------------------- argument types


def parse_segment(spec: str) -> dict[str, str]:
    """``DEST:PORTS[/PROTO]`` → a segment for the API (which validates destination and ports).

    ``10.0.0.0/16:22,3389``, ``*.corp.example:443/tcp``, ``[2001:db8::/32]:53/udp``.
    """
    text = spec.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1:end + 2] != ":":
            raise argparse.ArgumentTypeError(f"{spec!r}: expected [IPV6]:PORTS[/PROTO]")
        destination, rest = text[1:end], text[end + 2:]
    else:
        destination, sep, rest = text.rpartition(":")
        if not sep or not destination:
            raise argparse.ArgumentTypeError(f"{spec!r}: expected DEST:PORTS[/PROTO], e.g. 10.0.0.0/16:22,3389/tcp")
        if ":" in destination:
            raise argparse.ArgumentTypeError(f"{spec!r}: put an IPv6 destination in brackets, e.g. "
                                             f"[2001:db8::/32]:443")
    ports, slash, protocol = rest.partition("/")
    if not ports.strip():
        raise argparse.ArgumentTypeError(f"{spec!r}: no ports after the destination")
    if slash and not protocol.strip():
        raise argparse.ArgumentTypeError(f"{spec!r}: no protocol after '/'")
    segment = {"destination": destination, "ports": ports.strip()}
    if slash:
        segment["protocol"] = protocol.strip().lower()
    return segment


def parse_duration(text: str) -> int:
    """Seconds of ``3600``, ``90s``, ``30m``, ``1h``, ``7d`` or a combination such as ``1h30m``."""
    value = text.strip().lower()
    if value.isdigit():
        seconds = int(value)
    else:
        match = _DURATION_RE.fullmatch(value)
        if not value or match is None:
            raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 3600, 90s, 30m, 1h, 7d or 1h30m")
        days, hours, minutes, secs = (int(g or 0) for g in match.groups())
        seconds = ((days * 24 + hours) * 60 + minutes) * 60 + secs
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration must be positive")
    return seconds


def parse_since(text: str) -> str:
    """An RFC 3339 time with a zone (``2024-05-01T12:00:00Z``; a bare date is midnight UTC), or a
    duration back from now (``1h``, ``2d``)."""
    value = text.strip()
    try:
        seconds = parse_duration(value)
    except argparse.ArgumentTypeError:
        pass
    else:
        return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat()
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time like 2024-05-01T12:00:00Z or a duration like "
                                         f"1h") from None
    if moment.tzinfo is None:
        if "T" in value or " " in value:
            raise argparse.ArgumentTypeError(f"{text!r} has no time zone: add Z (UTC) or an offset like +02:00")
        moment = moment.replace(tzinfo=UTC)
    return moment.isoformat()


def _quote(value: str | int) -> str:
    return urllib.parse.quote(str(value), safe="")


# ---------------------------------------------------------------------------- commands


@dataclass
class Ctx:
    client: Client
    json: bool

    def show(self, payload: bytes, human: Callable[[Any], str]) -> None:
        """Print the API's JSON (``--json``) or the human form of it."""
        if self.json:
            if payload:
                print(msgspec.json.format(payload, indent=2).decode())
            return
        print(human(decode(payload, self.client.base_url)))


def _listing(empty: str, headers: Sequence[str], row: Callable[[dict[str, Any]], Sequence[object]]
             ) -> Callable[[Any], str]:
    def render(items: list[dict[str, Any]]) -> str:
        return table(headers, [row(item) for item in items]) if items else empty
    return render


def _app_row(app: dict[str, Any]) -> Sequence[object]:
    return (app["name"], app["kind"], app["connector_group"], ", ".join(segment_text(s) for s in app["segments"]))


_apps_table = _listing("no applications", ("NAME", "KIND", "GROUP", "SEGMENTS"), _app_row)


def _app_detail(app: dict[str, Any]) -> str:
    head = fields([("name", app["name"]), ("kind", app["kind"]), ("connector group", app["connector_group"]),
                   ("created", when(app["created_at"])), ("updated", when(app["updated_at"]))])
    if not app["segments"]:
        return head + "\nno segments"
    rows = [(s["id"], s["destination"], s["kind"], s["ports"], s["protocol"]) for s in app["segments"]]
    return head + "\n\n" + table(("ID", "DESTINATION", "KIND", "PORTS", "PROTOCOL"), rows)


def cmd_apps_list(ctx: Ctx, _args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("GET", "/v1/applications"), _apps_table)
    return 0


def cmd_apps_show(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("GET", f"/v1/applications/{_quote(args.name)}"), _app_detail)
    return 0


def cmd_apps_create(ctx: Ctx, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name, "kind": "quick_access" if args.quick_access else "per_app",
                            "segments": args.segment}
    if args.group is not None:
        body["connector_group"] = args.group
    ctx.show(ctx.client.call("POST", "/v1/applications", body),
             lambda app: f"created application {app['name']!r}\n\n{_app_detail(app)}")
    return 0


def cmd_apps_delete(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.client.call("DELETE", f"/v1/applications/{_quote(args.name)}")
    if not ctx.json:
        print(f"deleted application {args.name!r}")
    return 0


def cmd_segments_add(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("POST", f"/v1/applications/{_quote(args.app)}/segments", args.segment),
             lambda s: f"added segment {s['id']} to {args.app!r}: {segment_text(s)}")
    return 0


def cmd_segments_remove(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.client.call("DELETE", f"/v1/applications/{_quote(args.app)}/segments/{args.segment_id}")
    if not ctx.json:
        print(f"removed segment {args.segment_id} from {args.app!r}")
    return 0


def cmd_groups_list(ctx: Ctx, _args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("GET", "/v1/connector-groups"),
             _listing("no connector groups", ("NAME", "REGION", "DEFAULT", "CREATED"),
                      lambda g: (g["name"], g["region"], yes_no(g["is_default"]), when(g["created_at"]))))
    return 0


def cmd_groups_create(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("POST", "/v1/connector-groups", {"name": args.name, "region": args.region}),
             lambda g: f"created connector group {g['name']!r}" + (f" (region {g['region']})" if g["region"] else ""))
    return 0


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


def cmd_connectors_list(ctx: Ctx, _args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("GET", "/v1/connectors"),
             _listing("no connectors", ("ID", "NAME", "GROUP", "STATUS", "LAST SEEN", "TUNNELS", "FLOWS", "CONFIG",
                                        "VERSION", "REVOKED"),
                      lambda c: (c["id"], c["name"], c["group"], c["status"], when(c["last_seen"]), c["tunnels"],
                                 c["active_flows"], "-" if c["config_version"] is None else c["config_version"],
                                 c["version"], yes_no(c["revoked"]))))
    return 0


def cmd_connectors_show(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("GET", f"/v1/connectors/{_quote(args.id)}"), _node_detail)
    return 0


def _revoke(ctx: Ctx, node_type: str, node_id: str, reason: str) -> int:
    ctx.show(ctx.client.call("POST", "/v1/revocations", {"node_type": node_type, "node_id": node_id,
                                                         "reason": reason}),
             lambda rows: f"revoked {len(rows)} certificate{'s' if len(rows) != 1 else ''} "
                          f"({', '.join(r['serial'] for r in rows)}) of {node_type} "
                          f"{(rows[0]['node_name'] if rows else None) or node_id!r} ({node_id}); "
                          f"edges cut its tunnels once they hold the next configuration version")
    return 0


def cmd_certs_client(ctx: Ctx, args: argparse.Namespace) -> int:
    from dataplane.basics.pki import PkiError, new_key_and_csr, write_node_files as write_identity

    try:
        key_pem, csr_pem = new_key_and_csr(args.name)
    except PkiError as exc:
        raise _usage(str(exc)) from None
    body: dict[str, Any] = {"name": args.name, "csr_pem": csr_pem.decode()}
    if args.days is not None:
        body["lifetime_days"] = args.days
    issued = ctx.client.json("POST", "/v1/client-certificates", body)
    try:
        files = write_identity(args.dir, args.name, key_pem, issued["certificate_pem"].encode(),
                               issued["ca_pem"].encode())
    except PkiError as exc:
        raise AdminError(f"certificate {issued['serial']} was issued but cannot be stored: {exc}; "
                         f"revoke it with `ferryman admin certs revoke {issued['serial']}`") from None
    ctx.show(msgspec.json.encode({**issued, "cert": files.cert, "key": files.key, "ca": files.ca}),
             lambda c: fields([("serial", c["serial"]), ("valid until", when(c["not_after"])),
                               ("certificate", c["cert"]), ("key", c["key"]), ("CA", c["ca"])]))
    return 0


def cmd_certs_revoke(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("POST", "/v1/revocations", {"serial": args.serial.lower(), "reason": args.reason}),
             lambda rows: f"revoked certificate {rows[0]['serial']}; edges refuse it once they hold the next "
                          f"configuration version")
    return 0


def cmd_certs_revoked(ctx: Ctx, _args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("GET", "/v1/revocations"),
             _listing("no revoked certificates", ("SERIAL", "AT", "NODE", "REASON"),
                      lambda r: (r["serial"], when(r["at"]),
                                 f"{r['node_type']} {r['node_name']}" if r["node_type"] else "-", r["reason"])))
    return 0


def cmd_connectors_revoke(ctx: Ctx, args: argparse.Namespace) -> int:
    return _revoke(ctx, "connector", args.id, args.reason)


def cmd_edges_list(ctx: Ctx, _args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("GET", "/v1/edges"),
             _listing("no edges", ("ID", "NAME", "ADDRESS", "STATUS", "LAST SEEN", "TUNNELS", "FLOWS", "CONFIG",
                                   "VERSION", "REVOKED"),
                      lambda e: (e["id"], e["name"], e["address"], e["status"], when(e["last_seen"]), e["tunnels"],
                                 e["active_flows"], "-" if e["config_version"] is None else e["config_version"],
                                 e["version"], yes_no(e["revoked"]))))
    return 0


def cmd_edges_show(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("GET", f"/v1/edges/{_quote(args.id)}"), _node_detail)
    return 0


def cmd_edges_revoke(ctx: Ctx, args: argparse.Namespace) -> int:
    return _revoke(ctx, "edge", args.id, args.reason)


def cmd_dns_list(ctx: Ctx, _args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("GET", "/v1/dns-suffixes"),
             _listing("no private DNS suffixes", ("SUFFIX", "CREATED"), lambda d: (d["suffix"], when(d["created_at"]))))
    return 0


def cmd_dns_add(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("POST", "/v1/dns-suffixes", {"suffix": args.suffix}),
             lambda d: f"added private DNS suffix {d['suffix']!r}")
    return 0


def cmd_dns_remove(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.client.call("DELETE", f"/v1/dns-suffixes/{_quote(args.suffix)}")
    if not ctx.json:
        print(f"removed private DNS suffix {args.suffix!r}")
    return 0


def cmd_profile_show(ctx: Ctx, _args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("GET", "/v1/forwarding-profile"),
             lambda p: f"fail mode: {p['fail_mode']} (client agents "
                       f"{'refuse' if p['fail_mode'] == 'closed' else 'dial directly'} private destinations while "
                       f"no edge is reachable); changed {when(p['updated_at'])}")
    return 0


def cmd_profile_set(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("PUT", "/v1/forwarding-profile", {"fail_mode": args.fail_mode}),
             lambda p: f"fail mode is now {p['fail_mode']}")
    return 0


def cmd_tokens_create(ctx: Ctx, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"role": args.role, "ttl_seconds": args.ttl}
    if args.group is not None:
        body["group"] = args.group
    ctx.show(ctx.client.call("POST", "/v1/registration-tokens", body), _token_created)
    return 0


def _token_created(t: dict[str, Any]) -> str:
    target = f"a connector in group {t['group']!r}" if t["role"] == "connector" else "an edge"
    return (f"registration token {t['id']} for {target}, single use, valid until {when(t['expires_at'])}.\n"
            f"It is shown this once:\n{t['token']}")


def cmd_tokens_list(ctx: Ctx, _args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("GET", "/v1/registration-tokens"),
             _listing("no registration tokens",
                      ("ID", "ROLE", "GROUP", "STATE", "EXPIRES", "CREATED BY", "USED BY"),
                      lambda t: (t["id"], t["role"], t["group"], t["state"], when(t["expires_at"]), t["created_by"],
                                 t["used_by"])))
    return 0


def cmd_keys_list(ctx: Ctx, _args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("GET", "/v1/admin-keys"),
             _listing("no admin keys", ("NAME", "CREATED", "CREATED BY", "LAST USED", "REVOKED"),
                      lambda k: (k["name"], when(k["created_at"]), k["created_by"], when(k["last_used_at"]),
                                 when(k["revoked_at"]))))
    return 0


def cmd_keys_create(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("POST", "/v1/admin-keys", {"name": args.name}),
             lambda k: f"admin key {k['name']!r} created. It is shown this once:\n{k['key']}")
    return 0


def cmd_keys_revoke(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("POST", f"/v1/admin-keys/{_quote(args.name)}/revoke"),
             lambda k: f"revoked admin key {k['name']!r}")
    return 0


def _audit_object(record: dict[str, Any]) -> str:
    state = record["after"] or record["before"] or {}
    label = state.get("name") or state.get("suffix") or state.get("application")
    text = f"{record['object_type']} {record['object_id']}"
    return f"{text} ({label})" if label else text


def cmd_audit(ctx: Ctx, args: argparse.Namespace) -> int:
    query = {"actor": args.actor, "object_type": args.type, "since": args.since, "limit": args.limit}
    ctx.show(ctx.client.call("GET", "/v1/audit", query=query),
             _listing("no audit records", ("ID", "TIME", "ACTOR", "ACTION", "OBJECT"),
                      lambda r: (r["id"], when(r["at"]), r["actor"], r["action"], _audit_object(r))))
    return 0


# ---------------------------------------------------------------------------- access: assignments, locations, policies


POLICY_STATES = ("on", "off", "report_only")
POLICY_GRANTS = ("block", "require_mfa", "require_compliant_device")
RISK_LEVELS = ("low", "medium", "high")


def duration_text(seconds: int) -> str:
    """``5400`` → ``1h30m``; the inverse of ``parse_duration`` (``0s`` for zero)."""
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def _ref(item: dict[str, Any], label: str) -> str:
    """A target's name, or its id marked deleted when it no longer exists."""
    return item[label] if item.get(label) else f"{item['id']} (deleted)"


def _assignment_target(a: dict[str, Any]) -> tuple[str, str, str]:
    if a["user"] is not None:
        return "user", _ref(a["user"], "upn"), a["user"]["id"]
    return "group", _ref(a["group"], "name"), a["group"]["id"]


def cmd_assignments_list(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("GET", f"/v1/applications/{_quote(args.app)}/assignments"),
             _listing(f"application {args.app!r} is assigned to nobody", ("TYPE", "NAME", "ID"), _assignment_target))
    return 0


def _assignment_body(args: argparse.Namespace) -> dict[str, str]:
    return {"user": args.user} if args.user is not None else {"group": args.group}


def cmd_assignments_add(ctx: Ctx, args: argparse.Namespace) -> int:
    def human(a: dict[str, Any]) -> str:
        kind, name, ident = _assignment_target(a)
        return f"assigned application {a['application']!r} to {kind} {name!r} ({ident})"

    ctx.show(ctx.client.call("POST", f"/v1/applications/{_quote(args.app)}/assignments", _assignment_body(args)),
             human)
    return 0


def cmd_assignments_remove(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.client.call("DELETE", f"/v1/applications/{_quote(args.app)}/assignments", _assignment_body(args))
    if not ctx.json:
        kind, name = ("user", args.user) if args.user is not None else ("group", args.group)
        print(f"application {args.app!r} is no longer assigned to {kind} {name!r}")
    return 0


_locations_table = _listing("no named locations", ("NAME", "NETWORKS", "POLICIES"),
                            lambda loc: (loc["name"], ", ".join(loc["cidrs"]), ", ".join(loc["policies"])))


def _location_text(verb: str) -> Callable[[dict[str, Any]], str]:
    return lambda loc: f"{verb} named location {loc['name']!r}: {', '.join(loc['cidrs'])}"


def cmd_locations_list(ctx: Ctx, _args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("GET", "/v1/named-locations"), _locations_table)
    return 0


def cmd_locations_create(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("POST", "/v1/named-locations", {"name": args.name, "cidrs": args.cidrs}),
             _location_text("created"))
    return 0


def cmd_locations_update(ctx: Ctx, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.rename is not None:
        body["name"] = args.rename
    if args.cidrs:
        body["cidrs"] = args.cidrs
    if not body:
        raise _usage("locations update: nothing to change (give networks and/or --rename NEW)")
    ctx.show(ctx.client.call("PATCH", f"/v1/named-locations/{_quote(args.name)}", body), _location_text("updated"))
    return 0


def cmd_locations_delete(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.client.call("DELETE", f"/v1/named-locations/{_quote(args.name)}")
    if not ctx.json:
        print(f"deleted named location {args.name!r}")
    return 0


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


_policies_table = _listing("no policies", ("NAME", "STATE", "GRANT", "APPLICATIONS", "USERS", "WHEN"),
                           lambda p: (p["name"], p["state"], p["grant"], _policy_apps(p), _policy_users(p),
                                      _policy_conditions(p)))


def _policy_detail(p: dict[str, Any]) -> str:
    return fields([("name", p["name"]), ("state", p["state"]), ("grant", p["grant"]),
                   ("applications", _policy_apps(p)), ("users", _policy_users(p)),
                   ("when", _policy_conditions(p)), ("created", when(p["created_at"])),
                   ("updated", when(p["updated_at"]))])


def cmd_policies_list(ctx: Ctx, _args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("GET", "/v1/policies"), _policies_table)
    return 0


def cmd_policies_show(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("GET", f"/v1/policies/{_quote(args.name)}"), _policy_detail)
    return 0


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


def cmd_policies_create(ctx: Ctx, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name, "grant": args.grant, "state": args.state, "applications": args.app,
                            "users": args.user, "groups": args.group, "conditions": _condition_flags(args)}
    ctx.show(ctx.client.call("POST", "/v1/policies", body),
             lambda p: f"created policy {p['name']!r}\n\n{_policy_detail(p)}")
    return 0


def cmd_policies_update(ctx: Ctx, args: argparse.Namespace) -> int:
    if args.all_apps and args.app:
        raise _usage("policies update: give either --app or --all-apps, not both")
    if args.all_users and (args.user or args.group):
        raise _usage("policies update: give either --user/--group or --all-users, not both")
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
            current = ctx.client.json("GET", f"/v1/policies/{_quote(args.name)}")["conditions"]
        body["conditions"] = {**current, **given}
    if not body:
        raise _usage("policies update: nothing to change (see `ferryman admin policies update -h`)")
    ctx.show(ctx.client.call("PATCH", f"/v1/policies/{_quote(args.name)}", body),
             lambda p: f"updated policy {p['name']!r}\n\n{_policy_detail(p)}")
    return 0


def cmd_policies_delete(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.client.call("DELETE", f"/v1/policies/{_quote(args.name)}")
    if not ctx.json:
        print(f"deleted policy {args.name!r}")
    return 0


# ---------------------------------------------------------------------------- users, user groups, devices, sessions


USER_RISK_LEVELS = ("none", *RISK_LEVELS)


def read_password(upn: str) -> str:
    """The password of ``--password-stdin``: typed twice at a hidden prompt when standard input is
    a terminal, else the first line of standard input (its line ending removed). Passwords are
    never taken from the command line, where other local users could see them."""
    stdin = sys.stdin
    if stdin is None:
        raise AdminError("--password-stdin: there is no standard input to read the password from")
    if stdin.isatty():
        import getpass

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
            raise AdminError(f"--password-stdin: cannot read standard input: {_reason(exc)}") from None
        password = password.removesuffix("\n").removesuffix("\r")
    if not password:
        raise AdminError("--password-stdin: the password is empty (give it on the first line of standard input, "
                         "e.g. `printf '%s\\n' \"$PASSWORD\" | ferryman admin users ...`, or type it at the prompt "
                         "when standard input is a terminal)")
    return password


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
        ("created", when(u["created_at"])), ("updated", when(u["updated_at"]))])


def _users_table(ctx: Ctx, empty: str) -> Callable[[Any], str]:
    groups = _group_names(ctx)
    return _listing(empty, ("UPN", "NAME", "DISABLED", "RISK", "PASSWORD", "TOTP", "GROUPS", "ID"),
                    lambda u: (u["upn"], u["display_name"], yes_no(u["disabled"]), u["risk_level"],
                               yes_no(u["has_password"]), yes_no(u["totp_enabled"]), groups(u["groups"]), u["id"]))


def cmd_users_list(ctx: Ctx, _args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("GET", "/v1/users"), _users_table(ctx, "no users"))
    return 0


def cmd_users_show(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("GET", f"/v1/users/{_quote(args.user)}"), _user_detail(ctx))
    return 0


def cmd_users_create(ctx: Ctx, args: argparse.Namespace) -> int:
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


def cmd_users_update(ctx: Ctx, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    for key, value in (("upn", args.rename), ("display_name", args.name), ("risk_level", args.risk),
                       ("disabled", args.disabled)):
        if value is not None:
            body[key] = value
    if not body and not args.password_stdin:
        raise _usage("users update: nothing to change (see `ferryman admin users update -h`)")
    if args.password_stdin:
        body["password"] = read_password(args.user)
    detail = _user_detail(ctx)
    ctx.show(ctx.client.call("PATCH", f"/v1/users/{_quote(args.user)}", body),
             lambda u: f"updated user {u['upn']!r}\n\n{detail(u)}")
    return 0


def cmd_users_delete(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.client.call("DELETE", f"/v1/users/{_quote(args.user)}")
    if not ctx.json:
        print(f"deleted user {args.user!r} (its devices are revoked, its sessions and group memberships gone)")
    return 0


def cmd_users_reset_totp(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("POST", f"/v1/users/{_quote(args.user)}/totp/reset"),
             lambda u: f"reset the TOTP second factor of user {u['upn']!r}: its secret and recovery codes are "
                       f"gone, and it may enrol again")
    return 0


def _session_row(s: dict[str, Any]) -> Sequence[object]:
    return (s["id"], s["status"], s["device_id"], ",".join(s["amr"]), when(s["auth_time"]), when(s["expires_at"]),
            when(s["last_refresh_at"]), when(s["revoked_at"]))


def cmd_users_sessions(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("GET", f"/v1/users/{_quote(args.user)}/sessions"),
             _listing(f"user {args.user!r} has no sign-in sessions",
                      ("ID", "STATUS", "DEVICE", "AMR", "SIGNED IN", "EXPIRES", "LAST REFRESH", "REVOKED"),
                      _session_row))
    return 0


def _user_group_created(g: dict[str, Any]) -> str:
    return f"created user group {g['name']!r} ({g['id']})"


def cmd_user_groups_list(ctx: Ctx, _args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("GET", "/v1/user-groups"),
             _listing("no user groups", ("NAME", "MEMBERS", "ID", "CREATED"),
                      lambda g: (g["name"], g["members"], g["id"], when(g["created_at"]))))
    return 0


def cmd_user_groups_create(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("POST", "/v1/user-groups", {"name": args.name}), _user_group_created)
    return 0


def cmd_user_groups_rename(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("PATCH", f"/v1/user-groups/{_quote(args.group)}", {"name": args.new_name}),
             lambda g: f"renamed user group {args.group!r} to {g['name']!r}")
    return 0


def cmd_user_groups_delete(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.client.call("DELETE", f"/v1/user-groups/{_quote(args.group)}")
    if not ctx.json:
        print(f"deleted user group {args.group!r} (with its memberships and application assignments)")
    return 0


def cmd_user_groups_members(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("GET", f"/v1/user-groups/{_quote(args.group)}/members"),
             _users_table(ctx, f"user group {args.group!r} has no members"))
    return 0


def cmd_user_groups_add_member(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("POST", f"/v1/user-groups/{_quote(args.group)}/members", {"user": args.user}),
             lambda m: f"added user {m['upn']!r} to user group {m['group']!r}")
    return 0


def cmd_user_groups_remove_member(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.client.call("DELETE", f"/v1/user-groups/{_quote(args.group)}/members/{_quote(args.user)}")
    if not ctx.json:
        print(f"removed user {args.user!r} from user group {args.group!r}")
    return 0


def _device_os(d: dict[str, Any]) -> str:
    return f"{d['os']} {d['os_version']}".strip()


def _device_detail(d: dict[str, Any]) -> str:
    return fields([("id", d["id"]), ("user", f"{d['upn'] or '(deleted)'} ({d['user_id']})"), ("name", d["name"]),
                   ("OS", d["os"]), ("OS version", d["os_version"]), ("compliant", yes_no(d["compliant"])),
                   ("registered", when(d["created_at"])), ("last seen", when(d["last_seen"])),
                   ("certificate", d["cert_serial"]), ("valid until", when(d["cert_not_after"])),
                   ("revoked", when(d["revoked_at"]) or "no")])


def cmd_devices_list(ctx: Ctx, args: argparse.Namespace) -> int:
    empty = "no devices" if args.user is None else f"user {args.user!r} has no devices"
    ctx.show(ctx.client.call("GET", "/v1/devices", query={"user": args.user}),
             _listing(empty, ("ID", "USER", "NAME", "OS", "COMPLIANT", "LAST SEEN", "REVOKED"),
                      lambda d: (d["id"], d["upn"], d["name"], _device_os(d), yes_no(d["compliant"]),
                                 when(d["last_seen"]), when(d["revoked_at"]))))
    return 0


def cmd_devices_show(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("GET", f"/v1/devices/{_quote(args.id)}"), _device_detail)
    return 0


def cmd_devices_update(ctx: Ctx, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.compliant is not None:
        body["compliant"] = args.compliant == "yes"
    for key, value in (("os", args.os), ("os_version", args.os_version), ("name", args.name)):
        if value is not None:
            body[key] = value
    if not body:
        raise _usage("devices update: nothing to change (give --compliant, --os, --os-version and/or --name)")
    ctx.show(ctx.client.call("PATCH", f"/v1/devices/{_quote(args.id)}", body),
             lambda d: f"updated device {d['id']}\n\n{_device_detail(d)}")
    return 0


def cmd_devices_revoke(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("POST", f"/v1/devices/{_quote(args.id)}/revoke", {"reason": args.reason}),
             lambda d: f"revoked device {d['id']} of {d['upn'] or d['user_id']!r}: its certificate and live "
                       f"sessions; edges refuse it within seconds")
    return 0


def _session_detail(ctx: Ctx) -> Callable[[dict[str, Any]], str]:
    def render(s: dict[str, Any]) -> str:
        user = s["user_id"]
        try:  # the UPN too, if the user can still be read
            upn = ctx.client.json("GET", f"/v1/users/{_quote(user)}")["upn"]
        except AdminError:
            pass
        else:
            user = f"{upn} ({user})"
        return fields([("id", s["id"]), ("user", user), ("device", s["device_id"]), ("status", s["status"]),
                       ("AMR", ", ".join(s["amr"])), ("signed in", when(s["auth_time"])),
                       ("created", when(s["created_at"])), ("expires", when(s["expires_at"])),
                       ("last refresh", when(s["last_refresh_at"])), ("revoked", when(s["revoked_at"]) or "no")])
    return render


def cmd_sessions_show(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("GET", f"/v1/sessions/{_quote(args.id)}"), _session_detail(ctx))
    return 0


def cmd_sessions_revoke(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("POST", f"/v1/sessions/{_quote(args.id)}/revoke", {"reason": args.reason}),
             lambda s: f"revoked session {s['id']}: its refresh token stops working and edges refuse its access "
                       f"tokens")
    return 0


# ---------------------------------------------------------------------------- traffic: logs, discovery


TRAFFIC_ACTIONS = ("allow", "deny", "report")
TRAFFIC_PAGE = 1000  # the API's largest page (control.api.traffic.MAX_PAGE)
DEFAULT_LOG_LIMIT = 100


def size_text(count: int) -> str:
    """``512`` → ``512B``, ``1536`` → ``1.5KiB`` (KiB, MiB, GiB, TiB; one decimal, rounded down)."""
    if count < 1024:
        return f"{count}B"
    unit, size = "KiB", 1024
    for unit, size in (("KiB", 1024), ("MiB", 1024 ** 2), ("GiB", 1024 ** 3), ("TiB", 1024 ** 4)):
        if count < size * 1024:
            break
    return f"{count * 10 // size / 10:.1f}{unit}"


def millis_text(ms: int) -> str:
    """``250`` → ``250ms``, ``1500`` → ``1.5s`` (rounded down), ``5400000`` → ``1h30m``."""
    if ms < 1000:
        return f"{ms}ms"
    if ms < 60000:
        return f"{ms // 100 / 10:.1f}s"
    return duration_text(ms // 1000)


def _host_port(host: str, port: int) -> str:
    if not host:
        return ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _traffic_row(r: dict[str, Any]) -> Sequence[object]:
    destination = _host_port(r["destination_fqdn"] or r["destination_ip"], r["destination_port"])
    return (when(r["start"]), r["upn"] or r["user_id"], r["device_id"], _host_port(r["source_ip"], r["source_port"]),
            f"{destination}/{r['transport']}" if destination else "", r["application"], r["action"], r["policy"],
            r["reason_code"], size_text(r["bytes_sent"]), size_text(r["bytes_received"]),
            millis_text(r["duration_ms"]))


_traffic_table = _listing("no traffic records", ("TIME", "USER", "DEVICE", "SOURCE", "DESTINATION", "APP", "ACTION",
                                                 "POLICY", "REASON", "SENT", "RECEIVED", "DURATION"), _traffic_row)


def _traffic_filters(args: argparse.Namespace) -> dict[str, Any]:
    if args.since is not None and args.until is not None and \
            datetime.fromisoformat(args.since) >= datetime.fromisoformat(args.until):
        raise _usage(f"logs: --since ({when(args.since)}) must be before --until ({when(args.until)})")
    return {"since": args.since, "until": args.until, "user": args.user, "app": args.app, "action": args.action,
            "connector": args.connector}


def cmd_logs(ctx: Ctx, args: argparse.Namespace) -> int:
    query = _traffic_filters(args)
    if args.export is not None:
        if args.limit is not None:
            raise _usage("logs: --limit does not apply to --export, which writes every matching record")
        return _export_traffic(ctx, args.export, query)
    limit = DEFAULT_LOG_LIMIT if args.limit is None else args.limit
    if limit < 1:
        raise _usage("logs: --limit must be at least 1")
    pages: list[tuple[bytes, list[dict[str, Any]]]] = []
    got, before = 0, None
    while True:  # pages of at most TRAFFIC_PAGE records, newest first, until --limit
        size = min(limit - got, TRAFFIC_PAGE)
        payload = ctx.client.call("GET", "/v1/traffic", query={**query, "limit": size, "before": before})
        records = decode(payload, ctx.client.base_url)
        pages.append((payload, records))
        got += len(records)
        if len(records) < size or got >= limit:
            break
        before = records[-1]["id"]
    payload = pages[0][0] if len(pages) == 1 else msgspec.json.encode([r for _, rs in pages for r in rs])
    ctx.show(payload, _traffic_table)
    return 0


def _export_traffic(ctx: Ctx, target: str, query: dict[str, Any]) -> int:
    """``logs --export``: the JSON Lines export, streamed as it arrives to standard output (``-``)
    or to a file (written next to it and renamed when complete, so a failed export leaves no
    truncated file behind)."""
    written = 0

    def export(write: Callable[[bytes], object]) -> None:
        def sink(chunk: bytes) -> None:
            nonlocal written
            write(chunk)
            written += chunk.count(b"\n")

        ctx.client.stream("GET", "/v1/traffic/export", sink, query=query, accept="application/x-ndjson")

    if target == "-":
        out = sys.stdout.buffer
        sys.stdout.flush()
        try:
            export(out.write)
            out.flush()
        except (SinkError, BrokenPipeError) as exc:
            error = exc.error if isinstance(exc, SinkError) else exc
            if isinstance(error, BrokenPipeError):  # the reader went away (`| head`): stop quietly
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                return 0
            raise AdminError(f"--export -: cannot write to standard output: {_reason(error)}") from None
        except AdminError as exc:
            if not written:
                raise
            raise AdminError(f"{exc} (the export stopped after {written} records)", exc.status) from None
        return 0

    import tempfile

    special = os.path.exists(target) and not os.path.isfile(target)  # a FIFO, /dev/stdout ...: write to it directly
    try:
        if special:
            fh, partial = open(target, "wb"), None  # noqa: SIM115 - closed below
        else:
            fd, partial = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(target)),
                                           prefix=f".{os.path.basename(target)}.", suffix=".part")
            fh = os.fdopen(fd, "wb")
    except OSError as exc:
        raise AdminError(f"--export {target}: cannot write there: {_reason(exc)}") from None
    try:
        with fh:
            export(fh.write)
        if partial is not None:
            os.replace(partial, target)
            partial = None
    except SinkError as exc:
        raise AdminError(f"--export {target}: cannot write it: {_reason(exc.error)}") from None
    except OSError as exc:
        raise AdminError(f"--export {target}: cannot write it: {_reason(exc)}") from None
    except AdminError as exc:
        raise AdminError(f"{exc} ({target} was not written)", exc.status) from None
    finally:
        if partial is not None:
            try:
                os.unlink(partial)
            except OSError:
                pass
    if ctx.json:
        print(msgspec.json.format(msgspec.json.encode({"file": target, "records": written}), indent=2).decode())
    else:
        print(f"exported {written} traffic record{'' if written == 1 else 's'} to {target}")
    return 0


def cmd_discovery_list(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.show(ctx.client.call("GET", "/v1/discovery", query={"since": args.since, "limit": args.limit}),
             _listing("no destinations used through quick access",
                      ("DESTINATION", "PORT", "PROTOCOL", "USERS", "DEVICES", "FLOWS", "BYTES", "FIRST SEEN",
                       "LAST SEEN"),
                      lambda d: (d["destination"], d["port"], d["protocol"], d["users"], d["devices"], d["flows"],
                                 size_text(d["bytes"]), when(d["first_seen"]), when(d["last_seen"]))))
    return 0


def cmd_discovery_promote(ctx: Ctx, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name, "destination": args.destination, "ports": args.ports,
                            "protocol": args.protocol}
    if args.group is not None:
        body["connector_group"] = args.group
    ctx.show(ctx.client.call("POST", "/v1/discovery/applications", body),
             lambda app: f"created application {app['name']!r} for "
                         f"{', '.join(segment_text(s) for s in app['segments'])}: it now wins over quick access"
                         f"\n\n{_app_detail(app)}")
    return 0


# ---------------------------------------------------------------------------- apply


SegmentKey = tuple[str, str, str]  # (destination, canonical ports, protocol)


@dataclass
class Desired:
    """One application of the file, validated and in canonical form."""

    name: str
    kind: str
    group: str
    segments: tuple[SegmentKey, ...]
    parsed: tuple[Any, ...]  # dataplane.apps.Segment, ports merged (for overlap checks)


@dataclass
class Step:
    """One entry of the plan."""

    name: str
    action: str  # create, update, delete, unchanged
    changes: list[str] = field(default_factory=list)
    body: dict[str, Any] | None = None
    desired: Desired | None = None
    current: dict[str, Any] | None = None


def _seg_key_text(key: SegmentKey) -> str:
    return segment_text({"destination": key[0], "ports": key[1], "protocol": key[2]})


def load_desired(path: str) -> list[Desired]:
    """Read and validate an application file with the data plane's parser and the store's rules.

    Raises ``AdminError`` (status 1) naming the file, the application and the segment.
    """
    from control.store.errors import StoreError
    from control.store.segments import canonical_ports, parse_segments
    from dataplane.contract import apps as apps_mod

    try:
        raw = apps_mod.read_file(path)  # the data plane's reader: same formats, same messages
        kinds: list[str] = []
        if isinstance(raw, dict) and isinstance(raw.get("apps"), list):
            entries = []
            for number, entry in enumerate(raw["apps"], 1):
                kind = "per_app"
                if isinstance(entry, dict) and "kind" in entry:
                    entry = dict(entry)
                    kind = entry.pop("kind")
                    if kind not in APP_KINDS:
                        name = entry.get("name")
                        label = repr(name.strip()) if isinstance(name, str) and name.strip() else str(number)
                        raise apps_mod.AppsError(f"{path}: app {label}: kind must be 'per_app' or 'quick_access', "
                                                 f"not {kind!r}")
                kinds.append(kind)
                entries.append(entry)
            raw = {**raw, "apps": entries}
        table_ = apps_mod.Applications.from_obj(raw, source=path)
    except apps_mod.AppsError as exc:
        raise AdminError(str(exc)) from None
    desired = []
    for app, kind, entry in zip(table_.apps, kinds, raw["apps"], strict=True):
        try:
            parsed = parse_segments(app.name, entry["segments"])  # merged ports; duplicates refused
        except StoreError as exc:
            raise AdminError(f"{path}: {exc}") from None
        keys = tuple((s.destination, canonical_ports(s.ports), s.protocol) for s in parsed)
        desired.append(Desired(app.name, kind, app.connector_group, keys, parsed))
    quick = [d.name for d in desired if d.kind == "quick_access"]
    if len(quick) > 1:
        raise AdminError(f"{path}: at most one application can be quick_access; found {quick[0]!r} and {quick[1]!r}")
    return desired


def _server_segments(app: dict[str, Any]) -> tuple[Any, ...]:
    from control.store.segments import ports_from_text
    from dataplane.contract.apps import Segment

    return tuple(Segment(app=app["name"], destination=s["destination"], kind=s["kind"],
                         ports=ports_from_text(s["ports"]), protocol=s["protocol"]) for s in app["segments"])


def _check_final_state(path: str, desired: list[Desired], kept: list[dict[str, Any]]) -> None:
    """Refuse a final state the control plane would refuse: overlapping per-app segments, two quick-access apps."""
    from control.store.segments import OverlapIndex, describe

    quick = [a["name"] for a in kept if a["kind"] == "quick_access"] + [d.name for d in desired
                                                                       if d.kind == "quick_access"]
    if len(quick) > 1:
        raise AdminError(f"{path}: app {quick[1]!r} would be a second quick access application next to "
                         f"{quick[0]!r}, which the file does not name (delete it, or apply with --prune)")
    kept_names = {a["name"] for a in kept}
    placed: list[Any] = []
    apps = [(a["name"], _server_segments(a)) for a in kept if a["kind"] == "per_app"]
    apps += [(d.name, d.parsed) for d in desired if d.kind == "per_app"]
    for name, segments in apps:
        index = OverlapIndex(placed)
        for segment in segments:
            other = index.first_overlap(segment)
            if other is not None:
                hint = (" (which is not in the file and is kept; --prune would delete it)"
                        if other.app in kept_names else "")
                raise AdminError(f"{path}: segment {describe(segment)} of app {name!r} overlaps segment "
                                 f"{describe(other)} of app {other.app!r}{hint}")
        placed.extend(segments)


def make_plan(path: str, desired: list[Desired], current: list[dict[str, Any]], groups: set[str],
              prune: bool) -> tuple[list[Step], list[str]]:
    """(steps in file order then deletions, names of applications kept although the file omits them)."""
    by_name = {a["name"]: a for a in current}
    wanted = {d.name for d in desired}
    steps: list[Step] = []
    for d in desired:
        if d.group not in groups:
            raise AdminError(f"{path}: app {d.name!r}: connector group {d.group!r} does not exist on the control "
                             f"plane (create it with `ferryman admin groups create {d.group}`)")
        body_segments = [{"destination": k[0], "ports": k[1], "protocol": k[2]} for k in d.segments]
        app = by_name.get(d.name)
        if app is None:
            count = f"{len(d.segments)} segment" + ("" if len(d.segments) == 1 else "s")
            extra = ", quick access" if d.kind == "quick_access" else ""
            steps.append(Step(d.name, "create", [f"group {d.group}, {count}{extra}"],
                              {"name": d.name, "kind": d.kind, "connector_group": d.group,
                               "segments": body_segments}, d))
            continue
        if app["kind"] != d.kind:
            raise AdminError(f"{path}: app {d.name!r} is {app['kind']} on the control plane but {d.kind} in the "
                             f"file, and an application's kind cannot change: delete it first "
                             f"(`ferryman admin apps delete {d.name}`)")
        changes: list[str] = []
        body: dict[str, Any] = {}
        if app["connector_group"] != d.group:
            changes.append(f"group {app['connector_group']} -> {d.group}")
            body["connector_group"] = d.group
        now: tuple[SegmentKey, ...] = tuple((s["destination"], s["ports"], s["protocol"]) for s in app["segments"])
        if now != d.segments:
            added = [k for k in d.segments if k not in now]
            removed = [k for k in now if k not in d.segments]
            parts = [f"+{_seg_key_text(k)}" for k in added] + [f"-{_seg_key_text(k)}" for k in removed]
            changes.append("segments " + (" ".join(parts) if parts else "reordered"))
            body["segments"] = body_segments
        if body:
            steps.append(Step(d.name, "update", changes, body, d, app))
        else:
            steps.append(Step(d.name, "unchanged", desired=d, current=app))
    others = [a for a in current if a["name"] not in wanted]
    if prune:
        steps += [Step(a["name"], "delete", current=a) for a in others]
        kept = []
    else:
        kept = others
    _check_final_state(path, desired, kept)
    return steps, [a["name"] for a in kept]


@dataclass
class Call:
    """One API call of the execution."""

    method: str
    path: str
    body: dict[str, Any] | None
    step: Step
    note: str = ""


def schedule(steps: list[Step], current: list[dict[str, Any]]) -> list[Call]:
    """The API calls: deletions, then updates (ordered so that no update collides with an
    application not yet updated; a swap is broken by narrowing first), then creations."""
    from control.store.segments import OverlapIndex, canonical_ports

    calls = [Call("DELETE", f"/v1/applications/{_quote(s.name)}", None, s) for s in steps if s.action == "delete"]
    deleted = {s.name for s in steps if s.action == "delete"}
    # Per-app segments on the control plane as the calls go.
    state = {a["name"]: _server_segments(a) for a in current if a["kind"] == "per_app" and a["name"] not in deleted}
    pending = [s for s in steps if s.action == "update"]
    narrowed: set[str] = set()

    def collides(step: Step) -> bool:
        assert step.desired is not None
        if step.desired.kind != "per_app" or "segments" not in (step.body or {}):
            return False
        index = OverlapIndex(seg for name, segs in state.items() if name != step.name for seg in segs)
        return any(index.first_overlap(seg) is not None for seg in step.desired.parsed)

    while pending:
        ready = next((s for s in pending if not collides(s)), None)
        if ready is not None:
            pending.remove(ready)
            calls.append(Call("PATCH", f"/v1/applications/{_quote(ready.name)}", ready.body, ready))
            if ready.desired is not None and ready.desired.kind == "per_app":
                state[ready.name] = ready.desired.parsed
            continue
        # Every pending update collides with another's current segments: narrow one to what it keeps.
        step = next((s for s in pending if s.name not in narrowed), None)
        if step is None:  # cannot happen for a checked final state; let the control plane say why
            calls += [Call("PATCH", f"/v1/applications/{_quote(s.name)}", s.body, s) for s in pending]
            break
        assert step.desired is not None
        narrowed.add(step.name)
        keep = [seg for seg in state.get(step.name, ()) if seg in step.desired.parsed]
        calls.append(Call("PATCH", f"/v1/applications/{_quote(step.name)}",
                          {"segments": [{"destination": s.destination, "ports": canonical_ports(s.ports),
                                         "protocol": s.protocol} for s in keep]},
                          step, "narrowed first, to make room for segments moving between applications"))
        state[step.name] = tuple(keep)
    calls += [Call("POST", "/v1/applications", s.body, s) for s in steps if s.action == "create"]
    return calls


def _plan_text(path: str, base_url: str, steps: list[Step], kept: list[str]) -> str:
    lines = [f"plan for {path} against {base_url}:"]
    if steps:
        width = max(len(s.name) for s in steps)
        for s in steps:
            detail = "; ".join(s.changes)
            lines.append(f"  {s.action:<9}  {s.name.ljust(width)}  {detail}".rstrip())
    else:
        lines.append("  (no applications in the file or on the control plane)")
    if kept:
        lines.append(f"not in the file, kept (--prune deletes them): {', '.join(kept)}")
    return "\n".join(lines)


def _counts(steps: list[Step]) -> str:
    total = {a: sum(1 for s in steps if s.action == a) for a in ("create", "update", "delete", "unchanged")}
    return (f"{total['create']} to create, {total['update']} to update, {total['delete']} to delete, "
            f"{total['unchanged']} unchanged")


def cmd_apply(ctx: Ctx, args: argparse.Namespace) -> int:
    client = ctx.client
    desired = load_desired(args.file)  # a file that fails validation stops here, before any call
    current = client.json("GET", "/v1/applications")
    groups = {g["name"] for g in client.json("GET", "/v1/connector-groups")}
    steps, kept = make_plan(args.file, desired, current, groups, args.prune)
    calls = schedule(steps, current)
    changing = [s for s in steps if s.action != "unchanged"]
    report: dict[str, Any] = {
        "file": args.file, "control": client.base_url, "dry_run": args.dry_run, "prune": args.prune,
        "plan": [{"name": s.name, "action": s.action, "changes": s.changes} for s in steps],
        "kept": kept, "calls_made": 0,
    }
    if not ctx.json:
        print(_plan_text(args.file, client.base_url, steps, kept))
    if args.dry_run or not changing:
        if ctx.json:
            print(msgspec.json.format(msgspec.json.encode(report), indent=2).decode())
        elif not changing:
            print(f"the control plane already matches {args.file}: nothing to do")
        else:
            print(f"dry run: nothing changed ({_counts(steps)})")
        return 0
    done = 0
    for call in calls:
        try:
            client.call(call.method, call.path, call.body)
        except AdminError as exc:
            what = {"DELETE": "deleting", "PATCH": "updating", "POST": "creating"}[call.method]
            raise AdminError(f"{what} app {call.step.name!r}: {exc} (apply stopped after {done} of {len(calls)} "
                             f"changes; fix the cause and run it again)", exc.status) from None
        done += 1
        if not ctx.json and call.note:
            print(f"  ({call.step.name}: {call.note})")
    report["calls_made"] = done
    if ctx.json:
        print(msgspec.json.format(msgspec.json.encode(report), indent=2).decode())
    else:
        counts = {a: sum(1 for s in steps if s.action == a) for a in ("create", "update", "delete", "unchanged")}
        print(f"applied: {counts['create']} created, {counts['update']} updated, {counts['delete']} deleted, "
              f"{counts['unchanged']} unchanged")
    return 0


# ---------------------------------------------------------------------------- parser


def _global_options(parser: argparse.ArgumentParser, *, in_subcommand: bool) -> None:
    """The connection and output options; accepted before or after the command words."""
    default: Any = argparse.SUPPRESS if in_subcommand else None
    parser.add_argument("--control", metavar="URL", default=default,
                        help="control plane URL (default: http://FERRYMAN_CONTROL_LISTEN)")
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

    def group(name: str, help_: str) -> Any:
        p = resources.add_parser(name, help=help_, description=help_, parents=[common])
        return p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def leaf(subs: Any, name: str, help_: str, func: Callable[[Ctx, argparse.Namespace], int]
             ) -> argparse.ArgumentParser:
        p = subs.add_parser(name, help=help_, description=help_, parents=[common])
        p.set_defaults(func=func)
        return p

    apps = group("apps", "applications")
    leaf(apps, "list", "list applications", cmd_apps_list)
    leaf(apps, "show", "show an application and its segments (with their ids)", cmd_apps_show).add_argument("name")
    p = leaf(apps, "create", "create an application", cmd_apps_create)
    p.add_argument("name")
    p.add_argument("--group", default=None, help="connector group (default: the default group)")
    p.add_argument("--quick-access", action="store_true",
                   help="the quick access application (at most one; may overlap per-app segments)")
    p.add_argument("--segment", action="append", default=[], type=parse_segment, metavar="DEST:PORTS[/PROTO]",
                   help="a segment, e.g. 10.20.0.0/16:22,3389 or *.corp.example:443/tcp (repeatable)")
    leaf(apps, "delete", "delete an application", cmd_apps_delete).add_argument("name")

    segments = group("segments", "segments of an application")
    p = leaf(segments, "add", "add a segment to an application", cmd_segments_add)
    p.add_argument("app")
    p.add_argument("segment", type=parse_segment, metavar="DEST:PORTS[/PROTO]")
    p = leaf(segments, "remove", "remove a segment (ids: `apps show APP`)", cmd_segments_remove)
    p.add_argument("app")
    p.add_argument("segment_id", type=int, metavar="SEGMENT_ID")

    groups = group("groups", "connector groups")
    leaf(groups, "list", "list connector groups", cmd_groups_list)
    p = leaf(groups, "create", "create a connector group", cmd_groups_create)
    p.add_argument("name")
    p.add_argument("--region", default="", help="free-form region label")

    connectors = group("connectors", "registered connectors")
    leaf(connectors, "list", "list connectors", cmd_connectors_list)
    leaf(connectors, "show", "show a connector", cmd_connectors_show).add_argument("id")
    p = leaf(connectors, "revoke", "revoke a connector's certificates (edges cut its tunnels)", cmd_connectors_revoke)
    p.add_argument("id")
    p.add_argument("--reason", default="", help="why (kept in the revocation list and the audit log)")

    edges = group("edges", "registered edges")
    leaf(edges, "list", "list edges", cmd_edges_list)
    leaf(edges, "show", "show an edge", cmd_edges_show).add_argument("id")
    p = leaf(edges, "revoke", "revoke an edge's certificates", cmd_edges_revoke)
    p.add_argument("id")
    p.add_argument("--reason", default="", help="why (kept in the revocation list and the audit log)")

    certs = group("certs", "certificates: client certificates, revocation by serial")
    p = leaf(certs, "client", "issue a client certificate: key and CSR made here, signed by the control plane",
             cmd_certs_client)
    p.add_argument("name", help="client (device) name, its certificate's CN")
    p.add_argument("--dir", required=True, help="where to write NAME.key (0600), NAME.pem and ca.pem")
    p.add_argument("--days", type=int, default=None, help="lifetime in days (default: the control plane's)")
    p = leaf(certs, "revoke", "revoke one certificate by serial (hex)", cmd_certs_revoke)
    p.add_argument("serial")
    p.add_argument("--reason", default="", help="why (kept in the revocation list and the audit log)")
    leaf(certs, "revoked", "list revoked certificates", cmd_certs_revoked)

    dns = group("dns", "private DNS suffixes")
    leaf(dns, "list", "list private DNS suffixes", cmd_dns_list)
    leaf(dns, "add", "add a private DNS suffix", cmd_dns_add).add_argument("suffix")
    leaf(dns, "remove", "remove a private DNS suffix", cmd_dns_remove).add_argument("suffix")

    profile = group("profile", "the forwarding profile client agents follow (fail mode)")
    leaf(profile, "show", "show the forwarding profile's fail mode", cmd_profile_show)
    leaf(profile, "set", "set the fail mode", cmd_profile_set).add_argument(
        "--fail-mode", required=True, choices=["closed", "open"],
        help="closed: refuse private destinations while no edge is reachable; open: dial them directly")

    tokens = group("tokens", "one-time node registration tokens")
    p = leaf(tokens, "create", "issue a registration token (shown once)", cmd_tokens_create)
    p.add_argument("--role", required=True, choices=["connector", "edge"])
    p.add_argument("--group", default=None, help="connector group of the connector (default: the default group)")
    p.add_argument("--ttl", type=parse_duration, default=86400, metavar="DURATION",
                   help="lifetime: 3600, 30m, 1h, 7d ... (default 24h)")
    leaf(tokens, "list", "list registration tokens (never the tokens themselves)", cmd_tokens_list)

    keys = group("keys", "admin API keys")
    leaf(keys, "list", "list admin keys", cmd_keys_list)
    leaf(keys, "create", "create an admin key (shown once)", cmd_keys_create).add_argument("name")
    leaf(keys, "revoke", "revoke an admin key", cmd_keys_revoke).add_argument("name")

    assignments = group("assignments", "who an application is assigned to (users and groups)")
    leaf(assignments, "list", "list the users and groups an application is assigned to",
         cmd_assignments_list).add_argument("app")
    for name, help_, func in (("add", "assign an application to a user or a group", cmd_assignments_add),
                              ("remove", "remove an assignment", cmd_assignments_remove)):
        p = leaf(assignments, name, help_, func)
        p.add_argument("app")
        target = p.add_mutually_exclusive_group(required=True)
        target.add_argument("--user", default=None, metavar="USER", help="a user id or UPN")
        target.add_argument("--group", default=None, metavar="GROUP", help="a user group id or name")

    locations = group("locations", "named locations (source networks for policy conditions)")
    leaf(locations, "list", "list named locations", cmd_locations_list)
    p = leaf(locations, "create", "create a named location", cmd_locations_create)
    p.add_argument("name")
    p.add_argument("cidrs", nargs="+", metavar="CIDR", help="networks or addresses: 10.0.0.0/8 2001:db8::/32 ...")
    p = leaf(locations, "update", "replace a named location's networks and/or rename it", cmd_locations_update)
    p.add_argument("name")
    p.add_argument("cidrs", nargs="*", metavar="CIDR", help="the new networks (replace all; none: unchanged)")
    p.add_argument("--rename", default=None, metavar="NEW", help="new name (carried into the policies using it)")
    leaf(locations, "delete", "delete a named location (refused while a policy uses it)",
         cmd_locations_delete).add_argument("name")

    policies = group("policies", "conditional-access policies")
    leaf(policies, "list", "list policies", cmd_policies_list)
    leaf(policies, "show", "show a policy", cmd_policies_show).add_argument("name")

    def policy_flags(p: argparse.ArgumentParser, *, create: bool) -> None:
        p.add_argument("name")
        if not create:
            p.add_argument("--rename", default=None, metavar="NEW", help="new name")
        p.add_argument("--grant", choices=POLICY_GRANTS, required=create, default=None,
                       help="what the policy demands when it applies")
        p.add_argument("--state", choices=POLICY_STATES, default="on" if create else None,
                       help="on (enforced), off, report_only (logged, never denies)" + (" (default on)" if create
                                                                                          else ""))
        replaces = "" if create else "; replaces the list"
        p.add_argument("--app", action="append", default=[], metavar="APP",
                       help=f"target application (repeatable; none: every application{replaces})")
        p.add_argument("--user", action="append", default=[], metavar="USER",
                       help=f"target user id or UPN (repeatable; no --user/--group: everyone{replaces})")
        p.add_argument("--group", action="append", default=[], metavar="GROUP",
                       help=f"target user group id or name (repeatable{replaces})")
        if not create:
            p.add_argument("--all-apps", action="store_true", help="target every application")
            p.add_argument("--all-users", action="store_true", help="target every user (no user or group list)")
            p.add_argument("--clear-conditions", action="store_true",
                           help="drop every condition not given in this command (default: keep them)")
        p.add_argument("--location", action="append", default=[], metavar="LOCATION",
                       help="condition: the source is in this named location (repeatable)")
        p.add_argument("--device-os", action="append", default=[], metavar="OS",
                       help="condition: the device's OS is this one, e.g. Windows (repeatable)")
        p.add_argument("--risk-at-least", choices=RISK_LEVELS, default=None,
                       help="condition: the user's risk level is this or higher")
        p.add_argument("--signin-older-than", type=parse_duration, default=None, metavar="DURATION",
                       help="condition: the sign-in is older than this (3600, 30m, 12h, 7d ...)")

    policy_flags(leaf(policies, "create", "create a policy", cmd_policies_create), create=True)
    policy_flags(leaf(policies, "update", "change a policy (only what is given)", cmd_policies_update), create=False)
    leaf(policies, "delete", "delete a policy", cmd_policies_delete).add_argument("name")

    users = group("users", "users (named by id or UPN)")
    leaf(users, "list", "list users", cmd_users_list)
    leaf(users, "show", "show a user", cmd_users_show).add_argument("user", metavar="USER", help="id or UPN")
    p = leaf(users, "create", "create a user", cmd_users_create)
    p.add_argument("upn", metavar="UPN", help="user principal name, e.g. alice@corp.example")
    p.add_argument("--name", default=None, metavar="DISPLAY", help="display name")
    p.add_argument("--password-stdin", action="store_true",
                   help="set a password: read from the first line of standard input, or typed at a hidden prompt "
                        "when it is a terminal (none: the user cannot sign in until one is set)")
    p = leaf(users, "update", "change a user (only what is given)", cmd_users_update)
    p.add_argument("user", metavar="USER", help="id or UPN")
    p.add_argument("--rename", default=None, metavar="UPN", help="new UPN")
    p.add_argument("--name", default=None, metavar="DISPLAY", help="new display name")
    p.add_argument("--risk", choices=USER_RISK_LEVELS, default=None, help="risk level (for policy conditions)")
    state = p.add_mutually_exclusive_group()
    state.add_argument("--disable", dest="disabled", action="store_const", const=True, default=None,
                       help="refuse sign-in and refreshes")
    state.add_argument("--enable", dest="disabled", action="store_const", const=False, help="allow sign-in again")
    p.add_argument("--password-stdin", action="store_true",
                   help="set a new password: read from the first line of standard input, or typed at a hidden "
                        "prompt when it is a terminal")
    leaf(users, "delete", "delete a user with its devices (revoked), sessions and memberships",
         cmd_users_delete).add_argument("user", metavar="USER", help="id or UPN")
    leaf(users, "reset-totp", "remove a user's TOTP second factor and recovery codes (e.g. a lost phone)",
         cmd_users_reset_totp).add_argument("user", metavar="USER", help="id or UPN")
    leaf(users, "sessions", "list a user's sign-in sessions, newest first",
         cmd_users_sessions).add_argument("user", metavar="USER", help="id or UPN")

    user_groups = group("user-groups", "user groups (named by id or name)")
    leaf(user_groups, "list", "list user groups", cmd_user_groups_list)
    leaf(user_groups, "create", "create a user group", cmd_user_groups_create).add_argument("name")
    p = leaf(user_groups, "rename", "rename a user group", cmd_user_groups_rename)
    p.add_argument("group", metavar="GROUP", help="id or name")
    p.add_argument("new_name", metavar="NEW")
    leaf(user_groups, "delete", "delete a user group with its memberships and application assignments",
         cmd_user_groups_delete).add_argument("group", metavar="GROUP", help="id or name")
    leaf(user_groups, "members", "list a user group's members",
         cmd_user_groups_members).add_argument("group", metavar="GROUP", help="id or name")
    for name, help_, func in (("add-member", "add a user to a user group", cmd_user_groups_add_member),
                              ("remove-member", "remove a user from a user group", cmd_user_groups_remove_member)):
        p = leaf(user_groups, name, help_, func)
        p.add_argument("group", metavar="GROUP", help="id or name")
        p.add_argument("user", metavar="USER", help="id or UPN")

    devices = group("devices", "users' registered devices")
    p = leaf(devices, "list", "list devices, oldest first", cmd_devices_list)
    p.add_argument("--user", default=None, metavar="USER", help="only this user's (id or UPN)")
    leaf(devices, "show", "show a device", cmd_devices_show).add_argument("id")
    p = leaf(devices, "update", "set a device's compliance, OS and/or name (only what is given)", cmd_devices_update)
    p.add_argument("id")
    p.add_argument("--compliant", choices=("yes", "no"), default=None, help="compliant (for policy conditions)")
    p.add_argument("--os", default=None, metavar="OS", help="operating system, e.g. Windows")
    p.add_argument("--os-version", default=None, metavar="VERSION", help="operating system version")
    p.add_argument("--name", default=None, help="device name")
    p = leaf(devices, "revoke", "revoke a device: its certificate and live sessions", cmd_devices_revoke)
    p.add_argument("id")
    p.add_argument("--reason", default="", help="why (kept in the audit log)")

    sessions = group("sessions", "sign-in sessions (a user's: `users sessions USER`)")
    leaf(sessions, "show", "show a sign-in session", cmd_sessions_show).add_argument("id")
    p = leaf(sessions, "revoke", "end a session: its refresh token stops working, edges refuse its access tokens",
             cmd_sessions_revoke)
    p.add_argument("id")
    p.add_argument("--reason", default="", help="why (kept in the audit log)")

    p = resources.add_parser("logs", help="traffic log records, newest first",
                             description="Traffic log records, newest first; --export writes every matching record "
                                         "as JSON Lines, oldest first.", parents=[common])
    p.set_defaults(func=cmd_logs)
    since_help = "2024-05-01T12:00:00Z, 2024-05-01, or a duration back (1h, 2d)"
    p.add_argument("--since", type=parse_since, default=None, metavar="TIME",
                   help=f"records that started at or after TIME: {since_help}")
    p.add_argument("--until", type=parse_since, default=None, metavar="TIME",
                   help="records that started before TIME (same forms)")
    p.add_argument("--user", default=None, metavar="USER", help="only this user's (UPN or id)")
    p.add_argument("--app", default=None, metavar="APP", help="only this application's")
    p.add_argument("--action", choices=TRAFFIC_ACTIONS, default=None,
                   help="only allowed, denied or report-only (allowed, a report-only policy would have denied) flows")
    p.add_argument("--connector", default=None, metavar="CONNECTOR", help="only through this connector (name or id)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help=f"at most N records (default {DEFAULT_LOG_LIMIT})")
    p.add_argument("--export", default=None, metavar="FILE|-",
                   help="write every matching record as JSON Lines (oldest first) to FILE, or to standard output "
                        "with -")

    discovery = group("discovery", "destinations used through quick access (candidates for per-app applications)")
    p = leaf(discovery, "list", "list destinations used through quick access, busiest first", cmd_discovery_list)
    p.add_argument("--since", type=parse_since, default=None, metavar="TIME",
                   help=f"only flows that started at or after TIME: {since_help}")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="at most N destinations (1-1000, default 500)")
    p = leaf(discovery, "promote", "create a per-app application for a discovered destination", cmd_discovery_promote)
    p.add_argument("name", metavar="NAME", help="the new application's name")
    p.add_argument("destination", metavar="DESTINATION", help="host name, address or network")
    p.add_argument("ports", metavar="PORTS", help="e.g. 443 or 80,443 or 8000-8100")
    p.add_argument("--protocol", choices=("tcp", "udp"), default="tcp", help="default tcp")
    p.add_argument("--group", default=None, help="connector group (default: the default group)")

    p = resources.add_parser("audit", help="audit records, newest first", description="audit records, newest first",
                             parents=[common])
    p.set_defaults(func=cmd_audit)
    p.add_argument("--actor", default=None, help="only changes by this actor (an admin key's name, ...)")
    p.add_argument("--type", default=None, metavar="OBJECT_TYPE",
                   help="only this object type (application, segment, connector_group, dns_suffix, ...)")
    p.add_argument("--since", type=parse_since, default=None, metavar="TIME",
                   help="records at or after TIME: 2024-05-01T12:00:00Z, 2024-05-01, or a duration back (1h, 2d)")
    p.add_argument("--limit", type=int, default=100, help="at most this many records (1-1000, default 100)")

    p = resources.add_parser("apply", help="make the control plane's applications match an application file",
                             description="Make the control plane's applications match FILE (JSON or TOML, the "
                                         "data plane's application file format), like `kubectl apply`.",
                             parents=[common])
    p.set_defaults(func=cmd_apply)
    p.add_argument("file", metavar="FILE")
    p.add_argument("--prune", action="store_true", help="delete applications that the file does not name")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
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
            raise _usage("--timeout must be positive")
        url = control_url(args.control)
        key, source = admin_key(args.key, args.key_file)
        return int(args.func(Ctx(Client(url, key, source, args.timeout), args.json), args))
    except AdminError as exc:
        print(f"ferryman admin: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
