"""The front door's byte stream over a tunnel flow (``dataplane.edge.webflow.WebFlow``), alone.

A stand-in tunnel records what the flow acknowledges: a read takes every whole piece that
arrived and fits (one read, not one per piece), splits a piece larger than asked for,
acknowledges exactly what it returned (credit goes back only for bytes the front door
took), and ends with ``b""`` after the connector's end; a reset flow reads its end too.
"""

from __future__ import annotations

import asyncio

import pytest

from dataplane.edge.webflow import WebFlow

pytestmark = pytest.mark.timeout(30)


class _Tunnel:
    peer_name = "connector-1"

    def __init__(self) -> None:
        self.acked: list[int] = []
        self.routes: dict = {}

    def has_flow(self, fid: int) -> bool:
        return True

    def acknowledge(self, fid: int, size: int) -> bool:
        self.acked.append(size)
        return False


def test_reads_take_whole_pieces_that_fit_and_acknowledge_what_they_return() -> None:
    async def main() -> None:
        tunnel = _Tunnel()
        flow = WebFlow(tunnel, 7, "wiki", "c1")  # type: ignore[arg-type]
        flow.data(b"a" * 10)
        flow.data(memoryview(b"b" * 20))
        flow.data(b"c" * 100)
        assert await flow.read(64) == b"a" * 10 + b"b" * 20  # the third piece does not fit whole
        assert await flow.read(64) == b"c" * 64
        assert await flow.read(64) == b"c" * 36
        waiting = asyncio.ensure_future(flow.read(64))
        await asyncio.sleep(0)
        assert not waiting.done()
        flow.data(b"d")
        flow.ended()
        assert await waiting == b"d"
        assert await flow.read(64) == b""
        assert tunnel.acked == [30, 64, 36, 1] and flow.received == 131

        reset = WebFlow(tunnel, 9, "wiki", "c2")  # type: ignore[arg-type]
        reset.reset("connector_lost", "connector connector-1 lost")
        assert await reset.read(64) == b"" and reset.closed

    asyncio.run(main())
