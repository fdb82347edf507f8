"""The load generator: each benchmark workload as a coroutine over asyncio Protocols.

Runs inside the bench process on uvloop and talks to ``bench.backend`` (directly or through
a path under test) with the backend's 9-byte header. Protocols, not streams, so that the
generator costs as little as possible per byte and per round trip. Every echoed request
is compared with what was sent.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from .backend import ECHO, SINK, SOURCE, header

REQUEST = os.urandom(64)
UPLOAD_CHUNK = memoryview(os.urandom(1 << 20))
READ_SCRATCH = memoryview(bytearray(256 * 1024))
FLOW_TIMEOUT = 30.0


class WorkloadError(RuntimeError):
    """A workload could not produce a measurement (the message says why)."""


_F = TypeVar("_F", bound="_Flow")


async def _connect(address: tuple[str, int], factory: Callable[[], _F]) -> _F:
    """A new flow to ``address`` (uvloop sets TCP_NODELAY on every TCP transport itself)."""
    _, protocol = await asyncio.get_running_loop().create_connection(factory, *address)
    return protocol


def describe(exc: BaseException) -> str:
    """``exc`` as one line for a report (timeouts have no message of their own)."""
    if isinstance(exc, WorkloadError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


async def _open_many(opener: Callable[[], Awaitable[_F]], count: int, concurrency: int) -> list[_F]:
    """Open ``count`` flows with ``opener()``, at most ``concurrency`` at a time: all of them, or none stay open."""
    gate = asyncio.Semaphore(concurrency)

    async def one() -> _F:
        async with gate:
            return await asyncio.wait_for(opener(), FLOW_TIMEOUT)

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    flows = [r for r in results if not isinstance(r, BaseException)]
    if len(flows) < count:
        for flow in flows:
            flow.transport.close()
        failures = [r for r in results if isinstance(r, BaseException)]
        raise WorkloadError(f"opened {len(flows)}/{count} flows; {len(failures)} failed, "
                            f"first: {describe(failures[0])}")
    return flows


class _Flow(asyncio.BaseProtocol):
    """Base of the generator's protocols: keeps the transport; ``done`` fails if the connection ends early."""

    def __init__(self) -> None:
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport

    def abort(self) -> None:
        """Drop the flow; nobody waits for ``done`` any more."""
        self.done.cancel()
        self.transport.abort()

    def fail(self, error: str) -> None:
        if not self.done.done():
            self.done.set_exception(WorkloadError(error))
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(WorkloadError(f"connection closed early: {exc or 'EOF'}"))


# ----------------------------------------------------------------------------- bulk
class _Upload(_Flow, asyncio.Protocol):
    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.remaining = nbytes
        self.paused = False
        self.reply = bytearray()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        transport.set_write_buffer_limits(high=4 << 20, low=1 << 20)

    def start(self) -> None:
        self.transport.write(header(SINK, self.remaining))
        self._fill()

    def _fill(self) -> None:
        while self.remaining and not self.paused:
            n = min(self.remaining, len(UPLOAD_CHUNK))
            self.transport.write(UPLOAD_CHUNK[:n])
            self.remaining -= n

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._fill()

    def data_received(self, data: bytes) -> None:
        self.reply += data
        if len(self.reply) >= 8 and not self.done.done():
            self.done.set_result(int.from_bytes(self.reply[:8], "big"))


class _Download(_Flow, asyncio.BufferedProtocol):
    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.expected = nbytes
        self.received = 0

    def get_buffer(self, sizehint: int) -> memoryview:
        return READ_SCRATCH

    def buffer_updated(self, nbytes: int) -> None:
        self.received += nbytes
        if self.received >= self.expected and not self.done.done():
            self.done.set_result(self.received)


async def bulk_upload(address: tuple[str, int], nbytes: int) -> float:
    """Send ``nbytes`` on one flow; seconds until the backend confirms it has them all."""
    flow = await _connect(address, lambda: _Upload(nbytes))
    try:
        started = time.perf_counter()
        flow.start()
        count = await asyncio.wait_for(flow.done, FLOW_TIMEOUT + nbytes / 10e6)
        elapsed = time.perf_counter() - started
    finally:
        flow.transport.close()
    if count != nbytes:
        raise WorkloadError(f"backend confirmed {count} bytes, {nbytes} were sent")
    return elapsed


async def bulk_download(address: tuple[str, int], nbytes: int) -> float:
    """Receive ``nbytes`` on one flow; seconds from the request to the last byte."""
    flow = await _connect(address, lambda: _Download(nbytes))
    try:
        started = time.perf_counter()
        flow.transport.write(header(SOURCE, nbytes))
        count = await asyncio.wait_for(flow.done, FLOW_TIMEOUT + nbytes / 10e6)
        elapsed = time.perf_counter() - started
    finally:
        flow.transport.close()
    if count != nbytes:
        raise WorkloadError(f"received {count} bytes, asked for {nbytes}")
    return elapsed


