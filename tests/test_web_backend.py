"""Unit tests of the front door's backend side: the keep-alive pool and the HTTP/1.1 response reader.

The pool keeps idle connections per (app, session) key, most recently used first, bounded
per key, in total and in idle time, and drops an app's or a session's connections on
demand. The response reader runs over a real loopback TCP connection to a server that
writes exact bytes: interim ``1xx`` responses are skipped, trailers are collected,
``HEAD`` responses end after the head, close-delimited bodies end at EOF, and a truncated
or oversized response is a ``BackendError``.
"""

from __future__ import annotations

import asyncio

import pytest

from dataplane.edge.web.backend import (
    BackendClosedEarly, BackendConnection, BackendError, BackendTimeout, Pool, SocketStream, open_socket_stream,
)

pytestmark = pytest.mark.timeout(30)


class _Closable:
    """A stand-in stream for pool bookkeeping only (the pool never reads or writes)."""

    peer = ""

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def _conn(key: tuple[str, str]) -> BackendConnection:
    c = BackendConnection(_Closable(), key, 16384)
    c.reusable = True
    return c


def test_a_pooled_connection_on_a_draining_tunnel_is_not_used_again() -> None:
    """A tunnel that takes no new flows (its connector moves it, or this edge asks its connector
    to move it after a renewal) closes once its flows ended: an idle backend connection on it is
    closed instead of reused, so it does not hold the tunnel open until the drain grace."""
    pool = Pool(per_key=4, total=8, idle_timeout=60)
    kept, moving = _conn(("wiki", "s1")), _conn(("wiki", "s1"))
    pool.release(kept, now=0)
    pool.release(moving, now=1)
    moving.stream.draining = True  # type: ignore[attr-defined]
    assert pool.acquire(("wiki", "s1"), now=2) is kept  # the draining one, most recent, was skipped
    assert moving.stream.closed and len(pool) == 0


def test_pool_bounds() -> None:
    pool = Pool(per_key=2, total=3, idle_timeout=10)
    a1, a2, a3 = (_conn(("wiki", "s1")) for _ in range(3))
    for c in (a1, a2, a3):
        pool.release(c, now=0)
    assert a1.stream.closed and len(pool) == 2  # per key
    b1 = _conn(("wiki", "s2"))
    c1 = _conn(("docs", "s1"))
    pool.release(b1, now=1)
    pool.release(c1, now=2)
    assert a2.stream.closed and len(pool) == 3  # total: the oldest idle goes
    assert pool.acquire(("wiki", "s1"), now=3) is a3
    assert pool.acquire(("wiki", "s1"), now=3) is None  # never another session's connection
    assert pool.acquire(("wiki", "s2"), now=20) is None and b1.stream.closed  # idle too long
    assert pool.sweep(now=100) == 1 and c1.stream.closed and len(pool) == 0
    d = _conn(("wiki", "s3"))
    d.reusable = False
    pool.release(d)
    assert d.stream.closed and len(pool) == 0
    e = _conn(("wiki", "s4"))
    pool.release(e, now=200)
    e.stream.closed = True  # its tunnel flow ended while idle (the connector went away)
    assert pool.acquire(("wiki", "s4"), now=201) is None and e.closed and len(pool) == 0
    e, f = _conn(("wiki", "s4")), _conn(("docs", "s4"))
    pool.release(e)
    pool.release(f)
    assert pool.drop(session="s4") == 2 and e.stream.closed and f.stream.closed
    g1, g2 = _conn(("wiki", "s5")), _conn(("wiki", "s5"))
    g1.peer, g2.peer = "connector-1", "connector-2"
    pool.release(g1)
    pool.release(g2)
    assert pool.drop(peer="connector-1") == 1 and g1.stream.closed and not g2.stream.closed
    assert pool.acquire(("wiki", "s5")) is g2
    none = Pool(per_key=0, total=0, idle_timeout=10)
    g = _conn(("x", ""))
    none.release(g)
    assert g.stream.closed


async def _exchange(raw: bytes, method: str = "GET", chunk: int = 0) -> tuple:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if chunk:
            for i in range(0, len(raw), chunk):
                writer.write(raw[i:i + chunk])
                await writer.drain()
                await asyncio.sleep(0)
        else:
            writer.write(raw)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    stream = await open_socket_stream("127.0.0.1", port)
    conn = BackendConnection(stream, ("app", ""), 1024)
    try:
        conn.write_head(method, "/x", [(b"host", b"b")])
        head = await conn.read_head(5)
        body = b""
        while True:
            data = await conn.read_body(5)
            if data is None:
                break
            body += data
        return head.status, head.headers, body, conn.trailers, conn.finished_cleanly()
    finally:
        conn.close()
        server.close()


def run(coro):
    return asyncio.run(coro)


