"""Transparent capture of the client agent (Linux, root): ``FERRYMAN_TRANSPARENT=on``.

Apps connect to private addresses as if there were no agent; nftables redirects those
connections to a listener of the agent, which reads where each one was going and carries
it like a SOCKS5 CONNECT. This is the way sshuttle's ``nat`` method works, not a TUN
device: a TUN device hands over IP packets, and turning them back into TCP streams would
need a userspace TCP/IP stack, which the agent does not have. Only TCP is captured.

- **Listeners.** One TCP listener on 127.0.0.1 (and one on ::1 when IPv6 is there), port
  chosen by the kernel. Each accepted connection reads its original destination
  (``getsockopt(SOL_IP, SO_ORIGINAL_DST)``, ``IP6T_SO_ORIGINAL_DST`` for IPv6) and becomes a
  ``ClientFlow`` opened through the agent (``FlowOpener.open``) like a SOCKS5 CONNECT: process
  lookup (the app's socket is ``peer`` → original destination), refusals logged with the
  edge's reason, and a refused flow resets the app's connection (the app sees a reset,
  as from the real destination).
- **Rules.** A table of its own, ``inet ferryman_<pid>``: a ``nat`` ``output`` chain that
  redirects TCP to the forwarding profile's IP / CIDR / IP-range segments (their ports) to
  the listener, and two sets with timeouts (``dns4`` ``ipv4_addr``, ``dns6``
  ``ipv6_addr``) holding the addresses the private DNS resolver answered for private
  names (TTL, at most ``dns.TTL_MAX``, + ``DNS_MARGIN`` seconds; any TCP port). Such a
  connection is opened to the NAME the app asked for, not to the address, so the edge
  matches it against FQDN segments (unless only an address segment covers it: a name never
  matches those). A new profile replaces the chain's rules in one nft transaction (the
  sets and their addresses stay); the table is removed at exit (SIGTERM, SIGINT, or an
  interpreter exit), and tables of agents that died without removing theirs are removed
  at start.
- **Only what the private name answered.** Whoever answers a private name (the connector's
  DNS server, an edge, the system resolver under fail open) decides what is captured, so
  an answer is taken narrowly (``capture_entries``): only A/AAAA records of the name asked
  or of its CNAME chain, never a loopback, unspecified, link-local, multicast or broadcast
  address (local traffic would go into the tunnel); the others are counted
  (``ferryman_datagrams_dropped_total{reason="dns_capture_<why>"}``) and logged at a limited
  rate. When the addresses cannot be put in the sets (nft fails or is slow), an app given
  the answer would reach them outside the tunnel: it gets SERVFAIL if the profile fails
  closed, else the answer (either way counted: ``dns_capture_failed``).
- **Never the agent's own traffic.** The chain only matches private destinations (the
  profile's address segments and privately answered addresses), and returns first for:
  the edges' addresses (the tunnel), the control plane and the egress proxy (names
  resolved when the rules are built), the agent's own listening ports on local addresses
  (``fib daddr type local``: the capture listener itself, SOCKS5, HTTP CONNECT, DNS,
  forwards, metrics), and packets marked ``MARK``. The only socket the agent marks
  (SO_MARK) is the one a captured connection is dialed directly with (fail open while no
  edge is reachable, or a destination the profile stopped covering before the rules were
  replaced), so the agent never dials a captured destination unmarked. Redirect loops
  cannot happen: NAT rewrites a connection once (conntrack), the listener's port is
  excluded, a captured connection goes into the tunnel (whose edge is excluded) or out
  marked, and a connection whose original destination is the listener itself is refused.
  SOCKS5 and HTTP CONNECT still dial uncovered destinations directly, unmarked: those are
  not in the chain (their fail-open dial of a private address is captured once more, and
  then goes out marked). Matching ``meta skuid`` would exclude every root process (the agent
  runs as root), and ``socket cgroupv2`` would need the agent moved into a cgroup of its
  own, which service managers own; hence addresses plus one mark.

A captured destination needs a route (normally the default one): the kernel routes a
connection before the ``output`` hook redirects it. Refused at start (exit 2, one line)
when not on Linux, not root, or without ``nft``.
"""

from __future__ import annotations

import asyncio
import atexit
import ipaddress
import logging
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable

from dnslib import QTYPE, RCODE, DNSLabel, DNSRecord

