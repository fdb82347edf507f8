"""The load generator: each benchmark workload as a coroutine over asyncio Protocols.

Runs inside the bench process on uvloop and talks to ``bench.backend`` (directly or through
a path under test) with the backend's 9-byte header. Protocols, not streams, so that the
generator costs as little as possible per byte and per round trip. Every echoed request
is compared with what was sent.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import struct
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

from .backend import ECHO, SINK, SOURCE, header

REQUEST = os.urandom(64)
UPLOAD_CHUNK = memoryview(os.urandom(1 << 20))
READ_SCRATCH = memoryview(bytearray(256 * 1024))
FLOW_TIMEOUT = 30.0


class WorkloadError(RuntimeError):
    """A workload could not produce a measurement (the message says why; ``detail``: what was measured)."""

    def __init__(self, message: str, detail: dict | None = None) -> None:
        super().__init__(message)
        self.detail = detail


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


# ------------------------------------------------------------------------- UDP
# Every datagram: crc32 (of all that follows) | flow u16 | size u16 | seq u64 | send time ns u64 | filler.
UDP_HEADER = struct.Struct("!IHHQQ")
UDP_BODY = struct.Struct("!HHQQ")
UDP_FILLER = os.urandom(65536)
UDP_RCVBUF = 4 << 20  # the app's own socket buffers, as the backend's (capped by net.core.rmem_max)
UDP_TICK = 0.001  # pacer period, s
UDP_MAX_CATCH_UP = 0.005  # a late pacer tick sends at most this many seconds' worth at once
UDP_MAX_BATCH = 64  # unpaced: datagrams per flow per loop iteration
UDP_SETTLE = 0.3  # after the last send: answers still arriving until this long without one
UDP_DRAIN_LIMIT = 3.0


class _UdpSender(_Flow, asyncio.DatagramProtocol):
    """One UDP flow (its own socket): numbered, checksummed datagrams out; every answer verified.

    An answer counts once if it is byte for byte a datagram this flow sent (checksum, flow,
    size and sequence number in range); a second copy counts as a duplicate, anything else
    as corrupted.
    """

    def __init__(self, index: int, size: int, capacity: int) -> None:
        super().__init__()
        self.index = index
        self.size = size
        self.filler = UDP_FILLER[:size - UDP_HEADER.size]
        self.seen = bytearray(capacity)
        self.sent = 0
        self.received = 0
        self.duplicates = 0
        self.corrupted = 0
        self.first_corruption = ""
        self.latencies_ns: list[int] = []
        self.record = False
        self.last_answer = 0.0
        self.paused = False
        self.send_errors = 0
        self.answered = asyncio.get_running_loop().create_future()  # first answer (flow open)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[arg-type]
        sock = transport.get_extra_info("socket")
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, UDP_RCVBUF)

    def send(self, count: int) -> None:
        """Send the next ``count`` datagrams (fewer if the sequence space is used up)."""
        sendto, crc32, pack, filler, index, size = (self.transport.sendto, zlib.crc32, UDP_BODY.pack,
                                                    self.filler, self.index, self.size)
        seq = self.sent
        end = min(seq + count, len(self.seen))
        now = time.perf_counter_ns
        while seq < end:
            body = pack(index, size, seq, now()) + filler
            sendto(crc32(body).to_bytes(4, "big") + body)
            seq += 1
        self.sent = seq

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        now = time.perf_counter_ns()
        if len(data) != self.size or zlib.crc32(memoryview(data)[4:]) != int.from_bytes(data[:4], "big"):
            self._corrupt(f"{len(data)}-byte answer fails its checksum (sent {self.size} bytes)")
            return
        _, flow, size, seq, sent_at = UDP_HEADER.unpack_from(data)
        if flow != self.index or size != self.size or seq >= self.sent or data[UDP_HEADER.size:] != self.filler:
            self._corrupt(f"answer flow {flow} seq {seq}: not a datagram flow {self.index} sent")
            return
        if self.seen[seq]:
            self.duplicates += 1
            return
        self.seen[seq] = 1
        self.received += 1
        self.last_answer = time.monotonic()
        if self.record:
            self.latencies_ns.append(now - sent_at)
        if not self.answered.done():
            self.answered.set_result(None)

    def _corrupt(self, what: str) -> None:
        self.corrupted += 1
        self.first_corruption = self.first_corruption or what

    def error_received(self, exc: Exception) -> None:
        self.send_errors += 1  # ICMP port unreachable and the like

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def connection_lost(self, exc: Exception | None) -> None:
        pass


async def _udp_open(address: tuple[str, int], index: int, size: int, capacity: int) -> _UdpSender:
    """A UDP flow that had its first datagram answered (resent while the path opens the flow)."""
    loop = asyncio.get_running_loop()
    _, flow = await loop.create_datagram_endpoint(lambda: _UdpSender(index, size, capacity),
                                                  local_addr=("127.0.0.1", 0), remote_addr=address)
    deadline = loop.time() + FLOW_TIMEOUT
    try:
        while not flow.answered.done():
            if loop.time() > deadline:
                raise WorkloadError(f"UDP flow {index}: no answer to {flow.sent} datagrams in {FLOW_TIMEOUT:g} s")
            flow.send(1)
            await asyncio.wait([flow.answered], timeout=0.2)
    except BaseException:
        flow.transport.abort()
        raise
    return flow


async def udp_echo(address: tuple[str, int], size: int, rate: float | None, duration: float, flows: int,
                   measure: Callable[[], dict] | None = None) -> dict:
    """Datagrams of ``size`` bytes to an echo through ``address`` on ``flows`` sockets for ``duration`` s.

    ``rate``: datagrams/s offered in all (paced by a 1 ms timer, spread over the flows), or
    None to send as fast as the loop goes (respecting the sockets' pause_writing).
    ``measure()`` is called once the flows are open and again after the answers settled,
    while the sockets still exist (the caller reads drop counters there). Returns achieved
    answers/s (unique answers to datagrams sent in the window / window), offered rate,
    loss %, duplicates, corrupted, and p50/p99 round trip of the answers.
    """
    if size < UDP_HEADER.size or size > UDP_HEADER.size + len(UDP_FILLER):
        raise WorkloadError(f"UDP datagram size {size} not in {UDP_HEADER.size}..{UDP_HEADER.size + len(UDP_FILLER)}")
    loop = asyncio.get_running_loop()
    capacity = int((rate or 400_000) / flows * (duration + 1) * 1.2) + 1000
    senders = await asyncio.gather(*(_udp_open(address, i, size, capacity) for i in range(flows)),
                                   return_exceptions=True)
    opened = [s for s in senders if not isinstance(s, BaseException)]
    if len(opened) < flows:
        for flow in opened:
            flow.transport.abort()
        raise next(s for s in senders if isinstance(s, BaseException))
    try:
        await asyncio.sleep(0.05)  # the opening datagrams' answers
        base = [(f.sent, f.received) for f in opened]
        before = measure() if measure is not None else None
        for flow in opened:
            flow.record = True
        finished = loop.create_future()
        started = time.perf_counter()
        stop_at = started + duration
        if rate is not None:
            per_flow = rate / flows
            goal_base = [f.sent for f in opened]

            def tick() -> None:
                now = time.perf_counter()
                elapsed = min(now, stop_at) - started
                for flow, sent0 in zip(opened, goal_base):
                    due = int(per_flow * elapsed) - (flow.sent - sent0)
                    if due > 0:
                        flow.send(min(due, int(per_flow * UDP_MAX_CATCH_UP) + 1))
                if now >= stop_at:
                    finished.set_result(stop_at)
                else:
                    loop.call_later(UDP_TICK, tick)
        else:
            def tick() -> None:
                now = time.perf_counter()
                if now >= stop_at:
                    finished.set_result(now)
                    return
                for flow in opened:
                    if not flow.paused:
                        flow.send(UDP_MAX_BATCH)
                loop.call_soon(tick)

        tick()
        ended = await finished
        window = ended - started
        # Answers still in flight: wait until none came for UDP_SETTLE (at most UDP_DRAIN_LIMIT).
        drain_until = time.monotonic() + UDP_DRAIN_LIMIT
        while time.monotonic() < drain_until:
            await asyncio.sleep(0.05)
            if time.monotonic() - max(f.last_answer for f in opened) >= UDP_SETTLE:
                break
        after = measure() if measure is not None else None
    finally:
        for flow in opened:
            flow.transport.abort()
    sent = sum(f.sent - b[0] for f, b in zip(opened, base))
    received = sum(f.received - b[1] for f, b in zip(opened, base))
    latencies = sorted(ns for f in opened for ns in f.latencies_ns)
    detail = {
        "size": size, "flows": flows, "offered_rate": rate, "seconds": window,
        "sent": sent, "received": received, "lost": sent - received,
        "loss_pct": 100.0 * (sent - received) / sent if sent else 0.0,
        "duplicates": sum(f.duplicates for f in opened), "corrupted": sum(f.corrupted for f in opened),
        "first_corruption": next((f.first_corruption for f in opened if f.first_corruption), ""),
        "send_errors": sum(f.send_errors for f in opened),
        "sent_per_s": sent / window, "dgram_per_s": received / window,
        "opening_datagrams": sum(b[0] for b in base),
        "p50_us": _percentile(latencies, 0.50) / 1e3 if latencies else None,
        "p99_us": _percentile(latencies, 0.99) / 1e3 if latencies else None,
    }
    if before is not None:
        detail["measure_before"], detail["measure_after"] = before, after
    if detail["corrupted"]:
        raise WorkloadError(f"{detail['corrupted']} corrupted answers (first: {detail['first_corruption']})",
                            detail)
    if not received:
        raise WorkloadError(f"none of {sent} datagrams was answered", detail)
    return detail
