"""Every OPEN is answered, and one client cannot take every pending slot of a connector.

Clients here are real TLS connections with certificates of the fabric's CA speaking the
wire protocol by hand (so nothing on their side times an OPEN out); edge and connector
are the real processes. The destination that never answers is a real listening socket
whose accept queue is full: the kernel drops the SYNs, so the connector's TCP dial hangs
(for longer than the test, ``FERRYMAN_DIAL_TIMEOUT``).

- the edge frees an OPEN the connector does not answer within ``FERRYMAN_OPEN_TIMEOUT``:
  OPEN_FAIL ``open_timeout`` to the client;
- one device (or user) may have only ``FERRYMAN_PENDING_OPENS_SHARE`` of
  ``FERRYMAN_MAX_PENDING_OPENS`` OPENs waiting on a connector tunnel: beyond that its
  OPENs are refused at once (``too_many_pending``) and another client's flows still open;
- the connector answers a destination it cannot even try (a host name that is not valid
  IDNA) with OPEN_FAIL.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from dataplane.basics import pki
from dataplane.wire.frames import (
    DECODERS,
    HEADER,
    HEADER_SIZE,
    PREAMBLE_SIZE,
    FrameType,
    Hello,
    Open,
    OpenFail,
    encode_control,
    encode_preamble,
)


@contextlib.contextmanager
def unanswered_port() -> Iterator[int]:
    """A TCP port on 127.0.0.1 whose accept queue is full: connects to it hang (SYNs dropped)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):  # more than the queue holds; the extra ones just hang
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
            fillers.append(s)
        time.sleep(0.2)
        probe = socket.socket()
        probe.settimeout(0.5)
        with pytest.raises(OSError):  # (socket.timeout): the queue is full, a connect hangs
            probe.connect(("127.0.0.1", port))
        probe.close()
        yield port
    finally:
        for s in fillers:
            s.close()
        listener.close()


class RawClient:
    """A client tunnel driven by hand over real TLS: sends OPENs, collects the answers."""

    def __init__(self, edge_port: int, pki_dir: Path, name: str) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(str(pki_dir / "ca.pem"))
        ctx.load_cert_chain(str(pki_dir / f"{name}.pem"), str(pki_dir / f"{name}.key"))
        raw = socket.create_connection(("127.0.0.1", edge_port), timeout=5)
        self.sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        self.buf = bytearray()
        self.answers: dict[int, tuple[str, str]] = {}  # flow -> (OPEN_OK | OPEN_FAIL code, reason)
        self.next_id = 1
        self.preamble_seen = False
        self.hello_seen = False
        self.sock.sendall(encode_preamble() + encode_control(0, Hello(role="client", node=name, max_frame=262144,
                                                                       window=524288, max_flows=1024)))
        self._read_until(lambda: self.hello_seen, 5)

    def open(self, host: str, port: int) -> int:
        fid = self.next_id
        self.next_id += 2
        self.sock.sendall(encode_control(fid, Open(host=host, port=port)))
        return fid

    def answer(self, fid: int, timeout: float) -> tuple[str, str]:
        self._read_until(lambda: fid in self.answers, timeout)
        return self.answers[fid]

    def _read_until(self, done, timeout: float) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no answer within {timeout:g}s (answers so far: {self.answers})")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except (TimeoutError, socket.timeout):
                continue
            if not chunk:
                raise AssertionError(f"the edge closed the tunnel (answers so far: {self.answers})")
            self.buf += chunk
            self._parse()

    def _parse(self) -> None:
        buf = self.buf
        if not self.preamble_seen:
            if len(buf) < PREAMBLE_SIZE:
                return
            del buf[:PREAMBLE_SIZE]
            self.preamble_seen = True
        while len(buf) >= HEADER_SIZE:
            ftype, _flags, fid, length = HEADER.unpack_from(buf, 0)
            if len(buf) < HEADER_SIZE + length:
                return
            body = bytes(buf[HEADER_SIZE:HEADER_SIZE + length])
            del buf[:HEADER_SIZE + length]
            if ftype == FrameType.HELLO:
                self.hello_seen = True
            elif ftype == FrameType.OPEN_OK:
                self.answers[fid] = ("OPEN_OK", "")
            elif ftype == FrameType.OPEN_FAIL:
                fail: OpenFail = DECODERS[FrameType.OPEN_FAIL].decode(body)
                self.answers[fid] = (fail.code, fail.reason)
            elif ftype == FrameType.RST:
                self.answers.setdefault(fid, ("RST", msgspec.msgpack.decode(body).get("code", "")))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def app(name: str, destination: str, port: str) -> dict:
    return {"name": name, "segments": [{"destination": destination, "ports": port, "protocol": "tcp"}]}