# ------------------------------------------------------------------ request/response
class _PingPong(_Flow, asyncio.Protocol):
    """Sequential 64-byte echo round trips on one flow, driven from the receive callback."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = bytearray()
        self.sent_at = 0
        self.count = 0
        self.target: int | None = None
        self.latencies_ns: list[int] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        transport.write(header(ECHO))

    def run(self, target: int | None = None, latencies_ns: list[int] | None = None) -> asyncio.Future:
        """Ping ``target`` times (None: until ``stop()``); record latencies into the list if given."""
        self.done = asyncio.get_running_loop().create_future()
        self.count, self.target, self.latencies_ns = 0, target, latencies_ns
        self._ping()
        return self.done

    def stop(self) -> None:
        self.target = self.count + 1

    def _ping(self) -> None:
        self.sent_at = time.perf_counter_ns()
        self.transport.write(REQUEST)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        self.buffer += data
        if len(self.buffer) < len(REQUEST):
            return
        if self.buffer != REQUEST:
            self.fail(f"echo mismatch: sent {len(REQUEST)} bytes, got back {len(self.buffer)} different ones")
            return
        self.buffer.clear()
        if self.latencies_ns is not None:
            self.latencies_ns.append(now - self.sent_at)
        self.count += 1
        if self.target is not None and self.count >= self.target:
            self.done.set_result(self.count)
        else:
            self._ping()


async def _pingpong_flow(address: tuple[str, int]) -> _PingPong:
    """A connected echo flow that has done one round trip."""
    flow = await _connect(address, _PingPong)
    try:
        await asyncio.wait_for(flow.run(1), FLOW_TIMEOUT)
    except BaseException:
        flow.abort()
        raise
    return flow


def _percentile(sorted_values: list[int], q: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def rr1(address: tuple[str, int], count: int, warmup: int) -> dict[str, float]:
    """p50/p99 latency (µs) of ``count`` sequential 64-byte round trips on one flow after ``warmup``."""
    flow = await _pingpong_flow(address)
    latencies: list[int] = []
    try:
        await asyncio.wait_for(flow.run(warmup), FLOW_TIMEOUT)
        await asyncio.wait_for(flow.run(count, latencies), FLOW_TIMEOUT + count * 0.01)
    finally:
        flow.transport.close()
    latencies.sort()
    return {"p50_us": _percentile(latencies, 0.50) / 1e3, "p99_us": _percentile(latencies, 0.99) / 1e3,
            "mean_us": statistics.fmean(latencies) / 1e3, "round_trips": len(latencies)}


async def rr_concurrent(address: tuple[str, int], flows: int, duration: float) -> dict[str, float]:
    """Aggregate round trips/s of ``flows`` flows each doing sequential 64-byte round trips."""
    conns = await _open_many(lambda: _pingpong_flow(address), flows, flows)
    try:
        runs = [flow.run() for flow in conns]
        await asyncio.sleep(min(0.5, duration / 5))
        start_count, started = sum(f.count for f in conns), time.perf_counter()
        await asyncio.sleep(duration)
        end_count, elapsed = sum(f.count for f in conns), time.perf_counter() - started
        for flow in conns:
            flow.stop()
        await asyncio.wait_for(asyncio.gather(*runs), FLOW_TIMEOUT)
    finally:
        for flow in conns:
            flow.transport.close()
    return {"req_per_s": (end_count - start_count) / elapsed, "round_trips": end_count - start_count,
            "flows": flows, "seconds": elapsed}


# ----------------------------------------------------------------------- new flows
class _OneShot(_Flow, asyncio.Protocol):
    """Connect, one 64-byte round trip (sent with the header in one write), done."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        transport.write(header(ECHO) + REQUEST)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) < len(REQUEST) or self.done.done():
            return
        if self.buffer == REQUEST:
            self.done.set_result(None)
        else:
            self.fail("echo mismatch on a new flow")


async def _one_shot(address: tuple[str, int]) -> _OneShot:
    flow = await _connect(address, _OneShot)
    try:
        await flow.done
    except BaseException:
        flow.abort()
        raise
    return flow


async def connect_rate(address: tuple[str, int], concurrency: int, duration: float) -> dict[str, float]:
    """Completed new flows/s (connect, one round trip, close) with ``concurrency`` in parallel."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + duration
    completed = errors = 0
    first_error = ""

    async def worker() -> None:
        nonlocal completed, errors, first_error
        while loop.time() < deadline:
            try:
                flow = await asyncio.wait_for(_one_shot(address), FLOW_TIMEOUT)
            except (OSError, WorkloadError) as exc:
                errors += 1
                first_error = first_error or describe(exc)
                continue
            flow.transport.close()
            completed += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    if not completed:
        raise WorkloadError(f"no flow completed ({errors} errors; first: {first_error})")
    return {"flows_per_s": completed / elapsed, "completed": completed, "errors": errors,
            "first_error": first_error, "seconds": elapsed}


# ---------------------------------------------------------------------- idle flows
async def idle_flows(address: tuple[str, int], count: int, measure: Callable[[], dict[str, int]],
                     concurrency: int = 200) -> dict:
    """Memory per idle flow: ``measure()`` before and after opening ``count`` flows that each did one round trip.

    ``measure`` returns ``{"pss": KiB, "rss": KiB}`` of the path's processes. All flows are
    closed before returning.
    """
    before = measure()
    opened = await _open_many(lambda: _one_shot(address), count, concurrency)
    try:
        await asyncio.sleep(0.5)
        after = measure()
    finally:
        for flow in opened:
            flow.transport.close()
    return {"kib_per_flow": (after["pss"] - before["pss"]) / count,
            "rss_kib_per_flow": (after["rss"] - before["rss"]) / count,
            "flows": count, "before_kib": before, "after_kib": after}
