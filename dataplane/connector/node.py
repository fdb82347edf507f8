"""Connector: keeps outbound tunnels to edges and dials private backends for each OPEN.

The connector never listens for tunnels. It holds ``FERRYMAN_CONNECTOR_TUNNELS`` TLS
tunnels (at least one per chosen edge) spread over at most ``FERRYMAN_CONNECTOR_EDGES`` of the
edges it knows (``placement``: chosen by rendezvous hashing; a tunnel moves when its edge is no
longer chosen, draining first), each kept up by its own reconnect loop (exponential backoff
with jitter; the other edges are its fallbacks while its own is down). Every OPEN from an edge becomes a TCP connection
from this host to the backend (so the backend sees the connector's address), answered
with OPEN_OK or OPEN_FAIL carrying a specific reason (any error while dialing, foreseen or
not, is answered with OPEN_FAIL: an OPEN never stays pending here). An OPEN the edge resets
before the answer cancels its dial (resolution or connection, its socket closed), and each
tunnel runs at most ``FERRYMAN_MAX_PENDING_OPENS`` dials at once. Before dialing it resolves the
destination once and checks every address (``dial``: loopback, link-local, metadata and this
host's own addresses only when a segment names them, the group's allow and deny lists), and
connects only to addresses that passed. On SIGTERM it sends GOAWAY on
every tunnel, lets running flows finish for ``FERRYMAN_DRAIN_GRACE`` seconds, resets
what is left and exits.

A connector registered with the control plane also runs a ``ControlLink``: it reports
heartbeats, renews its certificate (new tunnels use the new one), takes the edges to dial
from each configuration snapshot (unless ``FERRYMAN_EDGES``/``--edges`` were given), and
ends tunnels to an edge whose certificate the snapshot revokes, and takes its group's dial lists
and the applications' segments from it (``FERRYMAN_APPS_FILE``, when set, gives the applications).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from dnslib import OPCODE, DNSRecord

from ..access.apptable import AppTable, app_table
from ..access.destinations import DialPolicy, Refusal
from ..access.grants import KEY_SIZE as GRANT_KEY_SIZE
from ..access.grants import GrantClaims, GrantError, GrantVerifier
from ..basics.hostport import dns_server, parse_hostport
from ..basics.caps import HttpLimits, LogLimiter
from ..basics.metrics import Stats, start_metrics_server
from ..basics.pki import PeerCertificate
from ..basics.settings import ConnectorSettings
from ..contract.apps import App, Applications, AppsError
from ..contract.snapshot import ConfigSnapshot, SnapshotError, revoked_set
from ..controllink.registration import Registration
from ..controllink.link import ControlLink, Report, cut_revoked
from ..transport.credentials import NodeCredentials
from ..transport.endpoint import EndpointNode
from ..transport.socketflow import BufferBudget, LocalFlow, SocketFlow
from ..transport.supervisor import keep_tunnel
from ..transport.tunnel import TunnelBase, close_when_idle
from ..transport.udpflow import UdpFlow
from ..transport.udpio import UdpEndpoint
from ..wire import events as ev
from ..wire.connection import WireConfig
from ..wire.frames import Open
from .dial import DialError, Resolver, Target, checked, connect_tcp, connect_udp
from . import placement
from .relayed import DecidingEdges

log = logging.getLogger("ferryman.connector")

DNS_FLOW_IDLE = 10.0  # seconds a private DNS flow (one query, its answer) may stay idle at most
# Seconds a grant for an application this connector does not know yet waits for the next
# configuration (a new application reaches the edges and the connectors within about two seconds).
CONFIG_CATCH_UP = 3.0
# Seconds between the moves of two tunnel slots to a renewed certificate.
RENEWAL_STAGGER = 5.0


# The edge's certificate key: what a signed grant (from an edge that does not use this tunnel's
# grant key) must verify with.
EdgeKey = ec.EllipticCurvePublicKey | None
ConnectorTunnel = TunnelBase[LocalFlow, EdgeKey]


class Connector(EndpointNode[EdgeKey]):
    """``registered``: the registration stored by ``ferryman connector register`` (None: no control
    plane); ``follow_edges``: take the edge list from the control plane's snapshots."""

    def __init__(self, settings: ConnectorSettings, credentials: NodeCredentials,
                 registered: Registration | None = None,
                 *, follow_edges: bool = False) -> None:
        self.settings = settings
        self.udp_backlog = settings.udp_backlog
        self.credentials = credentials
        self.name = credentials.name
        self.stats = Stats("connector", credentials.name, LogLimiter(settings.log_limit, settings.log_limit_interval))
        self.buffer_budget = BufferBudget(settings.flow_buffer_budget, self.stats)
        self.edges = [parse_hostport(e.strip(), "FERRYMAN_EDGES") for e in settings.edges.split(",") if e.strip()]
        if not self.edges:
            raise ValueError("FERRYMAN_EDGES is empty: give at least one edge HOST:PORT")
        self.tunnels: set[ConnectorTunnel] = set()
        # Tunnel slots (``placement``): the edges chosen, each slot's dial order, its task, whether it
        # stopped (fewer slots now), the event that makes its session check where its tunnel is.
        self.chosen: list[tuple[str, int]] = []
        self.slot_edges: list[list[tuple[str, int]]] = []
        self._slots: list[asyncio.Task[None]] = []
        self._stopped: list[bool] = []
        self._moved: list[asyncio.Event] = []
        self._moving: set[asyncio.Task[None]] = set()  # tunnels draining after a move
        # Bumped at each certificate renewal: a tunnel dialed under an older one moves to the new
        # certificate (drains while its slot dials again) before the control plane revokes the old.
        self._certificate = 0
        self._dialed_with: dict[int, int] = {}  # slot -> the generation its latest dial presented
        self._slot_of: dict[ConnectorTunnel, int] = {}  # each slot's running tunnel -> the slot
        # (slot, edge, certificate serial) a slot moved away from when its edge renewed (``_move_for_edge``)
        self._moved_for: set[tuple[int, str, int]] = set()
        self._refused_moves: set[tuple[int, str, int]] = set()
        self.udp_flows: set[UdpFlow] = set()
        # Whose each UDP / private DNS flow is (the grant's device, else user) and how many each has:
        # one device may hold a quarter of FERRYMAN_MAX_UDP_FLOWS.
        self.udp_owner: dict[UdpFlow, str] = {}
        self.udp_per_owner: dict[str, int] = {}
        self.udp_sockets: dict[UdpFlow, UdpEndpoint] = {}  # each UDP flow's backend socket
        # Each tunnel's dials in flight. A dial leaves only once it has ended (its socket closed): the
        # edge's RST frees an OPEN's pending slot at once, so that count alone would not bound them.
        self.dialing: dict[ConnectorTunnel, set[asyncio.Task[None]]] = {}
        self.resolver = Resolver(settings.resolve_threads)  # flow destinations' names (``dial``)
        self.draining = False
        self._ssl = credentials.client_context()
        # Every tunnel sends the edge a fresh grant key in HELLO: the edge MACs each flow's grant with it.
        self._wire = credentials.wire_config(group=settings.connector_group, grant_key_size=GRANT_KEY_SIZE)
        self.revoked: frozenset[int] = frozenset()
        self.grants = GrantVerifier(credentials.name, limit=settings.grant_cache)
        self.deciding = DecidingEdges(settings.tls_ca)  # who signed the grants of relayed flows
        # What may be dialed: the group's lists and the applications' explicit segments, from the
        # control plane's snapshots and/or FERRYMAN_APPS_FILE (without either: no special address).
        self.static_apps = Applications.load(settings.apps_file).apps if settings.apps_file else None
        self.policy = DialPolicy(settings.connector_group, apps=self.static_apps or ())
        self._group_warned = ""  # the recorded group last warned about (it differs from the setting)
        # The applications this connector's group serves, each as a table of its own segments: a
        # grant's destination must lie in its application's segments (``_check_served``). None: no
        # configuration names any (no control plane, no application file): nothing to check against.
        self.served: dict[str, AppTable] | None = None
        self._reconfigured: asyncio.Future[None] | None = None  # set by the next configuration
        if self.static_apps is not None:
            self._serve(self.static_apps, settings.connector_group)
        self.follow_edges = follow_edges
        self.link: ControlLink | None = None
        if registered is not None:
            self.link = ControlLink(settings, registered, self._configure, self._report, self._renewed)
        self.stats.extra = {
            "ferryman_config_version": (
                "Configuration version in use (-1: none yet; 0 without a control plane)",
                lambda: float(0 if self.link is None else -1 if self.link.version is None else self.link.version)),
            "ferryman_flow_buffer_bytes": self.buffer_budget.gauge(),
        }

    # ------------------------------------------------------------------ lifecycle
    async def run(self, stop: asyncio.Event) -> None:
        metrics = None
        if self.link is not None:
            self.link.load_cached()
        following = asyncio.create_task(self.link.run(stop)) if self.link is not None else None
        if self.settings.metrics_addr:
            metrics = await start_metrics_server(self.settings.metrics_addr, self.stats, self.ready,
                                                 limits=HttpLimits.from_settings(self.settings))
        self._place()
        log.info("connector started", extra={"group": self.settings.connector_group,
                                             "edges": ",".join(f"{h}:{p}" for h, p in self.chosen),
                                             "tunnels": len(self._slots)})
        await stop.wait()
        await self.drain()
        for task in self._slots:
            task.cancel()
        await asyncio.gather(*self._slots, *self._moving, *([following] if following else []),
                             return_exceptions=True)
        if metrics is not None:
            metrics.close()
        self.resolver.close()

    # ------------------------------------------------------------------ control plane
    def _configure(self, snapshot: ConfigSnapshot) -> None:
        self.revoked = revoked_set(snapshot)
        cut_revoked(self.tunnels, self.revoked, f"connector {self.name}")
        # The group is the control plane's record of this connector (its own entry in the snapshot),
        # never the local setting: with another group there, the recorded group's dial lists would
        # not apply while the edges still send it that group's flows.
        group = snapshot.connectors[0].group if snapshot.connectors else self.settings.connector_group
        if group != self.settings.connector_group and group != self._group_warned:
            self._group_warned = group
            log.warning("the control plane records this connector in another group than FERRYMAN_CONNECTOR_GROUP "
                        "says: its dial lists are the recorded group's",
                        extra={"group": group, "setting": self.settings.connector_group})
        try:
            apps = self.static_apps if self.static_apps is not None else app_table(snapshot).apps
            policy = DialPolicy.from_config(group, snapshot.groups, apps)
        except ValueError as exc:  # SnapshotError included: the link keeps the previous configuration
            raise SnapshotError(f"connector group {group!r}: {exc}") from None
        if (policy.allow, policy.deny) != (self.policy.allow, self.policy.deny):
            log.info("dial lists updated", extra={"group": policy.group,
                                                  "allowed_addresses": ",".join(map(str, policy.allow)),
                                                  "denied_addresses": ",".join(map(str, policy.deny))})
        self.policy = policy
        self._serve(apps, group)
        if self.follow_edges and snapshot.edges:
            edges = []
            for edge in snapshot.edges:
                try:
                    edges.append(parse_hostport(edge, "edge address from the control plane"))
                except ValueError as exc:
                    log.error("%s; edge ignored", exc)
            if edges and edges != self.edges:
                log.info("edges updated by the control plane", extra={"edges": ",".join(snapshot.edges)})
                self.edges[:] = edges
                if self._slots:  # running: tunnels move to the edges chosen now
                    self._place()

    def _serve(self, apps: list[App], group: str) -> None:
        """Serve ``apps`` of ``group`` from now on (and wake the dials waiting for a configuration)."""
        mine = [app for app in apps if app.connector_group == group]
        self.served = {app.name: AppTable([app]) for app in mine}
        waiting, self._reconfigured = self._reconfigured, None
        if waiting is not None and not waiting.done():
            waiting.set_result(None)

    def _outside(self, request: Open, claims: GrantClaims) -> str:
        """Why the grant's destination is not one of this connector's group's applications ("" when
        it is): the edge decided the flow, but only within what the control plane says this group serves."""
        served = self.served
        if served is None or request.protocol == "dns":
            # A private DNS query goes only to this connector's DNS server, for the granted name
            # alone; a name no application covers is answered by the default group's connectors.
            return ""
        table = served.get(claims.app)
        if table is None:
            return f"application {claims.app!r} is not one this connector's group serves"
        if table.match(request.host, request.port, request.protocol) is None:
            return (f"{request.host}:{request.port}/{request.protocol} is outside the segments of application "
                    f"{claims.app!r}")
        return ""

    async def _check_served(self, request: Open, claims: GrantClaims) -> None:
        """``DialError`` ``destination_forbidden`` when the grant names what this connector's group does
        not serve (``_outside``). An application the edge knows may not have reached this connector
        yet: before refusing, the next configuration is waited for, ``CONFIG_CATCH_UP`` seconds at most."""
        why = self._outside(request, claims)
        if not why:
            return
        if self._reconfigured is None or self._reconfigured.done():
            self._reconfigured = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._reconfigured), CONFIG_CATCH_UP)
        except TimeoutError:
            pass
        why = self._outside(request, claims)
        if why:
            self.stats.count(self.stats.dial_refused, "not_served")
            self.stats.log_limit.log(log, logging.WARNING, claims.edge, "grant outside this connector's applications", {
                "edge": claims.edge, "dest": f"{request.host}:{request.port}", "app": claims.app,
                "user": claims.user, "connection": claims.connection, "reason": why})
            raise DialError("destination_forbidden", f"connector {self.name}: {why}")

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
        """New tunnels present the renewed certificate, and the running ones move to it: slot by
        slot, RENEWAL_STAGGER seconds apart (the others carry new flows meanwhile), each drains
        while its slot dials again. The control plane revokes the old certificate
        FERRYMAN_SUPERSEDED_CERT_GRACE after the renewal; a tunnel still on it then is cut."""
        self._ssl = self.credentials.client_context()
        self.deciding.reload(self.settings.tls_ca)
        self._certificate += 1
        loop = asyncio.get_running_loop()
        for i, moved in enumerate(self._moved):
            loop.call_later(i * RENEWAL_STAGGER, moved.set)

    # ------------------------------------------------------------------ which edges
    def _place(self) -> None:
        """Choose the edges (at most FERRYMAN_CONNECTOR_EDGES of ``self.edges``, ``placement``) and
        give each tunnel slot its edge; a slot whose edge changed moves: its tunnel drains (GOAWAY,
        flows finish within FERRYMAN_DRAIN_GRACE) while the slot dials its new edge."""
        s = self.settings
        chosen = placement.choose(self.name, self.edges, s.connector_edges)
        orders = placement.plan(chosen, self.edges, placement.slots(chosen, s.connector_tunnels))
        if chosen != self.chosen and self.chosen:
            log.info("edges chosen", extra={"edges": ",".join(f"{h}:{p}" for h, p in chosen),
                                            "previous": ",".join(f"{h}:{p}" for h, p in self.chosen)})
        self.chosen = chosen
        for i, order in enumerate(orders):
            if i < len(self.slot_edges):
                self.slot_edges[i][:] = order  # keep_tunnel reads the list at every dial
                if self._stopped[i]:
                    self._stopped[i] = False
                    self._start_slot(i)
            else:
                self.slot_edges.append(list(order))
                self._stopped.append(False)
                self._moved.append(asyncio.Event())
                self._start_slot(i)
            self._moved[i].set()  # the session checks whether its tunnel is on the slot's edge still
        for i in range(len(orders), len(self.slot_edges)):  # fewer slots now: these stop
            self._stopped[i] = True
            self._moved[i].set()

    def _start_slot(self, i: int) -> None:
        task = asyncio.create_task(keep_tunnel(
            self, self.settings, lambda: self._dial_wire(i), lambda: self._ssl, self.slot_edges[i],
            lambda t: self._session(i, t),
            lambda: not self.draining and not self._stopped[i], label=f"t{i}->", back_to_first=True))
        if i < len(self._slots):
            self._slots[i] = task
        else:
            self._slots.append(task)

    def _dial_wire(self, i: int) -> WireConfig:
        """What slot ``i`` dials with now (every dial, TLS/TCP and QUIC, asks), noting which
        certificate generation the dial presents."""
        self._dialed_with[i] = self._certificate
        return self._wire

    async def _session(self, i: int, tunnel: ConnectorTunnel) -> bool:
        """Slot ``i``'s tunnel, until it ends, or until the slot moves to another edge (or stops) or
        the certificate it was dialed with is renewed: then it drains in the background while the
        slot dials again at once (True: ``keep_tunnel`` skips its backoff)."""
        # The certificate the tunnel was dialed with: a renewal during its handshake moves it too.
        certificate = self._dialed_with.pop(i, self._certificate)
        self._slot_of[tunnel] = i
        try:
            return await self._serve_slot(i, tunnel, certificate)
        finally:
            self._slot_of.pop(tunnel, None)

    async def _serve_slot(self, i: int, tunnel: ConnectorTunnel, certificate: int) -> bool:
        while not tunnel.done_waiter.done():
            if self._certificate != certificate and not self.draining:
                log.info("tunnel moves to the renewed certificate", extra={"tunnel": tunnel.label,
                                                                            "edge": tunnel.peer_name})
                self._retire(tunnel, "moves this tunnel to its renewed certificate", certificate=True)
                return True
            if tunnel.goaway_waiter.done() and tunnel.goaway_waiter.result() == "renewed" and not self.draining \
                    and self._move_for_edge(i, tunnel):
                log.info("tunnel moves to the edge's renewed certificate", extra={"tunnel": tunnel.label,
                                                                                   "edge": tunnel.peer_name})
                self._retire(tunnel, "dials the edge again: it renewed its certificate", certificate=True)
                return True
            moved = self._moved[i]
            moved.clear()
            waiter = asyncio.ensure_future(moved.wait())
            try:
                await asyncio.wait([tunnel.done_waiter, waiter], return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if tunnel.done_waiter.done() or self.draining:
                break
            if self._stopped[i] or tunnel.dialed != self.slot_edges[i][0]:
                where = "no edge" if self._stopped[i] else "{}:{}".format(*self.slot_edges[i][0])
                log.info("tunnel moves", extra={"tunnel": tunnel.label, "edge": tunnel.peer_name, "to": where})
                self._retire(tunnel)
                return True
        return False

    def _move_for_edge(self, i: int, tunnel: ConnectorTunnel) -> bool:
        """Whether slot ``i`` follows the edge's GOAWAY ``renewed`` on ``tunnel``: once per edge
        certificate (serial) a slot moved away from. An edge asking again on a tunnel presenting
        a certificate the slot already left (it did not renew, or lies) would otherwise have the
        slot dial it in a loop; the tunnel stays, taking no new flows, until the edge closes it."""
        peer = tunnel.peer_certificate
        key = (i, tunnel.peer_name, peer.serial if peer is not None else 0)
        if key in self._moved_for:
            if key not in self._refused_moves:
                self._refused_moves.add(key)
                log.warning("edge asks again to move a tunnel presenting a certificate this slot already moved "
                            "away from: not followed", extra={"tunnel": tunnel.label, "edge": tunnel.peer_name})
            return False
        if len(self._moved_for) >= 1024:
            self._moved_for.clear()
            self._refused_moves.clear()
        self._moved_for.add(key)
        return True

    def _retire(self, tunnel: ConnectorTunnel, why: str = "moves this tunnel to another edge",
                certificate: bool = False) -> None:
        """GOAWAY now (the edge sends no new flows), close once the flows ended or FERRYMAN_DRAIN_GRACE
        passed — for a move to a renewed certificate (``certificate``), once they ended however
        long they run: the revocation of the old certificate, a day later, cuts what still runs."""
        tunnel.goaway("moved", f"connector {self.name} {why}")
        close_when_idle(tunnel, "moved", f"connector {self.name} {why}",
                        None if certificate else self.settings.drain_grace, keep=self._moving)

    def ready(self) -> bool:
        """A tunnel up and, when following a control plane, a configuration (the dial lists) in hand."""
        return (not self.draining and any(t.up and not t.closed for t in self.tunnels)
                and (self.link is None or self.link.version is not None))

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
        # The edge's certificate key, for grants signed with it rather than MAC'd with the tunnel's grant key.
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
        """The edge drains this tunnel: existing flows continue, the edge sends no new ones. When it
        asks the tunnel to move to its renewed certificate (``renewed``), the slot dials it again
        at once (``_session``), so the connector stays reachable there."""
        if event.code == "renewed":
            slot = self._slot_of.get(tunnel)
            if slot is not None:
                self._moved[slot].set()

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
            if request.signer:  # a signed grant with its signer: relayed for another edge, or a web flow
                # of this tunnel's edge (whose key may be newer than the tunnel, after a renewal)
                deciding, edge_key = self.deciding.key_of(request.signer, self.revoked,
                                                          datetime.datetime.now(datetime.UTC))
                mac_key = b""  # never this tunnel's grant key: the relaying edge holds it, and decided nothing
            else:
                deciding, edge_key, mac_key = tunnel.peer_name, tunnel.state, tunnel.conn.grant_key
            claims = self.grants.verify(request.grant, edge_key, deciding, host=request.host,
                                        port=request.port, protocol=request.protocol, now=time.time(), key=mac_key)
        except GrantError as exc:
            self.stats.count(self.stats.protocol_errors, exc.code)
            self.stats.log_limit.log(log, logging.WARNING, tunnel.peer_name, "OPEN refused: no valid grant", {
                "edge": tunnel.peer_name, "dest": f"{request.host}:{request.port}", "code": exc.code,
                "reason": str(exc)})
            self._refuse(tunnel, event.flow_id, exc.code, f"connector {self.name}: {exc}")
            return
        if len(self.dialing.get(tunnel, ())) >= self.settings.max_pending_opens:
            self._refuse(tunnel, event.flow_id, "too_many_dials",
                         f"connector {self.name} runs its maximum of {self.settings.max_pending_opens} dials "
                         "for this tunnel (FERRYMAN_MAX_PENDING_OPENS)")
            return
        if request.protocol in ("udp", "dns"):
            limit = self.settings.max_udp_flows
            if len(self.udp_flows) >= limit:
                self._refuse(tunnel, event.flow_id, "too_many_udp_flows",
                             f"connector {self.name} carries its maximum of {limit} UDP flows")
                return
            owner = claims.device or claims.user
            held = self.udp_per_owner.get(owner, 0)
            if held >= max(1, limit // 4):
                self._refuse(tunnel, event.flow_id, "too_many_udp_flows",
                             f"connector {self.name} carries {held} UDP and DNS flows of {owner}, the most one "
                             f"device may have (a quarter of FERRYMAN_MAX_UDP_FLOWS)")
                return
            target = (request.host, request.port)
            if request.protocol == "dns":  # a private name, resolved by this connector's DNS server
                try:
                    target = dns_server(self.settings.dns_server)
                except ValueError as exc:
                    self._refuse(tunnel, event.flow_id, "dns_error", f"connector {self.name}: {exc}")
                    return
            # A private DNS flow carries one query and its answer: it is not kept idle like a UDP conversation.
            idle = self.settings.udp_idle_timeout if request.protocol == "udp" else min(
                self.settings.udp_idle_timeout, DNS_FLOW_IDLE)
            udp = UdpFlow(self, _unset_send, self._udp_closed, idle=idle,
                          queue=self.settings.udp_queue, peer=f"{target[0]}:{target[1]}")
            udp.bind(tunnel, event.flow_id)
            self.udp_flows.add(udp)
            self.udp_owner[udp] = owner
            self.udp_per_owner[owner] = held + 1
            self._start_dial(tunnel, udp, self._dial(tunnel, udp, request, claims, target))
            return
        flow = SocketFlow(self)
        flow.bind(tunnel, event.flow_id)
        self._start_dial(tunnel, flow, self._dial(tunnel, flow, request, claims))

    def _refuse(self, tunnel: ConnectorTunnel, flow_id: int, code: str, reason: str) -> None:
        tunnel.reject(flow_id, code, reason)
        self.stats.count(self.stats.open_failures, code)
        self.stats.log_limit.log(log, logging.INFO, tunnel.peer_name, "open refused", {
            "edge": tunnel.peer_name, "flow": flow_id, "code": code, "reason": reason})

    def _start_dial(self, tunnel: ConnectorTunnel, flow: SocketFlow | UdpFlow,
                    dial: Coroutine[Any, Any, None]) -> None:
        """Run ``dial`` as ``flow``'s dial task, counted among the tunnel's dials until it has ended.
        The flow cancels it if it ends first (the edge resets the OPEN, the tunnel is lost)."""
        task = asyncio.get_running_loop().create_task(dial)
        flow.dialing = task
        dials = self.dialing.setdefault(tunnel, set())
        dials.add(task)

        def ended(_: asyncio.Task[None]) -> None:
            dials.discard(task)
            if not dials:
                del self.dialing[tunnel]

        task.add_done_callback(ended)

    async def _dial(self, tunnel: ConnectorTunnel, flow: SocketFlow | UdpFlow, request: Open, claims: GrantClaims,
                    address: tuple[str, int] | None = None) -> None:
        """Open the backend side of a flow, then answer OPEN_OK (or OPEN_FAIL with the reason).

        The destination is resolved once and every address checked (``_targets``). TCP: a
        connection to the first checked address that accepts one. UDP: a connected UDP socket
        to the first checked address (the backend, or for a private DNS query this connector's
        DNS server, which is this host's own configuration and not checked), so the peer sees
        this host's address and only its answers come back."""
        host, port = address or (request.host, request.port)
        udp = isinstance(flow, UdpFlow)
        try:
            await self._check_served(request, claims)
            targets = await self._targets(request, claims, host, port)
            if udp:
                stats = self.stats
                transport: asyncio.BaseTransport | UdpEndpoint = connect_udp(
                    targets[0], _BackendSocket(flow), buffer=self.settings.udp_buffer,
                    on_send_drop=lambda n: stats.count(stats.datagrams_dropped, "local_busy", n))
            else:
                transport = await connect_tcp(targets, lambda: flow, timeout=self.settings.dial_timeout,
                                              shown=f"{host}:{port}")
        except DialError as exc:
            code, reason = exc.code, exc.reason
        except Exception as exc:  # nobody foresaw it: the OPEN is answered all the same
            self.stats.count(self.stats.handler_errors, "dial")
            log.error("unexpected error dialing a flow's destination", exc_info=exc,
                      extra={"edge": tunnel.peer_name, "dest": f"{host}:{port}", "flow": flow.flow_id,
                             "reason": f"{type(exc).__name__}: {exc}"})
            code, reason = "dial_error", f"cannot dial {host}:{port}: unexpected {type(exc).__name__}"
        else:
            flow.dialing = None  # dialed: from now on the flow's end closes the socket, nothing to cancel
            if flow.done or tunnel.closed:
                if udp:
                    transport.close()
                else:
                    transport.abort()  # type: ignore[union-attr]
                return
            if udp:
                assert isinstance(transport, UdpEndpoint)
                self.udp_sockets[flow] = transport  # type: ignore[index]
                if request.protocol == "udp":
                    flow.send = transport.sendto
                    flow.send_batch = transport.send_all
                else:  # each DNS query is checked on its own
                    flow.send = _queries_for(request.host, transport.sendto, self.stats)
            local = transport.get_extra_info("sockname")
            remote = transport.get_extra_info("peername")
            tunnel.accept(flow.flow_id, bound=f"{local[0]}:{local[1]}",
                          remote=f"{remote[0]}:{remote[1]}" if remote else "")
            flow.activate()
            return
        tunnel.routes.pop(flow.flow_id, None)
        if udp:
            self._udp_forget(flow)  # type: ignore[arg-type]
        if flow.done or tunnel.closed:
            return
        flow.done = True
        self._refuse(tunnel, flow.flow_id, code, f"connector {self.name}: {reason}"
                     if code == "destination_forbidden" else reason)

    async def _targets(self, request: Open, claims: GrantClaims, host: str, port: int) -> list[Target]:
        """The addresses this flow may connect to: ``host`` resolved once (bounded in time and count),
        each address checked by the dial policy for the grant's application; ``DialError`` when none is left."""
        s = self.settings
        app = claims.app
        targets, dropped = await self.resolver.resolve(host, port, "udp" if request.protocol != "tcp" else "tcp",
                                                       timeout=s.resolve_timeout, limit=s.dial_addresses,
                                                       key=claims.device or claims.user)
        if dropped:
            self.stats.count(self.stats.dial_refused, "too_many_addresses", dropped)
            log.info("resolved addresses ignored", extra={"dest": f"{host}:{port}", "used": len(targets),
                                                          "ignored": dropped, "limit": s.dial_addresses})
        if request.protocol == "dns":
            return targets  # this connector's own DNS server (FERRYMAN_DNS_SERVER / resolv.conf)
        refusals: list[Refusal] = []

        def refused(target: Target, refusal: Refusal) -> None:
            refusals.append(refusal)
            self.stats.count(self.stats.dial_refused, refusal.rule)
            # Who, from the grant: the OPEN's own user, device and connection fields are unsigned (a relaying
            # edge could change them). Lines per device: one client's flood hides no other's.
            who = claims.device or claims.user
            self.stats.log_limit.log(log, logging.WARNING, who, "destination address refused", {
                "dest": f"{host}:{port}", "address": target[1][0], "app": app, "rule": refusal.rule,
                "reason": refusal.reason, "user": claims.user, "connection": claims.connection})

        allowed = checked(targets, self.policy, app=app, port=port, protocol=request.protocol, refused=refused)
        if allowed:
            return allowed
        reason = refusals[0].reason
        if len(targets) > 1:
            reason = f"every address of {host} is refused ({len(targets)}); the first: {reason}"
        elif host != targets[0][1][0]:
            reason = f"{host} resolves to {targets[0][1][0]}: {reason}"
        raise DialError("destination_forbidden", reason)

    def _udp_forget(self, flow: UdpFlow) -> None:
        self.udp_flows.discard(flow)
        owner = self.udp_owner.pop(flow, None)
        if owner is not None:
            left = self.udp_per_owner[owner] - 1
            if left:
                self.udp_per_owner[owner] = left
            else:
                del self.udp_per_owner[owner]

    def _udp_closed(self, flow: UdpFlow) -> None:
        self._udp_forget(flow)
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
    (a client cannot use a grant for one name to ask for others, or to send anything else).

    Names are compared label by label, ASCII case-insensitively as DNS does: a label holding a
    "." (``["rdp.corp", "example"]``) reads as the granted name but is another name to the DNS
    server, and never equals one of the granted name's labels."""
    wanted = tuple(label.lower() for label in name.rstrip(".").encode().split(b"."))

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
        if len(query.questions) != 1 or tuple(label.lower() for label in query.q.qname.label) != wanted:
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