@pytest.mark.timeout(60)
def test_an_open_the_connector_never_answers_fails_after_the_timeout(fabric, backend) -> None:  # type: ignore[no-untyped-def]
    echo = backend("echo")
    with unanswered_port() as dead:
        fab = fabric([echo], env={"FERRYMAN_OPEN_TIMEOUT": "1.5", "FERRYMAN_DIAL_TIMEOUT": "60"},
                     apps=[app("unanswered", "127.0.0.1", str(dead))])
        client = RawClient(fab.edge_port, Path(fab.workdir) / "pki", "client-1")
        try:
            started = time.monotonic()
            fid = client.open("127.0.0.1", dead)
            code, reason = client.answer(fid, timeout=10)
            waited = time.monotonic() - started
            assert code == "open_timeout", (code, reason)
            assert "did not answer within 1.5s" in reason
            assert 1.4 <= waited < 5, waited
            # the tunnel is still there and answers the next OPEN
            ok = client.open("127.0.0.1", echo.port)
            assert client.answer(ok, timeout=10)[0] == "OPEN_OK"
        finally:
            client.close()


@pytest.mark.timeout(60)
def test_one_client_cannot_fill_a_connectors_pending_slots(fabric, backend, xfer) -> None:  # type: ignore[no-untyped-def]
    echo = backend("echo")
    with unanswered_port() as dead:
        fab = fabric([echo], env={"FERRYMAN_MAX_PENDING_OPENS": "8", "FERRYMAN_OPEN_TIMEOUT": "30",
                                  "FERRYMAN_DIAL_TIMEOUT": "60", "FERRYMAN_CONNECTOR_TUNNELS": "1"},
                     apps=[app("unanswered", "127.0.0.1", str(dead))])
        pki_dir = Path(fab.workdir) / "pki"
        pki.issue_node(str(pki_dir), "client", "client-2")
        hog = RawClient(fab.edge_port, pki_dir, "client-2")
        try:
            flows = [hog.open("127.0.0.1", dead) for _ in range(8)]
            refused = [hog.answer(fid, timeout=5) for fid in flows[2:]]  # 8 * 0.25 = 2 may wait
            assert {code for code, _ in refused} == {"too_many_pending"}, refused
            assert "already wait for connector connector-1" in refused[0][1]
            assert not any(fid in hog.answers for fid in flows[:2])  # those two still wait
            # another client (the real client agent) still opens flows through the same connector
            for _ in range(4):
                payload = b"x" * 65536
                assert xfer.echo(fab.forward_ports[0], payload, timeout=10) == payload
        finally:
            hog.close()


@pytest.mark.timeout(60)
def test_a_host_name_that_is_not_idna_is_answered(fabric, backend) -> None:  # type: ignore[no-untyped-def]
    echo = backend("echo")
    fab = fabric([echo], apps=[app("wild", "*.wild.test", "80")])
    client = RawClient(fab.edge_port, Path(fab.workdir) / "pki", "client-1")
    try:
        fid = client.open("a" * 64 + ".wild.test", 80)  # a label of 64 characters: the IDNA codec refuses it
        code, reason = client.answer(fid, timeout=10)
        assert code == "dns_error" and "not a valid host name" in reason, (code, reason)
    finally:
        client.close()
