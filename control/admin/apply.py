"""``ferryman admin apply FILE``: make the control plane's applications match an application file.

``apply`` takes the data plane's application file (``dataplane.contract.apps``; each app may also
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

Web apps: a ``[[webapps]]`` table of the same file (``name``, ``external_url``,
``internal_url``, optionally ``connector_group`` and the options of ``POST /v1/webapps``) is
applied the same way: created, updated field by field, unchanged, or (``--prune``) deleted;
fields are checked locally with the nodes' own rules first. Web apps are applications on the
control plane too, but never count as the file's plain applications (no segments).

The control plane's rules are applied with the store's own code (``control.store.segments``),
imported only when ``apply`` runs: the store package loads SQLAlchemy, which no other command
needs.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from .client import AdminError, quote
from .commands import Command, arg
from .output import Ctx, segment_text

APP_KINDS = ("per_app", "quick_access")


SegmentKey = tuple[str, str, str]  # (destination, canonical ports, protocol)


@dataclass
class Desired:
    """One application of the file, validated and in canonical form."""

    name: str
    kind: str
    group: str
    segments: tuple[SegmentKey, ...]
    parsed: tuple[Any, ...]  # dataplane.contract.apps.Segment, ports merged (for overlap checks)


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
        if isinstance(raw, dict) and "webapps" in raw:  # applied by load_webapps
            raw = {k: v for k, v in raw.items() if k != "webapps"}
            raw.setdefault("apps", [])
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
    if table_.connectors is not None:
        raise AdminError(f"{path}: a 'connectors' list is for an edge running from this file without a control "
                         f"plane; the control plane gives each connector its group when it registers "
                         f"(`ferryman admin tokens create --role connector --group GROUP`)")
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


WEBAPP_FIELDS = ("external_url", "internal_url", "connector_group", "preauth", "backend_timeout",
                 "translate_headers", "translate_body", "cookie_http_only", "cookie_persistent", "websocket",
                 "verify_backend", "cors_preflight_bypass", "header_sso", "backend_ca")


def load_webapps(path: str, app_names: set[str]) -> list[dict[str, Any]]:
    """The file's ``[[webapps]]``, each checked (``AdminError`` naming the file, the web app and the field)."""
    from dataplane.contract import apps as apps_mod
    from dataplane.contract.webapps import (
        BACKEND_TIMEOUTS, PREAUTH, WebAppFieldError, check_header_sso, external_endpoint, internal_endpoint,
    )

    try:
        raw = apps_mod.read_file(path)
    except apps_mod.AppsError as exc:
        raise AdminError(str(exc)) from None
    entries = raw.get("webapps", []) if isinstance(raw, dict) else []
    if not isinstance(entries, list):
        raise AdminError(f"{path}: 'webapps' must be a list of tables ([[webapps]])")
    out: list[dict[str, Any]] = []
    hosts: dict[str, str] = {}
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise AdminError(f"{path}: web app {number} is not a table")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise AdminError(f"{path}: web app {number} needs a name")
        label = f"{path}: web app {name.strip()!r}"
        unknown = sorted(set(entry) - {"name", *WEBAPP_FIELDS})
        if unknown:
            raise AdminError(f"{label}: unknown field {unknown[0]!r} (fields: name, {', '.join(WEBAPP_FIELDS)})")
        try:
            authority = external_endpoint(entry.get("external_url")).authority
            internal_endpoint(entry.get("internal_url"))
            if "header_sso" in entry:
                check_header_sso(entry["header_sso"])
        except WebAppFieldError as exc:
            raise AdminError(f"{label}: {exc}") from None
        if entry.get("preauth", "ferryman") not in PREAUTH:
            raise AdminError(f"{label}: preauth must be one of {', '.join(PREAUTH)}")
        if entry.get("backend_timeout", "default") not in BACKEND_TIMEOUTS:
            raise AdminError(f"{label}: backend_timeout must be one of {', '.join(BACKEND_TIMEOUTS)}")
        for key in ("translate_headers", "translate_body", "cookie_http_only", "cookie_persistent", "websocket",
                    "verify_backend", "cors_preflight_bypass"):
            if key in entry and not isinstance(entry[key], bool):
                raise AdminError(f"{label}: {key} must be true or false")
        clean = {**entry, "name": name.strip()}
        if clean["name"] in app_names or any(w["name"] == clean["name"] for w in out):
            raise AdminError(f"{label}: the name is used twice in the file")
        if authority in hosts:
            raise AdminError(f"{label}: external host {authority} is also web app {hosts[authority]!r}'s")
        hosts[authority] = clean["name"]
        out.append(clean)
    return out


def plan_webapps(wanted: list[dict[str, Any]], current: list[dict[str, Any]], prune: bool) -> list[Step]:
    """Create / update (the fields that differ) / unchanged per web app of the file; then deletions."""
    by_name = {w["name"]: w for w in current}
    steps: list[Step] = []
    for w in wanted:
        now = by_name.get(w["name"])
        if now is None:
            steps.append(Step(w["name"], "create", [f"web app {w['external_url']} -> {w['internal_url']}"], w))
            continue
        body = {k: v for k, v in w.items() if k != "name" and now.get(k) != v}
        if body:
            steps.append(Step(w["name"], "update", [f"web app {', '.join(sorted(body))}"], body, current=now))
        else:
            steps.append(Step(w["name"], "unchanged", current=now))
    if prune:
        names = {w["name"] for w in wanted}
        steps += [Step(w["name"], "delete", ["web app"], current=w) for w in current if w["name"] not in names]
    return steps


