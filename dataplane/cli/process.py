"""Process bootstrap of a node: file-descriptor limit, malloc and garbage-collector tuning, uvloop, SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import resource
import signal
from collections.abc import Awaitable, Callable

import uvloop


def raise_nofile_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def tune_malloc() -> None:
    """Keep glibc from mapping and unmapping (or trimming) memory for every large buffer.

    Tunnel reads and writes allocate buffers of up to a few hundred KiB per call; by
    default glibc serves those with fresh mmaps or gives the heap top back after each
    free, and the page faults that follow cost about a third of the edge's CPU in bulk
    transfers. Memory stays bounded by the flow-control windows either way.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 * 1024 * 1024)
    mallopt(m_trim_threshold, 128 * 1024 * 1024)


def tune_gc() -> None:
    """Keep the cyclic garbage collector off the forwarding path.

    Every frame allocates a few short-lived container objects (events, memoryviews, header
    tuples), so with the default threshold the collector runs every few hundred frames, and
    each older-generation pass walks every object the node ever made (its modules, settings,
    policy): that cost ~5 % of a relay's CPU and showed as the round-trip tail. What exists
    at start-up lives as long as the process and is frozen out of collection; the youngest
    generation is collected ten times less often (its objects are freed by reference counting
    in any case; only cycles wait for it).
    """
    gc.freeze()
    _threshold0, threshold1, threshold2 = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, threshold1, threshold2)


GC_THRESHOLD = 7000  # allocations of container objects between two young-generation collections


def run_node(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)`` on uvloop; SIGINT/SIGTERM set ``stop``."""
    raise_nofile_limit()
    tune_malloc()
    tune_gc()

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    uvloop.run(runner())
