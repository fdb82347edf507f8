"""Which local process opened a captured connection (Linux): ``name[pid]`` for the traffic log.

The client agent fills ``Open.process`` with it for every forward, SOCKS5 and HTTP CONNECT
flow (``FERRYMAN_PROCESS_LOOKUP=on``). Two steps, both bounded and never raising:

1. **the app's socket inode.** The app's socket is the other end of what we accepted: for
   TCP its local address is our peer and its remote address our listener. An exact
   ``sock_diag`` netlink query (``NETLINK_SOCK_DIAG``, one hash lookup in the kernel,
   about 5 µs) answers with its inode and uid. Without netlink, ``/proc/net/tcp``,
   ``tcp6``, ``udp`` and ``udp6`` are parsed instead: the kernel walks its whole TCP hash
   table for every read of ``/proc/net/tcp`` (about 8 ms on the development VM, with any
   number of sockets), so that fallback is slow; the UDP files are cheap.
2. **the process holding that inode:** a ``/proc/PID/fd/N`` symlink reading
   ``socket:[INODE]``. Every scanned process's socket inodes are cached (pid → inodes and
   inode → (pid, fd), checked again with one ``readlink`` before use); processes that owned
   captured sockets before are scanned first, since an app usually opens many
   connections; a full scan of ``/proc`` is bounded (``MAX_SCAN_FDS`` links,
   ``MAX_SCAN_SECONDS``). Processes we may not look at (another user's, when not root)
   are skipped, so their connections get ``""``. Reading a process's links costs about
   2-4 µs per open fd: a scan longer than 1 ms (a process with hundreds of fds, or all of
   /proc) is not repeated before ten times its duration has passed, so lookups never take
   more than about a tenth of a core from the agent (new connections of such a process may
   get ``""`` meanwhile).

Lookups run on one worker thread, batched (a burst of connections costs one scan), busy
half of the time at most.
``ProcessFinder.find`` answers through a callback on the event loop within ``wait``
seconds (default 4 ms), with ``""`` when the answer is not known by then: OPEN is never
held longer than that. The thread keeps going and caches what it found for the next time.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger("ferryman.process")

MAX_SCAN_FDS = 100_000  # symlinks read by one full scan of /proc at most
MAX_SCAN_SECONDS = 0.5  # and the time it may take
MAX_RECENT = 16  # processes that owned captured sockets, scanned first
MAX_CACHED_INODES = 200_000
EXPENSIVE_SCAN = 0.001  # seconds: a scan longer than this is paced
PACE = 10  # ... and not repeated before PACE times its duration has passed
MAX_PENDING = 4096  # lookups waiting for the worker; beyond, the answer is "" at once
DEFAULT_WAIT = 0.004

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NOCOOKIE = 0xFFFFFFFF
_TCP_LISTEN = 10

Addr = tuple[str, int]


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _split(addr: Addr) -> Addr:
    """Drop an IPv6 zone and map ``::ffff:a.b.c.d`` to its IPv4 form (how the kernel files it)."""
    ip = addr[0].split("%", 1)[0]
    if ip.startswith("::ffff:") and "." in ip:
        ip = ip[7:]
    return ip, int(addr[1])


class SocketTable:
    """The inode (and owner uid) of a socket given its addresses; one netlink socket, reused."""

    def __init__(self) -> None:
        self._nl: socket.socket | None = None
        self._netlink_ok = True
        self._seq = 0

    def close(self) -> None:
        if self._nl is not None:
            self._nl.close()
            self._nl = None

    def find(self, protocol: str, app: Addr, ours: Addr | None) -> tuple[int, int] | None:
        """``(inode, uid)`` of the app's socket: local address ``app``, remote ``ours`` (for UDP
        ``ours`` may be None: any socket bound to ``app``); ``(0, -1)`` for a socket its application
        has already closed (no owner any more), None for none."""
        app = _split(app)
        ours = _split(ours) if ours is not None else None
        if self._netlink_ok:
            try:
                found = self._netlink(protocol, app, ours)
            except OSError as exc:
                self._netlink_ok = False  # e.g. no sock_diag in this kernel: /proc from now on
                log.info("sock_diag netlink unavailable, reading /proc/net instead", extra={"reason": str(exc)})
                self.close()
            else:
                if found is not None or protocol == "tcp":
                    return found
        return self._procfs(protocol, app, ours)

    # ---------------------------------------------------------------- netlink sock_diag
    def _netlink(self, protocol: str, app: Addr, ours: Addr | None) -> tuple[int, int] | None:
        family = _family(app[0])
        if ours is not None and _family(ours[0]) != family:
            return None
        if self._nl is None:
            self._nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG)
            self._nl.settimeout(0.5)
        if protocol == "tcp":
            if ours is None:
                return None
            # inet_diag_find_one_icsk: src/sport are the socket's local end, dst/dport its remote end
            src, dst = app, ours
            proto = socket.IPPROTO_TCP
        else:
            # udp_dump_one looks up as for a packet from src to dst: dst is the socket's local end
            src, dst = ours or (("::" if family == socket.AF_INET6 else "0.0.0.0"), 0), app
            proto = socket.IPPROTO_UDP

        def packed(ip: str) -> bytes:
            return socket.inet_pton(family, ip).ljust(16, b"\0")

        sockid = struct.pack("!HH", src[1], dst[1]) + packed(src[0]) + packed(dst[0]) + struct.pack(
            "=III", 0, _NOCOOKIE, _NOCOOKIE)
        body = struct.pack("=BBBBI", family, proto, 0, 0, 0xFFFFFFFF) + sockid
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        self._nl.send(struct.pack("=IHHII", 16 + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, seq, 0) + body)
        while True:
            data = self._nl.recv(65536)
            if len(data) < 20:
                return None
            _, kind, _, got_seq, _ = struct.unpack_from("=IHHII", data)
            if got_seq != seq:
                continue  # the answer to an earlier request that timed out
            if kind == _NLMSG_ERROR or len(data) < 16 + 72:
                return None  # ENOENT: no such socket
            _, state, _, _ = struct.unpack_from("=BBBB", data, 16)
            sport, dport = struct.unpack_from("!HH", data, 20)
            uid, inode = struct.unpack_from("=II", data, 16 + 64)
            if protocol == "tcp" and (state == _TCP_LISTEN or sport != app[1]):
                return None
            if protocol == "udp" and sport != app[1]:
                return None
            return _owned(inode, uid)

    # ---------------------------------------------------------------- /proc/net fallback
    @staticmethod
    def _hex_addr(ip: str, port: int) -> str:
        raw = socket.inet_pton(_family(ip), ip)
        # /proc/net prints each 32-bit word of the address in host byte order
        words = "".join("%08X" % struct.unpack("=I", raw[i:i + 4])[0] for i in range(0, len(raw), 4))
        return f"{words}:{port:04X}"

    def _procfs(self, protocol: str, app: Addr, ours: Addr | None) -> tuple[int, int] | None:
        v6 = _family(app[0]) == socket.AF_INET6
        name = f"/proc/net/{protocol}{'6' if v6 else ''}"
        local = self._hex_addr(*app)
        any_local = self._hex_addr("::" if v6 else "0.0.0.0", app[1])
        remote = self._hex_addr(*ours) if ours is not None else None
        try:
            with open(name, "rb") as fh:
                lines = fh.read().decode("ascii", "replace").splitlines()[1:]
        except OSError:
            return None
        fallback = None
        for line in lines:
            f = line.split()
            if len(f) < 10:
                continue
            if protocol == "tcp":
                if f[1] == local and f[2] == remote and f[3] != "0A":
                    return _owned(int(f[9]), int(f[7]))
            elif f[1] == local and (remote is None or f[2] in (remote, "0" * (len(remote) - 5) + ":0000")):
                return _owned(int(f[9]), int(f[7]))
            elif f[1] == any_local and fallback is None:
                fallback = _owned(int(f[9]), int(f[7]))
        return fallback


def _owned(inode: int, uid: int) -> tuple[int, int]:
    """A socket's ``(inode, uid)``; ``(0, -1)`` for an orphaned one (inode 0: its application has
    closed it, the kernel finishes the connection alone), whose uid no longer says whose it was
    (root on older kernels)."""
    return (inode, uid) if inode else (0, -1)


# The start of LocalUsers.refusal's answer for a connection whose application closed it before
# its owner was looked up: refused (no owner to check), but nothing an operator must look at.
CLOSED_EARLY = "closed by its application before its owner could be checked"


class LocalUsers:
    """Which local accounts may use the agent's SOCKS5, HTTP CONNECT and forward listeners
    (``FERRYMAN_LOCAL_USERS``): the agent's own user and root always, and those ``spec``
    names (user names or uids, comma-separated); ``*`` lets every account in.

    A connection's account is the owner of the app's socket (``SocketTable``, the step 1
    above: a ``sock_diag`` query answered on the event loop, so each check costs about 10 µs).
    A connection from an address of this host whose socket is not found is refused; one from
    another host (a listener bound beyond loopback) has no local account and is let in. Off
    Linux, and for ``*``, nothing is checked.
    """

    def __init__(self, spec: str, *, own_uid: int | None = None) -> None:
        self.everyone = spec.strip() == "*" or not sys.platform.startswith("linux")
        self.uids = {0, os.getuid() if own_uid is None else own_uid}
        for item in (part.strip() for part in spec.split(",")):
            if not item or item == "*":
                continue
            if item.isdigit():
                self.uids.add(int(item))
                continue
            import pwd  # (POSIX only)

            try:
                self.uids.add(pwd.getpwnam(item).pw_uid)
            except KeyError:
                raise ValueError(f"FERRYMAN_LOCAL_USERS: no local user {item!r}") from None
        self._table: SocketTable | None = None

    def refusal(self, protocol: str, app: Addr | None, ours: Addr | None) -> str:
        """Why the connection (or UDP sender) at ``app`` that reached our ``ours`` may not use the
        agent ("" when it may)."""
        if self.everyone or app is None:
            return ""
        if self._table is None:
            self._table = SocketTable()
        found = self._table.find(protocol, app, ours)
        if found is None:
            if _local_address(app[0]):
                return f"the local socket at {app[0]}:{app[1]} and its owner were not found"
            return ""
        if not found[0]:
            return f"{CLOSED_EARLY} (the local socket at {app[0]}:{app[1]})"
        uid = found[1]
        if uid in self.uids:
            return ""
        return f"local user {uid} may not use this agent (FERRYMAN_LOCAL_USERS)"

    def close(self) -> None:
        if self._table is not None:
            self._table.close()
            self._table = None


def _local_address(ip: str) -> bool:
    """``ip`` is loopback or an address of this host (it can bind it)."""
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return True
    try:
        with socket.socket(_family(str(address)), socket.SOCK_DGRAM) as probe:
            probe.bind((str(address), 0))
    except OSError:
        return False
    return True


class OwnerIndex:
    """Socket inode → owning pid, from /proc/PID/fd; scans are cached and bounded."""

    def __init__(self, skip_pid: int = 0) -> None:
        self.skip_pid = skip_pid  # not scanned in full scans (the client agent itself)
        self.pid_inodes: dict[int, set[int]] = {}  # pid -> socket inodes seen at its last scan
        self.owner: dict[int, tuple[int, int]] = {}  # inode -> (pid, fd)
        self.recent: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.rescan_at: dict[int, float] = {}  # pid -> not scanned again before (monotonic)
        self.full_scan_at = 0.0  # no full scan of /proc before (monotonic)
        self.full_scans = 0

    def _scan_pid(self, pid: int, wanted: set[int], budget: list[int]) -> set[int]:
        """Read pid's fd links; returns which ``wanted`` inodes it holds. Errors: nothing."""
        found: set[int] = set()
        inodes: set[int] = set()
        base = f"/proc/{pid}/fd/"
        try:
            fds = os.listdir(base)
        except OSError:  # gone, or another user's process
            self._forget(pid)
            return found
        for fd in fds:
            if budget[0] <= 0:
                break
            budget[0] -= 1
            try:
                target = os.readlink(base + fd)
            except OSError:
                continue
            if not target.startswith("socket:["):
                continue
            try:
                inode = int(target[8:-1])
            except ValueError:
                continue
            inodes.add(inode)
            self.owner[inode] = (pid, int(fd))
            if inode in wanted:
                found.add(inode)
        for stale in self.pid_inodes.get(pid, set()) - inodes:
            if self.owner.get(stale, (0, 0))[0] == pid:
                del self.owner[stale]
        self.pid_inodes[pid] = inodes
        return found

    @staticmethod
    def _next_scan(started: float) -> float:
        """A scan that took more than EXPENSIVE_SCAN is not repeated before PACE times as long:
        lookups then cost the client at most about 1/PACE of a core."""
        now = time.monotonic()
        took = now - started
        return now + PACE * took if took > EXPENSIVE_SCAN else 0.0

    def _pace(self, pid: int, started: float) -> None:
        at = self._next_scan(started)
        if at:
            if len(self.rescan_at) > 4 * MAX_RECENT:
                self.rescan_at.clear()
            self.rescan_at[pid] = at
        else:
            self.rescan_at.pop(pid, None)

    def _forget(self, pid: int) -> None:
        for inode in self.pid_inodes.pop(pid, set()):
            if self.owner.get(inode, (0, 0))[0] == pid:
                del self.owner[inode]
        self.recent.pop(pid, None)

    def _cached(self, inode: int) -> int:
        entry = self.owner.get(inode)
        if entry is None:
            return 0
        pid, fd = entry
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                return pid
        except OSError:
            pass
        del self.owner[inode]
        return 0

    def owners(self, inodes: set[int]) -> dict[int, int]:
        """pid of each of ``inodes`` that could be found (others are left out)."""
        result: dict[int, int] = {}
        missing = set()
        for inode in inodes:
            pid = self._cached(inode)
            if pid:
                result[inode] = pid
            else:
                missing.add(inode)
        if missing:
            budget = [MAX_SCAN_FDS]
            scanned = set()
            now = time.monotonic()
            for pid in reversed(list(self.recent)):  # most recent first
                scanned.add(pid)
                if self.rescan_at.get(pid, 0.0) > now:
                    continue  # an expensive process (many fds), scanned a moment ago
                started = time.monotonic()
                for inode in self._scan_pid(pid, missing, budget):
                    result[inode] = pid
                    missing.discard(inode)
                self._pace(pid, started)
                if not missing:
                    break
            if missing and self.full_scan_at <= time.monotonic():
                self.full_scans += 1
                started = time.monotonic()
                if len(self.owner) > MAX_CACHED_INODES:
                    self.owner.clear()
                    self.pid_inodes.clear()
                deadline = time.monotonic() + MAX_SCAN_SECONDS
                try:
                    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
                except OSError:
                    pids = []
                alive = set(pids)
                for pid in list(self.pid_inodes):
                    if pid not in alive:
                        self._forget(pid)
                # Newest processes first: a new app is more likely than an old daemon.
                for pid in sorted(pids, reverse=True):
                    if pid in scanned or pid == self.skip_pid:
                        continue
                    began = time.monotonic()
                    for inode in self._scan_pid(pid, missing, budget):
                        result[inode] = pid
                        missing.discard(inode)
                    if pid in result.values():  # an owner of captured sockets: paced as in the loop above
                        self._pace(pid, began)
                    if not missing or budget[0] <= 0 or time.monotonic() > deadline:
                        break
                self.full_scan_at = self._next_scan(started)
        for pid in set(result.values()):
            self.recent[pid] = None
            self.recent.move_to_end(pid)
            while len(self.recent) > MAX_RECENT:
                self.recent.popitem(last=False)
        return result


