"""Micro-benchmark of the control plane storing a batch of traffic records (SQLite).

Run: ``python -m pytest bench/test_traffic_insert_bench.py --benchmark-enable``. Under the
project's default ``--benchmark-disable`` every function still runs once and checks its result.

One round is what ``POST /v1/node/traffic`` does with a full batch: decode 500 web
transaction records from JSON into ``FlowRecord`` structs, insert them in one transaction,
commit. The table holds ``PREFILL`` rows first, as a control plane's does after a while, with
connection ids made as edges make them (``new_connection_id``: in time order) or random (as
they were before): a random id lands on a random page of the index on ``connection_id``,
which costs more the larger the table grows. Measured on the 2-core development machine at
1,000,000 rows: 36 µs of CPU (49 µs wall) per record with random ids, 19 (20) in time order.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from control.store import Store, open_store, traffic
from control.store.models import TrafficLog
from dataplane.contract.flowrecord import MAX_BATCH, FlowRecord, new_connection_id

pytestmark = pytest.mark.timeout(300)

PREFILL = 200_000  # rows in the table before the measured batches

_decode = msgspec.json.Decoder(list[FlowRecord]).decode


def _random_id() -> str:
    return os.urandom(8).hex()


def _batch(make_id: Callable[[], str]) -> bytes:
    """A full batch of web transaction records as an edge sends it (JSON)."""
    now = time.time()
    return msgspec.json.encode([FlowRecord(
        connection_id=make_id(), transaction_id="s" * 43, start=now - 0.002, end=now, duration_ms=2,
        user_id="6f1c2a1e-9b7d-4c55-8e11-0a2b3c4d5e6f", upn="alice@corp.example", source_ip="192.0.2.7",
        source_port=40000 + i, destination_fqdn="wiki.corp.example", destination_port=443, network="IPv4",
        application="wiki", application_kind="web", action="allow", reason_code="allowed",
        connector_name="connector-1", bytes_received=1024, http_method="GET", http_host="wiki.corp.example",
        http_path="/pages/1", http_status=200, user_agent="Mozilla/5.0", http_protocol="HTTP/2")
        for i in range(MAX_BATCH)])


def _store_batch(store: Store, body: bytes) -> int:
    with store.begin() as session:
        return traffic.insert_records(session, "edge-1", _decode(body))


@pytest.fixture(params=["time-ordered", "random"])
def filled(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Store, Callable[[], str]]]:
    make_id = new_connection_id if request.param == "time-ordered" else _random_id
    store = open_store(f"sqlite:///{tmp_path / 'control.db'}")
    try:
        for _ in range(PREFILL // MAX_BATCH):
            _store_batch(store, _batch(make_id))
        yield store, make_id
    finally:
        store.close()


def test_store_a_batch_of_traffic_records(benchmark, filled: tuple[Store, Callable[[], str]]) -> None:
    store, make_id = filled
    stored = benchmark.pedantic(_store_batch, setup=lambda: ((store, _batch(make_id)), {}), rounds=20)
    assert stored == MAX_BATCH
    with store.read() as session:
        rows = session.query(TrafficLog).count()
    assert rows >= PREFILL + MAX_BATCH and rows % MAX_BATCH == 0
