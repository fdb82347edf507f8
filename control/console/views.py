"""What each console page shows, read from the store in one transaction (no HTTP here).

Each function takes a read session (and what it needs) and returns the template's context.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from control.store import (
    applications,
    assignments,
    audit,
    certificates,
    connector_groups,
    devices,
    dns_suffixes,
    forwarding_profile,
    named_locations,
    nodes,
    policies,
    registration_tokens,
    sessions,
    totp,
    traffic,
    user_groups,
    users,
)
from control.store.models import Application, ConnectorGroup, Device, SignInSession, TrafficLog, User

from .charts import human, ranked_bars, time_bars

CERT_WARNING = timedelta(days=30)
HOURS = 24
DROPPED_WINDOW = timedelta(hours=HOURS)  # an edge that dropped traffic records within it is an alert
TRAFFIC_PAGE = 100
AUDIT_PAGE = 200
# Every field of a traffic record, in the order the detail view shows them; the list's default columns.
TRAFFIC_FIELDS = ("id", "connection_id", "transaction_id", "start", "end", "duration_ms", "action", "reason_code",
                  "close_reason", "user_id", "upn", "display_name", "device_id", "device_os", "device_os_version",
                  "client_version", "process", "source_ip", "source_port", "local_source_ip", "local_source_port",
                  "destination_fqdn", "destination_ip", "destination_port", "transport", "network", "application",
                  "application_kind", "segment", "policy", "rule", "connector_id", "connector_name",
                  "connector_address", "edge", "relay_edge", "bytes_sent", "bytes_received", "http_method",
                  "http_host", "http_path", "http_status", "http_protocol", "user_agent")
TRAFFIC_COLUMNS = ("start", "upn", "device_id", "destination", "application", "action", "reason_code",
                   "connector_name", "bytes_sent", "bytes_received")
TRAFFIC_CHOICES = ("start", "end", "duration_ms", "upn", "display_name", "user_id", "device_id", "device_os",
                   "device_os_version", "client_version", "process", "source", "local_source",
                   "destination", "transport", "application", "segment", "policy", "rule", "action", "reason_code",
                   "connector_name", "connector_id", "edge", "bytes_sent", "bytes_received", "close_reason")


def _cert_days(not_after: datetime | None, now: datetime) -> int | None:
    return None if not_after is None else (not_after - now).days


def node_rows(session: Session, heartbeat: float, now: datetime) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Connectors and edges as the pages show them (status, certificate expiry, revoked)."""
    revoked = certificates.revoked_serials(session)

    def row(n: Any, role: str) -> dict[str, Any]:
        return {"role": role, "id": n.id, "name": n.name, "status": n.status(now, heartbeat), "version": n.version,
                "external_addr": n.external_addr, "internal_addr": n.internal_addr, "last_seen": n.last_seen,
                "tunnels": n.tunnels, "active_flows": n.active_flows, "config_version": n.config_version,
                "cert_not_after": n.cert_not_after, "cert_days": _cert_days(n.cert_not_after, now),
                "revoked": n.cert_serial in revoked, "group": getattr(getattr(n, "group", None), "name", ""),
                "address": getattr(n, "address", ""), "records_dropped": getattr(n, "records_dropped", 0) or 0,
                "records_dropped_at": getattr(n, "records_dropped_at", None)}

    return ([row(c, "connector") for c in nodes.list_connectors(session)],
            [row(e, "edge") for e in nodes.list_edges(session)])


