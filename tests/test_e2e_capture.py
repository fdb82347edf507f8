"""Client agent capture end to end: SOCKS5 UDP ASSOCIATE, the HTTP CONNECT proxy and the
initiating process in the traffic log, through real processes (edge, connector, client,
backends; a control plane for the traffic log).

Covered:
- SOCKS5 UDP ASSOCIATE: datagrams to an IPv4 and to a domain-name destination (resolved by
  the connector) echoed byte for byte, answers wrapped with that destination as source;
  fragments dropped and counted; an uncovered destination refused and logged once; closing
  the control connection ends every UDP flow of the association (down to the edge) and
  closes the relay socket;
- HTTP CONNECT: a flow with content checked, early data sent with the request included;
  each error status with the edge's reason and code (403 no application, 502 dial refused,
  503 no connector, 504 dial timeout); an oversized head (431), a malformed target (400),
  a malformed request (400), a non-CONNECT method (405 with ``Allow: CONNECT``);
- the traffic log's ``process`` field names this test's process (``comm[pid]``) for a
  port forward, SOCKS5 CONNECT, HTTP CONNECT and a UDP forward.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import threading
import time

import pytest

from dataplane.fabric import free_port

KiB = 1 << 10


def read_log(fab, name: str) -> str:
    with open(fab.logs[name], "rb") as fh:
        return fh.read().decode(errors="replace")


# ---------------------------------------------------------------------------- SOCKS5 UDP
def _associate(socks_port: int) -> tuple[socket.socket, tuple[str, int]]:
    """UDP ASSOCIATE (client address all zeros); returns the control connection and the relay address."""
    ctl = socket.create_connection(("127.0.0.1", socks_port), timeout=10)
    ctl.sendall(b"\x05\x01\x00")
    assert ctl.recv(2) == b"\x05\x00"
    ctl.sendall(b"\x05\x03\x00\x01" + socket.inet_aton("0.0.0.0") + struct.pack("!H", 0))
    rep = b""
    while len(rep) < 10:
        chunk = ctl.recv(10 - len(rep))
        assert chunk, f"control connection closed after {rep!r}"
        rep += chunk
    assert rep[:4] == b"\x05\x00\x00\x01", f"UDP ASSOCIATE refused: {rep!r}"
    relay = (socket.inet_ntoa(rep[4:8]), struct.unpack("!H", rep[8:10])[0])
    assert relay[0] == "127.0.0.1" and relay[1] > 0
    return ctl, relay


def _udp_header(host: str, port: int, frag: int = 0) -> bytes:
    try:
        addr = b"\x01" + socket.inet_aton(host)
    except OSError:
        addr = b"\x03" + bytes([len(host)]) + host.encode()
    return b"\x00\x00" + bytes([frag]) + addr + struct.pack("!H", port)


def _udp_roundtrip(sock: socket.socket, relay: tuple, host: str, port: int, payload: bytes) -> bytes:
    """Send ``payload`` to host:port through the relay; return the whole answer datagram (resending:
    UDP may lose one)."""
    for _ in range(20):
        sock.sendto(_udp_header(host, port) + payload, relay)
        try:
            data, src = sock.recvfrom(70000)
        except socket.timeout:
            continue
        assert src == relay, f"answer from {src}, not the relay {relay}"
        return data
    raise AssertionError(f"no answer from {host}:{port} through the SOCKS UDP relay")


@pytest.mark.timeout(40)
def test_socks5_udp_associate(backend, fabric, xfer):
    echo = backend("udp-echo")
    socks_port = free_port()
    # Two UDP applications on the echo backend: by address, and by name (resolved by the connector).
    fab = fabric([("127.0.0.1", 0, "127.0.0.1", echo.port, "udp"), ("127.0.0.1", 0, "localhost", echo.port, "udp")],
                 env={"FERRYMAN_SOCKS_LISTEN": f"127.0.0.1:{socks_port}"})
    ctl, relay = _associate(socks_port)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(1.0)
    with ctl, sock:
        for size in (1, 512, 1200):  # (within what a QUIC tunnel datagram carries too)
            payload = os.urandom(size)
            got = _udp_roundtrip(sock, relay, "127.0.0.1", echo.port, payload)
            assert got == _udp_header("127.0.0.1", echo.port) + payload, f"{size}-byte datagram by address"
        payload = os.urandom(700)
        got = _udp_roundtrip(sock, relay, "localhost", echo.port, payload)
        # The answer names the destination as asked: the domain name (never resolved here).
        assert got == _udp_header("localhost", echo.port) + payload, "datagram by domain name"
        assert xfer.metric(xfer.scrape(fab.metrics["edge-1"]), "ferryman_flows") == 2  # one flow per destination

        # A fragment is dropped and counted, never sent on.
        sock.sendto(_udp_header("127.0.0.1", echo.port, frag=1) + b"fragment", relay)
        xfer.wait_metric(fab.metrics["client-1"], "ferryman_datagrams_dropped_total", 1, reason="socks_fragment")
        with pytest.raises(socket.timeout):
            sock.recvfrom(70000)

        # An uncovered destination is refused by the edge; the reason is logged once for it.
        for _ in range(5):
            sock.sendto(_udp_header("10.1.2.3", 53) + b"query", relay)
        xfer.wait_for(lambda: "socks udp destination refused" in read_log(fab, "client-1"), 5,
                      "the refusal to be logged")
        time.sleep(0.3)
        log = read_log(fab, "client-1")
        assert log.count("socks udp destination refused") == 1, log[-3000:]
        assert "no application covers 10.1.2.3:53" in log
        assert xfer.metric(xfer.scrape(fab.metrics["client-1"]), "ferryman_datagrams_dropped_total",
                           reason="flow_refused") >= 4
    # Control connection closed: the association's flows end at once (no idle timeout) and the
    # relay socket is closed.
    xfer.wait_for(lambda: xfer.metric(xfer.scrape(fab.metrics["edge-1"]), "ferryman_flows") == 0, 5,
                  "the association's UDP flows to end at the edge")

    def relay_closed() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(relay)
            except OSError:
                return False
            return True
    xfer.wait_for(relay_closed, 5, "the relay socket to close")
    assert "Traceback" not in read_log(fab, "client-1")


# ---------------------------------------------------------------------------- HTTP CONNECT
def _http(port: int, request: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes, socket.socket]:
    """Send ``request``; read the response head; returns status, headers (lower-case), what
    followed the head so far, and the socket."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(request)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, f"connection closed before a response head: {buf!r}"
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    m = re.fullmatch(r"HTTP/1\.1 (\d{3}) .*", lines[0])
    assert m, f"bad status line {lines[0]!r}"
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(m.group(1)), headers, rest, s


