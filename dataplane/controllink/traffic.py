"""The bounded queue of traffic log records between an edge's data path and its control link.

The edge puts a ``FlowRecord`` for every flow and refused attempt; the queue holds at most
``FERRYMAN_TRAFFIC_QUEUE`` records: the data path only ever appends, never waits; when the
control plane is unreachable long enough for the queue to fill, the oldest records are
dropped and counted (``ferryman_traffic_records_dropped_total``). The control link ships
batches to ``POST /v1/node/traffic`` (``take_batch``: at most ``MAX_BATCH`` records and
``MAX_BATCH_BYTES`` of JSON) and puts a batch back at the front when sending fails.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable

import msgspec

from ..contract.flowrecord import MAX_BATCH, MAX_BATCH_BYTES, FlowRecord

log = logging.getLogger("ferryman.control_link")
_encode = msgspec.json.Encoder().encode


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

    def take_batch(self, limit: int = MAX_BATCH, max_bytes: int = MAX_BATCH_BYTES) -> tuple[list[FlowRecord], bytes]:
        """Up to ``limit`` of the oldest records, removed from the queue, and the body of the
        request that ships them (``{"records": [...]}`` as JSON), at most ``max_bytes`` long:
        of a batch whose body would be longer, the first part that fits is taken and the rest
        stays in front. A record too large on its own (its fields are bounded far below
        ``MAX_BATCH_BYTES``) is dropped, counted and logged, rather than refused for ever."""
        while batch := self.take(limit):
            body = _encode({"records": batch})
            while len(body) > max_bytes and len(batch) > 1:
                keep = min(len(batch) - 1, max(1, len(batch) * max_bytes // len(body)))
                self._records.extendleft(reversed(batch[keep:]))  # just taken: they fit again
                batch = batch[:keep]
                body = _encode({"records": batch})
            if len(body) <= max_bytes:
                return batch, body
            self.dropped += 1
            log.error("a traffic record of %d bytes is larger than a request may be (%d); dropped", len(body),
                      max_bytes, extra={"connection_id": batch[0].connection_id})
        return [], b""

    def give_back(self, batch: Iterable[FlowRecord]) -> None:
        """Put an unsent batch back in front (what does not fit any more is dropped, oldest first)."""
        batch = list(batch)
        room = self.limit - len(self._records)
        if room < len(batch):
            self.dropped += len(batch) - max(room, 0)
            batch = batch[len(batch) - max(room, 0):]
        self._records.extendleft(reversed(batch))
