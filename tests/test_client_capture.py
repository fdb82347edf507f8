"""Unit tests of the client agent's capture pieces, in one process on loopback with real sockets:

- ``process.py``: the owning process of TCP (IPv4, IPv6) and UDP (unconnected, connected)
  sockets, "" for what cannot be known, the /proc/net fallback, the asynchronous
  ``find`` answering within its wait; and the measured cost per lookup (printed);
- ``httpconnect.py``: CONNECT targets, status for each refusal code, error responses;
  direct routing with early data, and a refused direct dial (502 with its code);
- ``socks.py`` + ``direct.py`` with every destination routed ``"direct"``: CONNECT relayed
  with half-close and back-pressure (a reader that stops holds the sender, memory stays
  bounded); UDP ASSOCIATE: answers wrapped with the destination, fragments and foreign
  sources dropped and counted, the per-association flow limit, closing the control
  connection closes the relay and its flows.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import struct
import subprocess
import time
import types

import msgspec
import pytest
import uvloop

from dataplane.client import capture, httpconnect, process, socks
from dataplane.client.direct import DirectUdp
from dataplane.basics.metrics import Stats
from dataplane.basics.settings import ClientSettings as Settings

MiB = 1 << 20

pytestmark = pytest.mark.timeout(30)


def own_process() -> str:
    with open("/proc/self/comm") as fh:
        return f"{fh.read().strip()}[{os.getpid()}]"


# ---------------------------------------------------------------------------- process lookup
@pytest.fixture
def finder():
    f = process.ProcessFinder(skip_self=False)
    yield f
    f.close()


def tcp_pair(family: int = socket.AF_INET, host: str = "127.0.0.1"):
    srv = socket.socket(family)
    srv.bind((host, 0))
    srv.listen()
    app = socket.create_connection(srv.getsockname()[:2])
    accepted, _ = srv.accept()
    srv.close()
    return app, accepted


def test_process_of_tcp_and_udp_sockets(finder):
    me = own_process()
    app, accepted = tcp_pair()
    with app, accepted:
        assert finder.lookup("tcp", accepted.getpeername(), accepted.getsockname()) == me
        # The pair the other way round is our accepted socket's: also this process, but a
        # listener address that matches nothing is unknown.
        assert finder.lookup("tcp", accepted.getpeername(), ("127.0.0.1", 1)) == ""
    app6, accepted6 = tcp_pair(socket.AF_INET6, "::1")
    with app6, accepted6:
        assert finder.lookup("tcp", accepted6.getpeername()[:2], accepted6.getsockname()[:2]) == me
    relay = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    relay.bind(("127.0.0.1", 0))
    unconnected = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    unconnected.bind(("127.0.0.1", 0))
    connected = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    connected.connect(relay.getsockname())
    with relay, unconnected, connected:
        assert finder.lookup("udp", unconnected.getsockname(), None) == me
        assert finder.lookup("udp", unconnected.getsockname(), relay.getsockname()) == me
        assert finder.lookup("udp", connected.getsockname(), relay.getsockname()) == me
        assert finder.lookup("udp", connected.getsockname(), None) == me  # (found in /proc/net/udp)
    # Closed sockets and remote peers: unknown, never an exception.
    assert finder.lookup("tcp", ("127.0.0.1", 9), ("127.0.0.1", 10)) == ""
    assert finder.lookup("udp", ("192.0.2.1", 9), None) == ""
    assert finder.lookup("tcp", ("not an address", 9), ("127.0.0.1", 1)) == ""


def test_process_lookup_without_netlink_reads_proc_net(finder):
    finder.sockets._netlink_ok = False
    app, accepted = tcp_pair()
    with app, accepted:
        assert finder.lookup("tcp", accepted.getpeername(), accepted.getsockname()) == own_process()
        assert finder.lookup("tcp", accepted.getpeername(), ("127.0.0.1", 1)) == ""


def test_expensive_scans_are_paced(finder, monkeypatch):
    """A process whose scan took long is not scanned again at once: a new socket of it is unknown
    (""), while a socket found before is still answered from the cache."""
    monkeypatch.setattr(process, "EXPENSIVE_SCAN", 0.0)
    monkeypatch.setattr(process, "PACE", 1e6)
    a, b = tcp_pair()
    with a, b:
        assert finder.lookup("tcp", b.getpeername(), b.getsockname()) == own_process()  # full scan
        c, d = tcp_pair()
        with c, d:
            assert finder.lookup("tcp", d.getpeername(), d.getsockname()) == ""  # paced: not scanned again
            assert finder.lookup("tcp", b.getpeername(), b.getsockname()) == own_process()  # cached
    assert finder.index.full_scans == 1


def test_process_lookup_cost(finder, capsys, monkeypatch):
    """Not a timing assertion (the bench measures): prints what one lookup costs on this machine."""
    monkeypatch.setattr(process, "EXPENSIVE_SCAN", 10.0)  # no pacing here, whatever this machine's speed
    me = own_process()
    pairs = []
    finder.lookup("tcp", ("127.0.0.1", 9), ("127.0.0.1", 10))  # netlink socket open
    a, b = tcp_pair()
    started = time.perf_counter()
    assert finder.lookup("tcp", b.getpeername(), b.getsockname()) == me  # this process is in no cache yet
    first = time.perf_counter() - started
    pairs.append((a, b))
    total = 0.0
    n = 100
    for _ in range(n):
        a, b = tcp_pair()
        pairs.append((a, b))
        started = time.perf_counter()
        assert finder.lookup("tcp", b.getpeername(), b.getsockname()) == me
        total += time.perf_counter() - started
    started = time.perf_counter()
    for _, b in pairs[1:]:
        finder.sockets.find("tcp", b.getpeername(), b.getsockname())
    netlink = (time.perf_counter() - started) / n
    fds = len(os.listdir("/proc/self/fd"))
    for a, b in pairs:
        a.close()
        b.close()
    with capsys.disabled():
        print(f"\nprocess lookup: socket inode (netlink) {netlink * 1e6:.1f} µs; first lookup of a process "
              f"{first * 1e3:.2f} ms; next ones {total / n * 1e3:.3f} ms each ({fds} open fds in the process, "
              f"{len([p for p in os.listdir('/proc') if p.isdigit()])} processes)")


def test_find_answers_within_its_wait(finder):
    async def main():
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        app = socket.create_connection(("127.0.0.1", port))
        answers: list[tuple[str, float]] = []
        started = loop.time()
        finder.wait = 0.5  # generous here: the lookup itself is what is checked
        finder.find("tcp", app.getsockname(), ("127.0.0.1", port), lambda p: answers.append((p, loop.time())))
        finder.find("tcp", ("127.0.0.1", 9), ("127.0.0.1", 10), lambda p: answers.append((p, loop.time())))
        finder.find("tcp", None, None, lambda p: answers.append((p, loop.time())))  # no address: at once
        assert answers and answers[0][0] == ""
        while len(answers) < 3 and loop.time() - started < 2:
            await asyncio.sleep(0.001)
        app.close()
        srv.close()
        return answers, started

    answers, started = uvloop.run(main())
    assert sorted(a for a, _ in answers) == sorted(["", "", own_process()])
    # A short wait answers "" in time, and the late answer is only counted.
    async def short():
        f = process.ProcessFinder(wait=0.0, skip_self=False)
        got = []
        f.find("tcp", ("127.0.0.1", 9), ("127.0.0.1", 10), got.append)
        await asyncio.sleep(0.05)
        f.close()
        return got

    assert uvloop.run(short()) == [""]


def test_parse_addr():
    assert process.parse_addr("127.0.0.1:80") == ("127.0.0.1", 80)
    assert process.parse_addr("::1:443") == ("::1", 443)
    assert process.parse_addr("[::1]:443") == ("::1", 443)
    assert process.parse_addr("probe") is None
    assert process.parse_addr("") is None


# ---------------------------------------------------------------------------- HTTP CONNECT parts
def test_connect_targets():
    assert httpconnect.parse_target("db.corp.example:5432") == ("db.corp.example", 5432)
    assert httpconnect.parse_target("10.0.0.1:22") == ("10.0.0.1", 22)
    assert httpconnect.parse_target("[2001:db8::1]:443") == ("2001:db8::1", 443)
    for bad in ("db.corp.example", ":443", "host:0", "host:65536", "host:https", "[::1]443", "[nope]:1",
                "bad_host!:1", "-x.example:1", "a..b:1", "/path:1"):
        with pytest.raises(ValueError):
            httpconnect.parse_target(bad)


def test_status_for_each_refusal():
    for code in ("no_application", "not_allowed", "mfa_required", "blocked_by_policy", "device_not_compliant",
                 "not_assigned", "sign_in_required"):
        assert httpconnect.status_for(code) == 403, code
    for code in ("dial_refused", "dial_error", "dns_error"):
        assert httpconnect.status_for(code) == 502, code
    for code in ("edge_unreachable", "no_connector", "tunnel_lost"):
        assert httpconnect.status_for(code) == 503, code
    for code in ("open_timeout", "dial_timeout"):
        assert httpconnect.status_for(code) == 504, code
    raw = httpconnect.response(403, "MFA required for app 'x'", {"X-Ferryman-Reason": "mfa_required"})
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 403 Forbidden\r\n") and b"\r\nX-Ferryman-Reason: mfa_required" in head
    assert body == b"MFA required for app 'x'\n" and f"Content-Length: {len(body)}".encode() in head
    # An edge's code is any text: a CR/LF in it must not start a header or a body of its choosing.
    raw = httpconnect.response(502, "refused", {"X-Ferryman-Reason": "x\r\nSet-Cookie: a=b\r\n\r\n<html>"})
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.endswith(b"\r\nX-Ferryman-Reason: x??Set-Cookie: a=b????<html>") and body == b"refused\n"


# ---------------------------------------------------------------------------- direct routing
def stub_client(**settings: object) -> types.SimpleNamespace:
    """What the front ends use of a Client, routing everything direct."""
    opened = []
    return types.SimpleNamespace(
        settings=msgspec.structs.replace(Settings(), **settings), stats=Stats("client", "test"),
        socket_buffer=64 * 1024, route=lambda host, port, protocol="tcp": "direct", open=opened.append,
        opened=opened, local_users=process.LocalUsers(str(settings.get("local_users", ""))), profile=None,
        dns_rebind_allow=())


class _Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.t = transport

    def data_received(self, data):
        self.t.write(data)

    def eof_received(self):
        self.t.write_eof()
        return True


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.t = transport

    def datagram_received(self, data, addr):
        self.t.sendto(b"echo:" + data, addr)


async def _read_exactly(reader: asyncio.StreamReader, n: int) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), 10)


def test_socks_connect_direct_relay_half_close_and_backpressure():
    async def main():
        loop = asyncio.get_running_loop()
        client = stub_client()
        echo = await loop.create_server(_Echo, "127.0.0.1", 0)
        echo_port = echo.sockets[0].getsockname()[1]
        front = await loop.create_server(lambda: socks.Socks5(client), "127.0.0.1", 0)
        port = front.sockets[0].getsockname()[1]

        # Echo with early data sent with the request, then a half-close: the rest still comes back.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        early = os.urandom(5000)
        writer.write(b"\x05\x01\x00\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", echo_port)
                     + early)
        assert await _read_exactly(reader, 2) == b"\x05\x00"
        assert (await _read_exactly(reader, 10))[:2] == b"\x05\x00"
        assert await _read_exactly(reader, len(early)) == early
        body = os.urandom(MiB)
        writer.write(body)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == body
        writer.close()

        # A destination nobody listens on: "connection refused" (5).
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x05\x01\x00\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", dead))
        assert await _read_exactly(reader, 2) == b"\x05\x00"
        assert (await _read_exactly(reader, 10))[1] == socks.REP_REFUSED
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()

        # Back-pressure: a server pushing 64 MiB to an app that does not read is held back.
        pushed = [0]
        done = asyncio.Event()

        class Pusher(asyncio.Protocol):
            def connection_made(self, transport):
                self.t = transport
                self.paused = asyncio.Event()
                loop.create_task(self.push())

            def pause_writing(self):
                self.paused.clear()

            def resume_writing(self):
                self.paused.set()

            async def push(self):
                self.paused.set()
                chunk = b"z" * (256 * 1024)
                while pushed[0] < 64 * MiB:
                    await self.paused.wait()
                    self.t.write(chunk)
                    pushed[0] += len(chunk)
                    await asyncio.sleep(0)
                self.t.write_eof()
                done.set()

        pusher = await loop.create_server(Pusher, "127.0.0.1", 0)
        pport = pusher.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 16)
        writer.write(b"\x05\x01\x00\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", pport))
        assert await _read_exactly(reader, 2) == b"\x05\x00"
        assert (await _read_exactly(reader, 10))[1] == 0
        reader._transport.pause_reading()  # the app stops reading
        await asyncio.sleep(1.0)
        held = pushed[0]
        assert held < 24 * MiB, f"{held / MiB:.1f} MiB pushed to an app that reads nothing: no back-pressure"
        reader._transport.resume_reading()
        total = 0
        while True:
            chunk = await asyncio.wait_for(reader.read(1 << 20), 10)
            if not chunk:
                break
            assert chunk.count(b"z") == len(chunk)
            total += len(chunk)
        assert total == 64 * MiB and done.is_set()
        writer.close()
        for server in (echo, front, pusher):
            server.close()

    uvloop.run(main())


def test_http_connect_direct_with_early_data_and_refusal():
    async def main():
        loop = asyncio.get_running_loop()
        client = stub_client()
        echo = await loop.create_server(_Echo, "127.0.0.1", 0)
        echo_port = echo.sockets[0].getsockname()[1]
        front = await loop.create_server(lambda: httpconnect.HttpConnect(client), "127.0.0.1", 0)
        port = front.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        early = os.urandom(2000)
        writer.write(f"CONNECT 127.0.0.1:{echo_port} HTTP/1.1\r\nHost: 127.0.0.1:{echo_port}\r\n\r\n".encode() + early)
        established = httpconnect.ESTABLISHED
        assert await _read_exactly(reader, len(established)) == established
        assert await _read_exactly(reader, len(early)) == early
        writer.write(b"after")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b"after"
        writer.close()

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"CONNECT 127.0.0.1:{dead} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
        assert b"X-Ferryman-Reason: dial_refused\r\n" in answer and f"refused by 127.0.0.1:{dead}".encode() in answer
        writer.close()
        echo.close()
        front.close()

    uvloop.run(main())


def test_local_front_ends_close_a_handshake_that_does_not_complete_in_time():
    """A local process that opens a SOCKS5 or HTTP CONNECT connection and never finishes its
    handshake is closed after FERRYMAN_HANDSHAKE_TIMEOUT; a connection that finished it stays."""
    async def main():
        loop = asyncio.get_running_loop()
        client = stub_client(handshake_timeout=0.3)
        echo = await loop.create_server(_Echo, "127.0.0.1", 0)
        echo_port = echo.sockets[0].getsockname()[1]
        socks_front = await loop.create_server(lambda: socks.Socks5(client), "127.0.0.1", 0)
        http_front = await loop.create_server(lambda: httpconnect.HttpConnect(client), "127.0.0.1", 0)
        socks_port = socks_front.sockets[0].getsockname()[1]
        http_port = http_front.sockets[0].getsockname()[1]

        silent = await asyncio.open_connection("127.0.0.1", socks_port)
        greeted = await asyncio.open_connection("127.0.0.1", socks_port)
        greeted[1].write(b"\x05\x01\x00")  # a greeting, then no request
        half_head = await asyncio.open_connection("127.0.0.1", http_port)
        half_head[1].write(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: x\r\n")
        done = await asyncio.open_connection("127.0.0.1", socks_port)
        done[1].write(b"\x05\x01\x00\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", echo_port))
        answer = await _read_exactly(done[0], 2 + 10)  # method choice, then the reply (IPv4 BND address)
        assert answer[:4] == b"\x05\x00\x05\x00", answer

        started = loop.time()
        assert await asyncio.wait_for(silent[0].read(), 5) == b""
        assert await asyncio.wait_for(greeted[0].read(), 5) == b"\x05\x00"  # the method choice, then EOF
        answer = await asyncio.wait_for(half_head[0].read(), 5)
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
        assert 0.2 < loop.time() - started < 3.0
        await asyncio.sleep(0.4)  # well past the timeout: the relayed connection is still served
        done[1].write(b"still here")
        assert await _read_exactly(done[0], 10) == b"still here"
        for _, writer in (silent, greeted, half_head, done):
            writer.close()
        for server in (echo, socks_front, http_front):
            server.close()

    uvloop.run(main())


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a process as another user (needs root)")
def test_another_local_user_cannot_use_the_agents_listeners():
    """The listeners carry the signed-in user's identity: a process of another local account
    (uid 65534, run by this test) is refused by SOCKS5 (closed), HTTP CONNECT (403), a TCP
    forward (closed, no flow opened) and a UDP forward (no flow), while this process's own
    connections are served; FERRYMAN_LOCAL_USERS naming that account lets it in."""
    from dataplane.client.forwards import Forward, UdpForward, forward_flow

    def as_nobody(*command: str) -> subprocess.CompletedProcess:
        """``command`` run by uid 65534: curl, a real client nobody here wrote (bash for UDP)."""
        return subprocess.run(command, user=65534, group=65534, extra_groups=[], capture_output=True, text=True,
                              timeout=15)

    async def main():
        loop = asyncio.get_running_loop()
        client = stub_client()
        forward = Forward("127.0.0.1", 0, "10.9.9.9", 22)
        servers = [await loop.create_server(factory, "127.0.0.1", 0) for factory in (
            lambda: socks.Socks5(client), lambda: httpconnect.HttpConnect(client), lambda: forward_flow(client, forward))]
        socks_port, http_port, forward_port = (srv.sockets[0].getsockname()[1] for srv in servers)
        udp, _ = await loop.create_datagram_endpoint(lambda: UdpForward(client, forward), local_addr=("127.0.0.1", 0))
        udp_port = udp.get_extra_info("sockname")[1]

        run = functools.partial(loop.run_in_executor, None)
        target = "http://127.0.0.1:9/"  # (nothing is dialed for the other account)
        done = await run(lambda: as_nobody("curl", "-sS", "--max-time", "5", "--socks5", f"127.0.0.1:{socks_port}",
                                           target))
        # closed before any SOCKS answer (curl says reset or closed, as the timing goes)
        assert "Connection reset by peer" in done.stderr or "connection to proxy closed" in done.stderr, done.stderr
        done = await run(lambda: as_nobody("curl", "-sS", "--max-time", "5", "-p", "-x", f"http://127.0.0.1:{http_port}",
                                           "-o", "/dev/null", "-w", "%{http_connect}", target))
        assert done.stdout == "403", (done.stdout, done.stderr)
        done = await run(lambda: as_nobody("curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{forward_port}/"))
        assert any(said in done.stderr for said in ("Connection reset by peer", "Empty reply", "closed")), done.stderr
        done = await run(lambda: as_nobody("bash", "-c", f"echo ping > /dev/udp/127.0.0.1/{udp_port}"))
        assert done.returncode == 0, done.stderr
        await asyncio.sleep(0.2)
        assert client.opened == []  # nothing was opened for the other account
        assert client.stats.open_failures == {"local_user_refused": 4}
        assert client.stats.datagrams_dropped == {"local_user_refused": 1}

        # This process (the agent's own user) is served by the same listeners.
        reader, writer = await asyncio.open_connection("127.0.0.1", socks_port)
        writer.write(b"\x05\x01\x00")
        assert await _read_exactly(reader, 2) == b"\x05\x00"
        writer.close()
        _, fwd_writer = await asyncio.open_connection("127.0.0.1", forward_port)
        deadline = loop.time() + 5
        while not client.opened and loop.time() < deadline:
            await asyncio.sleep(0.02)
        assert len(client.opened) == 1 and client.opened[0].dest == ("10.9.9.9", 22)
        fwd_writer.close()

        # Named in FERRYMAN_LOCAL_USERS (by name here): let in.
        client.local_users = process.LocalUsers("nobody")
        done = await run(lambda: as_nobody("curl", "-sS", "--max-time", "5", "-p", "-x", f"http://127.0.0.1:{http_port}",
                                           "-o", "/dev/null", "-w", "%{http_connect}", target))
        assert done.stdout == "502", (done.stdout, done.stderr)  # served: port 9 refuses the direct dial
        for server in servers:
            server.close()
        udp.close()

    uvloop.run(main())


def test_local_users_are_parsed_from_names_and_uids():
    users = process.LocalUsers("nobody, 1234", own_uid=1000)
    assert users.uids == {0, 1000, 1234, 65534} and not users.everyone
    assert process.LocalUsers("*").everyone
    with pytest.raises(ValueError, match="FERRYMAN_LOCAL_USERS: no local user 'no-such-user-here'"):
        process.LocalUsers("no-such-user-here")


def test_a_connection_closed_by_its_application_before_the_check_is_refused_quietly():
    """An application that connects and closes at once leaves an orphaned socket (inode 0: no
    owner, and older kernels report root for it). It is refused, but as closed early, counted
    apart and not logged as a refusal; a live socket of another account is still refused."""
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        app = socket.create_connection(listener.getsockname())
        served, _ = listener.accept()  # never closed until the end: the app's side stays in FIN_WAIT2
        app_end, ours = app.getsockname(), served.getsockname()
        users = process.LocalUsers("", own_uid=os.getuid())
        assert users.refusal("tcp", app_end, ours) == ""  # our own live socket: let in
        app.close()
        table = process.SocketTable()
        try:
            assert table.find("tcp", app_end, ours) == (0, -1)
        finally:
            table.close()
        why = users.refusal("tcp", app_end, ours)
        assert why.startswith(process.CLOSED_EARLY) and f"127.0.0.1:{app_end[1]}" in why

        class _Transport:
            def get_extra_info(self, name):
                return {"peername": app_end, "sockname": ours}[name]

        client = stub_client()
        assert capture.local_user_refusal(client, _Transport()).startswith(process.CLOSED_EARLY)
        assert client.stats.open_failures == {"local_closed_early": 1}
        served.close()
    finally:
        listener.close()


def test_socks_udp_associate_direct():
    async def main():
        loop = asyncio.get_running_loop()
        client = stub_client(max_udp_flows=2)
        udp_echo, _ = await loop.create_datagram_endpoint(_UdpEcho, local_addr=("127.0.0.1", 0))
        eport = udp_echo.get_extra_info("sockname")[1]
        udp_echo2, _ = await loop.create_datagram_endpoint(_UdpEcho, local_addr=("127.0.0.1", 0))
        eport2 = udp_echo2.get_extra_info("sockname")[1]
        front = await loop.create_server(lambda: socks.Socks5(client), "127.0.0.1", 0)
        port = front.sockets[0].getsockname()[1]

        app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        app.bind(("127.0.0.1", 0))
        app.setblocking(False)
        # Announce the app's address and port: only it may use the relay.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x05\x01\x00\x05\x03\x00\x01" + socket.inet_aton("127.0.0.1")
                     + struct.pack("!H", app.getsockname()[1]))
        assert await _read_exactly(reader, 2) == b"\x05\x00"
        rep = await _read_exactly(reader, 10)
        assert rep[:4] == b"\x05\x00\x00\x01"
        relay = (socket.inet_ntoa(rep[4:8]), struct.unpack("!H", rep[8:10])[0])

        async def roundtrip(header: bytes, payload: bytes) -> bytes:
            await loop.sock_sendto(app, header + payload, relay)
            data, src = await asyncio.wait_for(loop.sock_recvfrom(app, 70000), 5)
            assert src == relay
            return data

        h1 = b"\x00\x00\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", eport)
        assert await roundtrip(h1, b"one") == h1 + b"echo:one"
        h2 = b"\x00\x00\x00\x03\x09localhost" + struct.pack("!H", eport2)
        assert await roundtrip(h2, b"two") == h2 + b"echo:two"  # the name as asked, as the source

        dropped = client.stats.datagrams_dropped
        # A fragment, a truncated header, another source port: dropped and counted.
        await loop.sock_sendto(app, b"\x00\x00\x01" + h1[3:] + b"frag", relay)
        await loop.sock_sendto(app, b"\x00\x00\x00\x01\x7f", relay)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
            other.sendto(h1 + b"intruder", relay)
        # A third destination is beyond max_udp_flows=2.
        h3 = b"\x00\x00\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", 9)
        await loop.sock_sendto(app, h3 + b"three", relay)
        await loop.sock_sendto(app, h3 + b"three again", relay)
        deadline = loop.time() + 5
        while loop.time() < deadline and (dropped.get("too_many_udp_flows", 0) < 2
                                          or dropped.get("socks_foreign_source", 0) < 1):
            await asyncio.sleep(0.01)
        assert dropped.get("socks_fragment") == 1
        assert dropped.get("socks_bad_header") == 1
        assert dropped.get("socks_foreign_source") == 1
        assert dropped.get("too_many_udp_flows") == 2
        with pytest.raises(TimeoutError):  # none of them got an answer
            await asyncio.wait_for(loop.sock_recvfrom(app, 70000), 0.3)

        writer.close()  # the control connection ends the association: the relay closes
        deadline = loop.time() + 5
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                try:
                    probe.bind(relay)  # the relay's port is free again
                    break
                except OSError:
                    assert loop.time() < deadline, "the relay socket is still open"
            await asyncio.sleep(0.02)
        app.close()
        udp_echo.close()
        udp_echo2.close()
        front.close()

    asyncio.run(main())  # (uvloop has no sock_sendto / sock_recvfrom)


def test_direct_udp_refused_destination_drops_its_queue():
    async def main():
        client = stub_client()
        closed = []
        flow = DirectUdp(client, "name.invalid", 53, lambda d: None, closed.append)
        flow.from_local(b"a")
        flow.from_local(b"b")
        deadline = asyncio.get_running_loop().time() + 10
        while not closed and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert closed == [flow] and flow.done
        assert client.stats.datagrams_dropped.get("flow_refused") == 2

    uvloop.run(main())


def test_an_idle_dns_over_tcp_connection_is_closed(monkeypatch):
    """A DNS-over-TCP connection holds a file descriptor: one that sends no complete query for
    TCP_IDLE seconds while none is being answered is closed (a silent one, one trickling a
    query, and one idle after its answer); answering first is not cut short."""
    from dnslib import QTYPE, RR, A, DNSRecord

    from dataplane.client import dns

    monkeypatch.setattr(dns, "TCP_IDLE", 0.4)

    class Upstream(asyncio.DatagramProtocol):
        def connection_made(self, transport):
            self.t = transport

        def datagram_received(self, data, addr):
            reply = DNSRecord.parse(data).reply()
            reply.add_answer(RR(str(reply.q.qname), QTYPE.A, rdata=A("192.0.2.1"), ttl=60))
            self.t.sendto(reply.pack(), addr)

    async def main():
        loop = asyncio.get_running_loop()
        upstream, _ = await loop.create_datagram_endpoint(Upstream, local_addr=("127.0.0.1", 0))
        client = stub_client(dns_upstream=f"127.0.0.1:{upstream.get_extra_info('sockname')[1]}")
        client.route_name = lambda name: "public"
        resolver = dns.Resolver(client, ("127.0.0.1", 53))
        server = await loop.create_server(lambda: dns.DnsTcp(resolver), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        silent = await asyncio.open_connection("127.0.0.1", port)
        trickling = await asyncio.open_connection("127.0.0.1", port)
        query = DNSRecord.question("www.example.org", "A").pack()
        trickling[1].write(struct.pack("!H", len(query)) + query[:5])
        answered = await asyncio.open_connection("127.0.0.1", port)
        answered[1].write(struct.pack("!H", len(query)) + query)
        (size,) = struct.unpack("!H", await _read_exactly(answered[0], 2))
        reply = DNSRecord.parse(await _read_exactly(answered[0], size))
        assert [str(rr.rdata) for rr in reply.rr] == ["192.0.2.1"]
        started = loop.time()
        for reader, _ in (silent, trickling, answered):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        assert loop.time() - started < 3
        for _, writer in (silent, trickling, answered):
            writer.close()
        server.close()
        upstream.close()

    uvloop.run(main())
