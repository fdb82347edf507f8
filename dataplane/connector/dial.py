"""How the connector reaches a flow's destination: resolve once, check every address, connect only to those.

``Resolver.resolve`` turns the granted host into at most ``FERRYMAN_DIAL_ADDRESSES`` socket
addresses, in the system resolver's order, within ``FERRYMAN_RESOLVE_TIMEOUT`` seconds (an
address literal is used as it is, without asking anyone). Names are looked up on the
resolver's own ``FERRYMAN_RESOLVE_THREADS`` threads, not the event loop's small shared pool
(libuv's four threads, which also resolve edges and the control plane): a lookup that stalls
(a name server that never answers) cannot be interrupted and holds its thread until the
system resolver gives up, so one device or user may hold at most a quarter of the threads
and a lookup finding none free is refused (``too_many_lookups``) rather than queued behind
the stalled ones. ``checked`` asks the kernel how it routes
each address (``route_kind``: one netlink RTM_GETROUTE request, so that every address of
this host counts, whichever interface holds it and whenever it was added) and passes each
to ``access.destinations.DialPolicy.check``; only the addresses that pass are ever handed to
``connect_tcp`` / ``connect_udp``, which connect to those socket addresses directly. Nothing
resolves the name a second time, so a DNS answer that changes between the check and the
connection (DNS rebinding) cannot bring in an address that was not checked.

Every refusal is a ``DialError`` with the OPEN_FAIL code (``dns_error``, ``dns_timeout``,
``too_many_lookups``, ``destination_forbidden``, ``dial_refused``, ``dial_timeout``, ``dial_error``) and a reason.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..access.destinations import (
    ROUTE_BROADCAST,
    ROUTE_LOCAL,
    ROUTE_MULTICAST,
    ROUTE_UNICAST,
    Address,
    DialPolicy,
    Refusal,
    candidates,
    plain,
)
from ..transport.udpio import UdpEndpoint, udp_socket

SockAddr = tuple[Any, ...]
Target = tuple[int, SockAddr]  # (address family, socket address)


class DialError(Exception):
    """The flow's destination cannot be (or must not be) connected to: ``code`` for the OPEN_FAIL."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


# ---------------------------------------------------------------------------- resolving