def _error(port: int, request: bytes) -> tuple[int, dict[str, str], str]:
    """An error response: status, headers and the whole body (read to the close); for a 200 the
    tunnel is closed at once and the body is empty."""
    status, headers, rest, s = _http(port, request)
    with s:
        if status == 200:
            return status, headers, ""
        body = rest + xfer_recv_all(s)
    assert len(body) == int(headers["content-length"])
    return status, headers, body.decode()


def xfer_recv_all(s: socket.socket) -> bytes:
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return out
        out += chunk


def _connect_request(target: str) -> bytes:
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: test\r\n\r\n".encode()


@pytest.mark.timeout(50)
def test_http_connect_flows_and_errors(backend, fabric, xfer):
    echo, down = backend("echo"), backend("echo")
    # A backend that completes no handshake once its accept queue is full: the connector's dial times out.
    stalled = socket.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(0)
    http_port = free_port()
    fab = fabric([echo, down, stalled.getsockname()[1]],
                 env={"FERRYMAN_HTTP_LISTEN": f"127.0.0.1:{http_port}", "FERRYMAN_DIAL_TIMEOUT": "1"})
    fillers = []
    try:
        # A flow with early data: bytes sent with the request, before the 200, are not lost.
        early = os.urandom(3 * KiB)
        status, headers, rest, s = _http(http_port, _connect_request(f"127.0.0.1:{echo.port}") + early)
        with s:
            assert status == 200
            more = os.urandom(200 * KiB)
            sender = threading.Thread(target=lambda: (s.sendall(more), s.shutdown(socket.SHUT_WR)), daemon=True)
            sender.start()
            got = rest + xfer.recv_all(s)
            sender.join(5)
        assert got == early + more
        assert echo.wait_event("eof", bytes=len(early) + len(more))
        # A name is passed to the edge as is (never resolved here): no application names "localhost".
        status, _, body = _error(http_port, _connect_request(f"localhost:{echo.port}"))
        assert status == 403 and f"no application covers localhost:{echo.port}" in body

        # 403: no application covers the destination.
        status, headers, body = _error(http_port, _connect_request("10.1.2.3:22"))
        assert (status, headers["x-ferryman-reason"]) == (403, "no_application")
        assert "no application covers 10.1.2.3:22" in body
        # 502: the backend refuses the connection.
        down.stop()
        status, headers, body = _error(http_port, _connect_request(f"127.0.0.1:{down.port}"))
        assert (status, headers["x-ferryman-reason"]) == (502, "dial_refused")
        assert f"connection refused by 127.0.0.1:{down.port}" in body
        # 504: the backend does not answer within FERRYMAN_DIAL_TIMEOUT.
        for _ in range(4):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(stalled.getsockname())
            fillers.append(f)
        status, headers, body = _error(http_port, _connect_request(f"127.0.0.1:{stalled.getsockname()[1]}"))
        assert (status, headers["x-ferryman-reason"]) == (504, "dial_timeout"), body
        assert f"127.0.0.1:{stalled.getsockname()[1]} did not answer within 1s" in body, body

        # Malformed requests never reach the edge.
        status, headers, body = _error(http_port, b"CONNECT " + b"a" * 9000 + b":443 HTTP/1.1\r\n\r\n")
        assert status == 431
        status, headers, body = _error(http_port, b"CONNECT x HTTP/1.1\r\nX-Big: " + b"b" * 9000)
        assert status == 431
        status, headers, body = _error(http_port, _connect_request("no-port-here"))
        assert status == 400 and "HOST:PORT" in body
        status, headers, body = _error(http_port, _connect_request("bad_host!:443"))
        assert status == 400
        status, headers, body = _error(http_port, b"this is not http\r\n\r\n")
        assert status == 400
        status, headers, body = _error(http_port, b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
        assert status == 405 and headers["allow"] == "CONNECT" and "GET" in body

        # 503: no connector is up for the application (the only one drains: GOAWAY, then it exits).
        fab.kill("connector-1", signal.SIGTERM)
        answers: list[tuple] = []

        def unavailable() -> bool:
            answers.append(_error(http_port, _connect_request(f"127.0.0.1:{echo.port}")))
            return answers[-1][1].get("x-ferryman-reason") == "no_connector"
        xfer.wait_for(unavailable, 10, "the edge to have no connector", interval=0.2)
        # (while it went away: 200, or 503 connector_lost for a flow it was asked to open as it closed)
        assert {(a[0], a[1].get("x-ferryman-reason", "")) for a in answers} <= {
            (200, ""), (503, "connector_lost"), (503, "no_connector")}, answers
        status, headers, body = answers[-1]
        assert (status, headers["x-ferryman-reason"]) == (503, "no_connector"), body
        assert "no connector of group 'default' is connected for application 'forward-1'" in body
    finally:
        for f in fillers:
            f.close()
        stalled.close()
    assert "Traceback" not in read_log(fab, "client-1")


# ---------------------------------------------------------------------------- process in the traffic log
@pytest.mark.timeout(60)
def test_traffic_log_names_the_initiating_process(backend, fabric, xfer):
    echo, uecho = backend("echo"), backend("udp-echo")
    socks_port, http_port = free_port(), free_port()
    fab = fabric([echo, ("127.0.0.1", 0, "127.0.0.1", uecho.port, "udp")], managed=True,
                 env={"FERRYMAN_SOCKS_LISTEN": f"127.0.0.1:{socks_port}", "FERRYMAN_HTTP_LISTEN": f"127.0.0.1:{http_port}",
                      "FERRYMAN_HEARTBEAT_INTERVAL": "0.5", "FERRYMAN_UDP_IDLE_TIMEOUT": "1",
                      # this test process holds many fds: on a loaded machine its first scan may take
                      # longer than the default 4 ms, and the record would then name no process
                      "FERRYMAN_PROCESS_LOOKUP_WAIT": "0.5"})
    with open("/proc/self/comm") as fh:
        me = f"{fh.read().strip()}[{os.getpid()}]"

    def tcp_echo(s: socket.socket, payload: bytes) -> None:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        assert xfer.recv_all(s) == payload

    # The first connection of a process the client has never seen may be looked up too late for
    # its OPEN (a full /proc scan can take longer than the few ms OPEN waits); from then on the
    # process is known. Warm up once, then check every kind of capture.
    with xfer.connect(fab.forward_ports[0]) as s:
        tcp_echo(s, b"warm-up")
    with xfer.connect(fab.forward_ports[0]) as s:
        tcp_echo(s, b"via forward")
    s, code = xfer.socks_connect(socks_port, "127.0.0.1", echo.port)
    with s:
        assert code == 0
        tcp_echo(s, b"via socks5!")
    status, _, rest, s = _http(http_port, _connect_request(f"127.0.0.1:{echo.port}"))
    with s:
        assert status == 200 and rest == b""
        tcp_echo(s, b"via http connect")
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))
    u.settimeout(1.0)
    with u:
        for _ in range(20):
            u.sendto(b"via udp forward", ("127.0.0.1", fab.forward_ports[1]))
            try:
                assert u.recvfrom(2048)[0] == b"via udp forward"
                break
            except socket.timeout:
                continue
        else:
            raise AssertionError("no UDP answer")

    def records() -> list[dict] | None:
        rows = [r for r in fab.admin("GET", "/v1/traffic?limit=1000") if r["action"] == "allow"]
        tcp = [r for r in rows if r["transport"] == "tcp" and r["bytes_sent"] in (11, 16)]
        udp = [r for r in rows if r["transport"] == "udp" and r["bytes_sent"] >= 15]
        # "via forward" and "via socks5!" are 11 bytes each, "via http connect" 16
        return tcp + udp if len(tcp) == 3 and udp else None

    rows = xfer.wait_for(records, 10, "the traffic records of the four flows", interval=0.3)
    for r in rows:
        assert r["process"] == me, (f"{r['transport']} record {r['id']} ({r['bytes_sent']} bytes) names "
                                    f"{r['process']!r}, not {me!r}")