def webapp_calls(steps: list[Step]) -> list[Call]:
    calls = [Call("DELETE", f"/v1/webapps/{quote(s.name)}", None, s) for s in steps if s.action == "delete"]
    calls += [Call("PATCH", f"/v1/webapps/{quote(s.name)}", s.body, s) for s in steps if s.action == "update"]
    calls += [Call("POST", "/v1/webapps", s.body, s) for s in steps if s.action == "create"]
    return calls


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

    calls = [Call("DELETE", f"/v1/applications/{quote(s.name)}", None, s) for s in steps if s.action == "delete"]
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
            calls.append(Call("PATCH", f"/v1/applications/{quote(ready.name)}", ready.body, ready))
            if ready.desired is not None and ready.desired.kind == "per_app":
                state[ready.name] = ready.desired.parsed
            continue
        # Every pending update collides with another's current segments: narrow one to what it keeps.
        step = next((s for s in pending if s.name not in narrowed), None)
        if step is None:  # cannot happen for a checked final state; let the control plane say why
            calls += [Call("PATCH", f"/v1/applications/{quote(s.name)}", s.body, s) for s in pending]
            break
        assert step.desired is not None
        narrowed.add(step.name)
        keep = [seg for seg in state.get(step.name, ()) if seg in step.desired.parsed]
        calls.append(Call("PATCH", f"/v1/applications/{quote(step.name)}",
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


def _counts(steps: list[Step]) -> dict[str, int]:
    """How many steps of each action."""
    return {a: sum(1 for s in steps if s.action == a) for a in ("create", "update", "delete", "unchanged")}


def apply(ctx: Ctx, args: argparse.Namespace) -> int:
    """``apply FILE``: validate, plan, print the plan, then (unless --dry-run) make the calls."""
    client = ctx.client
    desired = load_desired(args.file)  # a file that fails validation stops here, before any call
    wanted_web = load_webapps(args.file, {d.name for d in desired})
    current_web = client.json("GET", "/v1/webapps")
    web_names = {w["name"] for w in current_web}
    current = [a for a in client.json("GET", "/v1/applications") if a["name"] not in web_names]
    clash = next((d.name for d in desired if d.name in web_names), None)
    if clash is not None:
        raise AdminError(f"{args.file}: app {clash!r} is a web app on the control plane: list it under [[webapps]] "
                         f"(or delete the web app first)")
    clash = next((w["name"] for w in wanted_web if w["name"] in {a["name"] for a in current}), None)
    if clash is not None:
        raise AdminError(f"{args.file}: web app {clash!r} is a plain application on the control plane: delete it "
                         f"first (`ferryman admin apps delete {clash}`)")
    groups = {g["name"] for g in client.json("GET", "/v1/connector-groups")}
    for w in wanted_web:
        if w.get("connector_group", "default") not in groups:
            raise AdminError(f"{args.file}: web app {w['name']!r}: connector group {w['connector_group']!r} does "
                             f"not exist on the control plane")
    steps, kept = make_plan(args.file, desired, current, groups, args.prune)
    calls = schedule(steps, current)
    web_steps = plan_webapps(wanted_web, current_web, args.prune)
    calls += webapp_calls(web_steps)
    steps += web_steps
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
            ctx.print_json(report)
        elif not changing:
            print(f"the control plane already matches {args.file}: nothing to do")
        else:
            total = _counts(steps)
            print(f"dry run: nothing changed ({total['create']} to create, {total['update']} to update, "
                  f"{total['delete']} to delete, {total['unchanged']} unchanged)")
        return 0
    done = 0
    for call in calls:
        try:
            client.call(call.method, call.path, call.body)
        except AdminError as exc:
            what = {"DELETE": "deleting", "PATCH": "updating", "POST": "creating"}[call.method]
            kind = "web app" if call.path.startswith("/v1/webapps") else "app"
            raise AdminError(f"{what} {kind} {call.step.name!r}: {exc} (apply stopped after {done} of {len(calls)} "
                             f"changes; fix the cause and run it again)", exc.status) from None
        done += 1
        if not ctx.json and call.note:
            print(f"  ({call.step.name}: {call.note})")
    report["calls_made"] = done
    if ctx.json:
        ctx.print_json(report)
    else:
        counts = _counts(steps)
        print(f"applied: {counts['create']} created, {counts['update']} updated, {counts['delete']} deleted, "
              f"{counts['unchanged']} unchanged")
    return 0


APPLY = Command("apply", "make the control plane's applications match an application file", (
    arg("file", metavar="FILE"),
    arg("--prune", action="store_true", help="delete applications that the file does not name"),
    arg("--dry-run", action="store_true", help="print the plan, change nothing"),
), run=apply, description="Make the control plane's applications match FILE (JSON or TOML, the data plane's "
                          "application file format), like `kubectl apply`.")
