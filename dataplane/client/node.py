"""Client agent: captures local connections and carries them as flows over one edge tunnel.

Capture comes from fixed port forwards (``--forward LISTEN=HOST:PORT``, TCP, or
``--forward LISTEN=HOST:PORT/udp``: each source address sending to the UDP listener
becomes one UDP flow, created by its first datagram), a SOCKS5 listener (CONNECT and UDP
ASSOCIATE, ``socks.py``), an HTTP CONNECT proxy (``httpconnect.py``) and a private DNS
resolver (``dns.py``), all on localhost. A signed-in agent follows its forwarding profile
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
from collections.abc import Callable

import msgspec

from ..basics.hostport import parse_hostport
from ..basics.metrics import Stats, start_metrics_server
from ..basics.settings import Settings
from ..transport.credentials import NodeCredentials
from ..transport.socketflow import EndpointNode, SocketFlow
from ..transport.supervisor import keep_tunnel, transport_of
from ..transport.tunnel import Tunnel
from ..transport.udpflow import UdpFlow, set_udp_buffers
from ..wire import events as ev
from ..wire.connection import FlowError, WireConfig
from . import status
from .profile import Profile, ProfileFollower
from .signin import TokenKeeper, default_directory
from ..wire.frames import Open
from .process import ProcessFinder, parse_addr

log = logging.getLogger("ferryman.client")

# on_opened(flow, code, reason): code "" means the flow is open.
Opened = Callable[["ClientFlow", str, str], None]


class Forward(msgspec.Struct, frozen=True):
    listen_host: str
    listen_port: int
    host: str
    port: int
    protocol: str = "tcp"

    @classmethod
    def parse(cls, spec: str) -> "Forward":
        """``[LISTEN_HOST:]LISTEN_PORT=HOST:PORT[/tcp|/udp]``."""
        if "=" not in spec:
            raise ValueError(f"--forward {spec!r}: expected [LISTEN_HOST:]LISTEN_PORT=HOST:PORT[/udp]")
        listen, dest = spec.split("=", 1)
        protocol = "tcp"
        if "/" in dest:
            dest, protocol = dest.rsplit("/", 1)
            if protocol not in ("tcp", "udp"):
                raise ValueError(f"--forward {spec!r}: protocol {protocol!r} is not tcp or udp")
        if ":" not in listen or listen.startswith("["):
            listen = listen if ":" in listen else f"127.0.0.1:{listen}"
        lhost, lport = parse_hostport(listen, f"--forward {spec!r} listen address", allow_zero=True)
        host, port = parse_hostport(dest, f"--forward {spec!r} destination")
        return cls(lhost, lport, host, port, protocol)

    def __str__(self) -> str:
        suffix = "/udp" if self.protocol == "udp" else ""
        return f"{self.listen_host}:{self.listen_port}={self.host}:{self.port}{suffix}"


class ClientFlow(SocketFlow):
    __slots__ = ("dest", "on_opened", "timer")
    protocol = "tcp"

    def __init__(self, node: "Client", dest: tuple[str, int] | None = None, on_opened: Opened | None = None,
                 on_connect: Callable[[SocketFlow], None] | None = None) -> None:
        super().__init__(node, on_connect)
        self.dest = dest
        self.on_opened = on_opened
        self.timer: asyncio.TimerHandle | None = None

    def opened(self, code: str, reason: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        callback, self.on_opened = self.on_opened, None
        if callback is not None:
            callback(self, code, reason)


class Client(EndpointNode):
    """``keeper``: the signed-in session's token keeper (None: no user sign-in, certificate only)."""

    processes: ProcessFinder | None = None  # FERRYMAN_PROCESS_LOOKUP (set in run)

    def __init__(self, settings: Settings, credentials: NodeCredentials, forwards: list[Forward],
                 keeper: TokenKeeper | None = None) -> None:
        self.settings = settings
        self.credentials = credentials
        self.name = credentials.name
        self.forwards = forwards
        self.stats = Stats("client", credentials.name)
        self.edges = [parse_hostport(e.strip(), "FERRYMAN_EDGES") for e in settings.edges.split(",") if e.strip()]
        if not self.edges:
            raise ValueError("FERRYMAN_EDGES is empty: give at least one edge HOST:PORT")
        self.tunnel: Tunnel | None = None
        self.listeners: list[asyncio.AbstractServer] = []
        self.udp_listeners: list[asyncio.DatagramTransport] = []
        self.probe_ok: dict[Forward, str] = {}  # forward -> "" when usable, else the reason
        self._probes: dict[tuple[Tunnel, int], Forward] = {}  # (tunnel, flow id) of each readiness probe
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
        self.resolver: object | None = None  # the private DNS resolver (dns.Resolver), with FERRYMAN_DNS_LISTEN
        self.transparent: object | None = None  # transparent.Transparent, with FERRYMAN_TRANSPARENT=on
        if settings.transparent == "on":
            from .transparent import check_usable

            check_usable()  # ValueError: not Linux, not root, no nft
        self.stats.extra = {
            "ferryman_client_forwards_ready": (
                "Forwards whose destination answered a probe", lambda: float(sum(1 for v in self.probe_ok.values() if not v))),
        }

    # ------------------------------------------------------------------ lifecycle
    async def run(self, stop: asyncio.Event) -> None:
        from .socks import Socks5  # the SOCKS front end builds on this module

        loop = asyncio.get_running_loop()
        for fwd in self.forwards:
            if fwd.protocol == "udp":
                udp, _ = await loop.create_datagram_endpoint(lambda f=fwd: UdpForward(self, f),
                                                             local_addr=(fwd.listen_host, fwd.listen_port))
                set_udp_buffers(udp, self.settings.udp_buffer)
                self.udp_listeners.append(udp)
                port = udp.get_extra_info("sockname")[1]
            else:
                server = await loop.create_server(lambda f=fwd: self._forward_flow(f), fwd.listen_host,
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
            from .httpconnect import HttpConnect

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
            from . import dns

            host, port = parse_hostport(self.settings.dns_listen, "FERRYMAN_DNS_LISTEN", allow_zero=True)
            if host not in ("127.0.0.1", "::1", "localhost"):
                raise ValueError(f"FERRYMAN_DNS_LISTEN={self.settings.dns_listen!r}: the resolver listens on "
                                 "localhost only")
            dns_udp, dns_tcp = await dns.serve(self, (host, port))
            self.udp_listeners.append(dns_udp)
            self.listeners.append(dns_tcp)
            bound = dns_udp.get_extra_info("sockname")
            log.info("dns resolver listening", extra={"addr": f"{bound[0]}:{bound[1]}"})
        metrics = None
        if self.settings.metrics_addr:
            metrics = await start_metrics_server(self.settings.metrics_addr, self.stats, self.ready)
        keeper = asyncio.create_task(keep_tunnel(self, self.settings, self._wire_config, self._ssl, self.edges,
                                                 self._session, lambda: not stop.is_set()))
        tokens = asyncio.create_task(self.keeper.run(stop)) if self.keeper is not None else None
        background = [asyncio.create_task(status.keep_written(self, stop))]
        if self.follower is not None:
            self.follower.start_cached()
            background.append(asyncio.create_task(self.follower.run(stop)))
        if self.settings.transparent == "on":
            from .transparent import Transparent

            capture = self.transparent = Transparent(self)
            await capture.start()  # after the cached profile and every listener
        await stop.wait()
        if self.transparent is not None:  # rules first: nothing is redirected to a closed listener
            await self.transparent.close()  # type: ignore[attr-defined]
        for task in background:  # a profile long-poll in flight is abandoned; the status file removed
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        for server in self.listeners:
            server.close()
        for udp in self.udp_listeners:
            udp.close()
        if self.processes is not None:
            self.processes.close()
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
            tunnel.conn.send_auth(token)
            tunnel.flush_soon()

    def ready(self) -> bool:
        t = self.tunnel
        return (t is not None and t.up and not t.closed
                and all(self.probe_ok.get(f) == "" for f in self.forwards))

    async def _session(self, tunnel: Tunnel) -> None:
        """While the tunnel lasts: probe forwards quickly until all answer, then rarely."""
        while not tunnel.done_waiter.done():
            self._probe_forwards(tunnel)
            usable = all(self.probe_ok.get(f) == "" for f in self.forwards)
            await asyncio.wait([tunnel.done_waiter], timeout=5.0 if usable else 0.5)

    # ------------------------------------------------------------------ tunnel events
    def tunnel_up(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        self.stats.tunnels_up += 1
        self.stats.tunnels_opened += 1
        log.info("tunnel up", extra={"edge": tunnel.peer_name, "addr": tunnel.label,
                                     "transport": transport_of(tunnel)})

    def tunnel_down(self, tunnel: Tunnel) -> None:
        if tunnel.up:
            self.stats.tunnels_up -= 1
            self.stats.count(self.stats.tunnels_closed, tunnel.close_code)
            self.stats.rtt.pop(tunnel.label, None)
        for key in [k for k in self._probes if k[0] is tunnel]:
            del self._probes[key]  # unanswered probes of this tunnel: probed again on the next one
        if self.tunnel is tunnel or self.tunnel is None:
            # (not when a QUIC tunnel already replaced this one: what it found out stands)
            self.tunnel = None
            self.probe_ok.clear()
        reason = f"tunnel to edge {tunnel.peer_name} lost: {tunnel.close_reason}"
        for flow in list(tunnel.routes.values()):
            if getattr(flow, "on_opened", None) is not None:
                flow.done = True
                flow.opened("edge_unreachable", reason)
            else:
                flow.on_reset("tunnel_lost", reason)
        tunnel.routes.clear()

    def tunnel_writable(self, tunnel: Tunnel, writable: bool) -> None:
        """Per-flow credit bounds what each flow queues; nothing else to do."""

    def goaway_received(self, tunnel: Tunnel, event: ev.GoAwayReceived) -> None:
        """New flows fail with "draining" until the tunnel is replaced after it closes."""

    def flow_requested(self, tunnel: Tunnel, event: ev.FlowRequested) -> None:
        if event.flow_id not in tunnel.conn.flows:
            return
        tunnel.conn.reject_flow(event.flow_id, "not_allowed", "client agents do not accept flows")

    def flow_accepted(self, tunnel: Tunnel, event: ev.FlowAccepted) -> None:
        fwd = self._probes.pop((tunnel, event.flow_id), None)
        if fwd is not None:
            tunnel.conn.reset_flow(event.flow_id, "probe_done", "readiness probe")
            if self.probe_ok.get(fwd) != "":
                log.info("forward ready", extra={"forward": str(fwd)})
            self.probe_ok[fwd] = ""
            return
        flow = tunnel.routes.get(event.flow_id)
        if flow is not None:
            flow.activate()
            flow.opened("", "")

    def flow_rejected(self, tunnel: Tunnel, event: ev.FlowRejected) -> None:
        self.stats.count(self.stats.open_failures, event.code)
        fwd = self._probes.pop((tunnel, event.flow_id), None)
        if fwd is not None:
            if self.probe_ok.get(fwd) != event.reason:
                log.warning("forward not usable", extra={"forward": str(fwd), "code": event.code, "reason": event.reason})
            self.probe_ok[fwd] = event.reason or event.code
            return
        flow = tunnel.routes.pop(event.flow_id, None)
        if flow is not None:
            flow.done = True
            log.warning("flow refused", extra={"dest": "%s:%s" % flow.dest, "source": flow.peer,
                                               "code": event.code, "reason": event.reason})
            flow.opened(event.code, event.reason)

    def flow_reset(self, tunnel: Tunnel, event: ev.FlowReset) -> None:
        if self._probes.pop((tunnel, event.flow_id), None) is not None:
            return
        super().flow_reset(tunnel, event)

    # ------------------------------------------------------------------ opening flows
    def _probe_forwards(self, tunnel: Tunnel) -> None:
        for fwd in self.forwards:
            if self.probe_ok.get(fwd) == "" or fwd in self._probes.values():
                continue
            try:
                fid = tunnel.conn.open_flow(Open(host=fwd.host, port=fwd.port, protocol=fwd.protocol, source="probe"))
            except FlowError as exc:
                self.probe_ok[fwd] = exc.message
                continue
            self._probes[(tunnel, fid)] = fwd
        tunnel.flush_soon()

    def _forward_flow(self, fwd: Forward) -> ClientFlow:
        def opened(flow: ClientFlow, code: str, reason: str) -> None:
            if code:
                flow.abort(code, reason)

        return ClientFlow(self, (fwd.host, fwd.port), opened,
                          on_connect=lambda flow: self.open(flow))  # type: ignore[arg-type]

    def open(self, flow: ClientFlow | UdpFlow, process: str | None = None) -> None:
        """Send OPEN for a captured connection (or UDP conversation); ``flow.on_opened`` gets the answer.

        With FERRYMAN_PROCESS_LOOKUP the initiating process (``name[pid]``) is looked up first,
        on a worker thread: OPEN waits for it a few milliseconds at most (``process.py``)."""
        finder = self.processes
        if process is None and finder is not None:
            transport = flow.transport if isinstance(flow, ClientFlow) else None
            ours = transport.get_extra_info("sockname") if transport is not None else None
            finder.find(flow.protocol, parse_addr(flow.peer), ours,
                        lambda name: None if flow.done else self.open(flow, name))
            return
        host, port = flow.dest  # type: ignore[misc]
        tunnel = self.tunnel
        if tunnel is None or not tunnel.up or tunnel.closed:
            self.stats.count(self.stats.open_failures, "edge_unreachable")
            reason = self._unreachable()
            log.warning("flow refused", extra={"dest": f"{host}:{port}", "code": "edge_unreachable",
                                               "reason": reason})
            flow.done = True
            flow.opened("edge_unreachable", reason)
            return
        try:
            fid = tunnel.conn.open_flow(Open(host=host, port=port, protocol=flow.protocol, source=flow.peer,
                                             process=process or ""))
        except FlowError as exc:
            self.stats.count(self.stats.open_failures, exc.code)
            log.warning("flow refused", extra={"dest": f"{host}:{port}", "code": exc.code, "reason": exc.message})
            flow.done = True
            flow.opened(exc.code, exc.message)
            return
        flow.bind(tunnel, fid)
        tunnel.flush_soon()
        flow.timer = asyncio.get_running_loop().call_later(self.settings.open_timeout, self._open_expired, flow)

    def route(self, host: str, port: int, protocol: str = "tcp") -> str:
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
        tunnel = self.tunnel
        if tunnel is not None and tunnel.up and not tunnel.closed:
            return "tunnel"
        if profile is not None and profile.fail_mode == "open":
            self.stats.count(self.stats.open_failures, "fail_open")
            log.warning("edge unreachable: private destination dialed directly (fail open)",
                        extra={"dest": f"{host}:{port}", "protocol": protocol})
            return "direct"
        return "tunnel"

    def _new_profile(self, profile: Profile) -> None:
        self.profile = profile
        if self.transparent is not None:
            self.transparent.profile_changed(profile)  # type: ignore[attr-defined]

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
        if flow.tunnel is not None:
            flow.tunnel.conn.reset_flow(flow.flow_id, "open_timeout", reason)
            flow.tunnel.routes.pop(flow.flow_id, None)
            flow.tunnel.flush_soon()
        flow.done = True
        flow.opened("open_timeout", reason)


class UdpForward(asyncio.DatagramProtocol):
    """A UDP port forward: one UDP flow per source address, created by its first datagram and
    ended after FERRYMAN_UDP_IDLE_TIMEOUT without traffic; answers go back to that address."""

    def __init__(self, client: Client, forward: Forward) -> None:
        self.client = client
        self.forward = forward
        self.transport: asyncio.DatagramTransport | None = None
        self.flows: dict[tuple, UdpFlow] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        flow = self.flows.get(addr)
        if flow is None:
            client = self.client
            settings = client.settings
            if len(self.flows) >= settings.max_udp_flows:
                client.stats.count(client.stats.datagrams_dropped, "too_many_udp_flows")
                return
            transport = self.transport
            assert transport is not None
            flow = UdpFlow(client, lambda d, a=addr: transport.sendto(d, a), self._closed,
                           idle=settings.udp_idle_timeout, queue=settings.udp_queue,
                           dest=(self.forward.host, self.forward.port), peer=f"{addr[0]}:{addr[1]}")
            flow.on_opened = self._opened
            self.flows[addr] = flow
            flow.from_local(data)  # queued until OPEN_OK
            client.open(flow)
            return
        flow.from_local(data)

    def error_received(self, exc: Exception) -> None:
        # e.g. ICMP port unreachable for an answer sent to an app that has closed its socket
        self.client.stats.count(self.client.stats.datagrams_dropped, "local_error")

    def _opened(self, flow: UdpFlow, code: str, reason: str) -> None:
        """A refused UDP flow: its queued datagrams are dropped (counted); the next datagram from the
        same address tries again."""
        if code:
            stats = self.client.stats
            stats.count(stats.datagrams_dropped, "flow_refused", len(flow.queue))

    def _closed(self, flow: UdpFlow) -> None:
        for addr, known in list(self.flows.items()):
            if known is flow:
                del self.flows[addr]
                break
