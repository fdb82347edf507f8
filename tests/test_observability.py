"""Tests of dataplane/observability.py: /metrics, /ready, /health over real HTTP on
loopback, HOST:PORT parsing, and the text/JSON log formats."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dataplane.basics.hostport import parse_hostport
from dataplane.basics.logs import setup_logging
from dataplane.basics.metrics import IDLE_TIMEOUT, MAX_REQUEST_HEAD, Stats, start_metrics_server
from dataplane.basics.version import VERSION

pytestmark = pytest.mark.timeout(30)

Response = tuple[int, dict[str, str], bytes]


async def _request(port: int, raw: bytes, host: str = "127.0.0.1") -> Response:
    """Send raw bytes, read to EOF (the server always closes), split the response."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(raw)
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def _serve(stats: Stats, ready: Callable[[], bool], body: Callable[[int], Awaitable[None]],
           addr: str = "127.0.0.1:0", **kw: Any) -> None:
    async def main() -> None:
        server = await start_metrics_server(addr, stats, ready, **kw)
        try:
            await body(server.sockets[0].getsockname()[1])
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset({"role": "edge", "node": "edge-1", **labels}.items())


# ---------------------------------------------------------------------------- metrics
def test_metrics_reflect_stats_at_scrape_time() -> None:
    st = Stats("edge", "edge-1")
    st.tunnels_up, st.tunnels_opened, st.reconnects = 3, 7, 2
    st.count(st.tunnels_closed, "keepalive_timeout")
    st.count(st.tunnels_closed, "keepalive_timeout", 2)
    st.count(st.tunnels_closed, "goaway")
    st.flows_active, st.flows_opened = 4, 11
    st.count(st.flows_closed, "fin", 6)
    st.bytes_rx, st.bytes_tx = 1234, 5678
    st.count(st.open_failures, "no_connector")
    st.count(st.protocol_errors, "bad_frame", 5)
    st.rtt["t1"] = 0.025
    st.extra = {"ferryman_edge_clients": ("Client tunnels", lambda: 9.0),
                "ferryman_edge_broken": ("Raises", lambda: 1 / 0)}

    async def body(port: int) -> None:
        status, headers, payload = await _request(port, _get("/metrics"))
        assert status == 200
        assert headers["content-type"].startswith("text/plain; version=")
        assert headers["connection"] == "close"
        assert int(headers["content-length"]) == len(payload)
        m = _samples(payload.decode())
        for family in text_string_to_metric_families(payload.decode()):
            for s in family.samples:
                assert s.labels["role"] == "edge" and s.labels["node"] == "edge-1", s
        assert m[_key("ferryman_tunnels")] == 3
        assert m[_key("ferryman_tunnels_opened_total")] == 7
        assert m[_key("ferryman_tunnels_closed_total", reason="keepalive_timeout")] == 3
        assert m[_key("ferryman_tunnels_closed_total", reason="goaway")] == 1
        assert m[_key("ferryman_reconnects_total")] == 2
        assert m[_key("ferryman_flows")] == 4
        assert m[_key("ferryman_flows_opened_total")] == 11
        assert m[_key("ferryman_flows_closed_total", reason="fin")] == 6
        assert m[_key("ferryman_bytes_total", direction="rx")] == 1234
        assert m[_key("ferryman_bytes_total", direction="tx")] == 5678
        assert m[_key("ferryman_open_failures_total", reason="no_connector")] == 1
        assert m[_key("ferryman_protocol_errors_total", code="bad_frame")] == 5
        assert m[_key("ferryman_tunnel_rtt_seconds", tunnel="t1")] == 0.025
        assert m[_key("ferryman_build_info", version=VERSION)] == 1
        assert m[_key("ferryman_edge_clients")] == 9
        assert not any(name == "ferryman_edge_broken" for name, _ in m)  # skipped, scrape still works

        # values are read at scrape time, not copied at registration
        st.bytes_rx += 100
        st.count(st.flows_closed, "reset")
        del st.rtt["t1"]
        m = _samples((await _request(port, _get("/metrics")))[2].decode())
        assert m[_key("ferryman_bytes_total", direction="rx")] == 1334
        assert m[_key("ferryman_flows_closed_total", reason="reset")] == 1
        assert not any(name == "ferryman_tunnel_rtt_seconds" for name, _ in m)

    _serve(st, lambda: True, body)


def test_ready_health_and_head() -> None:
    state = {"ready": False}

    async def body(port: int) -> None:
        assert (await _request(port, _get("/ready")))[::2] == (503, b"not ready\n")
        state["ready"] = True
        status, headers, payload = await _request(port, _get("/ready"))
        assert (status, payload, headers["connection"]) == (200, b"ready\n", "close")
        assert (await _request(port, _get("/health")))[::2] == (200, b"ok\n")
        assert (await _request(port, _get("/health?x=1")))[::2] == (200, b"ok\n")
        status, headers, payload = await _request(port, _get("/health", "HEAD"))
        assert (status, headers["content-length"], payload) == (200, "3", b"")

    _serve(Stats("client", "c1"), lambda: state["ready"], body)