def process_name(pid: int) -> str:
    """``name[pid]`` from /proc/PID/comm (at most 15 characters of name), or ""."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as fh:
            name = fh.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""
    return f"{name[:200]}[{pid}]"


class _Request:
    __slots__ = ("protocol", "app", "ours", "callback", "answered", "timer")

    def __init__(self, protocol: str, app: Addr, ours: Addr | None, callback: Callable[[str], None]) -> None:
        self.protocol = protocol
        self.app = app
        self.ours = ours
        self.callback = callback
        self.answered = False
        self.timer: asyncio.TimerHandle | None = None


class ProcessFinder:
    """Finds the process behind local sockets on a worker thread; see the module doc."""

    def __init__(self, wait: float = DEFAULT_WAIT, skip_self: bool = True) -> None:
        self.wait = wait
        self.sockets = SocketTable()
        self.index = OwnerIndex(os.getpid() if skip_self else 0)
        self._pending: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.answered = 0  # answers given in time
        self.late = 0  # answers the thread found after the wait (cached for next time)
        self.unknown = 0

    # ---------------------------------------------------------------- blocking core
    def lookup(self, protocol: str, app: Addr, ours: Addr | None) -> str:
        """Blocking: ``name[pid]`` of the process owning the app's socket, or ""; never raises."""
        return self.lookup_many([(protocol, app, ours)])[0]

    def lookup_many(self, keys: list[tuple[str, Addr, Addr | None]]) -> list[str]:
        inodes: list[int] = []
        for protocol, app, ours in keys:
            try:
                found = self.sockets.find(protocol, app, ours)
            except Exception:  # noqa: BLE001 - a lookup must never hurt the flow
                log.debug("socket lookup failed", exc_info=True)
                found = None
            inodes.append(found[0] if found else 0)
        try:
            owners = self.index.owners({i for i in inodes if i})
        except Exception:  # noqa: BLE001
            log.debug("process lookup failed", exc_info=True)
            owners = {}
        return [process_name(owners[i]) if i in owners else "" for i in inodes]

    # ---------------------------------------------------------------- asynchronous
    def find(self, protocol: str, app: Addr | None, ours: Addr | None, callback: Callable[[str], None]) -> None:
        """Call ``callback(process)`` on this loop within ``wait`` seconds (maybe at once)."""
        if app is None or self._closed or len(self._pending) >= MAX_PENDING:
            callback("")
            return
        loop = asyncio.get_running_loop()
        self._loop = loop
        request = _Request(protocol, app, ours, callback)
        request.timer = loop.call_later(self.wait, self._answer, request, "")
        with self._cond:
            self._pending.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="ferryman-process-lookup", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _answer(self, request: _Request, process: str) -> None:
        if request.answered:
            if process:
                self.late += 1
            return
        request.answered = True
        if request.timer is not None:
            request.timer.cancel()
        if process:
            self.answered += 1
        else:
            self.unknown += 1
        request.callback(process)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    self.sockets.close()
                    return
                batch = list(self._pending)
                self._pending.clear()
            batch = [r for r in batch if not r.answered]  # (read racily: at worst one wasted lookup)
            if not batch:
                continue
            started = time.monotonic()
            names = self.lookup_many([(r.protocol, r.app, r.ours) for r in batch])
            loop = self._loop
            if loop is None or loop.is_closed():
                continue
            for request, name in zip(batch, names):
                try:
                    loop.call_soon_threadsafe(self._answer, request, name)
                except RuntimeError:  # the loop closed meanwhile
                    return
            # At most half of the time scanning: a burst of new flows waits and is batched into
            # the next scan rather than taking the GIL from the event loop all the time.
            time.sleep(min(time.monotonic() - started, 0.05))

    def close(self) -> None:
        """Stop the worker (it closes its netlink socket on its way out)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            if self._thread is None:
                self.sockets.close()


def parse_addr(text: str) -> Addr | None:
    """``"ip:port"`` / ``"[v6]:port"`` (a flow's ``peer``) → (ip, port); None when not an address."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return host, int(port)
    except ValueError:
        return None
