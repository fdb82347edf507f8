"""The bounded queue of traffic log records between an edge's data path and its control link.

The edge puts a ``FlowRecord`` for every flow and refused attempt; the queue holds at most
``FERRYMAN_TRAFFIC_QUEUE`` records: the data path only ever appends, never waits; when the
control plane is unreachable long enough for the queue to fill, the oldest records are
dropped and counted (``ferryman_traffic_records_dropped_total``). The control link ships
batches to ``POST /v1/node/traffic`` (``take_batch``: at most ``MAX_BATCH`` records and
``MAX_BATCH_BYTES`` of JSON) and puts a batch back at the front when sending fails.

Each record is encoded (JSON) when it is put, on the data path's turn, and a batch's body is
those encodings joined: encoding 2,000 records when the batch is sent took 1.6 ms of the
event loop at once, and every request being served waited for it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable

import msgspec

from ..contract.flowrecord import MAX_BATCH, MAX_BATCH_BYTES, FlowRecord

log = logging.getLogger("ferryman.control_link")
_encode = msgspec.json.Encoder().encode
_OPEN, _CLOSE = b'{"records":[', b"]}"


class TrafficQueue:
    """The bounded queue between an edge's data path and its control link (records held
    encoded, see the module doc)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the traffic queue must hold at least 1 record, not {limit}")
        self.limit = limit
        self._records: deque[bytes] = deque()
        self.dropped = 0  # records lost because the queue was full (or, encoded, too large to send)
        self.shipped = 0

    def __len__(self) -> int:
        return len(self._records)

    def put(self, record: FlowRecord) -> None:
        """Append (never blocks); the oldest record is dropped when full."""
        if len(self._records) >= self.limit:
            self._records.popleft()
            self.dropped += 1
        self._records.append(_encode(record))

    def take_batch(self, limit: int = MAX_BATCH, max_bytes: int = MAX_BATCH_BYTES) -> tuple[list[bytes], bytes]:
        """Up to ``limit`` of the oldest records (encoded), removed from the queue, and the body
        of the request that ships them (``{"records": [...]}``), at most ``max_bytes`` long:
        records that would make it longer stay in front for the next batch. A record too large
        on its own (its fields are bounded far below ``MAX_BATCH_BYTES``) is dropped, counted
        and logged, rather than refused for ever."""
        records = self._records
        room = max_bytes - len(_OPEN) - len(_CLOSE)
        batch: list[bytes] = []
        size = -1  # no comma before the first
        while records and len(batch) < limit:
            record = records[0]
            if size + 1 + len(record) > room:
                if batch:
                    break
                records.popleft()
                self.dropped += 1
                log.error("a traffic record of %d bytes is larger than a request may be (%d); dropped",
                          len(record), max_bytes)
                continue
            batch.append(records.popleft())
            size += 1 + len(record)
        if not batch:
            return batch, b""
        return batch, _OPEN + b",".join(batch) + _CLOSE

    def give_back(self, batch: Iterable[bytes]) -> None:
        """Put an unsent batch back in front (what does not fit any more is dropped, oldest first)."""
        batch = list(batch)
        room = self.limit - len(self._records)
        if room < len(batch):
            self.dropped += len(batch) - max(room, 0)
            batch = batch[len(batch) - max(room, 0):]
        self._records.extendleft(reversed(batch))