class Resolver:
    """A connector's resolution of flow destinations (module doc): ``threads`` lookups at once
    at most, ``threads // 4`` (at least one) for any one key (a device or user); a lookup is
    counted until its thread is done with it, not until its flow stops waiting."""

    def __init__(self, threads: int, lookup: Callable[..., list[Any]] = socket.getaddrinfo) -> None:
        self.threads = threads
        self.share = max(1, threads // 4)
        self.lookup = lookup
        self.running = 0
        self.per_key: dict[str, int] = {}
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="resolve")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def resolve(self, host: str, port: int, protocol: str, *, timeout: float, limit: int,
                      key: str = "") -> tuple[list[Target], int]:
        """(the first ``limit`` distinct addresses of ``host``, how many more the resolver gave)."""
        kind = socket.SOCK_DGRAM if protocol != "tcp" else socket.SOCK_STREAM
        literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            ipaddress.ip_address(literal)
        except ValueError:
            pass
        else:  # an address literal: no resolver involved (an IPv6 scope name becomes its index)
            try:
                family, _type, _proto, _name, sockaddr = socket.getaddrinfo(literal, port, type=kind,
                                                                            flags=socket.AI_NUMERICHOST)[0]
            except (socket.gaierror, UnicodeError) as exc:
                raise DialError("dns_error", f"cannot use address {host}: {exc}") from None
            return [(family, sockaddr)], 0
        held = self.per_key.get(key, 0)
        if held >= self.share:
            raise DialError("too_many_lookups", f"cannot resolve {host}: {held} lookups for {key or 'this client'} "
                                                f"are still running, the most one device may have "
                                                f"(a quarter of FERRYMAN_RESOLVE_THREADS)")
        if self.running >= self.threads:
            raise DialError("too_many_lookups", f"cannot resolve {host}: all {self.threads} resolver threads are "
                                                f"busy (FERRYMAN_RESOLVE_THREADS)")
        self.running += 1
        self.per_key[key] = held + 1
        future = asyncio.get_running_loop().run_in_executor(self._pool, self._lookup, host, port, kind)
        future.add_done_callback(lambda done: self._done(key, done))
        try:
            async with asyncio.timeout(timeout):
                infos = await asyncio.shield(future)
        except TimeoutError:
            raise DialError("dns_timeout", f"cannot resolve {host} within {timeout:g}s") from None
        except socket.gaierror as exc:
            raise DialError("dns_error", f"cannot resolve {host}: {exc.strerror}") from None
        except UnicodeError as exc:  # the IDNA codec refuses the name (an empty or too long label, ...)
            raise DialError("dns_error", f"cannot resolve {host!r}: not a valid host name ({exc})") from None
        except OSError as exc:
            raise DialError("dns_error", f"cannot resolve {host}: {exc.strerror or exc}") from None
        seen: set[str] = set()
        targets: list[Target] = []
        for family, _type, _proto, _name, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6) or sockaddr[0] in seen:
                continue
            seen.add(sockaddr[0])
            targets.append((family, sockaddr))
        if not targets:
            raise DialError("dns_error", f"cannot resolve {host}: no IPv4 or IPv6 address")
        return targets[:limit], max(0, len(targets) - limit)

    def _lookup(self, host: str, port: int, kind: int) -> list[Any]:
        return self.lookup(host, port, type=kind)

    def _done(self, key: str, future: asyncio.Future[list[Any]]) -> None:
        """A lookup's thread is free again (its answer, error or cancellation is in)."""
        if not future.cancelled():
            future.exception()  # retrieved: a lookup that ended after its flow stopped waiting is not an error
        self.running -= 1
        left = self.per_key[key] - 1
        if left:
            self.per_key[key] = left
        else:
            del self.per_key[key]


# ---------------------------------------------------------------------------- the kernel's view of an address

_NETLINK_ROUTE = 0
_RTM_NEWROUTE, _RTM_GETROUTE = 24, 26
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 1
_RTA_DST = 1
_NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_ROUTE_TYPES = {2: ROUTE_LOCAL, 3: ROUTE_BROADCAST, 4: ROUTE_LOCAL, 5: ROUTE_MULTICAST}  # local, broadcast, anycast
_UNROUTABLE = (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EACCES, errno.EINVAL)  # no route, prohibit, blackhole
_sequence = 0


def route_kind(address: Address) -> tuple[str, str]:
    """(``ROUTE_*``, "") for how this host's kernel would route a connection to ``address``, or
    (``ROUTE_UNICAST``, why it cannot tell). An address with no route is ``ROUTE_UNICAST`` (a
    connection to it fails anyway)."""
    global _sequence
    if not hasattr(socket, "AF_NETLINK"):
        return ROUTE_UNICAST, "this platform has no netlink to ask the kernel"
    _sequence = (_sequence + 1) & 0xFFFFFFFF
    packed = address.packed
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    body = _RTMSG.pack(family, len(packed) * 8, 0, 0, 0, 0, 0, 0, 0) + struct.pack("=HH", 4 + len(packed),
                                                                                  _RTA_DST) + packed
    request = _NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(body), _RTM_GETROUTE, _NLM_F_REQUEST, _sequence, 0) + body
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_ROUTE) as sock:
            sock.settimeout(1.0)
            sock.sendto(request, (0, 0))
            while True:  # the kernel answers at once; skip anything not answering this request
                data = sock.recv(65536)
                if len(data) < _NLMSG_HEADER.size + 4:
                    return ROUTE_UNICAST, "short netlink answer"
                _length, kind, _flags, sequence, _pid = _NLMSG_HEADER.unpack_from(data)
                if sequence == _sequence:
                    break
    except OSError as exc:
        return ROUTE_UNICAST, f"netlink route lookup failed: {exc.strerror or exc}"
    if kind == _NLMSG_ERROR:
        (code,) = struct.unpack_from("=i", data, _NLMSG_HEADER.size)
        if -code in _UNROUTABLE:
            return ROUTE_UNICAST, ""
        return ROUTE_UNICAST, f"netlink route lookup failed: {os.strerror(-code)}"
    if kind != _RTM_NEWROUTE or len(data) < _NLMSG_HEADER.size + _RTMSG.size:
        return ROUTE_UNICAST, f"unexpected netlink answer type {kind}"
    route_type = _RTMSG.unpack_from(data, _NLMSG_HEADER.size)[7]
    return _ROUTE_TYPES.get(route_type, ROUTE_UNICAST), ""