from ..basics.hostport import parse_hostport
from ..contract.apps import address_bounds
from .direct import DirectRelay
from .dns import TTL_MAX
from .opener import ClientFlow, FlowOpener
from .profile import Profile

log = logging.getLogger("ferryman.transparent")

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h (level SOL_IP)
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h (level SOL_IPV6)
SO_MARK = getattr(socket, "SO_MARK", 36)
MARK = 0x46524D31  # "FRM1": the agent's own direct dials of captured connections
DNS_MARGIN = 30  # seconds an answered address stays captured beyond its TTL
BROADCAST = ipaddress.IPv4Address("255.255.255.255")
MAX_NAMES = 65536  # answered addresses remembered (address -> name)
NFT_TIMEOUT = 10.0
DNS_HOOK_TIMEOUT = 2.0  # a DNS answer waits this long at most for its addresses to be in the set
TABLE_PREFIX = "ferryman_"

Exclusion = tuple[str, int]  # (IP address, TCP port; 0 = every port)


# ---------------------------------------------------------------------------- checks
def check_usable(platform: str = sys.platform, euid: int | None = None, nft: str | None = "") -> None:
    """ValueError (with what to do) unless transparent capture can work here."""
    if not platform.startswith("linux"):
        raise ValueError(f"FERRYMAN_TRANSPARENT=on works on Linux only (this is {platform}); "
                         "use the SOCKS5 or HTTP CONNECT proxy instead")
    if (os.geteuid() if euid is None else euid) != 0:
        raise ValueError("FERRYMAN_TRANSPARENT=on needs root (nftables rules and SO_ORIGINAL_DST); "
                         "run the agent as root or set FERRYMAN_TRANSPARENT=off")
    if (shutil.which("nft") if nft == "" else nft) is None:
        raise ValueError("FERRYMAN_TRANSPARENT=on needs the `nft` command (nftables): install it "
                         "(Debian: apt-get install nftables) or set FERRYMAN_TRANSPARENT=off")


def table_name(pid: int | None = None) -> str:
    return f"{TABLE_PREFIX}{os.getpid() if pid is None else pid}"


# ---------------------------------------------------------------------------- rule text (pure)
def _merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping, non-adjacent inclusive ranges (nft refuses overlapping set elements)."""
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            if hi > merged[-1][1]:
                merged[-1] = (merged[-1][0], hi)
        else:
            merged.append((lo, hi))
    return merged


def _address(version: int, lo: int, hi: int) -> str:
    """One nft set element: an address, a prefix when the range is one, else ``first-last``."""
    cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    if lo == hi:
        return str(cls(lo))
    bits = 32 if version == 4 else 128
    size = hi - lo + 1
    if size & (size - 1) == 0 and lo % size == 0:
        return f"{cls(lo)}/{bits - size.bit_length() + 1}"
    return f"{cls(lo)}-{cls(hi)}"


def _ports(ranges: Iterable[tuple[int, int]]) -> str:
    return ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in _merge(ranges))


def capture_targets(profile: Profile | None) -> dict[tuple[int, tuple[tuple[int, int], ...]], list[tuple[int, int]]]:
    """The profile's TCP address segments grouped by (IP version, merged ports): their merged
    address ranges. Name segments are not here: their addresses come from private DNS answers."""
    groups: dict[tuple[int, tuple[tuple[int, int], ...]], list[tuple[int, int]]] = {}
    if profile is None:
        return groups
    for app in profile.table.apps:
        for segment in app.segments:
            if segment.protocol != "tcp" or segment.kind not in ("ip", "cidr", "range"):
                continue
            version, lo, hi = address_bounds(segment)
            groups.setdefault((version, tuple(_merge(segment.ports))), []).append((lo, hi))
    return {key: _merge(ranges) for key, ranges in sorted(groups.items())}


def ruleset(table: str, profile: Profile | None, port4: int, port6: int, excluded: Iterable[Exclusion],
            local_ports: Iterable[int]) -> str:
    """The nft script that creates the table (or keeps it, with its DNS sets) and replaces its
    chain's rules, in one transaction. ``port4``/``port6``: the capture listeners on 127.0.0.1
    and ::1 (0: none, that family is not captured). ``excluded``: destinations never captured
    (edges, control plane, proxy); ``local_ports``: the agent's listening ports."""
    t = f"inet {table}"
    lines = [
        f"add table {t}",
        f"add set {t} dns4 {{ type ipv4_addr; flags timeout; }}",
        f"add set {t} dns6 {{ type ipv6_addr; flags timeout; }}",
        f"add chain {t} output {{ type nat hook output priority -100; policy accept; }}",
        f"flush chain {t} output",
        f"add rule {t} output meta l4proto != tcp return",
        f"add rule {t} output meta mark {MARK:#x} return",
    ]
    ports = sorted({p for p in local_ports if p} | {p for p in (port4, port6) if p})
    if ports:
        lines.append(f"add rule {t} output fib daddr type local tcp dport {{ {', '.join(map(str, ports))} }} return")
    by_family: dict[int, tuple[set[str], set[str]]] = {4: (set(), set()), 6: (set(), set())}
    for host, port in excluded:
        ip = ipaddress.ip_address(host)
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        anywhere, with_port = by_family[ip.version]
        if port:
            with_port.add(f"{ip} . {port}")
        else:
            anywhere.add(str(ip))
    for version, (anywhere, with_port) in by_family.items():
        match = "ip" if version == 4 else "ip6"
        if with_port:
            lines.append(f"add rule {t} output {match} daddr . tcp dport {{ {', '.join(sorted(with_port))} }} return")
        if anywhere:
            lines.append(f"add rule {t} output {match} daddr {{ {', '.join(sorted(anywhere))} }} return")
    for (version, port_ranges), ranges in capture_targets(profile).items():
        to = port4 if version == 4 else port6
        if not to:
            continue
        match = "ip" if version == 4 else "ip6"
        addresses = ", ".join(_address(version, lo, hi) for lo, hi in ranges)
        lines.append(f"add rule {t} output {match} daddr {{ {addresses} }} tcp dport {{ {_ports(port_ranges)} }} "
                     f"redirect to :{to}")
    if port4:
        lines.append(f"add rule {t} output ip daddr @dns4 meta l4proto tcp redirect to :{port4}")
    if port6:
        lines.append(f"add rule {t} output ip6 daddr @dns6 meta l4proto tcp redirect to :{port6}")
    return "\n".join(lines) + "\n"


