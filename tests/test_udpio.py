"""``dataplane.transport.udpio``: UDP sends with segmentation offload (GSO), coalesced receives (GRO),
and the fallbacks when the kernel refuses them, on real loopback sockets; then a QUIC tunnel with
offload off."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any

import msgspec
import pytest

from dataplane.transport import udpio
from dataplane.transport.udpio import UdpEndpoint, udp_socket

from test_quic_transport import SETTINGS, Dialer, Echo, dial, edge, run
from dataplane.wire import events as ev
from dataplane.wire.frames import Open

pytestmark = pytest.mark.timeout(20)


class Collect(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.errors: list[OSError] = []
        self.lost = asyncio.Event()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.got.append(data)

    def error_received(self, exc: Exception) -> None:
        self.errors.append(exc)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()


def batch(count: int, size: int, last: int) -> list[bytes]:
    out = [os.urandom(size) for _ in range(count - 1)]
    return out + [os.urandom(last)]


async def settle(condition: Any) -> None:
    for _ in range(300):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def pair(*, gso: bool, gro: bool) -> tuple[UdpEndpoint, UdpEndpoint, Collect]:
    loop = asyncio.get_running_loop()
    rx = Collect()
    receiver = UdpEndpoint(loop, udp_socket(socket.AF_INET, bind=("127.0.0.1", 0), buffer=1 << 22), rx, gro=gro)
    sender = UdpEndpoint(loop, udp_socket(socket.AF_INET, bind=("127.0.0.1", 0)), Collect(), gso=gso)
    return sender, receiver, rx


@pytest.mark.parametrize("gso,gro", [(True, True), (True, False), (False, True), (False, False)])
def test_batches_arrive_whole_and_in_order(gso: bool, gro: bool) -> None:
    async def main() -> None:
        sender, receiver, rx = await pair(gso=gso, gro=gro)
        if (gso and not sender.gso) or (gro and not receiver.gro):
            pytest.skip("this kernel has no UDP GSO/GRO")
        addr = receiver.get_extra_info("sockname")
        # two runs of equal sizes, each ended by a shorter datagram, then a run past 64 segments
        datagrams = batch(10, 1350, 700) + batch(5, 1200, 1200) + batch(150, 400, 17)
        sender.send_batch([(d, addr) for d in datagrams])
        await settle(lambda: len(rx.got) == len(datagrams))
        assert rx.got == datagrams
        if gso and gro:
            assert receiver.coalesced_reads > 0  # the kernel handed over GSO trains whole, split here
        else:
            assert receiver.coalesced_reads == 0
        assert sender.send_drops == 0 and rx.errors == []
        sender.close()
        receiver.close()
        await rx.lost.wait()

    run(main())


@pytest.mark.parametrize("gso,refused", [(True, False), (True, True), (False, False)])
def test_a_train_goes_back_as_the_datagrams_it_holds(gso: bool, refused: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``send_train``: a GRO buffer (here 150 datagrams of 400 bytes and a last one of 17, more
    than one GSO send holds) leaves as those datagrams, whether the kernel segments it, refuses
    to (then one by one), or has no GSO."""
    async def main() -> None:
        sender, receiver, rx = await pair(gso=gso, gro=False)
        if gso and not sender.gso:
            pytest.skip("this kernel has no UDP GSO")
        if refused:
            monkeypatch.setattr(udpio, "UDP_SEGMENT", 9999)  # a control message the kernel rejects
        datagrams = batch(151, 400, 17)
        sender.send_train(b"".join(datagrams), 400, receiver.get_extra_info("sockname"))
        await settle(lambda: len(rx.got) == len(datagrams))
        assert rx.got == datagrams
        assert sender.gso is (gso and not refused)
        assert sender.send_drops == 0 and rx.errors == []
        sender.close()
        receiver.close()

    run(main())


def test_a_kernel_refusing_segmentation_falls_back_to_single_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        sender, receiver, rx = await pair(gso=True, gro=True)
        if not sender.gso:
            pytest.skip("this kernel has no UDP GSO")
        monkeypatch.setattr(udpio, "UDP_SEGMENT", 9999)  # a control message the kernel rejects (EINVAL)
        addr = receiver.get_extra_info("sockname")
        datagrams = batch(8, 1000, 1000)
        sender.send_batch([(d, addr) for d in datagrams])
        assert sender.gso is False  # refused once: from now on one datagram per call
        sender.send_batch([(d, addr) for d in datagrams])
        await settle(lambda: len(rx.got) == 2 * len(datagrams))
        assert rx.got == datagrams + datagrams
        sender.close()
        receiver.close()

    run(main())


def test_a_kernel_without_the_options_is_probed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        monkeypatch.setattr(udpio, "UDP_SEGMENT", 9999)
        monkeypatch.setattr(udpio, "UDP_GRO", 9998)
        sender, receiver, rx = await pair(gso=True, gro=True)
        assert sender.gso is False and receiver.gro is False
        addr = receiver.get_extra_info("sockname")
        datagrams = batch(5, 1300, 100)
        sender.send_batch([(d, addr) for d in datagrams])
        await settle(lambda: len(rx.got) == len(datagrams))
        assert rx.got == datagrams
        sender.close()
        receiver.close()

    run(main())


