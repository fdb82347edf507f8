"""Traffic log records: what an edge writes for every flow and every refused attempt.

``FlowRecord`` has one field per column of the control plane's ``traffic_logs`` table.
An edge fills one in when a flow ends (``action`` ``allow``, or ``report`` when a
report-only policy would have denied it) and when it refuses an OPEN (``deny``), and puts
it in its ``TrafficQueue``. The queue is bounded (``FERRYMAN_TRAFFIC_QUEUE`` records): the
data path only ever appends, never waits; when the control plane is unreachable long
enough for the queue to fill, the oldest records are dropped and counted
(``ferryman_traffic_records_dropped_total``). The node's control link ships batches to
``POST /v1/node/traffic`` and puts a batch back at the front when sending fails.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Iterable
from typing import Annotated, Literal

import msgspec

MAX_BATCH = 500  # records per request to the control plane


_Text = Annotated[str, msgspec.Meta(max_length=1024)]
_Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
_Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
_Time = Annotated[float, msgspec.Meta(ge=0, le=32503680000)]  # Unix seconds up to the year 3000


class FlowRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One traffic log record. Times are Unix seconds (float); bytes are counted at the edge,
    ``bytes_sent`` from the client towards the application.

    The bounds are what the control plane accepts (it decodes these records as they come,
    ignoring fields a newer edge adds); text longer than a column is cut when stored.
    """

    connection_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    transaction_id: Annotated[str, msgspec.Meta(max_length=64)]
    start: _Time
    end: _Time | None = None
    duration_ms: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] = 0
    user_id: _Text = ""
    upn: _Text = ""
    device_id: _Text = ""
    device_os: _Text = ""
    process: _Text = ""
    source_ip: _Text = ""
    source_port: _Port = 0
    destination_ip: _Text = ""
    destination_port: _Port = 0
    destination_fqdn: _Text = ""
    transport: _Text = "tcp"
    network: _Text = ""
    application: _Text = ""
    application_kind: _Text = ""
    segment: _Text = ""
    policy: _Text = ""
    rule: _Text = ""
    action: Literal["allow", "deny", "report"] = "allow"
    reason_code: _Text = ""
    connector_id: _Text = ""
    connector_name: _Text = ""
    connector_address: _Text = ""
    edge: _Text = ""
    bytes_sent: _Count = 0
    bytes_received: _Count = 0
    close_reason: _Text = ""


def split_address(text: str) -> tuple[str, int]:
    """``("10.0.0.1", 443)`` from ``"10.0.0.1:443"`` (or ``"[::1]:443"``, ``"::1:443"``); ``("", 0)`` if unusable."""
    host, _, port = text.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return "", 0


def network_of(*addresses: str) -> str:
    """``IPv4`` or ``IPv6`` for the first of ``addresses`` that is an IP address; "" if none is."""
    for address in addresses:
        try:
            return f"IPv{ipaddress.ip_address(address).version}"
        except ValueError:
            continue
    return ""


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class TrafficQueue:
    """The bounded queue between an edge's data path and its control link."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the traffic queue must hold at least 1 record, not {limit}")
        self.limit = limit
        self._records: deque[FlowRecord] = deque()
        self.dropped = 0  # records lost because the queue was full
        self.shipped = 0

    def __len__(self) -> int:
        return len(self._records)

    def put(self, record: FlowRecord) -> None:
        """Append (never blocks); the oldest record is dropped when full."""
        if len(self._records) >= self.limit:
            self._records.popleft()
            self.dropped += 1
        self._records.append(record)

    def take(self, limit: int = MAX_BATCH) -> list[FlowRecord]:
        """Up to ``limit`` of the oldest records, removed from the queue."""
        records = self._records
        return [records.popleft() for _ in range(min(limit, len(records)))]

    def give_back(self, batch: Iterable[FlowRecord]) -> None:
        """Put an unsent batch back in front (what does not fit any more is dropped, oldest first)."""
        batch = list(batch)
        room = self.limit - len(self._records)
        if room < len(batch):
            self.dropped += len(batch) - max(room, 0)
            batch = batch[len(batch) - max(room, 0):]
        self._records.extendleft(reversed(batch))