def elements(table: str, entries: Iterable[tuple[str, int]]) -> str:
    """The nft script that puts each (address, seconds) in its DNS set with that timeout, whether
    or not it is there already (add, delete, add: the timeout is renewed)."""
    lines: list[str] = []
    for address, seconds in entries:
        ip = ipaddress.ip_address(address)
        target = f"inet {table} {'dns4' if ip.version == 4 else 'dns6'}"
        lines += [f"add element {target} {{ {ip} timeout {seconds}s }}", f"delete element {target} {{ {ip} }}",
                  f"add element {target} {{ {ip} timeout {seconds}s }}"]
    return "\n".join(lines) + "\n" if lines else ""


def never_captured(address: str) -> str:
    """Why ``address`` from a DNS answer is never captured ("" when it may be): these addresses
    are this device's or its link's, never a private app's. An IPv4-mapped address is judged
    as its IPv4 address."""
    ip = ipaddress.ip_address(address)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_link_local:
        return "link_local"
    if ip.is_multicast:
        return "multicast"
    if ip == BROADCAST:
        return "broadcast"
    return ""


def _labels(name: DNSLabel) -> tuple[bytes, ...]:
    return tuple(label.lower() for label in name.label)


def capture_entries(reply: DNSRecord, ipv6: bool) -> tuple[dict[str, int], list[tuple[str, str, str]]]:
    """What a private name's answer (its question checked by the resolver) puts in the capture
    sets: {address: seconds} from its A records (and AAAA with ``ipv6``) owned by the name asked
    or a name its CNAME chain leads to, each for its TTL (at most ``TTL_MAX``) + ``DNS_MARGIN``;
    and the records left out, as (owner, address, why): "other_name" (a DNS server may add
    records for any name, and only the name asked is private) or why ``never_captured``."""
    cnames: dict[tuple[bytes, ...], tuple[bytes, ...]] = {}
    for rr in reply.rr:
        if rr.rtype == QTYPE.CNAME:
            cnames.setdefault(_labels(rr.rname), _labels(rr.rdata.label))
    at = _labels(reply.q.qname)
    chain = {at}
    while at in cnames and cnames[at] not in chain:  # a CNAME loop ends the chain
        at = cnames[at]
        chain.add(at)
    entries: dict[str, int] = {}
    dropped: list[tuple[str, str, str]] = []
    for rr in reply.rr:
        if not (rr.rtype == QTYPE.A or (rr.rtype == QTYPE.AAAA and ipv6)):
            continue
        address = str(ipaddress.ip_address(str(rr.rdata)))
        why = "other_name" if _labels(rr.rname) not in chain else never_captured(address)
        if why:
            dropped.append((str(rr.rname).rstrip("."), address, why))
            continue
        seconds = min(rr.ttl, TTL_MAX) + DNS_MARGIN
        entries[address] = max(seconds, entries.get(address, 0))
    return entries, dropped


