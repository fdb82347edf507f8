"""The bounded queue of traffic log records between an edge's data path and its control link.

The edge puts a ``FlowRecord`` for every flow and refused attempt; the queue holds at most
``FERRYMAN_TRAFFIC_QUEUE`` records: the data path only ever appends, never waits; when the
control plane is unreachable long enough for the queue to fill, the oldest records are
dropped and counted (``ferryman_traffic_records_dropped_total``). The control link ships
batches to ``POST /v1/node/traffic`` and puts a batch back at the front when sending fails.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from ..contract.flowrecord import MAX_BATCH, FlowRecord


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