def overview(session: Session, heartbeat: float, now: datetime) -> dict[str, Any]:
    """Health of the fabric, the last 24 hours of traffic as charts, and the alerts."""
    connectors, edges = node_rows(session, heartbeat, now)
    since = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=HOURS - 1)
    flows = [0] * HOURS
    volume = [0] * HOURS
    denied = [0] * HOURS
    apps: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    bytes_in = bytes_out = 0
    # Two passes over the period's records, grouped in the database (no row comes to Python).
    bounds = [since + timedelta(hours=i + 1) for i in range(HOURS - 1)]
    bucket = case(*[(TrafficLog.start < b, i) for i, b in enumerate(bounds)], else_=HOURS - 1)
    for i, action, app, reason, n, sent, received in session.execute(
            select(bucket, TrafficLog.action, TrafficLog.application, TrafficLog.reason_code, func.count(),
                   func.sum(TrafficLog.bytes_sent), func.sum(TrafficLog.bytes_received))
            .where(TrafficLog.start >= since)
            .group_by(bucket, TrafficLog.action, TrafficLog.application, TrafficLog.reason_code)):
        if action == "deny":
            denied[i] += n
            reasons[reason or "(none)"] += n
        else:
            flows[i] += n
            apps[app or "(none)"] += n
        sent, received = int(sent or 0), int(received or 0)
        volume[i] += sent + received
        bytes_in += received
        bytes_out += sent
    active_users, active_devices = session.execute(
        select(func.count(func.distinct(case((TrafficLog.user_id != "", TrafficLog.user_id)))),
               func.count(func.distinct(case((TrafficLog.device_id != "", TrafficLog.device_id)))))
        .where(TrafficLog.start >= since)).one()
    labels = [(since + timedelta(hours=i)).strftime("%H:00") for i in range(HOURS)]
    top_apps = apps.most_common(8)
    top_denied = reasons.most_common(8)
    alerts: list[tuple[str, str]] = []
    for n in connectors + edges:
        if n["revoked"]:
            continue
        if n["status"] != "active":
            alerts.append(("warn", f"{n['role']} {n['name']} is inactive (last heartbeat: "
                                   f"{n['last_seen'] or 'never'})"))
        if n["cert_days"] is not None and n["cert_not_after"] - now < CERT_WARNING:
            alerts.append(("warn", f"{n['role']} {n['name']}'s certificate expires in {n['cert_days']} days"))
        dropped_at = n["records_dropped_at"]
        if dropped_at is not None and now - dropped_at < DROPPED_WINDOW:
            alerts.append(("warn", f"{n['role']} {n['name']} dropped traffic records: {n['records_dropped']} in all, "
                                   f"the latest reported {dropped_at:%Y-%m-%d %H:%M:%S} UTC (its queue, "
                                   f"FERRYMAN_TRAFFIC_QUEUE, filled while the control plane was unreachable)"))
    for d in session.scalars(select(Device).where(Device.revoked_at.is_(None), Device.cert_not_after.is_not(None),
                                                  Device.cert_not_after < now + CERT_WARNING)).all():
        alerts.append(("warn", f"device {d.name or d.id}'s certificate expires on {d.cert_not_after:%Y-%m-%d}"))
    live = [n for n in connectors + edges if not n["revoked"]]
    return {
        "edges_up": sum(1 for e in edges if e["status"] == "active" and not e["revoked"]),
        "edges_total": sum(1 for e in edges if not e["revoked"]),
        "connectors_up": sum(1 for c in connectors if c["status"] == "active" and not c["revoked"]),
        "connectors_total": sum(1 for c in connectors if not c["revoked"]),
        "active_flows": sum(n["active_flows"] for n in live if n["role"] == "edge" and n["status"] == "active"),
        "active_users": active_users, "active_devices": active_devices,
        "flows_24h": sum(flows), "denied_24h": sum(denied), "bytes_in": human(bytes_in, "B"),
        "bytes_out": human(bytes_out, "B"),
        "users": int(session.scalar(select(func.count()).select_from(User)) or 0),
        "devices": int(session.scalar(select(func.count()).select_from(Device).where(Device.revoked_at.is_(None)))
                       or 0),
        "flows_chart": time_bars("flows per hour, last 24 h", list(zip(labels, flows, strict=True)), per_second=3600),
        "bytes_chart": time_bars("bytes per hour, last 24 h", list(zip(labels, volume, strict=True)), unit="B",
                                 per_second=3600, css="bar bytes"),
        "denied_chart": time_bars("denied attempts per hour, last 24 h", list(zip(labels, denied, strict=True)),
                                  css="bar deny"),
        "apps_chart": ranked_bars("top applications by flows, last 24 h", top_apps),
        "reasons_chart": ranked_bars("top reasons for denied attempts, last 24 h", top_denied, css="bar deny"),
        "alerts": alerts,
    }


def applications_page(session: Session) -> dict[str, Any]:
    return {"apps": applications.list_applications(session),
            "groups": connector_groups.list_groups(session)}


def application_page(session: Session, name: str) -> dict[str, Any]:
    app = applications.get_application(session, name)
    return {"app": app, "assignments": assignments.list_assignments(session, app.name),
            "groups": connector_groups.list_groups(session), "users": users.list_users(session),
            "user_groups": user_groups.list_user_groups(session)}


def connectors_page(session: Session, heartbeat: float, now: datetime) -> dict[str, Any]:
    connectors, _edges = node_rows(session, heartbeat, now)
    groups = connector_groups.list_groups(session)
    by_group: dict[str, list[str]] = {}
    for name, group in session.execute(select(Application.name, ConnectorGroup.name)
                                       .join(ConnectorGroup, Application.connector_group_id == ConnectorGroup.id)
                                       .order_by(Application.name)):
        by_group.setdefault(group, []).append(name)
    return {"connectors": connectors,
            "groups": [{"name": g.name, "region": g.region, "is_default": g.is_default,
                        "allowed": connector_groups.allowed_addresses(g), "denied": connector_groups.denied_addresses(g),
                        "connectors": sum(1 for c in connectors if c["group"] == g.name and not c["revoked"]),
                        "apps": by_group.get(g.name, [])}
                       for g in groups],
            "tokens": _tokens(session, now)}