def test_response_reader() -> None:
    status, headers, body, trailers, clean = run(_exchange(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello"))
    assert (status, body, clean) == (200, b"hello", True) and (b"x-a", b"1") in headers
    status, _, body, trailers, clean = run(_exchange(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\nX-Sum: 9\r\n\r\n", chunk=3))
    assert (body, trailers, clean) == (b"abcde", [(b"x-sum", b"9")], True)
    status, _, body, _, clean = run(_exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", method="HEAD"))
    assert (status, body, clean) == (200, b"", False)  # a HEAD's connection is not reused
    status, _, body, _, clean = run(_exchange(b"HTTP/1.0 200 OK\r\n\r\nuntil the end", chunk=4))
    assert (body, clean) == (b"until the end", False)
    with pytest.raises(BackendError, match="middle of its response"):
        run(_exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"))
    with pytest.raises(BackendError, match="larger than 1024"):
        run(_exchange(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n"))
    with pytest.raises(BackendError, match="malformed"):
        run(_exchange(b"SSH-2.0-OpenSSH\r\n\r\n"))
    with pytest.raises(BackendClosedEarly):
        run(_exchange(b""))


def test_response_timeout() -> None:
    async def silent() -> None:
        async def serve(reader, writer):
            await asyncio.sleep(5)

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        stream = await open_socket_stream("127.0.0.1", server.sockets[0].getsockname()[1])
        conn = BackendConnection(stream, ("app", ""), 1024)
        conn.write_head("GET", "/", [(b"host", b"b")])
        try:
            await conn.read_head(0.3)
        finally:
            conn.close()
            server.close()

    with pytest.raises(BackendTimeout, match="within 0.3 seconds"):
        run(silent())


async def _scripted(script):
    """A backend that answers each request head with the next (delay, bytes) of ``script``."""
    async def serve(reader, writer):
        for delay, raw in script:
            await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(delay)
            writer.write(raw)
            await writer.drain()
        await asyncio.sleep(5)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    stream = await open_socket_stream("127.0.0.1", server.sockets[0].getsockname()[1])
    return server, BackendConnection(stream, ("app", "s1"), 1024)


async def _get(conn: BackendConnection, timeout: float) -> tuple[int, bytes]:
    conn.write_head("GET", "/", [(b"host", b"b")])
    head = await conn.read_head(timeout)
    body = b""
    while (data := await conn.read_body(timeout)) is not None:
        body += data
    return head.status, body


def test_keep_alive_responses_and_moving_deadlines() -> None:
    """One connection, one parser, several responses; each read has its own deadline whether
    it is earlier (the timer moves) or later (an early timer re-arms) than the last one."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"

    async def main() -> None:
        server, conn = await _scripted([(0, ok + b"a1"), (0.4, b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nb2"),
                                        (0, ok + b"c3"), (2, ok + b"late")])
        loop = asyncio.get_running_loop()
        try:
            assert await _get(conn, 0.2) == (200, b"a1") and conn.finished_cleanly()
            parser = conn.parser
            assert await _get(conn, 1.5) == (201, b"b2")  # answered after the first deadline passed
            assert await _get(conn, 30) == (200, b"c3") and conn.parser is parser
            started = loop.time()
            with pytest.raises(BackendTimeout, match="within 0.3 seconds"):
                await _get(conn, 0.3)  # the armed timer (30 s) fires too late: it is moved
            assert 0.25 < loop.time() - started < 1.5
        finally:
            conn.close()
            server.close()

    run(main())


def test_response_out_of_step_is_not_reused() -> None:
    """Bytes after a complete response (a second, unasked-for response) leave the connection
    out of step: it is not reused, so they can never answer a later request."""
    async def main() -> None:
        server, conn = await _scripted([(0, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nA"
                                            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nB")])
        try:
            assert await _get(conn, 5) == (200, b"A")
            assert not conn.finished_cleanly()
        finally:
            conn.close()
            server.close()

    run(main())


class _Sink:
    """Takes pieces of a ``SocketStream``; holds back (returns False) while ``full``."""

    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.full = False
        self.ended = 0

    def flow_data(self, data: bytes) -> bool:
        self.got.append(data)
        return not self.full

    def flow_ended(self) -> None:
        self.ended += 1


class _Socket:
    def __init__(self) -> None:
        self.paused = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


def test_socket_stream_hands_buffered_pieces_over_in_order() -> None:
    """Pieces read before ``attach`` go to the sink first; a sink that holds back stops the
    socket and gets the rest, in order, at ``release``; then the end."""
    stream = SocketStream("backend")
    sock = _Socket()
    stream.connection_made(sock)  # type: ignore[arg-type]
    for piece in (b"a", b"b", b"c"):
        stream.data_received(piece)
    stream.eof_received()
    sink = _Sink()
    sink.full = True
    stream.attach(sink)
    assert sink.got == [b"a"] and sock.paused and sink.ended == 0
    sink.full = False
    stream.release()
    assert sink.got == [b"a", b"b", b"c"] and not sock.paused and sink.ended == 1
    stream.attach(None)
    stream.data_received(b"d")  # detached: buffered for read() again
    assert sink.got == [b"a", b"b", b"c"] and asyncio.run(stream.read(10)) == b"d"
