"""Fields of a traffic record that an edge derives from what a client claims: only well-formed
values are kept, anything else becomes empty rather than reaching the traffic log; and the
connection ids an edge makes for its records and grants."""

from __future__ import annotations

import os
import re
import time

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.contract.flowrecord import FlowRecord, new_connection_id
from dataplane.controllink.traffic import TrafficQueue
from dataplane.edge.records import local_source

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("claimed, expected", [
    ("10.1.2.3:50122", ("10.1.2.3", 50122)),
    ("[fe80::1]:5353", ("fe80::1", 5353)),
    ("127.0.0.1:1", ("127.0.0.1", 1)),
    ("", ("", 0)),
    ("probe", ("", 0)),
    ("dns:wiki.corp.example", ("", 0)),
    ("wiki.corp.example:443", ("", 0)),   # a name is not an address
    ("10.1.2.3:0", ("", 0)),
    ("10.1.2.3:65536", ("", 0)),
    ("10.1.2.3:-5", ("", 0)),
    ("10.1.2.3:", ("", 0)),
    ("<script>:80", ("", 0)),
])
def test_the_apps_local_address_is_kept_only_when_it_is_an_address(claimed: str, expected: tuple[str, int]) -> None:
    assert local_source(claimed) == expected


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_whatever_a_client_claims_makes_a_record_the_control_plane_accepts(claimed: str) -> None:
    ip, port = local_source(claimed)
    record = FlowRecord(connection_id="c1", transaction_id="t1", start=1.0, local_source_ip=ip, local_source_port=port)
    again = msgspec.json.decode(msgspec.json.encode(record), type=FlowRecord)  # validates the bounds
    assert (again.local_source_ip, again.local_source_port) == (ip, port)
    assert (ip == "") == (port == 0)


def test_connection_ids_are_unique_and_come_in_time_order() -> None:
    """Unique (a connector refuses a grant whose connection id it has already honoured), valid
    in a record, and ordered by the millisecond they were made in: the store's index on them
    then grows at its end."""
    ids = [new_connection_id() for _ in range(50_000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{24}", i) for i in ids)
    record = FlowRecord(connection_id=ids[0], transaction_id="t", start=1.0)
    assert msgspec.json.decode(msgspec.json.encode(record), type=FlowRecord) == record  # validates the bounds
    before = new_connection_id()
    time.sleep(0.003)
    after = [new_connection_id() for _ in range(100)]
    assert all(before < later for later in after)
    now_ms = time.time_ns() // 1_000_000
    assert 0 <= now_ms - int(after[-1][:12], 16) < 1000


def test_a_forked_process_does_not_repeat_its_parents_connection_ids() -> None:
    """Ids draw their random part from a pool read ahead from the kernel; an edge's worker
    processes are forked, and a child handing out its parent's next ids would collide with them."""
    new_connection_id()  # the pool is filled and part used
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(write, "".join(new_connection_id()[12:] for _ in range(200)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as fh:
        child = fh.read()
    os.waitpid(pid, 0)
    theirs = {child[i:i + 12] for i in range(0, len(child), 12)}
    mine = {new_connection_id()[12:] for _ in range(200)}
    assert len(theirs) == 200 and not theirs & mine


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=1024), min_size=1, max_size=60),
       st.integers(min_value=300, max_value=8_000))
def test_a_batch_is_taken_in_parts_that_fit_a_request(sizes: list[int], max_bytes: int) -> None:
    """``take_batch`` ships records in order, each exactly once, every body within ``max_bytes``
    and holding the records it names; only a record too large on its own is dropped (counted)."""
    queue = TrafficQueue(limit=1000)
    records = [FlowRecord(connection_id=f"c{n}", transaction_id="t", start=1.0, user_agent="a" * size)
               for n, size in enumerate(sizes)]
    for record in records:
        queue.put(record)
    alone = {r.connection_id: len(msgspec.json.encode({"records": [r]})) for r in records}
    by_id = {r.connection_id: r for r in records}
    shipped: list[str] = []
    while True:
        batch, body = queue.take_batch(limit=7, max_bytes=max_bytes)
        if not batch:
            break
        assert 1 <= len(batch) <= 7 and len(body) <= max_bytes
        decoded = msgspec.json.decode(body, type=dict[str, list[FlowRecord]])["records"]
        assert len(decoded) == len(batch) and decoded == [by_id[r.connection_id] for r in decoded]
        shipped += [r.connection_id for r in decoded]
    kept = [r.connection_id for r in records if alone[r.connection_id] <= max_bytes]
    assert shipped == kept and queue.dropped == len(records) - len(kept) and len(queue) == 0