def _tokens(session: Session, now: datetime) -> list[dict[str, Any]]:
    out = []
    for t in registration_tokens.list_registration_tokens(session)[:20]:
        state = "used" if t.used_at is not None else "expired" if now >= t.expires_at else "unused"
        out.append({"role": t.role, "group": t.group.name if t.group else "", "created_by": t.created_by,
                    "created_at": t.created_at, "expires_at": t.expires_at, "state": state, "used_by": t.used_by})
    return out


def edges_page(session: Session, heartbeat: float, now: datetime) -> dict[str, Any]:
    _connectors, edges = node_rows(session, heartbeat, now)
    return {"edges": edges, "tokens": [t for t in _tokens(session, now) if t["role"] == "edge"]}


def users_page(session: Session) -> dict[str, Any]:
    people = users.list_users(session)
    device_counts = dict(session.execute(select(Device.user_id, func.count()).where(Device.revoked_at.is_(None))
                                         .group_by(Device.user_id)).all())
    now = datetime.now().astimezone()
    live = dict(session.execute(select(SignInSession.user_id, func.count())
                                .where(SignInSession.revoked_at.is_(None), SignInSession.expires_at > now)
                                .group_by(SignInSession.user_id)).all())
    groups = user_groups.list_user_groups(session)
    return {"users": [{"user": u, "devices": device_counts.get(u.id, 0), "sessions": live.get(u.id, 0)}
                      for u in people],
            "user_groups": [{"group": g, "members": [m.upn for m in user_groups.group_members(session, g.id)]}
                            for g in groups]}


def user_page(session: Session, ref: str, now: datetime) -> dict[str, Any]:
    user = users.get_user(session, ref)
    groups = user_groups.group_names_of(session, users.user_group_ids(session, user.id))
    return {"user": user, "groups": sorted(groups.values()),
            "recovery_left": totp.recovery_codes_left(session, user.id),
            "devices": devices.list_devices(session, user.id),
            "sessions": [{"row": s, "status": sessions.session_status(s, now)}
                         for s in sessions.list_sessions(session, user.id)]}


def devices_page(session: Session) -> dict[str, Any]:
    upns = {u.id: u.upn for u in users.list_users(session)}
    return {"devices": [{"device": d, "upn": upns.get(d.user_id, d.user_id)} for d in devices.list_devices(session)]}


def policies_page(session: Session) -> dict[str, Any]:
    return {"policies": policies.policy_views(session, policies.list_policies(session)),
            "locations": [{"name": loc.name, "cidrs": named_locations.location_cidrs(loc),
                           "created_at": loc.created_at} for loc in named_locations.list_locations(session)]}


def traffic_page(session: Session, f: traffic.TrafficFilter, before: int | None) -> dict[str, Any]:
    rows = traffic.query_records(session, f, limit=TRAFFIC_PAGE + 1, before_id=before)
    more = len(rows) > TRAFFIC_PAGE
    rows = rows[:TRAFFIC_PAGE]
    return {"rows": rows, "next_before": rows[-1].id if more and rows else None}


def traffic_record(session: Session, record_id: int) -> TrafficLog | None:
    return session.get(TrafficLog, record_id)


def discovery_page(session: Session) -> dict[str, Any]:
    return {"found": traffic.discovery(session, None, 200), "groups": connector_groups.list_groups(session)}


def settings_page(session: Session) -> dict[str, Any]:
    return {"suffixes": dns_suffixes.list_dns_suffixes(session),
            "profile": forwarding_profile.forwarding_profile(session)}


def audit_page(session: Session, actor: str | None, object_type: str | None) -> dict[str, Any]:
    rows = audit.list_audit(session, AUDIT_PAGE, object_type or None, actor=actor or None)
    out = []
    for r in rows:
        before, after = r.before or {}, r.after or {}
        keys = sorted(set(before) | set(after))
        changed = [(k, before.get(k), after.get(k)) for k in keys if before.get(k) != after.get(k)]
        out.append({"row": r, "changed": changed})
    return {"records": out}


def test_access_page(session: Session) -> dict[str, Any]:
    people = users.list_users(session)
    upns = {u.id: u.upn for u in people}
    return {"users": people,
            "devices": [{"id": d.id, "name": d.name, "upn": upns.get(d.user_id, "")}
                        for d in devices.list_devices(session) if d.revoked_at is None]}