# ---------------------------------------------------------------------------- checking


def checked(targets: list[Target], policy: DialPolicy, *, app: str, port: int, protocol: str,
            refused: Callable[[Target, Refusal], None]) -> list[Target]:
    """The targets ``policy`` allows for this flow, in order; ``refused(target, refusal)`` for each other."""
    allowed = []
    for target in targets:
        address = plain(ipaddress.ip_address(target[1][0]))
        # A NAT64 address reaches the IPv4 address it carries through the gateway: this host's own, maybe.
        routes = {candidate: route_kind(candidate) for candidate in candidates(address)}
        refusal = policy.check(address, app=app, port=port, protocol=protocol, routes=routes)
        if refusal is None:
            allowed.append(target)
        else:
            refused(target, refusal)
    return allowed


# ---------------------------------------------------------------------------- connecting


async def connect_tcp(targets: list[Target], factory: Callable[[], asyncio.Protocol], *, timeout: float,
                      shown: str) -> asyncio.Transport:
    """A TCP connection to the first of ``targets`` that accepts one, within ``timeout`` seconds in all."""
    loop = asyncio.get_running_loop()
    failures: list[OSError] = []
    try:
        async with asyncio.timeout(timeout):
            for family, sockaddr in targets:
                sock = socket.socket(family, socket.SOCK_STREAM)
                try:
                    sock.setblocking(False)
                    await loop.sock_connect(sock, sockaddr)
                except OSError as exc:
                    sock.close()
                    failures.append(exc)
                    continue
                except BaseException:
                    sock.close()
                    raise
                try:
                    transport, _ = await loop.create_connection(factory, sock=sock)
                except BaseException:
                    sock.close()
                    raise
                return transport  # type: ignore[return-value]
    except TimeoutError:
        raise DialError("dial_timeout", f"{shown} did not answer within {timeout:g}s") from None
    exc = failures[-1]
    where = shown if len(targets) == 1 else f"{shown} (none of its {len(targets)} addresses)"
    if isinstance(exc, ConnectionRefusedError):
        raise DialError("dial_refused", f"connection refused by {where}")
    raise DialError("dial_error", f"{where}: {exc.strerror or exc}")


def connect_udp(target: Target, protocol: asyncio.DatagramProtocol, *, buffer: int,
                on_send_drop: Callable[[int], None]) -> UdpEndpoint:
    """A UDP socket connected to ``target`` (so only its answers come back), served on the loop
    for ``protocol`` with ``buffer``-byte kernel buffers asked for (FERRYMAN_UDP_BUFFER); runs of
    datagrams leave in one system call (``UdpEndpoint.send_all``)."""
    family, sockaddr = target
    try:
        sock = udp_socket(family, connect=sockaddr, buffer=buffer)
    except OSError as exc:
        raise DialError("dial_error", f"{sockaddr[0]}:{sockaddr[1]}: {exc.strerror or exc}") from None
    try:
        return UdpEndpoint(asyncio.get_running_loop(), sock, protocol, gro=False, on_send_drop=on_send_drop)
    except BaseException:
        sock.close()
        raise
