"""Micro-benchmarks that chose the HTTP/1.1 parser of the edge's HTTPS front door (httptools vs h11).

Run: ``python -m pytest bench/test_http_parse_bench.py --benchmark-enable``. Under the
project's default ``--benchmark-disable`` every function still runs once and checks what
it parsed, so the file doubles as a test that both parsers read the same requests.

Three workloads, each parsed by httptools (llhttp, C) and by h11 (pure Python):

- ``head``: one browser-like GET request head (13 header lines, ~700 bytes);
- ``pipelined``: 16 such requests arriving in one read (keep-alive, pipelining);
- ``body``: a POST with a 1 MiB ``Content-Length`` body arriving in 64 KiB reads, and the
  same 1 MiB as chunked transfer coding (4 KiB chunks), streamed to a callback.

The numbers and the choice are written down in ``dataplane/edge/web/http1.py``.
"""

from __future__ import annotations

import h11
import httptools
import pytest

pytestmark = pytest.mark.timeout(120)

HEAD = (
    b"GET /wiki/Main_Page?action=view&oldid=12345 HTTP/1.1\r\n"
    b"Host: wiki.corp.example\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8\r\n"
    b"Accept-Language: en-GB,en;q=0.9\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\n"
    b"Connection: keep-alive\r\n"
    b"Cookie: __Host-ferryman=v1.k1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\r\n"
    b"Upgrade-Insecure-Requests: 1\r\n"
    b"Sec-Fetch-Dest: document\r\n"
    b"Sec-Fetch-Mode: navigate\r\n"
    b"Sec-Fetch-Site: none\r\n"
    b"Sec-Fetch-User: ?1\r\n"
    b"Cache-Control: max-age=0\r\n"
    b"\r\n"
)
HEADER_LINES = 13
BODY = bytes(range(256)) * 4096  # 1 MiB
READ = 65536


def chunked(body: bytes, size: int = 4096) -> bytes:
    out = bytearray()
    for i in range(0, len(body), size):
        piece = body[i:i + size]
        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
    return bytes(out + b"0\r\n\r\n")


POST_LEN = (b"POST /upload HTTP/1.1\r\nHost: wiki.corp.example\r\nContent-Length: %d\r\n\r\n" % len(BODY)) + BODY
POST_CHUNKED = b"POST /upload HTTP/1.1\r\nHost: wiki.corp.example\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(BODY)


class _Httptools:
    """The callbacks the front door uses: collect the URL and headers, count the body."""

    __slots__ = ("url", "headers", "body", "done")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = 0
        self.done = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += len(body)

    def on_message_complete(self) -> None:
        self.done += 1


def httptools_parse(data: bytes, reads: int = 0) -> _Httptools:
    sink = _Httptools()
    parser = httptools.HttpRequestParser(sink)
    if reads:
        for i in range(0, len(data), reads):
            parser.feed_data(data[i:i + reads])
    else:
        parser.feed_data(data)
    return sink


def h11_parse(data: bytes, reads: int = 0) -> tuple[int, int, int]:
    """(requests, headers of the last, body bytes) — h11 needs a response before the next request."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=65536)
    requests = headers = body = 0
    pieces = [data[i:i + reads] for i in range(0, len(data), reads)] if reads else [data]
    for piece in pieces:
        conn.receive_data(piece)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.Request):
                headers = len(event.headers)
            elif isinstance(event, h11.Data):
                body += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                requests += 1
                conn.send(h11.Response(status_code=204, headers=[]))
                conn.send(h11.EndOfMessage())
                conn.start_next_cycle()
    return requests, headers, body


# ---------------------------------------------------------------------------- request heads
def test_head_httptools(benchmark) -> None:
    sink = benchmark(httptools_parse, HEAD)
    assert sink.done == 1 and len(sink.headers) == HEADER_LINES and sink.url.startswith(b"/wiki/")


def test_head_h11(benchmark) -> None:
    assert benchmark(h11_parse, HEAD) == (1, HEADER_LINES, 0)


def test_pipelined_httptools(benchmark) -> None:
    sink = benchmark(httptools_parse, HEAD * 16)
    assert sink.done == 16


def test_pipelined_h11(benchmark) -> None:
    assert benchmark(h11_parse, HEAD * 16)[0] == 16


# ---------------------------------------------------------------------------- bodies
def test_body_length_httptools(benchmark) -> None:
    sink = benchmark(httptools_parse, POST_LEN, READ)
    assert sink.done == 1 and sink.body == len(BODY)


def test_body_length_h11(benchmark) -> None:
    assert benchmark(h11_parse, POST_LEN, READ) == (1, 2, len(BODY))


def test_body_chunked_httptools(benchmark) -> None:
    sink = benchmark(httptools_parse, POST_CHUNKED, READ)
    assert sink.done == 1 and sink.body == len(BODY)


def test_body_chunked_h11(benchmark) -> None:
    assert benchmark(h11_parse, POST_CHUNKED, READ) == (1, 2, len(BODY))