def test_quic_tunnel_without_offload(certs: Any) -> None:
    async def main() -> None:
        plain = msgspec.structs.replace(SETTINGS, quic_offload="off")
        echo, dialer = Echo(), Dialer()
        server = await edge(certs, echo, settings=plain)
        assert server.transport is not None and not server.transport.gso and not server.transport.gro
        tunnel = await dial(server, certs["connector-1"], dialer, settings=plain)
        await tunnel.up_waiter
        fid = tunnel.conn.open_flow(Open(host="echo", port=7))
        tunnel.flush_soon()
        await dialer.next(ev.FlowAccepted)
        payload = os.urandom(200_000)
        tunnel.send_data(fid, payload)
        await settle(lambda: bytes(dialer.data.get(fid, b"")) == payload)
        tunnel.close("shutdown", "test done")
        server.close()

    run(main())


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from dataplane.basics import pki
    return pki.init_pki(str(tmp_path_factory.mktemp("pki")), connectors=("connector-1",), clients=())


def test_send_all_to_the_connected_peer_and_drops_counted_when_the_kernel_is_full() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        rx = Collect()
        receiver = UdpEndpoint(loop, udp_socket(socket.AF_INET, bind=("127.0.0.1", 0), buffer=1 << 22), rx, gro=False)
        sender = UdpEndpoint(loop, udp_socket(socket.AF_INET, connect=receiver.get_extra_info("sockname")),
                             Collect(), gro=False)
        datagrams = batch(40, 64, 64) + batch(70, 1200, 30)
        sender.send_all(datagrams)  # to the connected peer: addr None
        await settle(lambda: len(rx.got) == len(datagrams))
        assert rx.got == datagrams and sender.send_drops == 0

        # A datagram socket whose peer does not read: the kernel refuses (EAGAIN) and each
        # refused datagram is counted, also through the endpoint's callback.
        near, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        dropped: list[int] = []
        full = UdpEndpoint(loop, near, Collect(), on_send_drop=dropped.append)
        full.send_all([b"y" * 512] * 2000)
        queued = 0
        far.setblocking(False)
        try:
            while True:
                far.recv(1024)
                queued += 1
        except BlockingIOError:
            pass
        assert full.send_drops > 0 and sum(dropped) == full.send_drops
        assert queued + full.send_drops == 2000
        for end in (sender, receiver, full):
            end.close()
        far.close()

    run(main())


def test_empty_datagrams_are_never_folded_into_a_run() -> None:
    """The kernel cuts a GSO run by bytes: an empty datagram in one would vanish, so each is sent alone."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        rx = Collect()
        receiver = UdpEndpoint(loop, udp_socket(socket.AF_INET, bind=("127.0.0.1", 0), buffer=1 << 22), rx, gro=False)
        sender = UdpEndpoint(loop, udp_socket(socket.AF_INET, bind=("127.0.0.1", 0)), Collect(), gro=False)
        if not sender.gso:
            pytest.skip("this kernel has no UDP GSO")
        addr = receiver.get_extra_info("sockname")
        datagrams = [b"", b"", b"", b"x" * 100, b"x" * 100, b"", b"y" * 100, b"", b"z" * 10, b"z" * 10]
        sender.send_all(datagrams, addr)
        await settle(lambda: len(rx.got) == len(datagrams))
        assert rx.got == datagrams and sender.send_drops == 0
        sender.close()
        receiver.close()

    run(main())


@pytest.mark.parametrize("gso", [True, False])
def test_an_error_reported_on_a_run_costs_at_most_one_datagram(gso: bool) -> None:
    """A port-unreachable from an earlier datagram is reported on the next send of a connected
    socket: the run it was reported on goes out all the same, one by one."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()  # nothing listens there now
        errors = Collect()
        sender = UdpEndpoint(loop, udp_socket(socket.AF_INET, connect=("127.0.0.1", port)), errors, gro=False, gso=gso)
        if gso and not sender.gso:
            pytest.skip("this kernel has no UDP GSO")
        sender.sendto(b"lost")
        time.sleep(0.05)  # the ICMP error arrives and waits on the socket: the loop (its reader) does not run
        backend = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        backend.bind(("127.0.0.1", port))
        backend.settimeout(0.5)
        run_ = [b"r" * 100] * 10
        sender.send_all(run_)
        got = []
        try:
            while len(got) < len(run_):
                got.append(backend.recv(2048))
        except socket.timeout:
            pass
        assert len(errors.errors) == 1  # the one error, reported by the send that met it
        assert len(got) >= len(run_) - 1 and set(got) == {b"r" * 100}
        sender.close()
        backend.close()

    run(main())


def test_a_listener_binds_the_first_address_of_its_host_that_binds(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def two_addresses(host: str, port: int, **kw: Any) -> list[tuple]:
            # 192.0.2.1 (TEST-NET-1) is no address of this host: binding it fails
            return [(socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("192.0.2.1", port)),
                    (socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("127.0.0.1", port))]

        monkeypatch.setattr(loop, "getaddrinfo", two_addresses)
        listener = await udpio.udp_listener("forward.test", 0, Collect(), buffer=1 << 20)
        assert listener.get_extra_info("sockname")[0] == "127.0.0.1"
        listener.close()

        async def unbindable(host: str, port: int, **kw: Any) -> list[tuple]:
            return [(socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("192.0.2.1", port))]

        monkeypatch.setattr(loop, "getaddrinfo", unbindable)
        with pytest.raises(OSError):
            await udpio.udp_listener("forward.test", 0, Collect(), buffer=1 << 20)

    run(main())
