"""Connector: keeps outbound tunnels to edges and dials private backends for each OPEN.

The connector never listens for tunnels. It holds ``FERRYMAN_CONNECTOR_TUNNELS`` TLS
tunnels spread over the configured edges, each kept up by its own reconnect loop
(exponential backoff with jitter). Every OPEN from an edge becomes a TCP connection
from this host to the backend (so the backend sees the connector's address), answered
with OPEN_OK or OPEN_FAIL carrying a specific reason. On SIGTERM it sends GOAWAY on
every tunnel, lets running flows finish for ``FERRYMAN_DRAIN_GRACE`` seconds, resets
what is left and exits.

A connector registered with the control plane also runs a ``ControlLink``: it reports
heartbeats, renews its certificate (new tunnels use the new one), takes the edges to dial
from each configuration snapshot (unless ``FERRYMAN_EDGES``/``--edges`` were given), and
ends tunnels to an edge whose certificate the snapshot revokes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from dnslib import OPCODE, DNSRecord

from ..access.grants import GrantError, GrantVerifier
from ..basics.hostport import dns_server, parse_hostport
from ..basics.metrics import Stats, start_metrics_server
from ..basics.pki import PeerCertificate
from ..basics.settings import ConnectorSettings
from ..contract.snapshot import ConfigSnapshot, revoked_set
from ..controllink.registration import Registration
from ..controllink.link import ControlLink, Report, cut_revoked
from ..transport.credentials import NodeCredentials
from ..transport.endpoint import EndpointNode
from ..transport.socketflow import LocalFlow, SocketFlow
from ..transport.supervisor import keep_tunnel
from ..transport.tunnel import TunnelBase
from ..transport.udpflow import UdpFlow, set_udp_buffers
from ..wire import events as ev
from ..wire.frames import Open

log = logging.getLogger("ferryman.connector")


EdgeKey = ec.EllipticCurvePublicKey  # the edge's certificate key: every OPEN's grant must verify with it
ConnectorTunnel = TunnelBase[LocalFlow, EdgeKey]


class Connector(EndpointNode[EdgeKey]):
    """``registered``: the registration stored by ``ferryman connector register`` (None: no control
    plane); ``follow_edges``: take the edge list from the control plane's snapshots."""

    def __init__(self, settings: ConnectorSettings, credentials: NodeCredentials,
                 registered: Registration | None = None,
                 *, follow_edges: bool = False) -> None:
        self.settings = settings
        self.credentials = credentials
        self.name = credentials.name
        self.stats = Stats("connector", credentials.name)
        self.edges = [parse_hostport(e.strip(), "FERRYMAN_EDGES") for e in settings.edges.split(",") if e.strip()]
        if not self.edges:
            raise ValueError("FERRYMAN_EDGES is empty: give at least one edge HOST:PORT")
        self.tunnels: set[ConnectorTunnel] = set()
        self.udp_flows: set[UdpFlow] = set()
        self.udp_sockets: dict[UdpFlow, asyncio.DatagramTransport] = {}  # each UDP flow's backend socket
        self.draining = False
        self._ssl = credentials.client_context()
        self._wire = credentials.wire_config(group=settings.connector_group)
        self.revoked: frozenset[int] = frozenset()
        self.grants = GrantVerifier(credentials.name, limit=settings.grant_cache)
        self.follow_edges = follow_edges
        self.link: ControlLink | None = None
        if registered is not None:
            self.link = ControlLink(settings, registered, self._configure, self._report, self._renewed)
        self.stats.extra = {
            "ferryman_config_version": (
                "Configuration version in use (-1: none yet; 0 without a control plane)",
                lambda: float(0 if self.link is None else -1 if self.link.version is None else self.link.version)),
        }

    # ------------------------------------------------------------------ lifecycle
    async def run(self, stop: asyncio.Event) -> None:
        metrics = None
        if self.link is not None:
            self.link.load_cached()
        following = asyncio.create_task(self.link.run(stop)) if self.link is not None else None
        if self.settings.metrics_addr:
            metrics = await start_metrics_server(self.settings.metrics_addr, self.stats, self.ready)
        slots = [asyncio.create_task(keep_tunnel(self, self.settings, self._wire, lambda: self._ssl, self.edges,
                                                 self._session, lambda: not self.draining, first=i, label=f"t{i}->"))
                 for i in range(self.settings.connector_tunnels)]
        log.info("connector started", extra={"group": self.settings.connector_group,
                                             "edges": self.settings.edges,
                                             "tunnels": self.settings.connector_tunnels})
        await stop.wait()
        await self.drain()
        for task in slots:
            task.cancel()
        await asyncio.gather(*slots, *([following] if following else []), return_exceptions=True)
        if metrics is not None:
            metrics.close()

    # ------------------------------------------------------------------ control plane
    def _configure(self, snapshot: ConfigSnapshot) -> None:
        self.revoked = revoked_set(snapshot)
        cut_revoked(self.tunnels, self.revoked, f"connector {self.name}")
        if self.follow_edges and snapshot.edges:
            edges = []
            for edge in snapshot.edges:
                try:
                    edges.append(parse_hostport(edge, "edge address from the control plane"))
                except ValueError as exc:
                    log.error("%s; edge ignored", exc)
            if edges and edges != self.edges:
                log.info("edges updated by the control plane", extra={"edges": ",".join(snapshot.edges)})
                self.edges[:] = edges  # the reconnect loops read the list at every dial

    def refuse_peer(self, peer: PeerCertificate) -> str | None:
        if peer.serial in self.revoked:
            return f"edge {peer.name!r}: certificate {peer.serial:x} is revoked"
        return None

    def _report(self) -> Report:
        addresses = set()
        for tunnel in self.tunnels:
            local = tunnel.sockname
            if local:
                addresses.add(str(local[0]))
        return Report(tunnels=len(self.tunnels), active_flows=sum(len(t.routes) for t in self.tunnels),
                      addresses=sorted(addresses))

    def _renewed(self) -> None:
        """New tunnels present the renewed certificate; running ones keep theirs until they end."""
        self._ssl = self.credentials.client_context()

    @staticmethod
    async def _session(tunnel: ConnectorTunnel) -> None:
        await tunnel.done_waiter

    def ready(self) -> bool:
        return not self.draining and any(t.up and not t.closed for t in self.tunnels)

    async def drain(self) -> None:
        """GOAWAY on every tunnel, wait for flows to finish (bounded), then close."""
        self.draining = True
        grace = self.settings.drain_grace
        live = sum(len(t.routes) for t in self.tunnels)
        log.info("draining", extra={"flows": live, "grace_s": grace})
        for tunnel in list(self.tunnels):
            tunnel.goaway("draining", f"connector {self.name} is shutting down")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while any(t.routes for t in self.tunnels) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for tunnel in list(self.tunnels):
            left = len(tunnel.routes)
            if left:
                log.warning("drain grace expired; resetting flows", extra={"flows": left})
            for flow in list(tunnel.routes.values()):
                flow.abort("connector_shutdown", f"connector {self.name} shut down")
            tunnel.close("shutdown", "connector stopped")

    # ------------------------------------------------------------------ tunnel events
    def tunnel_up(self, tunnel: ConnectorTunnel) -> None:
        # The edge's certificate key, which must have signed the grant of every OPEN on this tunnel.
        der = tunnel.peer_certificate_der()
        key = x509.load_der_x509_certificate(der).public_key() if der else None
        tunnel.state = key if isinstance(key, ec.EllipticCurvePublicKey) else None
        self.tunnels.add(tunnel)
        self.stats.tunnels_up += 1
        self.stats.tunnels_opened += 1
        log.info("tunnel up", extra={"tunnel": tunnel.label, "edge": tunnel.peer_name,
                                     "transport": tunnel.transport_name})

    def tunnel_down(self, tunnel: ConnectorTunnel) -> None:
        if tunnel in self.tunnels:
            self.tunnels.discard(tunnel)
            self.stats.tunnels_up -= 1
            self.stats.count(self.stats.tunnels_closed, tunnel.close_code)
            self.stats.rtt.pop(tunnel.label, None)
        self.reset_all(tunnel, "tunnel_lost", f"tunnel to edge {tunnel.peer_name} lost: {tunnel.close_reason}")

    def goaway_received(self, tunnel: ConnectorTunnel, event: ev.GoAwayReceived) -> None:
        """The edge drains this tunnel: existing flows continue, the edge sends no new ones."""

    def flow_requested(self, tunnel: ConnectorTunnel, event: ev.FlowRequested) -> None:
        if not tunnel.has_flow(event.flow_id):
            return  # OPEN and RST arrived in the same read: already cancelled
        request = event.open
        if self.draining:
            self._refuse(tunnel, event.flow_id, "draining", f"connector {self.name} is shutting down")
            return
        if request.protocol not in ("tcp", "udp", "dns"):
            self._refuse(tunnel, event.flow_id, "unsupported_protocol",
                         f"{request.protocol!r} flows are not supported by connector {self.name}")
            return
        try:
            if tunnel.state is None:
                raise GrantError("grant_unverifiable", "the edge's certificate key is unknown on this tunnel")
            self.grants.verify(request.grant, tunnel.state, tunnel.peer_name, host=request.host, port=request.port,
                               protocol=request.protocol, now=time.time())
        except GrantError as exc:
            self.stats.count(self.stats.protocol_errors, exc.code)
            log.warning("OPEN refused: no valid grant", extra={"edge": tunnel.peer_name, "dest":
                                                                f"{request.host}:{request.port}", "code": exc.code,
                                                                "reason": str(exc)})
            self._refuse(tunnel, event.flow_id, exc.code, f"connector {self.name}: {exc}")
            return
        if request.protocol in ("udp", "dns"):
            if len(self.udp_flows) >= self.settings.max_udp_flows:
                self._refuse(tunnel, event.flow_id, "too_many_udp_flows",
                             f"connector {self.name} carries its maximum of {self.settings.max_udp_flows} UDP flows")
                return
            target = (request.host, request.port)
            if request.protocol == "dns":  # a private name, resolved by this connector's DNS server
                try:
                    target = dns_server(self.settings.dns_server)
                except ValueError as exc:
                    self._refuse(tunnel, event.flow_id, "dns_error", f"connector {self.name}: {exc}")
                    return
            udp = UdpFlow(self, _unset_send, self._udp_closed, idle=self.settings.udp_idle_timeout,
                          queue=self.settings.udp_queue, peer=f"{target[0]}:{target[1]}")
            udp.bind(tunnel, event.flow_id)
            self.udp_flows.add(udp)
            asyncio.get_running_loop().create_task(self._dial(tunnel, udp, request, target))
            return
        flow = SocketFlow(self)
        flow.bind(tunnel, event.flow_id)
        asyncio.get_running_loop().create_task(self._dial(tunnel, flow, request))

    def _refuse(self, tunnel: ConnectorTunnel, flow_id: int, code: str, reason: str) -> None:
        tunnel.reject(flow_id, code, reason)
        self.stats.count(self.stats.open_failures, code)
        log.info("open refused", extra={"flow": flow_id, "code": code, "reason": reason})

    async def _dial(self, tunnel: ConnectorTunnel, flow: SocketFlow | UdpFlow, request: Open,
                    address: tuple[str, int] | None = None) -> None:
        """Open the backend side of a flow, then answer OPEN_OK (or OPEN_FAIL with the reason).

        TCP: a connection to the backend. UDP: a connected UDP socket to ``address`` (the
        backend, or for a private DNS query this connector's DNS server), so the peer sees this
        host's address and only its answers come back."""
        loop = asyncio.get_running_loop()
        host, port = address or (request.host, request.port)
        target = f"{host}:{port}"
        udp = isinstance(flow, UdpFlow)
        try:
            async with asyncio.timeout(self.settings.dial_timeout):
                if udp:
                    transport, _ = await loop.create_datagram_endpoint(lambda: _BackendSocket(flow),
                                                                       remote_addr=(host, port))
                else:
                    transport, _ = await loop.create_connection(lambda: flow, host, port)
        except TimeoutError:
            code, reason = "dial_timeout", (f"cannot resolve {host} within {self.settings.dial_timeout:g}s" if udp
                                            else f"{target} did not answer within {self.settings.dial_timeout:g}s")
        except ConnectionRefusedError:
            code, reason = "dial_refused", f"connection refused by {target}"
        except socket.gaierror as exc:
            code, reason = "dns_error", f"cannot resolve {host}: {exc.strerror}"
        except OSError as exc:
            code, reason = "dial_error", f"{target}: {exc.strerror or exc}"
        else:
            if flow.done or tunnel.closed:
                if udp:
                    transport.close()
                else:
                    transport.abort()
                return
            if udp:
                self.udp_sockets[flow] = transport  # type: ignore[index]
                set_udp_buffers(transport, self.settings.udp_buffer)
                flow.send = (transport.sendto if request.protocol == "udp"  # type: ignore[union-attr]
                             else _queries_for(request.host, transport.sendto, self.stats))
            local = transport.get_extra_info("sockname")
            remote = transport.get_extra_info("peername")
            tunnel.accept(flow.flow_id, bound=f"{local[0]}:{local[1]}",
                          remote=f"{remote[0]}:{remote[1]}" if remote else "")
            flow.activate()
            return
        tunnel.routes.pop(flow.flow_id, None)
        if udp:
            self.udp_flows.discard(flow)  # type: ignore[arg-type]
        if flow.done or tunnel.closed:
            return
        flow.done = True
        self._refuse(tunnel, flow.flow_id, code, reason)

    def _udp_closed(self, flow: UdpFlow) -> None:
        self.udp_flows.discard(flow)
        sock = self.udp_sockets.pop(flow, None)  # the backend socket, once dialed
        if sock is not None:
            sock.close()

    def tunnel_writable(self, tunnel: ConnectorTunnel, writable: bool) -> None:
        """Credit bounds what each flow may queue; nothing to do on tunnel back-pressure."""

    def flow_accepted(self, tunnel: ConnectorTunnel, event: ev.FlowAccepted) -> None:
        """Connectors never open flows, so there is never an OPEN_OK to handle."""

    def flow_rejected(self, tunnel: ConnectorTunnel, event: ev.FlowRejected) -> None:
        """Connectors never open flows, so there is never an OPEN_FAIL to handle."""


