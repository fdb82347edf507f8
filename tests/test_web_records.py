"""The edge's traffic record of a web transaction (``webdoor.EdgeWeb._record``).

A ``TransactionRecord`` from the front door becomes a ``FlowRecord`` in the edge's traffic
queue: the client's address splits into ``source_ip`` and ``source_port`` (IPv4 and IPv6),
``network`` follows the address family, and the HTTP fields are carried over.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dataplane.edge import webdoor
from dataplane.edge.web import TransactionRecord

pytestmark = pytest.mark.timeout(30)


class _Queue:
    def __init__(self) -> None:
        self.records: list = []

    def put(self, record) -> None:
        self.records.append(record)


def _convert(source: str):
    queue = _Queue()
    door = SimpleNamespace(edge=SimpleNamespace(records=SimpleNamespace(queue=queue), name="edge-1"),
                           ports={"wiki": 8443})
    webdoor.EdgeWeb._record(door, TransactionRecord(  # noqa: SLF001 - the conversion alone
        time=1_900_000_000.5, app="wiki", host="wiki.corp.example:8443", method="GET", path="/a", status=200,
        bytes_in=3, bytes_out=1024, user_agent="curl/8", duration=0.25, action="allow", code="allowed",
        user_id="u-alice", upn="alice@corp.example", session_id="s-1", source=source, protocol="HTTP/1.1",
        connector="connector-1"))
    (record,) = queue.records
    return record


def test_source_address_family_and_http_fields() -> None:
    r = _convert("198.51.100.7:50123")
    assert (r.source_ip, r.source_port, r.network) == ("198.51.100.7", 50123, "IPv4")
    assert (r.http_method, r.http_path, r.http_status, r.destination_fqdn, r.destination_port) == \
        ("GET", "/a", 200, "wiki.corp.example", 8443)
    assert (r.bytes_sent, r.bytes_received, r.duration_ms, r.start) == (3, 1024, 250, 1_900_000_000.25)
    r = _convert("2001:db8::7:443")
    assert (r.source_ip, r.source_port, r.network) == ("2001:db8::7", 443, "IPv6")
    r = _convert("192.0.2.1:0")  # refused while parsed: no port
    assert (r.source_ip, r.source_port, r.network) == ("192.0.2.1", 0, "IPv4")
