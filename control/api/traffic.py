"""Traffic logs and application discovery in the admin API (admin key required).

- ``GET /v1/traffic``: records newest first, filtered by time range (``since``/``until``,
  RFC 3339), ``user`` (UPN or id), ``app``, ``action``, ``connector`` (name or id);
  ``limit`` per page and ``before`` (a record id) for the next page.
- ``GET /v1/traffic/export``: every matching record as JSON Lines, oldest first, streamed.
- ``GET /v1/discovery``: destinations used through quick access (users, devices, flows,
  bytes, first and last seen), busiest first.
- ``POST /v1/discovery/applications``: make a per-app application for one of them in one
  call (its segment then wins over quick access).

``traffic_retention`` removes records older than the retention period every hour while
the control plane runs.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Annotated, Literal

import anyio.to_thread
import msgspec
from litestar import Router, get, post
from litestar.params import Parameter
from litestar.response import Stream

from control.store import Store, applications, traffic
from control.store.models import TrafficLog, utcnow

from .sweeps import sweep_every
from .guards import Api, admin_routes
from .schemas import ApplicationOut, application_out

log = logging.getLogger("ferryman.control.traffic")

MAX_PAGE = 1000
RETENTION_CHECK = 3600.0  # seconds between retention sweeps


class TrafficRecordOut(msgspec.Struct):
    id: int
    connection_id: str
    transaction_id: str
    start: datetime
    end: datetime | None
    duration_ms: int
    user_id: str
    upn: str
    device_id: str
    device_os: str
    process: str
    source_ip: str
    source_port: int
    destination_ip: str
    destination_port: int
    destination_fqdn: str
    transport: str
    network: str
    application: str
    application_kind: str
    segment: str
    policy: str
    rule: str
    action: str
    reason_code: str
    connector_id: str
    connector_name: str
    connector_address: str
    edge: str
    relay_edge: str
    bytes_sent: int
    bytes_received: int
    close_reason: str
    http_method: str
    http_host: str
    http_path: str
    http_status: int
    http_protocol: str
    user_agent: str
    display_name: str
    device_os_version: str
    client_version: str
    local_source_ip: str
    local_source_port: int


_FIELDS = [f.name for f in msgspec.structs.fields(TrafficRecordOut)]


def record_out(row: TrafficLog) -> TrafficRecordOut:
    return TrafficRecordOut(**{name: getattr(row, name) for name in _FIELDS})


class DiscoveryPromote(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Create per-app application ``name`` for one discovered destination."""

    name: str
    destination: str
    ports: str
    protocol: Literal["tcp", "udp"] = "tcp"
    connector_group: str | None = None


Since = Annotated[datetime | None, Parameter(description="records that started at or after (RFC 3339)")]
Until = Annotated[datetime | None, Parameter(description="records that started before (RFC 3339)")]


def _filter(since: datetime | None, until: datetime | None, user: str | None, app: str | None,
            action: str | None, connector: str | None) -> traffic.TrafficFilter:
    return traffic.TrafficFilter(since=since, until=until, user=user, app=app, action=action, connector=connector)


@get("/traffic", sync_to_thread=True, tags=["traffic"])
def list_traffic(
    api: Api, since: Since = None, until: Until = None, user: str | None = None, app: str | None = None,
    action: Literal["allow", "deny", "report"] | None = None, connector: str | None = None,
    limit: Annotated[int, Parameter(ge=1, le=MAX_PAGE)] = 100, before: Annotated[int | None, Parameter(ge=1)] = None,
) -> list[TrafficRecordOut]:
    """Traffic log records, newest first (``before``: the smallest id of the previous page)."""
    with api.store.read() as session:
        rows = traffic.query_records(session, _filter(since, until, user, app, action, connector), limit=limit,
                                     before_id=before)
        return [record_out(r) for r in rows]


@get("/traffic/export", tags=["traffic"], media_type="application/x-ndjson")
async def export_traffic(
    api: Api, since: Since = None, until: Until = None, user: str | None = None, app: str | None = None,
    action: Literal["allow", "deny", "report"] | None = None, connector: str | None = None,
) -> Stream:
    """Every matching record as JSON Lines (one object per line), oldest first."""
    f = _filter(since, until, user, app, action, connector)
    encoder = msgspec.json.Encoder()

    def page(after: int) -> tuple[list[bytes], int]:
        with api.store.read() as session:
            rows = traffic.records_after(session, f, after, MAX_PAGE)
            return [encoder.encode(record_out(r)) + b"\n" for r in rows], (rows[-1].id if rows else after)

    async def lines() -> AsyncIterator[bytes]:
        after = 0
        while True:
            chunk, after_next = await anyio.to_thread.run_sync(page, after)
            if chunk:
                yield b"".join(chunk)
            if len(chunk) < MAX_PAGE:
                return
            after = after_next

    return Stream(lines(), media_type="application/x-ndjson",
                  headers={"Content-Disposition": 'attachment; filename="traffic.jsonl"'})


@get("/discovery", sync_to_thread=True, tags=["traffic"])
def list_discovery(api: Api, since: Since = None,
                   limit: Annotated[int, Parameter(ge=1, le=MAX_PAGE)] = 500) -> list[traffic.Discovered]:
    """Destinations used through quick access, busiest first (candidates for per-app applications)."""
    with api.store.read() as session:
        return traffic.discovery(session, since, limit)


@post("/discovery/applications", sync_to_thread=True, tags=["traffic"])
def promote_discovered(api: Api, actor: str, data: DiscoveryPromote) -> ApplicationOut:
    """A per-app application for a discovered destination (it then wins over quick access)."""
    with api.store.begin() as session:
        app = applications.create_application(session, actor, data.name, connector_group=data.connector_group,
                                              segments=[{"destination": data.destination, "ports": data.ports,
                                                 "protocol": data.protocol}])
        return application_out(app)


def traffic_router() -> Router:
    return admin_routes([list_traffic, export_traffic, list_discovery, promote_discovered])


async def traffic_retention(store: Store, days: int, interval: float = RETENTION_CHECK) -> None:
    """Delete records older than ``days`` days, now and then every ``interval`` seconds (until cancelled)."""

    def sweep() -> None:
        with store.begin() as session:
            removed = traffic.delete_older_than(session, utcnow() - timedelta(days=days))
        if removed:
            log.info("traffic log retention: %d records older than %d days removed", removed, days)

    await sweep_every(interval, sweep, "traffic log retention")