def _queries_for(name: str, send: Callable[[bytes | memoryview], None], stats: Stats
                 ) -> Callable[[bytes | memoryview], None]:
    """``send`` for a private DNS flow: only queries for the granted ``name`` reach the DNS server
    (a client cannot use a grant for one name to ask for others, or to send anything else)."""
    wanted = name.lower().rstrip(".")

    def send_query(data: bytes | memoryview) -> None:
        try:
            query = DNSRecord.parse(bytes(data))
        except Exception:  # dnslib raises DNSError, but also UnicodeDecodeError and others on crafted input
            stats.count(stats.datagrams_dropped, "dns_malformed")
            return
        header = query.header
        if header.qr or header.opcode != OPCODE.QUERY or header.a or header.auth:
            stats.count(stats.datagrams_dropped, "dns_not_a_query")  # e.g. UPDATE or NOTIFY: never passed on
            return
        if len(query.questions) != 1 or str(query.q.qname).lower().rstrip(".") != wanted:
            stats.count(stats.datagrams_dropped, "dns_name_mismatch")
            return
        send(data)

    return send_query


def _unset_send(data: bytes | memoryview) -> None:
    """A UDP flow's sink before its backend socket exists (OPEN_OK is only sent after it does)."""
    raise OSError("the backend socket is not open yet")


class _BackendSocket(asyncio.DatagramProtocol):
    """The connected UDP socket of one flow: answers from the backend go into the tunnel."""

    __slots__ = ("flow",)

    def __init__(self, flow: UdpFlow) -> None:
        self.flow = flow

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.flow.from_local(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port/host unreachable for a datagram we sent: UDP has no connection to fail,
        # so the flow stays (the backend may come up), but the loss is counted.
        stats = self.flow.node.stats
        stats.count(stats.datagrams_dropped, "backend_unreachable")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.flow.done:
            self.flow.close("reset", f"backend socket closed: {exc}" if exc else "backend socket closed")
