"""Work the control plane repeats while it runs (traffic log retention, retiring superseded node
certificates): each a blocking store transaction run in a worker thread, now and then every
``interval`` seconds, until the app stops and cancels it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import anyio.to_thread

log = logging.getLogger("ferryman.control")


async def sweep_every(interval: float, work: Callable[[], None], what: str) -> None:
    """Run ``work`` in a worker thread now and then every ``interval`` seconds, until cancelled. A
    failure is logged (``what`` failed) and the work tried again at its next turn: the database
    may be briefly unavailable."""
    while True:
        try:
            await anyio.to_thread.run_sync(work)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - logged; the next turn tries again
            log.warning("%s failed: %s", what, exc)
        await asyncio.sleep(interval)