def stale_tables(listing: str, alive=lambda pid: os.path.exists(f"/proc/{pid}")) -> list[str]:
    """Our tables in ``nft list tables`` output whose agent process is gone."""
    found = re.findall(rf"^table inet ({re.escape(TABLE_PREFIX)}(\d+))\s*$", listing, re.M)
    return [name for name, pid in found if int(pid) != os.getpid() and not alive(int(pid))]


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where the app's redirected connection was going (OSError when it was not redirected)."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port = struct.unpack_from("!H", raw, 2)[0]
        return str(ipaddress.IPv6Address(raw[8:24])), port
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntoa(raw[4:8]), port


# ---------------------------------------------------------------------------- nft
class NftError(RuntimeError):
    pass


async def _nft(script: str, *args: str) -> str:
    """Run ``nft`` (``-f -`` with ``script``), its stdout; NftError with its message on failure."""
    command = ["nft", *args] if args else ["nft", "-f", "-"]
    proc = await asyncio.create_subprocess_exec(*command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    try:
        async with asyncio.timeout(NFT_TIMEOUT):
            out, err = await proc.communicate(script.encode() if not args else None)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise NftError(f"`{' '.join(command)}` did not finish within {NFT_TIMEOUT:g}s") from None
    if proc.returncode != 0:
        raise NftError(f"`{' '.join(command)}` failed: {err.decode(errors='replace').strip()[:2000]}")
    return out.decode(errors="replace")


def _delete_now(table: str) -> None:
    """Remove ``table`` synchronously (exit path); quiet when it is already gone."""
    try:
        subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True, timeout=NFT_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        pass


# ---------------------------------------------------------------------------- the capture
class _MarkedRelay(DirectRelay):
    """A direct dial of a captured connection, marked so that the chain lets it out."""

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, MARK)
            sock.setblocking(False)
            await loop.sock_connect(sock, (self.host, self.port))
        except BaseException:
            sock.close()
            raise
        await loop.create_connection(lambda: self.remote, sock=sock)


