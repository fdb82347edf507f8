"""Traffic log records: what an edge reports for every flow and every refused attempt.

``FlowRecord`` has one field per column of the control plane's ``traffic_logs`` table.
An edge fills one in when a flow ends (``action`` ``allow``, or ``report`` when a
report-only policy would have denied it) and when it refuses an OPEN (``deny``); its control
link ships them in batches of at most ``MAX_BATCH`` records and ``MAX_BATCH_BYTES`` of JSON to
``POST /v1/node/traffic``
(``controllink.traffic.TrafficQueue``). No I/O here.
"""

from __future__ import annotations

import ipaddress
import os
import threading
import time
from typing import Annotated, Literal

import msgspec

MAX_BATCH = 2000  # records per request to the control plane
# The largest JSON body of such a request. A record is at most ~200 KB (its text fields are
# bounded), but a batch of large ones would pass this: the control link sends it in parts.
MAX_BATCH_BYTES = 4 << 20


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
    device_os_version: _Text = ""
    client_version: _Text = ""  # the client agent's software, as its HELLO says
    process: _Text = ""  # as the client agent reported it (unverified); the edge bounds and sanitises it
    source_ip: _Text = ""  # the client's public address, as the edge saw its tunnel
    source_port: _Port = 0
    # The address the app used on the user's device, as the client agent reported it in the OPEN
    # (unverified, like ``process``); only an IP address and port are kept.
    local_source_ip: Annotated[str, msgspec.Meta(max_length=64)] = ""
    local_source_port: _Port = 0
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
    relay_edge: _Text = ""  # the peer edge that carried a relayed flow to its connector ("": not relayed)
    bytes_sent: _Count = 0
    bytes_received: _Count = 0
    close_reason: _Text = ""
    # One HTTP transaction of a web app (``application_kind`` ``web``; ``path`` without the query).
    http_method: Annotated[str, msgspec.Meta(max_length=16)] = ""
    http_host: _Text = ""
    http_path: _Text = ""
    http_status: Annotated[int, msgspec.Meta(ge=0, le=999)] = 0
    http_protocol: Annotated[str, msgspec.Meta(max_length=16)] = ""
    user_agent: _Text = ""


def new_connection_id() -> str:
    """A new connection id (a flow's, or a web transaction's): 24 hex digits, the time in
    milliseconds (12) then 48 random bits (12). Ids of one millisecond collide with odds of
    about n²/2⁴⁹, so a connector's replay check never mistakes a new grant for a used one; and
    ids come in time order, so the store's index on them grows at its end, as its time indexes
    do, instead of touching a random page of a large index for every record."""
    return f"{time.time_ns() // 1_000_000:012x}{_random_hex12()}"


_RANDOM_BLOCK = 6 * 512
_random_pool = b""
_random_at = _RANDOM_BLOCK
_random_lock = threading.Lock()


def _random_hex12() -> str:
    """12 hex digits of ``os.urandom``, drawn 3 KiB at a time: one ``getrandom()`` system call
    per 512 ids instead of one per id (an edge makes an id for every web request)."""
    global _random_pool, _random_at
    with _random_lock:
        at = _random_at
        if at >= _RANDOM_BLOCK:
            _random_pool, at = os.urandom(_RANDOM_BLOCK), 0
        _random_at = at + 6
        return _random_pool[at:at + 6].hex()


def _fresh_random_pool() -> None:
    global _random_at, _random_lock
    _random_at = _RANDOM_BLOCK  # a forked child must not hand out its parent's ids again
    _random_lock = threading.Lock()


os.register_at_fork(after_in_child=_fresh_random_pool)


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
