"""``ferryman admin`` commands for what happened: traffic ``logs`` (newest first, filtered;
``--export FILE|-`` streams every matching record as JSON Lines), ``discovery`` (destinations
used through quick access: ``list``, and ``promote`` one to a per-app application) and
``audit`` records.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import msgspec

from .apps import app_detail
from .args import parse_since
from .client import AdminError, SinkError, decode, usage, why_failed
from .commands import Command, Group, arg, shown
from .output import Ctx, host_port, listing, millis_text, segment_text, size_text, when

TRAFFIC_ACTIONS = ("allow", "deny", "report")
TRAFFIC_PAGE = 1000  # the API's largest page (control.api.traffic.MAX_PAGE)
DEFAULT_LOG_LIMIT = 100
_SINCE_HELP = "2024-05-01T12:00:00Z, 2024-05-01, or a duration back (1h, 2d)"

# ---------------------------------------------------------------------------- traffic logs


def _traffic_row(r: dict[str, Any]) -> Sequence[object]:
    destination = host_port(r["destination_fqdn"] or r["destination_ip"], r["destination_port"])
    if r.get("http_method"):  # one HTTP transaction of a web app: what was asked and answered
        target = f"{r['http_method']} https://{r['http_host']}{r['http_path']} {r['http_status']}"
    else:
        target = f"{destination}/{r['transport']}" if destination else ""
    return (when(r["start"]), r["upn"] or r["user_id"], r["device_id"], host_port(r["source_ip"], r["source_port"]),
            target, r["application"], r["action"], r["policy"],
            r["reason_code"], size_text(r["bytes_sent"]), size_text(r["bytes_received"]),
            millis_text(r["duration_ms"]))


_traffic_table = listing("no traffic records", ("TIME", "USER", "DEVICE", "SOURCE", "DESTINATION", "APP", "ACTION",
                                                 "POLICY", "REASON", "SENT", "RECEIVED", "DURATION"), _traffic_row)


def _traffic_filters(args: argparse.Namespace) -> dict[str, Any]:
    if args.since is not None and args.until is not None and \
            datetime.fromisoformat(args.since) >= datetime.fromisoformat(args.until):
        raise usage(f"logs: --since ({when(args.since)}) must be before --until ({when(args.until)})")
    return {"since": args.since, "until": args.until, "user": args.user, "app": args.app, "action": args.action,
            "connector": args.connector}


def logs(ctx: Ctx, args: argparse.Namespace) -> int:
    """``logs``: pages of records up to --limit, or with --export every matching record as JSON Lines."""
    query = _traffic_filters(args)
    if args.export is not None:
        if args.limit is not None:
            raise usage("logs: --limit does not apply to --export, which writes every matching record")
        return _export_traffic(ctx, args.export, query)
    limit = DEFAULT_LOG_LIMIT if args.limit is None else args.limit
    if limit < 1:
        raise usage("logs: --limit must be at least 1")
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
            raise AdminError(f"--export -: cannot write to standard output: {why_failed(error)}") from None
        except AdminError as exc:
            if not written:
                raise
            raise AdminError(f"{exc} (the export stopped after {written} records)", exc.status) from None
        return 0

    special = os.path.exists(target) and not os.path.isfile(target)  # a FIFO, /dev/stdout ...: write to it directly
    try:
        if special:
            fh, partial = open(target, "wb"), None  # noqa: SIM115 - closed below
        else:
            fd, partial = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(target)),
                                           prefix=f".{os.path.basename(target)}.", suffix=".part")
            fh = os.fdopen(fd, "wb")
    except OSError as exc:
        raise AdminError(f"--export {target}: cannot write there: {why_failed(exc)}") from None
    try:
        with fh:
            export(fh.write)
        if partial is not None:
            os.replace(partial, target)
            partial = None
    except SinkError as exc:
        raise AdminError(f"--export {target}: cannot write it: {why_failed(exc.error)}") from None
    except OSError as exc:
        raise AdminError(f"--export {target}: cannot write it: {why_failed(exc)}") from None
    except AdminError as exc:
        raise AdminError(f"{exc} ({target} was not written)", exc.status) from None
    finally:
        if partial is not None:
            try:
                os.unlink(partial)
            except OSError:
                pass
    if ctx.json:
        ctx.print_json({"file": target, "records": written})
    else:
        print(f"exported {written} traffic record{'' if written == 1 else 's'} to {target}")
    return 0


LOGS = Command("logs", "traffic log records, newest first", (
    arg("--since", type=parse_since, default=None, metavar="TIME",
        help=f"records that started at or after TIME: {_SINCE_HELP}"),
    arg("--until", type=parse_since, default=None, metavar="TIME",
        help="records that started before TIME (same forms)"),
    arg("--user", default=None, metavar="USER", help="only this user's (UPN or id)"),
    arg("--app", default=None, metavar="APP", help="only this application's"),
    arg("--action", choices=TRAFFIC_ACTIONS, default=None,
        help="only allowed, denied or report-only (allowed, a report-only policy would have denied) flows"),
    arg("--connector", default=None, metavar="CONNECTOR", help="only through this connector (name or id)"),
    arg("--limit", type=int, default=None, metavar="N", help=f"at most N records (default {DEFAULT_LOG_LIMIT})"),
    arg("--export", default=None, metavar="FILE|-",
        help="write every matching record as JSON Lines (oldest first) to FILE, or to standard output with -"),
), run=logs, description="Traffic log records, newest first; --export writes every matching record as JSON Lines, "
                         "oldest first.")

# ---------------------------------------------------------------------------- discovery


def _promote_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"name": args.name, "destination": args.destination, "ports": args.ports,
                            "protocol": args.protocol}
    if args.group is not None:
        body["connector_group"] = args.group
    return body


DISCOVERY = Group("discovery", "destinations used through quick access (candidates for per-app applications)", (
    Command(
        "list", "list destinations used through quick access, busiest first", (
            arg("--since", type=parse_since, default=None, metavar="TIME",
                help=f"only flows that started at or after TIME: {_SINCE_HELP}"),
            arg("--limit", type=int, default=None, metavar="N", help="at most N destinations (1-1000, default 500)"),
        ), path="/v1/discovery", query=lambda a: {"since": a.since, "limit": a.limit},
        show=shown(listing("no destinations used through quick access",
                           ("DESTINATION", "PORT", "PROTOCOL", "USERS", "DEVICES", "FLOWS", "BYTES", "FIRST SEEN",
                            "LAST SEEN"),
                           lambda d: (d["destination"], d["port"], d["protocol"], d["users"], d["devices"],
                                      d["flows"], size_text(d["bytes"]), when(d["first_seen"]),
                                      when(d["last_seen"]))))),
    Command(
        "promote", "create a per-app application for a discovered destination", (
            arg("name", metavar="NAME", help="the new application's name"),
            arg("destination", metavar="DESTINATION", help="host name, address or network"),
            arg("ports", metavar="PORTS", help="e.g. 443 or 80,443 or 8000-8100"),
            arg("--protocol", choices=("tcp", "udp"), default="tcp", help="default tcp"),
            arg("--group", default=None, help="connector group (default: the default group)"),
        ), method="POST", path="/v1/discovery/applications", body=_promote_body,
        show=shown(lambda app: f"created application {app['name']!r} for "
                               f"{', '.join(segment_text(s) for s in app['segments'])}: it now wins over quick access"
                               f"\n\n{app_detail(app)}")),
))

# ---------------------------------------------------------------------------- audit


def _audit_object(record: dict[str, Any]) -> str:
    state = record["after"] or record["before"] or {}
    label = state.get("name") or state.get("suffix") or state.get("application")
    text = f"{record['object_type']} {record['object_id']}"
    return f"{text} ({label})" if label else text


AUDIT = Command("audit", "audit records, newest first", (
    arg("--actor", default=None, help="only changes by this actor (an admin key's name, ...)"),
    arg("--type", default=None, metavar="OBJECT_TYPE",
        help="only this object type (application, segment, connector_group, dns_suffix, ...)"),
    arg("--since", type=parse_since, default=None, metavar="TIME", help=f"records at or after TIME: {_SINCE_HELP}"),
    arg("--limit", type=int, default=100, help="at most this many records (1-1000, default 100)"),
), path="/v1/audit", query=lambda a: {"actor": a.actor, "object_type": a.type, "since": a.since, "limit": a.limit},
                show=shown(listing("no audit records", ("ID", "TIME", "ACTOR", "ACTION", "OBJECT"),
                                   lambda r: (r["id"], when(r["at"]), r["actor"], r["action"], _audit_object(r)))))