class Transparent:
    """The capture listeners and the nftables table of one client agent. ``targets()``: where the
    agent itself connects to besides the profile's edges (its edges, the control plane, the
    egress proxy: never captured); ``local_ports()``: its listening ports."""

    def __init__(self, client: FlowOpener, *, targets: Callable[[], list[tuple[str, int]]] = list,
                 local_ports: Callable[[], set[int]] = set) -> None:
        self.client = client
        self.targets = targets
        self.local_ports = local_ports
        self.table = table_name()
        self.servers: list[asyncio.AbstractServer] = []
        self.port4 = 0
        self.port6 = 0
        self.names: dict[str, tuple[str, float]] = {}  # answered address -> (name, until: monotonic)
        self.excluded: list[Exclusion] = []
        self.installed = False
        self.closed = False
        self._lock = asyncio.Lock()  # one nft transaction at a time
        self._update: asyncio.Task[None] | None = None
        self._wanted: Profile | None = None
        self._warned_v6 = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Listeners up, stale tables removed, rules for the current profile installed, DNS hooked."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(self._flow, "127.0.0.1", 0, backlog=1024)
        self.servers.append(server)
        self.port4 = server.sockets[0].getsockname()[1]
        try:
            server6 = await loop.create_server(self._flow, "::1", 0, backlog=1024)
        except OSError as exc:
            log.info("transparent capture: IPv4 only (no listener on ::1)", extra={"reason": str(exc)})
        else:
            self.servers.append(server6)
            self.port6 = server6.sockets[0].getsockname()[1]
        try:
            for table in stale_tables(await _nft("", "list", "tables")):
                await _nft("", "delete", "table", "inet", table)
                log.info("stale transparent capture table removed", extra={"table": table})
            await self._install(self.client.profile)
        except NftError as exc:
            await self.close()
            raise SystemExit(f"ferryman client: transparent capture cannot start: {exc}") from None
        atexit.register(self._exit)
        if self._wanted is not None:  # a profile arrived while the first rules went in
            self._update = loop.create_task(self._follow())
        log.info("transparent capture on", extra={"table": f"inet {self.table}", "listen": self._listening(),
                                                   "excluded": ", ".join(f"{h}:{p}" for h, p in self.excluded)})
        if self.client.profile is None:
            log.warning("transparent capture: no forwarding profile yet (a signed-in agent gets one from the "
                        "control plane): nothing is captured until it arrives")

    def _listening(self) -> str:
        return ", ".join(f"127.0.0.1:{self.port4}" if s is self.servers[0] else f"[::1]:{self.port6}"
                         for s in self.servers)

    async def close(self) -> None:
        """Rules removed first (new connections are no longer redirected), then the listeners."""
        if self.closed:
            return
        self.closed = True
        if self._update is not None:  # (not cancelled: an nft already running would commit after the delete)
            await asyncio.wait([self._update], timeout=NFT_TIMEOUT)
        if self.installed:
            try:
                async with self._lock:
                    await _nft("", "delete", "table", "inet", self.table)
                self.installed = False
                log.info("transparent capture off", extra={"table": f"inet {self.table}"})
            except NftError as exc:
                log.error("transparent capture table not removed", extra={"table": self.table, "reason": str(exc)})
        for server in self.servers:
            server.close()

    def _exit(self) -> None:
        if self.installed:
            _delete_now(self.table)
            self.installed = False

    # ------------------------------------------------------------------ rules
    def profile_changed(self, profile: Profile) -> None:
        """A new forwarding profile: the rules follow (one transaction, newest profile wins)."""
        if self.closed:
            return
        self._wanted = profile  # (before the first rules are in: ``start`` takes it up)
        if not self.installed:
            return
        if self._update is None or self._update.done():
            self._update = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        while self._wanted is not None and not self.closed:
            profile, self._wanted = self._wanted, None
            try:
                await self._install(profile)
            except NftError as exc:
                log.error("transparent capture rules not updated: keeping the previous ones",
                          extra={"version": profile.version, "reason": str(exc)})
            else:
                log.info("transparent capture rules updated", extra={"version": profile.version})

    async def _install(self, profile: Profile | None) -> None:
        self.excluded = await asyncio.to_thread(self._exclusions, profile)
        script = ruleset(self.table, profile, self.port4, self.port6, self.excluded, self.local_ports())
        if profile is not None and not self.port6 and not self._warned_v6 and any(
                version == 6 for version, _ in capture_targets(profile)):
            self._warned_v6 = True
            log.warning("transparent capture: the profile's IPv6 segments are not captured (no IPv6 loopback)")
        async with self._lock:
            await _nft(script)
        self.installed = True

    def _exclusions(self, profile: Profile | None) -> list[Exclusion]:
        """Where the agent itself connects to: edges, control plane, egress proxy (names resolved)."""
        targets = self.targets()
        if profile is not None:
            for edge in profile.data.edges:
                try:
                    targets.append(parse_hostport(edge, "profile edge"))
                except ValueError:
                    continue
        found: set[Exclusion] = set()
        for host, port in targets:
            host = host.strip("[]")
            try:
                ipaddress.ip_address(host)
                found.add((host, port))
                continue
            except ValueError:
                pass
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("transparent capture: cannot resolve %s to exclude it", host, extra={"reason": str(exc)})
                continue
            found.update((info[4][0], port) for info in infos)
        return sorted(found)

    # ------------------------------------------------------------------ private DNS
    async def dns_answered(self, name: str, reply: DNSRecord) -> bool:
        """A resolver answer for ``name``: if private, its addresses are captured (opened by name)
        before the app gets the answer. False when they could not be and the profile fails
        closed: the app must not get the answer, it would reach them outside the tunnel."""
        profile = self.client.profile
        if self.closed or not self.installed or profile is None or reply.header.rcode != RCODE.NOERROR \
                or not profile.private_name(name):
            return True
        stats = self.client.stats
        entries, dropped = capture_entries(reply, bool(self.port6))
        for owner, address, why in dropped:
            stats.count(stats.datagrams_dropped, f"dns_capture_{why}")
            stats.log_limit.log(log, logging.WARNING, ("dns_capture", why),
                                "transparent capture: address in a private name's answer not captured",
                                {"qname": name, "owner": owner, "address": address, "reason": why})
        if not entries:
            return True
        now = time.monotonic()
        for address, seconds in entries.items():
            self.names.pop(address, None)
            self.names[address] = (name, now + seconds)
        self._prune(now)
        try:
            async with asyncio.timeout(DNS_HOOK_TIMEOUT):
                async with self._lock:
                    await _nft(elements(self.table, entries.items()))
        except (NftError, TimeoutError) as exc:
            closed = profile.fail_mode == "closed"
            stats.count(stats.datagrams_dropped, "dns_capture_failed")
            stats.log_limit.log(log, logging.ERROR, "dns_capture_failed",
                                "transparent capture: private name's addresses not captured, "
                                + ("answered SERVFAIL (fail closed)" if closed else "answer passed on (fail open)"),
                                {"qname": name, "addresses": ", ".join(entries), "reason": str(exc) or "timed out"})
            return not closed
        return True

    def _prune(self, now: float) -> None:
        if len(self.names) <= MAX_NAMES:
            return
        for address in [a for a, (_, until) in self.names.items() if until <= now]:
            del self.names[address]
        while len(self.names) > MAX_NAMES:
            del self.names[next(iter(self.names))]

    def name_for(self, address: str) -> str | None:
        """The private name last answered with ``address``, while its answer holds."""
        entry = self.names.get(address)
        if entry is None:
            return None
        if entry[1] <= time.monotonic():
            del self.names[address]
            return None
        return entry[0]

    def flow_host(self, address: str, port: int) -> str:
        """What a captured connection to address:port is opened to: the private name answered with
        that address (the edge matches it against FQDN segments), unless only an address segment
        covers it (a name never matches those), else the address."""
        name = self.name_for(address)
        if name is None:
            return address
        profile = self.client.profile
        if profile is not None and profile.table.match(name, port, "tcp") is None \
                and profile.table.match(address, port, "tcp") is not None:
            return address
        return name

    # ------------------------------------------------------------------ captured connections
    def _flow(self) -> ClientFlow:
        return ClientFlow(self.client, None, self._opened, on_connect=self._accepted)

    def _opened(self, flow: ClientFlow, code: str, reason: str) -> None:
        if code:
            flow.abort(code, reason)  # the app's connection is reset (the refusal is logged by the agent)

    def _accepted(self, flow: ClientFlow) -> None:
        client = self.client
        transport = flow.transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        try:
            ip, port = original_destination(sock)
        except (OSError, AttributeError) as exc:
            self._refuse(flow, "not_captured", f"no original destination ({exc})")
            return
        local = transport.get_extra_info("sockname")
        if local is not None and (ip, port) == (local[0], local[1]):
            self._refuse(flow, "not_captured", "connected to the transparent capture listener itself")
            return
        host = self.flow_host(ip, port)
        flow.dest = (host, port)
        log.debug("transparent capture", extra={"dest": f"{host}:{port}", "address": f"{ip}:{port}",
                                                "source": flow.peer})
        if client.route(host, port, "tcp") == "direct":
            self._direct(flow, ip, port)
            return
        client.open(flow, local=(ip, port))  # the app's process is looked up by where it connected to

    def _refuse(self, flow: ClientFlow, code: str, reason: str) -> None:
        stats = self.client.stats
        stats.count(stats.open_failures, code)
        log.warning("transparent connection refused", extra={"source": flow.peer, "code": code, "reason": reason})
        flow.done = True
        flow.on_opened = None
        flow._reset_socket()

    def _direct(self, flow: ClientFlow, ip: str, port: int) -> None:
        """Not tunnelled (fail open, or no longer covered): dialed from this device, marked."""
        transport = flow.transport
        assert transport is not None
        flow.done = True
        flow.on_opened = None

        def result(code: str, reason: str) -> None:
            if code and not transport.is_closing():
                sock = transport.get_extra_info("socket")
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
                transport.abort()

        _MarkedRelay(self.client, transport, ip, port, b"", result)