@pytest.mark.parametrize("raw, status", [
    (_get("/nope"), 404),
    (_get("/"), 404),
    (_get("/metrics", "POST"), 405),
    (_get("/metrics", "DELETE"), 405),
    (b"hello\r\n\r\n", 400),
    (b"GET /metrics\r\n\r\n", 400),
    (b"GET /metrics SPDY/3\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * MAX_REQUEST_HEAD + b"\r\n\r\n", 431),
    (b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * (4 * MAX_REQUEST_HEAD), 431),  # never ends
])
def test_error_statuses(raw: bytes, status: int) -> None:
    async def body(port: int) -> None:
        got, headers, _ = await _request(port, raw)
        assert got == status
        assert headers["connection"] == "close"
        if status == 405:
            assert headers["allow"] == "GET, HEAD"

    _serve(Stats("edge", "e"), lambda: True, body)


def test_idle_client_is_closed() -> None:
    assert IDLE_TIMEOUT == 5.0

    async def body(port: int) -> None:
        for first in (b"", b"GET /metrics HTTP/1.1\r\n"):  # silent, and stalled mid-head
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(first)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            assert 0.2 <= loop.time() - t0 < 3
            writer.close()

    _serve(Stats("edge", "e"), lambda: True, body, idle_timeout=0.3)


def test_ipv6_listen() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")

    async def body(port: int) -> None:
        assert (await _request(port, _get("/health"), host="::1"))[::2] == (200, b"ok\n")

    _serve(Stats("edge", "e"), lambda: True, body, addr="[::1]:0")


def test_bad_metrics_addr() -> None:
    with pytest.raises(ValueError, match=re.escape("FERRYMAN_METRICS_ADDR='abc': expected HOST:PORT")):
        asyncio.run(start_metrics_server("abc", Stats("edge", "e"), lambda: True))


# ---------------------------------------------------------------------------- HOST:PORT
@pytest.mark.parametrize("value, allow_zero, expected", [
    ("127.0.0.1:8443", False, ("127.0.0.1", 8443)),
    ("edge.example.com:443", False, ("edge.example.com", 443)),
    ("[::1]:9100", False, ("::1", 9100)),
    ("[::]:0", True, ("::", 0)),
    (" 0.0.0.0:65535 ", False, ("0.0.0.0", 65535)),
    ("localhost:0", True, ("localhost", 0)),
])
def test_parse_hostport_ok(value: str, allow_zero: bool, expected: tuple[str, int]) -> None:
    assert parse_hostport(value, "FERRYMAN_X", allow_zero=allow_zero) == expected


@pytest.mark.parametrize("value, allow_zero, message", [
    ("x:99999", False, "FERRYMAN_X='x:99999': port must be 1-65535"),
    ("x:99999", True, "FERRYMAN_X='x:99999': port must be 1-65535 (or 0 for any free port)"),
    ("x:0", False, "FERRYMAN_X='x:0': port must be 1-65535"),
    ("x:http", False, "FERRYMAN_X='x:http': port must be 1-65535"),
    ("x:", False, "FERRYMAN_X='x:': port must be 1-65535"),
    ("x:-1", False, "FERRYMAN_X='x:-1': port must be 1-65535"),
    ("abc", False, "FERRYMAN_X='abc': expected HOST:PORT"),
    ("", False, "FERRYMAN_X='': expected HOST:PORT"),
    (":80", False, "FERRYMAN_X=':80': host is empty"),
    ("::1:80", False, "FERRYMAN_X='::1:80': an IPv6 address must be in brackets"),
    ("[::1]80", False, "FERRYMAN_X='[::1]80': expected [IPV6]:PORT"),
    ("[::1:80", False, "FERRYMAN_X='[::1:80': expected [IPV6]:PORT"),
    ("[nope]:80", False, "FERRYMAN_X='[nope]:80': 'nope' is not an IPv6 address"),
    ("a b:80", False, "FERRYMAN_X='a b:80': 'a b' is not a valid host"),
])
def test_parse_hostport_errors(value: str, allow_zero: bool, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_hostport(value, "FERRYMAN_X", allow_zero=allow_zero)
    assert str(info.value).startswith(message)


# ---------------------------------------------------------------------------- logging
@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_log_lines(restore_root: None, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info", "json", "edge", "edge-1")
    setup_logging("info", "json", "edge", "edge-1")  # idempotent: still one handler
    assert len(logging.getLogger().handlers) == 1
    log = logging.getLogger("ferryman.test")
    log.debug("hidden at info level")
    log.info("tunnel closed", extra={"tunnel": "t1", "reason": "keepalive_timeout", "n": 3,
                                     "path": Path("/a b"), "tags": ("x", 1), "node": "other"})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("flow failed %s", 42)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    first, second = (json.loads(line) for line in lines)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert {k: first[k] for k in ("level", "role", "node", "logger", "msg", "tunnel", "reason", "n")} == {
        "level": "INFO", "role": "edge", "node": "edge-1", "logger": "ferryman.test",
        "msg": "tunnel closed", "tunnel": "t1", "reason": "keepalive_timeout", "n": 3}
    assert first["path"] == "/a b" and first["tags"] == ["x", 1] and first["node_"] == "other"
    assert "exc" not in first
    assert second["level"] == "ERROR" and second["msg"] == "flow failed 42"
    assert second["exc"].startswith("Traceback") and "RuntimeError: boom" in second["exc"]


def test_text_log_lines(restore_root: None, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("debug", "text", "edge", "edge-1")
    log = logging.getLogger("ferryman.test")
    log.debug("tunnel closed", extra={"tunnel": "t1", "reason": "keepalive_timeout"})
    log.warning("odd", extra={"why": "two words", "empty": ""})
    err = capsys.readouterr().err.splitlines()
    ts = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    assert re.fullmatch(ts + r" DEBUG edge\[edge-1\] tunnel closed tunnel=t1 reason=keepalive_timeout", err[0])
    assert re.fullmatch(ts + r' WARNING edge\[edge-1\] odd why="two words" empty=""', err[1])


def test_setup_logging_rejects_bad_values(restore_root: None) -> None:
    with pytest.raises(ValueError, match="FERRYMAN_LOG_FORMAT='xml'"):
        setup_logging("info", "xml", "edge", "e")
    with pytest.raises(ValueError, match="FERRYMAN_LOG_LEVEL='loud'"):
        setup_logging("loud", "text", "edge", "e")
