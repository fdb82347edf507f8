"""Client agent: captures local connections and carries them as flows over one edge tunnel.

Capture comes from fixed port forwards (``forwards.py``: ``--forward LISTEN=HOST:PORT``, TCP,
or ``--forward LISTEN=HOST:PORT/udp``: each source address sending to the UDP listener
becomes one UDP flow, created by its first datagram), a SOCKS5 listener (CONNECT and UDP
ASSOCIATE, ``socks.py``), an HTTP CONNECT proxy (``httpconnect.py``) and a private DNS
resolver (``dns.py``), all on localhost. The front ends see the agent only as a
``FlowOpener`` (``opener.py``). A signed-in agent follows its forwarding profile
(``profile.py``): SOCKS5 and HTTP CONNECT tunnel only what it covers and dial the rest
directly (``direct.py``); while no edge is reachable private destinations are refused
(fail closed) or dialed directly (fail open). Each captured connection becomes an OPEN on
the tunnel, naming the app's process on Linux (``process.py``); the socket is read only
once the edge answers OPEN_OK. A refusal (no application, no connector, backend refused,
a policy, ...) is logged with the edge's reason and reported in the SOCKS reply code or
HTTP status. The tunnel is kept up with reconnect backoff, trying the configured edges in
turn. ``ready`` means: tunnel up and every forward's destination answered a probe OPEN
with OPEN_OK. ``status.py`` writes what ``ferryman client status`` shows. With
FERRYMAN_TRANSPARENT=on (Linux, root) ``transparent.py`` also captures TCP to the private
addresses, redirected by nftables.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import msgspec

from ..basics.hostport import parse_hostport
from ..basics.caps import HttpLimits, LogLimiter
from ..basics.metrics import Stats, start_metrics_server
from ..basics.pki import PeerCertificate
from ..basics.settings import ClientSettings
from ..controllink.http import bases as control_bases
from ..controllink.link import cut_revoked
from ..transport.credentials import NodeCredentials
from ..transport.endpoint import EndpointNode
from ..transport.socketflow import BufferBudget, LocalFlow
from ..transport.proxy import egress_proxy
from ..transport.supervisor import MOVE_CODES, keep_tunnel
from ..transport.tunnel import TunnelBase
from ..transport.udpflow import UdpFlow
from ..transport.udpio import udp_listener
from ..wire import events as ev
from ..wire.connection import FlowError, WireConfig
from ..wire.frames import Open
from . import dns, status
from .dns import Resolver
from .forwards import Forward, UdpForward, forward_flow
from .httpconnect import HttpConnect
from .opener import ClientFlow, NameRoute, Route
from .process import LocalUsers, ProcessFinder, parse_addr
from .profile import Profile, ProfileFollower
from .signin import TokenKeeper, default_directory
from .socks import Socks5
from .transparent import Transparent, check_usable

log = logging.getLogger("ferryman.client")

ClientTunnel = TunnelBase[LocalFlow, None]


class Client(EndpointNode[None]):
    """``keeper``: the signed-in session's token keeper (None: no user sign-in, certificate only)."""

    processes: ProcessFinder | None = None  # FERRYMAN_PROCESS_LOOKUP (set in run)

    def __init__(self, settings: ClientSettings, credentials: NodeCredentials, forwards: list[Forward],
                 keeper: TokenKeeper | None = None) -> None:
        self.settings = settings
        self.udp_backlog = settings.udp_backlog
        self.credentials = credentials
        self.name = credentials.name
        self.forwards = forwards
        self.stats = Stats("client", credentials.name, LogLimiter(settings.log_limit, settings.log_limit_interval))
        self.buffer_budget = BufferBudget(settings.flow_buffer_budget, self.stats)
        self.edges = [parse_hostport(e.strip(), "FERRYMAN_EDGES") for e in settings.edges.split(",") if e.strip()]
        if not self.edges:
            raise ValueError("FERRYMAN_EDGES is empty: give at least one edge HOST:PORT")
        self.tunnel: ClientTunnel | None = None
        self.listeners: list[asyncio.AbstractServer] = []
        self.udp_listeners: list[Any] = []  # UDP forwards' endpoints and the DNS resolver's transport
        self.probe_ok: dict[Forward, str] = {}  # forward -> "" when usable, else the reason
        self._probes: dict[tuple[ClientTunnel, int], Forward] = {}  # (tunnel, flow id) of each readiness probe
        # Flows that met a draining tunnel, waiting for its replacement (at most FERRYMAN_MAX_PENDING_OPENS
        # of them, each at most FERRYMAN_OPEN_TIMEOUT): opened again when the next tunnel is up.
        self._parked: list[ClientFlow | UdpFlow] = []
        # Loop time until which a tunnel that ended after its edge's GOAWAY ``draining`` is being
        # replaced: flows opened meanwhile wait for the replacement instead of failing.
        self._replacing_until = 0.0
        self._ssl = credentials.client_context()
        self._wire = credentials.wire_config()
        self.keeper = keeper
        self.profile: Profile | None = None  # the forwarding profile (signed-in agents only)
        self.follower: ProfileFollower | None = None
        self.directory = os.path.abspath(default_directory(settings.data_dir))
        if keeper is not None:
            keeper.on_token = self._new_token
            self.directory = keeper.directory
            self.follower = ProfileFollower(keeper.directory, keeper, self._new_profile)
        self.started = time.time()
        self.resolver: Resolver | None = None  # the private DNS resolver, with FERRYMAN_DNS_LISTEN
        self.transparent: Transparent | None = None  # with FERRYMAN_TRANSPARENT=on
        if settings.transparent == "on":
            check_usable()  # ValueError: not Linux, not root, no nft
        # Who on this device may use the listeners (the signed-in user's identity): ValueError for an unknown name.
        self.local_users = LocalUsers(settings.local_users)
        self.dns_rebind_allow = dns.rebind_allow(settings.dns_rebind_allow)  # ValueError: not a DNS name
        self.stats.extra = {
            "ferryman_client_forwards_ready": (
                "Forwards whose destination answered a probe", lambda: float(sum(1 for v in self.probe_ok.values() if not v))),
            "ferryman_flow_buffer_bytes": self.buffer_budget.gauge(),
        }

    # ------------------------------------------------------------------ lifecycle
    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        for fwd in self.forwards:
            if fwd.protocol == "udp":
                stats = self.stats
                udp = await udp_listener(
                    fwd.listen_host, fwd.listen_port, UdpForward(self, fwd), buffer=self.settings.udp_buffer,
                    on_send_drop=lambda n: stats.count(stats.datagrams_dropped, "local_busy", n))
                self.udp_listeners.append(udp)
                port = udp.get_extra_info("sockname")[1]
            else:
                server = await loop.create_server(lambda f=fwd: forward_flow(self, f), fwd.listen_host,
                                                  fwd.listen_port, backlog=1024, reuse_address=True)
                self.listeners.append(server)
                port = server.sockets[0].getsockname()[1]
            if fwd.listen_port == 0:
                self.forwards[self.forwards.index(fwd)] = fwd = msgspec.structs.replace(fwd, listen_port=port)
            log.info("forward listening", extra={"forward": str(fwd)})
        if self.settings.socks_listen:
            host, port = parse_hostport(self.settings.socks_listen, "FERRYMAN_SOCKS_LISTEN", allow_zero=True)
            if host not in ("127.0.0.1", "::1", "localhost"):
                raise ValueError(f"FERRYMAN_SOCKS_LISTEN={self.settings.socks_listen!r}: SOCKS5 listens on localhost only")
            server = await loop.create_server(lambda: Socks5(self), host, port, backlog=1024, reuse_address=True)
            self.listeners.append(server)
            bound = server.sockets[0].getsockname()
            log.info("socks5 listening", extra={"addr": f"{bound[0]}:{bound[1]}"})
        if self.settings.http_listen:
            host, port = parse_hostport(self.settings.http_listen, "FERRYMAN_HTTP_LISTEN", allow_zero=True)
            if host not in ("127.0.0.1", "::1", "localhost"):
                raise ValueError(f"FERRYMAN_HTTP_LISTEN={self.settings.http_listen!r}: the HTTP CONNECT proxy "
                                 "listens on localhost only")
            server = await loop.create_server(lambda: HttpConnect(self), host, port, backlog=1024, reuse_address=True)
            self.listeners.append(server)
            bound = server.sockets[0].getsockname()
            log.info("http connect proxy listening", extra={"addr": f"{bound[0]}:{bound[1]}"})
        if self.settings.process_lookup == "on" and sys.platform == "linux":
            self.processes = ProcessFinder(wait=self.settings.process_lookup_wait)
        if self.settings.dns_listen:
            host, port = parse_hostport(self.settings.dns_listen, "FERRYMAN_DNS_LISTEN", allow_zero=True)
            if host not in ("127.0.0.1", "::1", "localhost"):
                raise ValueError(f"FERRYMAN_DNS_LISTEN={self.settings.dns_listen!r}: the resolver listens on "
                                 "localhost only")
            self.resolver, dns_udp, dns_tcp = await dns.serve(self, (host, port))
            self.udp_listeners.append(dns_udp)
            self.listeners.append(dns_tcp)
            bound = dns_udp.get_extra_info("sockname")
            log.info("dns resolver listening", extra={"addr": f"{bound[0]}:{bound[1]}"})
        metrics = None
        if self.settings.metrics_addr:
            metrics = await start_metrics_server(self.settings.metrics_addr, self.stats, self.ready,
                                                 limits=HttpLimits.from_settings(self.settings))
        keeper = asyncio.create_task(keep_tunnel(self, self.settings, self._wire_config, self._ssl, self.edges,
                                                 self._session, lambda: not stop.is_set(), replace_draining=True))
        tokens = asyncio.create_task(self.keeper.run(stop)) if self.keeper is not None else None
        background = [asyncio.create_task(status.keep_written(self.directory, self.status, self.stats, stop))]
        if self.follower is not None:
            self.follower.start_cached()
            background.append(asyncio.create_task(self.follower.run(stop)))
        if self.settings.transparent == "on":
            capture = self.transparent = Transparent(self, targets=self._own_targets, local_ports=self._local_ports)
            await capture.start()  # after the cached profile and every listener
            if self.resolver is not None:  # a private name's addresses are captured before the app gets them
                self.resolver.on_answer = capture.dns_answered
                self.resolver.captured_name = capture.name_for
        await stop.wait()
        if self.transparent is not None:  # rules first: nothing is redirected to a closed listener
            await self.transparent.close()
            if self.resolver is not None:
                self.resolver.on_answer = None
                self.resolver.captured_name = None
        for task in background:  # a profile long-poll in flight is abandoned; the status file removed
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        for server in self.listeners:
            server.close()
        for udp in self.udp_listeners:
            udp.close()
        if self.processes is not None:
            self.processes.close()
        self.local_users.close()
        keeper.cancel()
        if tokens is not None:
            tokens.cancel()
        await asyncio.gather(keeper, *([tokens] if tokens else []), return_exceptions=True)
        if self.tunnel is not None:
            self.tunnel.goaway("shutdown", f"client {self.name} stopped")
            self.tunnel.close("shutdown", "client stopped")
        if metrics is not None:
            metrics.close()

    def _wire_config(self) -> WireConfig:
        """The HELLO of the next tunnel: with the current access token when signed in."""
        if self.keeper is None:
            return self._wire
        return msgspec.structs.replace(self._wire, token=self.keeper.token)

    def _new_token(self, token: str) -> None:
        """A refreshed access token: the edge gets it at once for the flows opened from now on."""
        tunnel = self.tunnel
        if tunnel is not None and tunnel.up and not tunnel.closed:
            tunnel.send_auth(token)

    def ready(self) -> bool:
        t = self.tunnel
        return (t is not None and t.up and not t.closed
                and all(self.probe_ok.get(f) == "" for f in self.forwards))

    async def _session(self, tunnel: ClientTunnel) -> None:
        """While the tunnel lasts: probe forwards quickly until all answer, then rarely."""
        while not tunnel.done_waiter.done():
            self._probe_forwards(tunnel)
            usable = all(self.probe_ok.get(f) == "" for f in self.forwards)
            await asyncio.wait([tunnel.done_waiter], timeout=5.0 if usable else 0.5)

    def _own_targets(self) -> list[tuple[str, int]]:
        """Where the agent itself connects to (never captured transparently): its edges, the control
        plane of its session and the egress proxy."""
        targets: list[tuple[str, int]] = list(self.edges)
        keeper = self.keeper
        if keeper is not None and keeper.session.control:
            for base in control_bases(keeper.session.control):  # one, or several comma-separated
                try:
                    parts = urlsplit(base)
                    if parts.hostname:
                        targets.append((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)))
                except ValueError:  # a malformed URL: the session's calls fail and say so
                    continue
        try:
            proxy = egress_proxy(self.settings)
        except Exception:  # noqa: BLE001 - a malformed proxy stopped the agent at start already
            proxy = None
        if proxy is not None:
            targets.append((proxy.host, proxy.port))
        return targets

    def _local_ports(self) -> set[int]:
        """The agent's own listening ports (never captured transparently)."""
        ports = {sock.getsockname()[1] for server in self.listeners for sock in (server.sockets or ())}
        if self.settings.metrics_addr:
            try:
                ports.add(parse_hostport(self.settings.metrics_addr, "FERRYMAN_METRICS_ADDR", allow_zero=True)[1])
            except ValueError:
                pass
        return ports

    def status(self) -> dict[str, Any]:
        """The agent's state now, as ``status.json`` holds it."""
        tunnel = self.tunnel
        session = self.keeper.session if self.keeper is not None else None
        profile = self.profile
        follower = self.follower
        up = tunnel is not None and tunnel.up and not tunnel.closed
        return {
            "pid": os.getpid(),
            "updated": time.time(),
            "started": self.started,
            "user": session.upn if session is not None else "",
            "device": session.device_id if session is not None else self.name,
            "control": session.control if session is not None else "",
            "tunnel": {
                "state": "up" if up else "down",
                "edge": tunnel.peer_name if up else "",
                "address": tunnel.peer_addr if up else "",
                "transport": tunnel.transport_name if up else "",
                "rtt_ms": round(tunnel.rtt * 1000, 2) if up and tunnel.rtt is not None else None,
                "edges": [f"{h}:{p}" for h, p in self.edges],
            },
            "flows": self.stats.flows_active,
            "profile": {
                "version": profile.version if profile is not None else None,
                "fail_mode": profile.fail_mode if profile is not None else "closed",
                "applications": len(profile.data.applications) if profile is not None else 0,
                "dns_suffixes": list(profile.suffixes) if profile is not None else [],
                "last_sync": follower.last_sync if follower is not None else None,
                "error": follower.error if follower is not None else "",
            },
            "forwards": [{"forward": str(f), "ready": self.probe_ok.get(f) == "",
                          "reason": self.probe_ok.get(f, "not probed yet")} for f in self.forwards],
        }

    # ------------------------------------------------------------------ tunnel events
    def tunnel_up(self, tunnel: ClientTunnel) -> None:
        self.tunnel = tunnel
        self.stats.tunnels_up += 1
        self.stats.tunnels_opened += 1
        log.info("tunnel up", extra={"edge": tunnel.peer_name, "addr": tunnel.label,
                                     "transport": tunnel.transport_name})
        self._replacing_until = 0.0
        parked, self._parked = self._parked, []
        for flow in parked:
            if not flow.done:
                self.open(flow)

    def tunnel_down(self, tunnel: ClientTunnel) -> None:
        if tunnel.up:
            self.stats.tunnels_up -= 1
            self.stats.count(self.stats.tunnels_closed, tunnel.close_code)
            self.stats.rtt.pop(tunnel.label, None)
        for key in [k for k in self._probes if k[0] is tunnel]:
            del self._probes[key]  # unanswered probes of this tunnel: probed again on the next one
        if self.tunnel is tunnel or self.tunnel is None:
            # (not when a QUIC tunnel already replaced this one: what it found out stands)
            self.tunnel = None
            if tunnel.goaway_waiter.done() and tunnel.goaway_waiter.result() in MOVE_CODES:
                self._replacing_until = asyncio.get_running_loop().time() + self.settings.open_timeout
            self.probe_ok.clear()
        reason = f"tunnel to edge {tunnel.peer_name} lost: {tunnel.close_reason}"
        for flow in list(tunnel.routes.values()):
            if getattr(flow, "on_opened", None) is not None:  # still waiting for the edge's answer
                flow.done = True
                flow.opened("edge_unreachable", reason)
            else:
                flow.on_reset("tunnel_lost", reason)
        tunnel.routes.clear()

    def tunnel_writable(self, tunnel: ClientTunnel, writable: bool) -> None:
        """Per-flow credit bounds what each flow queues; nothing else to do."""

    def goaway_received(self, tunnel: ClientTunnel, event: ev.GoAwayReceived) -> None:
        """The edge drains this tunnel (or, ``renewed``, asks it to move to its renewed certificate):
        the tunnel's slot (``keep_tunnel``) dials a replacement, and flows opened meanwhile wait
        for it (``_park``)."""

    def flow_requested(self, tunnel: ClientTunnel, event: ev.FlowRequested) -> None:
        if not tunnel.has_flow(event.flow_id):
            return
        if not tunnel.writable:
            # An edge opening flows toward a client (it never should) while not reading the answers
            # would make them pile up here: this agent always reads its edge.
            tunnel.close("peer_not_reading", "the edge opens flows toward this client agent and does not read "
                                             "the refusals", error=True)
            return
        tunnel.reject(event.flow_id, "not_allowed", "client agents do not accept flows")

    def flow_accepted(self, tunnel: ClientTunnel, event: ev.FlowAccepted) -> None:
        fwd = self._probes.pop((tunnel, event.flow_id), None)
        if fwd is not None:
            tunnel.reset(event.flow_id, "probe_done", "readiness probe")
            if self.probe_ok.get(fwd) != "":
                log.info("forward ready", extra={"forward": str(fwd)})
            self.probe_ok[fwd] = ""
            return
        flow = tunnel.routes.get(event.flow_id)
        if flow is not None:
            flow.activate()
            flow.opened("", "")

    def flow_rejected(self, tunnel: ClientTunnel, event: ev.FlowRejected) -> None:
        fwd = self._probes.pop((tunnel, event.flow_id), None)
        if fwd is not None:
            if event.code == "draining":  # probed again on the replacement tunnel
                return
            self.stats.count(self.stats.open_failures, event.code)
            if self.probe_ok.get(fwd) != event.reason:
                log.warning("forward not usable", extra={"forward": str(fwd), "code": event.code, "reason": event.reason})
            self.probe_ok[fwd] = event.reason or event.code
            return
        flow = tunnel.routes.pop(event.flow_id, None)
        if flow is not None and event.code == "draining" and tunnel.draining and not flow.done:
            flow.tunnel = None  # the OPEN crossed the edge's GOAWAY: nothing reached the app, so open it again
            if self._park(flow):
                return
        self.stats.count(self.stats.open_failures, event.code)
        if flow is not None:
            flow.done = True
            log.warning("flow refused", extra={"dest": "%s:%s" % flow.dest, "source": flow.peer,
                                               "code": event.code, "reason": event.reason})
            flow.opened(event.code, event.reason)

    def flow_reset(self, tunnel: ClientTunnel, event: ev.FlowReset) -> None:
        if self._probes.pop((tunnel, event.flow_id), None) is not None:
            return
        super().flow_reset(tunnel, event)

    # ------------------------------------------------------------------ opening flows (the FlowOpener)
    def _probe_forwards(self, tunnel: ClientTunnel) -> None:
        if tunnel.draining:  # probed on the replacement
            return
        for fwd in self.forwards:
            if self.probe_ok.get(fwd) == "" or fwd in self._probes.values():
                continue
            try:
                fid = tunnel.open_flow(Open(host=fwd.host, port=fwd.port, protocol=fwd.protocol, source="probe"))
            except FlowError as exc:
                self.probe_ok[fwd] = exc.message
                continue
            self._probes[(tunnel, fid)] = fwd

    def open(self, flow: ClientFlow | UdpFlow, process: str | None = None,
             local: tuple[str, int] | None = None) -> None:
        """Send OPEN for a captured connection (or UDP conversation); ``flow.on_opened`` gets the answer.

        With FERRYMAN_PROCESS_LOOKUP the initiating process (``name[pid]``) is looked up first,
        on a worker thread: OPEN waits for it a few milliseconds at most (``process.py``)."""
        finder = self.processes
        if process is None and finder is not None:
            if local is None:
                transport = flow.transport if isinstance(flow, ClientFlow) else None
                local = transport.get_extra_info("sockname") if transport is not None else None
            finder.find(flow.protocol, parse_addr(flow.peer), local,
                        lambda name: None if flow.done else self.open(flow, name))
            return
        assert flow.dest is not None
        host, port = flow.dest
        tunnel = self.tunnel
        if (tunnel is None or not tunnel.up or tunnel.closed) and self._replacing() and self._park(flow):
            return
        if tunnel is None or not tunnel.up or tunnel.closed:
            self.stats.count(self.stats.open_failures, "edge_unreachable")
            reason = self._unreachable()
            log.warning("flow refused", extra={"dest": f"{host}:{port}", "code": "edge_unreachable",
                                               "reason": reason})
            flow.done = True
            flow.opened("edge_unreachable", reason)
            return
        if tunnel.draining and self._park(flow):
            return
        try:
            fid = tunnel.open_flow(Open(host=host, port=port, protocol=flow.protocol, source=flow.peer,
                                        process=process or ""))
        except FlowError as exc:
            self.stats.count(self.stats.open_failures, exc.code)
            log.warning("flow refused", extra={"dest": f"{host}:{port}", "code": exc.code, "reason": exc.message})
            flow.done = True
            flow.opened(exc.code, exc.message)
            return
        flow.bind(tunnel, fid)
        if flow.timer is None:  # (a flow opened again after waiting for a tunnel keeps its first deadline)
            flow.timer = asyncio.get_running_loop().call_later(self.settings.open_timeout, self._open_expired, flow)

    def _park(self, flow: ClientFlow | UdpFlow) -> bool:
        """Keep a flow whose tunnel drains until the replacement tunnel is up (``tunnel_up`` opens it
        there; the open timeout still runs). False when the current tunnel is a usable replacement
        already (the flow is opened on it now) or FERRYMAN_MAX_PENDING_OPENS flows wait."""
        current = self.tunnel
        if current is not None and current.up and not current.closed and not current.draining:
            self.open(flow)
            return True
        if len(self._parked) >= self.settings.max_pending_opens:
            self._parked = [f for f in self._parked if not f.done]
            if len(self._parked) >= self.settings.max_pending_opens:
                return False
        self._parked.append(flow)
        if flow.timer is None:
            flow.timer = asyncio.get_running_loop().call_later(self.settings.open_timeout, self._open_expired, flow)
        return True

    def route(self, host: str, port: int, protocol: str = "tcp") -> Route:
        """Where a connection captured by SOCKS5 or HTTP CONNECT to host:port goes: ``"tunnel"``
        (through the edge) or ``"direct"`` (dialed from this device, not tunnelled).

        Without a forwarding profile (an agent running on a certificate, or one that has not
        received its profile yet) everything is private. With one, only what a private
        application's segment or a private DNS suffix covers is tunnelled. A private
        destination while no edge is reachable is tunnelled (and so refused: fail closed)
        unless the profile's fail mode is ``open``, which dials it directly."""
        profile = self.profile
        if profile is not None and not profile.covers(host, port, protocol):
            return "direct"
        if self._tunnel_up():
            return "tunnel"
        if profile is not None and profile.fail_mode == "open":
            self.stats.count(self.stats.open_failures, "fail_open")
            log.warning("edge unreachable: private destination dialed directly (fail open)",
                        extra={"dest": f"{host}:{port}", "protocol": protocol})
            return "direct"
        return "tunnel"

    def route_name(self, name: str) -> NameRoute:
        """Where the resolver resolves ``name``: a private name through the tunnel while one is up,
        else as the profile's fail mode says; any other name by the system resolver."""
        profile = self.profile
        if profile is None or not profile.private_name(name):
            return "public"
        if self._tunnel_up():
            return "tunnel"
        return "closed" if profile.fail_mode == "closed" else "open"

    def _tunnel_up(self) -> bool:
        """A tunnel is up, or one whose edge drained is being replaced (flows wait for it)."""
        tunnel = self.tunnel
        return (tunnel is not None and tunnel.up and not tunnel.closed) or self._replacing()

    def _replacing(self) -> bool:
        return asyncio.get_running_loop().time() < self._replacing_until

    def _new_profile(self, profile: Profile) -> None:
        self.profile = profile
        if self.resolver is not None:  # answers kept under the old profile were checked against its segments
            self.resolver.cache.clear()
        if self.tunnel is not None:  # an edge revoked since its tunnel came up is left at once
            cut_revoked([self.tunnel], profile.revoked, f"client {self.name}")
        if self.transparent is not None:
            self.transparent.profile_changed(profile)

    def refuse_peer(self, peer: PeerCertificate) -> str | None:
        """An edge whose certificate the profile lists as revoked is refused at the handshake
        (an agent without a profile, on a certificate only, has no revocation list)."""
        profile = self.profile
        if profile is not None and peer.serial in profile.revoked:
            return f"edge {peer.name!r}: certificate {peer.serial:x} is revoked"
        return None

    def _unreachable(self) -> str:
        """Why a flow cannot be opened while no tunnel is up."""
        if self.profile is not None:
            return (f"no tunnel to an edge is up (fail {self.profile.fail_mode}: private destinations are "
                    f"{'refused' if self.profile.fail_mode == 'closed' else 'dialed directly'} until it is back)")
        return "no tunnel to an edge is up"

    def _open_expired(self, flow: ClientFlow | UdpFlow) -> None:
        flow.timer = None
        if flow.active or flow.done:
            return
        reason = f"no answer from the edge within {self.settings.open_timeout:g}s"
        self.stats.count(self.stats.open_failures, "open_timeout")
        log.warning("flow refused", extra={"dest": "%s:%s" % flow.dest, "code": "open_timeout", "reason": reason})
        tunnel = flow.tunnel
        if tunnel is not None:
            tunnel.reset(flow.flow_id, "open_timeout", reason)
            tunnel.routes.pop(flow.flow_id, None)
        flow.done = True
        flow.opened("open_timeout", reason)
