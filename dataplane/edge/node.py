"""Edge: accepts client and connector tunnels and switches each flow between them.

For every OPEN from a client the edge asks ``access.admission.admit`` whether it may go
through (the application whose segment covers the destination, the user's sign-in and
conditional access) and refuses it with the verdict's reason, or picks the least-loaded
healthy connector tunnel of that application's connector group (never a draining one),
makes a grant for exactly this flow (MAC'd under the key that connector tunnel's HELLO carries) and opens it there. Every OPEN is answered: a connector
that does not answer within ``FERRYMAN_OPEN_TIMEOUT`` gets an RST and the client OPEN_FAIL
``open_timeout``, and one user (or device) may have at most ``FERRYMAN_PENDING_OPENS_SHARE``
of ``FERRYMAN_MAX_PENDING_OPENS`` OPENs waiting on one connector tunnel, so a client that opens
flows to destinations that never answer cannot take every other user's slots. From then on it splices the two
flows: DATA payloads are passed from one tunnel to the other as the same slices, credit is
returned to the sender only for bytes the other side accepted (so the edge holds at most
one window per flow and direction), and FIN/RST travel through. A lost tunnel resets every
flow that used it, with a reason naming it.

Applications come from an application file (``FERRYMAN_APPS_FILE``, fixed for the life of
the process, for an edge with no control plane) or, for an edge registered with the control
plane, from the configuration snapshots its ``ControlLink`` receives (an edge is never given
both: its applications, assignments and policies would then disagree): each new version
replaces the access tables for the next OPENs (flows already running keep their
application), decides every live flow again (continuous access: the same ``admit``, with
the principal of the client's current access token) and replaces the set of revoked
certificate serials. A client's new token (AUTH) has its live flows decided again at once:
a refused token leaves them without a principal, so they are cut.

A connector tunnel serves the connector group the configuration records for its
certificate (``access.connectors``), never the one its HELLO names: a HELLO naming another
group ends the tunnel (GOAWAY ``group_mismatch``), and a connector the configuration does
not know serves no group until a configuration names it. Clients are told nothing of the
connector's own address (OPEN_OK carries no ``bound``), and the ``process`` a client reports
is kept as reported but bounded to ``MAX_PROCESS`` printable characters.

A peer presenting a revoked certificate is refused at the handshake, and tunnels
already up with one are ended (GOAWAY ``certificate_revoked``, their flows reset) as soon
as the snapshot revoking it arrives. Every flow and every refused OPEN becomes a traffic-log
record (``records.py``).

SIGTERM drains the edge (``_drain``): ``/ready`` turns 503, the TCP port closes, HELLOs that
still arrive (QUIC) are refused with ``draining``, client and relay tunnels get GOAWAY
``draining`` (a client agent dials another edge for its next flows), heartbeats offer no
connectors, and the edge waits for its running flows and web requests to end, at most
FERRYMAN_DRAIN_GRACE seconds, before it shuts down.

Caps (``basics.caps``): at most FERRYMAN_MAX_HANDSHAKES connections in their TLS handshake
and HELLO at once, FERRYMAN_MAX_HANDSHAKES_PER_SOURCE of them from one source address (one
more is closed at once); at most FERRYMAN_MAX_TUNNELS_PER_CLIENT / _PER_CONNECTOR tunnels
per certificate identity (one more is refused at its HELLO, GOAWAY ``too_many_tunnels``).
Lines about refused handshakes, tunnels and OPENs are rate-limited per source or peer
(``stats.log_limit``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import time
import zlib
from collections.abc import Iterable

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..access.admission import AccessRequest, AccessTables, Unauthenticated, Verdict, admit
from ..access.apptable import AppTable, app_table
from ..access.connectors import ConnectorGroups
from ..access.grants import KEY_SIZE as GRANT_KEY_SIZE
from ..access.grants import mac as mac_grant
from ..access.grants import sign as sign_grant
from ..access.policy import AccessIndex, Principal
from ..access.tokens import TokenError, TokenVerifier
from ..basics.hostport import parse_hostport
from ..basics.caps import Counts, HttpLimits, LogLimiter, source_key
from ..basics.metrics import Stats, exposition, start_metrics_server
from ..basics.pki import PeerCertificate, read_node_certificate
from ..basics.settings import EdgeSettings
from ..contract.apps import DEFAULT_GROUP
from ..contract.flowrecord import new_connection_id
from ..contract.presence import Presence, PresenceEdge
from ..contract.snapshot import ConfigSnapshot, revoked_set
from ..controllink.link import ControlLink, Report, cut_revoked
from ..controllink.registration import Registration
from ..controllink.traffic import TrafficQueue
from ..transport.credentials import NodeCredentials
from ..transport.quic import HandshakeLimits, QuicServer, QuicTunnel, load_credentials, serve_quic
from ..transport.tunnel import Tunnel, TunnelHandler, close_when_idle, ssl_handshake_error
from ..wire import events as ev
from ..wire.connection import FlowError, WireConfig
from ..wire.frames import Open
from .records import Records, segment_text
from .relay import Relay, RelayError, RelayPeer, is_sibling, local_presence
from .splice import ClientAccess, EdgeTunnel, Splice, kept
from .web import WebAppError
from .webdoor import EdgeWeb
from .webflow import WebFlow
from .workers import State, WorkerLink

log = logging.getLogger("ferryman.edge")

APPS_FILE_ON_REGISTERED_EDGE = (
    "FERRYMAN_APPS_FILE (--apps) cannot be used by an edge registered with the control plane: its "
    "applications, assignments and conditional-access policies all come from the control plane, and an "
    "application file would bypass them. Load the file there (`ferryman admin apply FILE`) and unset "
    "FERRYMAN_APPS_FILE, or run the edge without a control plane (FERRYMAN_TLS_CA, FERRYMAN_TLS_CERT and "
    "FERRYMAN_TLS_KEY from `ferryman pki init`)")
MAX_RELAY_TRIES = 3  # peer edges tried in turn for one relayed flow when their relay tunnels must be dialed


def renewal_schedule(tunnels: Iterable[EdgeTunnel], spread: float, rng: random.Random | None = None, *,
                     worker: int = 0, workers: int = 1) -> list[tuple[float, EdgeTunnel]]:
    """When (seconds from now) a renewed edge asks each of its dialers' tunnels to move: the
    ``n`` tunnels of one peer (by certificate name) ``spread / n`` apart from a random start, so
    the peers' handshakes come spread over ``spread`` seconds and a connector's tunnels never
    move together (it always keeps the others). Each worker of an edge of several schedules the
    tunnels it holds: there a peer's start is the same in every worker (from its name), shifted
    by the worker's share of the step, so a connector with one tunnel on each worker has them
    asked ``1 / workers`` of the spread apart (more than one tunnel on one worker may meet one
    on another)."""
    pick = rng or random
    by_peer: dict[str, list[EdgeTunnel]] = {}
    for tunnel in tunnels:
        by_peer.setdefault(tunnel.peer_name, []).append(tunnel)
    schedule: list[tuple[float, EdgeTunnel]] = []
    for peer, own in by_peer.items():
        step = spread / len(own)
        if workers > 1:
            start = (zlib.crc32(peer.encode()) / 2**32 + worker / workers) % 1.0 * step
        else:
            start = pick.uniform(0, step)
        schedule.extend((start + i * step, tunnel) for i, tunnel in enumerate(own))
    return sorted(schedule, key=lambda item: item[0])


MAX_PROCESS = 128  # characters of the client-reported initiating process kept (traffic log, connector)


def client_reported(text: str) -> str:
    """A client's free-text claim (the initiating process) made safe to log: printable characters
    only (others become ``?``), at most ``MAX_PROCESS`` of them."""
    if len(text) <= MAX_PROCESS and text.isprintable():
        return text
    return "".join(c if c.isprintable() else "?" for c in text[:MAX_PROCESS])


class Edge(TunnelHandler[Splice, ClientAccess]):
    """``apps``: a fixed application table, or None to take applications from the control plane;
    ``registered``: the registration stored by ``ferryman edge register`` (heartbeats, renewal,
    revocations and, without ``apps``, applications follow the control plane)."""

    def __init__(self, settings: EdgeSettings, credentials: NodeCredentials, apps: AppTable | None,
                 registered: Registration | None = None, worker: WorkerLink | None = None) -> None:
        if apps is None and registered is None:
            raise ValueError("an edge needs an application file or a control plane registration")
        if apps is not None and registered is not None:
            raise ValueError(APPS_FILE_ON_REGISTERED_EDGE)
        self.settings = settings
        self.worker = worker  # one of several workers of this edge (``workers``), or None
        self._udp_backlog = settings.udp_backlog  # a datagram is dropped rather than queued behind more
        self.credentials = credentials
        self.name = credentials.name
        self.static_apps = apps is not None
        # What OPENs are admitted by; replaced as a whole by each configuration from the control plane.
        self.tables = AccessTables(
            apps if apps is not None else AppTable([]),
            unconfigured="" if apps is not None else (f"edge {self.name} has not received its configuration from "
                                                      f"the control plane yet (and has no cached copy)"))
        self.revoked: frozenset[int] = frozenset()
        self.tokens: TokenVerifier | None = None
        self._grant_key = _load_key(settings.tls_key)
        self._cert_der = _load_certificate_der(settings.tls_cert)  # sent with relayed grants
        self.stats = Stats("edge", credentials.name, LogLimiter(settings.log_limit, settings.log_limit_interval))
        self.link: ControlLink | None = None
        self.traffic: TrafficQueue | None = None
        if registered is not None:
            self.traffic = TrafficQueue(settings.traffic_queue)
            self.link = ControlLink(settings, registered, self._configure, self._report, self._renewed,
                                    traffic=self.traffic, on_presence=self._presence,
                                    renews=worker is None or worker.index == 0)
        self.records = Records(self.name, self.traffic)
        # The HTTPS front door for published web apps (FERRYMAN_EDGE_HTTPS_LISTEN), or None.
        self.web: EdgeWeb | None = EdgeWeb(self) if settings.edge_https_listen else None
        self._server_ctx = credentials.server_context()
        self.groups: dict[str, list[EdgeTunnel]] = {}  # connector group -> the tunnels that serve it
        self.connectors: dict[EdgeTunnel, str | None] = {}  # every connector tunnel -> the group it is filed under
        self._stalled: set[EdgeTunnel] = set()  # not writable, with bytes passed to them not yet credited back
        # Who serves which group: the control plane's record (from each snapshot) or the application file's.
        if apps is None:
            self.connector_groups = ConnectorGroups(by_serial={}, source="a configuration from the control plane "
                                                                        "(none received yet)")
        elif apps.connectors is None:
            self.connector_groups = ConnectorGroups.hello_decides()
        else:
            self.connector_groups = ConnectorGroups.from_names(apps.connectors, f"the application file "
                                                                               f"{settings.apps_file or '(given)'}")
        self.clients: set[EdgeTunnel] = set()
        self.relays_in: set[EdgeTunnel] = set()  # relay tunnels peer edges dialed to this one
        # OPENs awaiting the connector's answer, per (connector tunnel, user or device): at most ``_share`` each.
        self.waiting: dict[tuple[EdgeTunnel, str], int] = {}
        self._share = max(1, int(settings.pending_opens_share * settings.max_pending_opens))
        self.listener: socket.socket | None = None
        self.quic: QuicServer | None = None  # the QUIC listener, with FERRYMAN_EDGE_QUIC=on
        self._accepting = False
        self.draining = False  # SIGTERM: no new tunnels or flows, running flows finish (``_drain``)
        self._bound: tuple[str, int] | None = None  # the tunnel port's address (heartbeats report it)
        self._handshakes: set[asyncio.Task[None]] = set()
        # Caps per source and per identity: handshakes in progress (accepted, HELLO not done) per
        # source address and in all; tunnels up per certificate identity (role, name).
        self._handshaking = Counts(per_key=settings.max_handshakes_per_source, total=settings.max_handshakes)
        self._identities = Counts()
        self._wire = credentials.wire_config()
        # Flows relayed to and from peer edges (only for an edge that follows a control plane).
        self._client_ssl = credentials.client_context()
        self.relay: Relay | None = None
        self._relaying: set[asyncio.Task[None]] = set()  # relayed OPENs waiting for their relay tunnel
        self._held: list = []  # the connectors reported to the control plane last (presence)
        # After a renewal: tunnels asked to move to the new certificate and closing once idle
        # (``_move_dialers``), and the timers that will ask the others (dropped when they fire or
        # their tunnel goes).
        self._moving: set[asyncio.Task[None]] = set()
        self._move_timers: dict[EdgeTunnel, asyncio.TimerHandle] = {}
        if self.link is not None or worker is not None:
            self.relay = Relay(self.name, settings, self, lambda: self._wire, lambda: self._client_ssl)
            if worker is not None:  # its siblings know it by this edge's certificate
                self.relay.identity = read_node_certificate(settings.tls_cert)
        self.stats.extra = {
            "ferryman_edge_clients": ("Client tunnels connected", lambda: float(len(self.clients))),
            "ferryman_edge_connector_tunnels": (
                "Connector tunnels connected", lambda: float(len(self.connectors))),
            "ferryman_edge_handshakes": (
                "Tunnel handshakes in progress (TCP accepted, TLS and HELLO not done)",
                lambda: float(self._handshaking.total)),
            "ferryman_traffic_records_queued": (
                "Traffic log records waiting to be sent to the control plane",
                lambda: float(len(self.traffic) if self.traffic is not None else 0)),
            "ferryman_traffic_records_dropped_total": (
                "Traffic log records dropped because the queue was full (control plane unreachable)",
                lambda: float(self.traffic.dropped if self.traffic is not None else 0)),
            "ferryman_edge_presence_edges": (
                "Edges in the presence map from the control plane (this one included; 0: none received)",
                lambda: float(len(self.relay.presence.edges) if self.relay is not None
                              and self.relay.presence is not None else 0)),
            "ferryman_edge_relay_connectors": (
                "Connectors peer edges hold tunnels to, as the presence map says (where flows can be relayed)",
                lambda: float(sum(len(e.connectors) for e in self.relay.peers.values()) if self.relay is not None else 0)),
            "ferryman_edge_relay_tunnels": (
                "Edge to edge relay tunnels up (dialed by this edge, and accepted from peer edges)",
                lambda: float(sum(1 for t in self.relays_in if t.up)
                              + (len(self.relay.out) if self.relay is not None else 0))),
            "ferryman_config_version": (
                "Configuration version in use (-1: none yet; 0 without a control plane)",
                lambda: float(-1 if self.link is not None and self.link.version is None
                              else self.link.version if self.link is not None else 0)),
        }

    # ------------------------------------------------------------------ lifecycle
    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        host, port = parse_hostport(self.settings.edge_listen, "FERRYMAN_EDGE_LISTEN", allow_zero=True)
        s = self.settings
        if self.worker is not None:  # the supervisor's socket, shared with the other workers
            self.listener = self.worker.listener()
        else:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
            self.listener = socket.create_server((host, port), family=family, backlog=1024)
            self.listener.setblocking(False)
        if self.link is not None:
            self.link.load_cached()
        accepting = loop.create_task(self._accept(self.listener))
        # The control link runs until the drain is over: a drain still takes revocations and new
        # configurations, reports (no connectors: peers stop relaying here) and ships traffic records.
        unlinked = asyncio.Event()
        following = loop.create_task(self.link.run(unlinked)) if self.link is not None else None
        bound = self._bound = self.listener.getsockname()[:2]
        if s.edge_quic == "on":  # QUIC tunnels on the same port number, over UDP
            self.quic = await serve_quic(self, self._wire, host, bound[1], s,
                                         load_credentials(s.tls_cert, s.tls_key, s.tls_ca),
                                         limits=HandshakeLimits.of(s),
                                         sock=self.worker.quic_socket() if self.worker is not None else None)
        working = loop.create_task(self.worker.run(self, stop)) if self.worker is not None else None
        if self.web is not None:
            web_host, web_port = await self.web.start(self.worker.https_socket() if self.worker is not None else None)
            log.info("HTTPS front door listening", extra={"addr": f"{web_host}:{web_port}",
                                                          "auth_host": s.web_auth_host})
        metrics = None
        if s.metrics_addr:
            metrics = await start_metrics_server(s.metrics_addr, self.stats, self.ready,
                                                 limits=HttpLimits.from_settings(self.settings))
        source = s.apps_file if self.link is None or self.static_apps else f"control plane {self.link.base}"
        log.info("edge listening", extra={"addr": f"{bound[0]}:{bound[1]}", "apps": len(self.tables.apps.apps),
                                          "config": source, "transports": "tcp,quic" if self.quic else "tcp"})
        if self.static_apps and self.connector_groups.trusts_hello:
            log.warning("the application file lists no connectors: each connector's HELLO names the group it "
                        "serves, so any certificate of this CA may serve any group (list them under "
                        "[[connectors]] to decide it here)")
        await stop.wait()
        accepting.cancel()
        await asyncio.gather(accepting, return_exceptions=True)  # its wait on the listener is gone first
        await self._drain()
        unlinked.set()
        log.info("edge stopping")
        if working is not None:
            working.cancel()
        await asyncio.gather(accepting, *([following] if following else []), *([working] if working else []),
                             return_exceptions=True)
        self.listener.close()
        if self.quic is not None:
            self.quic.close()
        if self.web is not None:
            await self.web.close()
        for timer in self._move_timers.values():
            timer.cancel()
        self._move_timers.clear()
        for tunnel in [*self.clients, *self.connectors, *self.relays_in]:
            tunnel.goaway("shutdown", f"edge {self.name} is shutting down")
            tunnel.close("shutdown", "edge stopped")
        for task in [*self._relaying, *self._moving]:
            task.cancel()
        if self.relay is not None:
            self.relay.close()
        if metrics is not None:
            metrics.close()

    async def _drain(self) -> None:
        """SIGTERM: take no new tunnels (the TCP port is shut down, QUIC and late HELLOs are refused
        with ``draining``), no new flows (GOAWAY ``draining`` to every client and relaying peer
        edge: a client dials another edge for its next flows; heartbeats report no connectors, so
        the presence map stops sending peers' flows here) and no new web connections (HTTP/1.1
        answers say ``connection: close``), and report not ready; then wait until the running
        flows, the OPENs still waiting for a connector and the web requests have ended, at most
        FERRYMAN_DRAIN_GRACE seconds. What is still running then is cut by the shutdown.
        Connector tunnels get no GOAWAY: web requests on open connections still reach them."""
        loop = asyncio.get_running_loop()
        self.draining = True
        if self.listener is not None:
            # shutdown, not only close: an edge worker's listener is shared with its supervisor,
            # and only shutdown takes the socket out of the port (and out of the loop's epoll)
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)
            self.listener.close()
        if self.web is not None:
            self.web.stop_listening()
        for tunnel in [*self.clients, *self.relays_in]:
            tunnel.goaway("draining", f"edge {self.name} is shutting down: new flows go to another edge")
        if self.worker is not None:
            self.worker.state_changed()
        if self.link is not None:
            self.link.presence_changed()  # no connectors from now on (``_report``)
        grace = self.settings.drain_grace

        def busy() -> int:
            return (self.stats.flows_active + sum(self.waiting.values()) + len(self._relaying)
                    + (self.web.in_flight() if self.web is not None else 0))

        log.info("edge draining", extra={"flows": self.stats.flows_active, "grace_s": grace,
                                         "web_requests": self.web.in_flight() if self.web is not None else 0})
        deadline = loop.time() + grace
        while loop.time() < deadline and busy():
            await asyncio.sleep(0.05)
        if busy():
            log.warning("drain grace over: cutting the flows still running",
                        extra={"flows": self.stats.flows_active, "grace_s": grace})

    def wire(self) -> WireConfig:
        return self._wire

    def metrics_text(self) -> str:
        """This edge's metrics in the Prometheus text format (a worker's, for its supervisor)."""
        return exposition(self.stats)

    def worker_state(self) -> State:
        """What a worker tells its supervisor (and, through it, its siblings)."""
        return State(connectors=local_presence(self.connectors) if not self.draining else [], clients=len(self.clients),
                     connector_tunnels=len(self.connectors), tunnels=len(self.clients) + len(self.connectors),
                     flows=self.stats.flows_active, ready=self.ready())

    def reload_credentials(self) -> None:
        """Another worker of this edge renewed the certificate: sign and accept with the new files."""
        if self.link is not None:
            self.link.signer.reload()
        self._renewed()

    def ready(self) -> bool:
        """Accepting tunnels, with a configuration (an application file, or a snapshot)."""
        return self._accepting and not self.draining and (self.static_apps or self.link is None or self.link.version is not None)

    # ------------------------------------------------------------------ control plane
    def _configure(self, snapshot: ConfigSnapshot) -> None:
        """A newer configuration: revocations for every tunnel first (they apply even if the rest
        of the snapshot cannot be used), then the access tables for the next OPENs, and the live
        flows decided again."""
        self.revoked = revoked_set(snapshot)
        cut_revoked([*self.clients, *self.connectors, *self.relays_in,
                     *(self.relay.out.values() if self.relay is not None else ())], self.revoked, f"edge {self.name}")
        if not self.static_apps:
            apps = app_table(snapshot)  # SnapshotError: the link keeps the previous configuration
            access = AccessIndex(snapshot)
            self.records.configure(snapshot)
            if self.tokens is None or (self.tokens.keys, self.tokens.issuer) != (snapshot.token_keys,
                                                                                 snapshot.token_issuer):
                try:
                    self.tokens = TokenVerifier(snapshot.token_keys, snapshot.token_issuer)
                except TokenError as exc:
                    log.error("%s; sign-ins cannot be verified", exc)
                    self.tokens = TokenVerifier([], snapshot.token_issuer)
                for client in self.clients:  # new keys: the tokens clients hold are checked again
                    if client.state is not None:
                        self._authenticate(client, client.state, client.state.token)
            self.tables = AccessTables(apps, dns_suffixes=snapshot.dns_suffixes, access=access)
            self.connector_groups = ConnectorGroups.from_snapshot(snapshot)
            if self.connector_groups.trusts_hello:
                log.warning("configuration version %d records no connector groups (made by an older control "
                            "plane): each connector's HELLO names its group until a configuration that records "
                            "them arrives (any change made through the control plane)", snapshot.version)
            self._file_connectors()
            if self.web is not None:
                try:
                    self.web.configure(snapshot)
                except (WebAppError, ValueError) as exc:  # the front door keeps the web apps it has
                    log.error("web apps of configuration version %d cannot be published: %s", snapshot.version, exc)
        if self.tables.enforcing:
            self._recheck_flows(self.clients)

    def _recheck_flows(self, clients: Iterable[EdgeTunnel]) -> None:
        """Continuous access: admit every live flow of ``clients`` again, for whom each client's
        tunnel speaks now (the principal of its latest token: refreshed, or refused, then none);
        reset those now denied. (A token of another user never passes for this tunnel's device:
        a device is registered to one user.)"""
        tables = self.tables
        now = time.time()
        for client in list(clients):
            access = client.state
            if access is None:
                continue
            current = access.principal
            for splice in list(client.routes.values()):
                if splice.closed_sides == -1 or splice.principal is None:
                    continue
                request = splice.request
                verdict = admit(AccessRequest(host=request.host, port=request.port, protocol=request.protocol,
                                              source=client.peer_addr, application=splice.app),
                                current, tables, now)
                splice.verdict = verdict
                if verdict.allowed:
                    continue
                reason = f"access revoked: {verdict.reason}"
                log.warning("flow cut by access change", extra={"client": client.peer_name, "dest": splice.dest,
                                                                "app": splice.app, "code": verdict.code,
                                                                "reason": reason})
                self._cut(splice, verdict.code, reason)

    def _cut(self, splice: Splice, code: str, reason: str) -> None:
        """Reset both halves of a spliced flow (access revoked)."""
        client, connector = splice.client, splice.connector
        if client.has_flow(splice.cfid):
            if splice.accepted:
                client.reset(splice.cfid, code, reason)
            else:
                client.reject(splice.cfid, code, reason)
        if connector.has_flow(splice.kfid):
            connector.reset(splice.kfid, code, reason)
        self._finish(splice, code, reason)

    # ------------------------------------------------------------------ who a client is
    def _authenticate(self, tunnel: EdgeTunnel, access: ClientAccess, token: str) -> None:
        """Who a client tunnel speaks for, from its token: a Principal, or why it has none."""
        access.token = token
        verifier = self.tokens
        if verifier is None:
            access.principal = Unauthenticated("this edge has no token keys from the control plane yet")
            return
        device = tunnel.peer_certificate.name if tunnel.peer_certificate is not None else ""
        if not device:  # a token without a device is a browser's (web apps only), never a client tunnel's
            access.principal = Unauthenticated("the client tunnel presented no device certificate")
            return
        try:
            access.principal = verifier.principal(token, device)
        except TokenError as exc:
            access.principal = Unauthenticated(str(exc))
            if token:
                self.stats.log_limit.log(log, logging.WARNING, tunnel.peer_name, "access token refused",
                                         {"client": tunnel.peer_name, "reason": str(exc)})

    def auth_received(self, tunnel: EdgeTunnel, event: ev.AuthReceived) -> None:
        access = tunnel.state
        hello = tunnel.hello
        if hello is None or hello.role != "client" or access is None or event.token == access.token:
            return  # (the token it already presented: nothing to check again, no flow to recheck)
        previous = access.principal
        self._authenticate(tunnel, access, event.token)
        principal = access.principal
        if isinstance(principal, Principal):
            log.info("access token renewed", extra={"client": tunnel.peer_name, "user": principal.upn,
                                                    "expires": principal.expires})
        elif isinstance(previous, Principal):
            log.warning("refreshed access token refused; its live flows are cut and new ones refused until a valid "
                        "one arrives", extra={"client": tunnel.peer_name, "reason": principal.reason})
        if self.tables.enforcing:  # the live flows follow the token the client holds now
            self._recheck_flows((tunnel,))

    def refuse_peer(self, peer: PeerCertificate) -> str | None:
        if peer.serial in self.revoked:
            self.stats.count(self.stats.tunnels_closed, "certificate_revoked")
            return f"{peer.role} {peer.name!r}: certificate {peer.serial:x} is revoked"
        return None

    def _report(self) -> Report:
        tunnels = len(self.clients) + len(self.connectors)
        flows = self.stats.flows_active
        bound = self._bound
        self._held = local_presence(self.connectors) if not self.draining else []
        held = self._held
        if self.worker is not None:  # the control plane sees one edge: every worker's connectors and figures
            held = self.worker.connectors(self._held)
            more_tunnels, more_flows = self.worker.totals()
            tunnels, flows = tunnels + more_tunnels, flows + more_flows
        return Report(tunnels=tunnels, active_flows=flows,
                      addresses=[f"{bound[0]}:{bound[1]}"] if bound else [], connectors=held)

    def _presence(self, presence: Presence) -> None:
        """A new presence map from the control plane: where flows are relayed to."""
        if self.relay is not None:
            self.relay.update(presence)

    def _connectors_changed(self) -> None:
        """A connector tunnel came, went, was filed again or drains: report it if what this edge
        holds changed (rate-limited by the link: FERRYMAN_PRESENCE_INTERVAL)."""
        if self.worker is not None:
            self.worker.state_changed()
        if self.link is not None and local_presence(self.connectors) != self._held:
            self.link.presence_changed()

    def _renewed(self) -> None:
        """New tunnels are accepted with the renewed certificate (and grants signed with its key);
        the running ones are asked to move to it (``_move_dialers``)."""
        self._server_ctx = self.credentials.server_context()
        self._grant_key = _load_key(self.settings.tls_key)
        self._cert_der = _load_certificate_der(self.settings.tls_cert)
        self._client_ssl = self.credentials.client_context()
        if self.quic is not None:
            s = self.settings
            self.quic.credentials = load_credentials(s.tls_cert, s.tls_key, s.tls_ca)
        if self.worker is not None:
            self.relay.identity = read_node_certificate(self.settings.tls_cert)  # type: ignore[union-attr]
            self.worker.renewed()
        self._move_dialers()

    def _move_dialers(self) -> None:
        """The control plane revokes the old certificate FERRYMAN_SUPERSEDED_CERT_GRACE after the
        renewal, and every dialer then cuts a tunnel still presenting it, with its flows. So the
        client agents, connectors and peer edges whose tunnels were handshaken with it are asked
        to dial again now (GOAWAY ``renewed``: they take no new flows there and open a new
        tunnel, which gets the new certificate), one after another over FERRYMAN_RENEWAL_SPREAD
        seconds so they do not all handshake at once (``renewal_schedule``: a connector's tunnels
        far apart, so it always has one); each old tunnel closes once its flows have ended (a
        long one, an ssh session, keeps it until the revocation cuts it, as before: no earlier).
        A tunnel whose handshake began before the renewal and ended after it is asked when it
        comes up (at a random moment of the spread). Sibling workers' tunnels (Unix sockets)
        present no certificate. The relay tunnels this edge dialed to peer edges present its old
        client certificate; they are not moved (a relayed flow dials a new one when a peer cuts
        one at the revocation)."""
        for timer in self._move_timers.values():
            timer.cancel()
        self._move_timers.clear()
        spread = self.settings.renewal_spread
        schedule = renewal_schedule((t for t in (*self.clients, *self.connectors, *self.relays_in)
                                     if t.up and not t.closed and not t.draining and self._on_old_certificate(t)),
                                    spread, worker=self.worker.index if self.worker is not None else 0,
                                    workers=self.worker.spec.workers if self.worker is not None else 1)
        for delay, tunnel in schedule:
            self._schedule_move(tunnel, delay)
        if schedule:
            log.info("certificate renewed: asking the tunnels dialed to this edge to move to it",
                     extra={"tunnels": len(schedule), "spread_s": spread})

    def _on_old_certificate(self, tunnel: EdgeTunnel) -> bool:
        """Whether the tunnel was handshaken with a certificate this edge has renewed since (the
        TLS context or QUIC credentials it was accepted with are not the current ones)."""
        if isinstance(tunnel, QuicTunnel):
            return self.quic is not None and tunnel.credentials is not self.quic.credentials
        accepted_with = getattr(tunnel, "server_context", None)  # None: a tunnel this edge dialed, or a sibling's
        return accepted_with is not None and accepted_with is not self._server_ctx

    def _schedule_move(self, tunnel: EdgeTunnel, delay: float) -> None:
        self._move_timers[tunnel] = asyncio.get_running_loop().call_later(delay, self._ask_to_move, tunnel)

    def _ask_to_move(self, tunnel: EdgeTunnel) -> None:
        """GOAWAY ``renewed`` now; close the tunnel once its flows ended."""
        self._move_timers.pop(tunnel, None)
        if tunnel.closed or tunnel.draining or self.draining:
            return
        reason = f"edge {self.name} renewed its certificate: dial again"
        tunnel.goaway("renewed", reason)  # its close is counted as ``renewed`` (ferryman_tunnels_closed_total)
        if tunnel in self.connectors:
            self._connectors_changed()  # it takes no new flows: not reported as held here any more
        close_when_idle(tunnel, "renewed", reason, keep=self._moving)

    async def _accept(self, listener: socket.socket) -> None:
        """Accept TCP connections; each one's TLS handshake runs in its own task.

        The handshake is not left to ``create_server(ssl=...)``: there a failed or timed-out
        handshake never reaches the node (uvloop drops it silently), and an operator must
        see who was refused and why.
        """
        loop = asyncio.get_running_loop()
        self._accepting = True
        try:
            while True:
                try:
                    sock, addr = await loop.sock_accept(listener)
                except OSError as exc:  # e.g. out of file descriptors: keep serving the others
                    log.warning("accept failed", extra={"reason": exc.strerror or str(exc)})
                    await asyncio.sleep(0.1)
                    continue
                key = source_key(addr[0])
                full = self._handshaking.take(key)
                if full is not None:
                    self._refuse_handshake(sock, addr, key, full)
                    continue
                task = loop.create_task(self._handshake(sock, addr, self._server_ctx, key))
                self._handshakes.add(task)
                task.add_done_callback(self._handshakes.discard)
        finally:
            self._accepting = False

    def _refuse_handshake(self, sock: socket.socket, addr: tuple, key: str, full: str) -> None:
        """Close an accepted connection at once: too many handshakes in progress (``full``:
        ``total`` or ``key``, from that source)."""
        sock.close()
        s = self.settings
        self.stats.count(self.stats.tunnels_closed, "too_many_handshakes")
        reason = (f"{s.max_handshakes} TLS handshakes in progress on this edge" if full == "total" else
                  f"{s.max_handshakes_per_source} TLS handshakes in progress from {key}")
        self.stats.log_limit.log(log, logging.WARNING, key, "tunnel refused", {
            "peer_addr": f"{addr[0]}:{addr[1]}", "code": "too_many_handshakes", "reason": reason})

    async def _handshake(self, sock: socket.socket, addr: tuple, ctx: ssl.SSLContext, key: str) -> None:
        """TLS handshake of an accepted connection; it counts as a handshake in progress (of
        ``key``, its source) until its tunnel is up or closed."""
        s = self.settings
        counted = True
        made: list[Tunnel] = []

        def factory() -> Tunnel:
            # The tunnel is kept from here: with uvloop, connect_accepted_socket returns its TLS
            # protocol wrapper, not the application protocol.
            made.append(Tunnel(self, self._wire, dialer=False, accept_roles=("client", "connector", "edge"),
                               keepalive=s.keepalive_interval, handshake_timeout=s.handshake_timeout,
                               write_buffer_high=s.write_buffer_high, label="in"))
            made[-1].server_context = ctx  # which certificate it presents (``_on_old_certificate``)
            return made[-1]

        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                factory, sock, ssl=ctx, ssl_handshake_timeout=s.handshake_timeout)
            (tunnel,) = made
            tunnel.up_waiter.add_done_callback(lambda done: self._handshake_over(done, key))  # HELLO, or closed
            counted = False
        except (OSError, asyncio.TimeoutError) as exc:  # ssl.SSLError is an OSError
            self.stats.count(self.stats.tunnels_closed, "tls_handshake_failed")
            self.stats.log_limit.log(log, logging.WARNING, key, "tunnel refused", {
                "peer_addr": f"{addr[0]}:{addr[1]}", "reason": f"TLS handshake failed: {ssl_handshake_error(exc)}"})
        finally:
            if counted:
                self._handshaking.give(key)

    def _handshake_over(self, up: asyncio.Future[None], key: str) -> None:
        """A tunnel's HELLO arrived or it closed first: its handshake slot is free again (the
        close is logged and counted by the tunnel; the future's exception is taken here)."""
        if not up.cancelled():
            up.exception()
        self._handshaking.give(key)

    # ------------------------------------------------------------------ tunnels
    def refuse_tunnel(self, tunnel: EdgeTunnel) -> tuple[str, str] | None:
        """At most FERRYMAN_MAX_TUNNELS_PER_CLIENT / _PER_CONNECTOR tunnels per certificate
        identity (role and name): one more is refused at its HELLO. Counted until tunnel_down.
        A draining edge refuses every new tunnel."""
        hello = tunnel.hello
        assert hello is not None
        s = self.settings
        if self.draining:
            self.stats.count(self.stats.tunnels_closed, "draining")
            return "draining", f"edge {self.name} is shutting down: dial another edge"
        if hello.role == "edge" and not tunnel.conn.dialer and not is_sibling(tunnel):  # a peer edge relaying
            refusal = (self.relay.refuse_peer_edge(hello.node) if self.relay is not None else
                       f"edge {self.name} follows no control plane: it accepts no relayed flows")
            if refusal is not None:
                self.stats.count(self.stats.tunnels_closed, "relay_refused")
                log.warning("relay tunnel refused", extra={"peer": hello.node, "reason": refusal})
                return "relay_refused", refusal
        cap = s.max_tunnels_per_client if hello.role == "client" else s.max_tunnels_per_connector
        if self._identities.take((hello.role, hello.node), per_key=cap) is None:
            return None
        self.stats.count(self.stats.tunnels_closed, "too_many_tunnels")
        return "too_many_tunnels", (f"{hello.role} {hello.node!r} holds its maximum of {cap} tunnels on edge "
                                    f"{self.name}")

    def tunnel_up(self, tunnel: EdgeTunnel) -> None:
        hello = tunnel.hello
        assert hello is not None
        self.stats.tunnels_up += 1
        self.stats.tunnels_opened += 1
        tunnel.label = f"{hello.role}:{hello.node}@{tunnel.peer_addr}"
        self.stats.count(self.stats.transports, tunnel.transport_name)
        user = None
        if hello.role == "connector":
            self.connectors[tunnel] = None
            if not self._file_connector(tunnel, first=True):
                return
            self._connectors_changed()
        elif hello.role == "edge":
            if not tunnel.conn.dialer:
                self.relays_in.add(tunnel)
                tunnel.state = RelayPeer(hello.node)  # type: ignore[assignment]
        else:
            self.clients.add(tunnel)
            access = tunnel.state = ClientAccess(hello.token)
            if self.tables.enforcing:
                self._authenticate(tunnel, access, hello.token)
            if isinstance(access.principal, Principal):
                user = access.principal.upn
        log.info("tunnel up", extra={"tunnel": tunnel.label, "group": self.connectors.get(tunnel), "user": user,
                                     "transport": tunnel.transport_name})
        if self._on_old_certificate(tunnel):  # its handshake began before a renewal
            self._schedule_move(tunnel, random.uniform(0, self.settings.renewal_spread))

    def _file_connector(self, tunnel: EdgeTunnel, first: bool = False) -> bool:
        """File a connector tunnel under the group the configuration records for its certificate
        (or under none); end it when its HELLO names another group. False: it was ended."""
        hello, peer = tunnel.hello, tunnel.peer_certificate
        assert hello is not None and peer is not None
        decision = self.connector_groups.group_of(peer, hello.group)
        filed = self.connectors.get(tunnel)
        if decision.group != filed:
            if filed is not None and tunnel in self.groups.get(filed, ()):
                self.groups[filed].remove(tunnel)
            self.connectors[tunnel] = decision.group
            if decision.group is not None:
                self.groups.setdefault(decision.group, []).append(tunnel)
                if not first:
                    log.info("connector filed", extra={"tunnel": tunnel.label, "group": decision.group})
        if decision.code == "group_mismatch":
            log.warning("connector refused: its HELLO names another group than its own",
                        extra={"tunnel": tunnel.label, "serial": format(peer.serial, "x"), "code": decision.code,
                               "reason": decision.reason})
            tunnel.terminate(decision.code, f"edge {self.name}: {decision.reason}")
            return False
        if decision.group is None and (first or filed is not None):
            log.warning("connector serves no group", extra={"tunnel": tunnel.label, "code": decision.code,
                                                            "reason": decision.reason})
        if not first:
            self._connectors_changed()
        return True

    def _file_connectors(self) -> None:
        """A new record of who serves which group: file every connector tunnel again."""
        for tunnel in list(self.connectors):
            if not tunnel.closed:
                self._file_connector(tunnel)

    def tunnel_down(self, tunnel: EdgeTunnel) -> None:
        self._stalled.discard(tunnel)
        timer = self._move_timers.pop(tunnel, None)
        if timer is not None:
            timer.cancel()
        hello = tunnel.hello
        if hello is None or not tunnel.up:
            return
        self.stats.tunnels_up -= 1
        self._identities.give((hello.role, hello.node))
        self.stats.count(self.stats.tunnels_closed, tunnel.close_code)
        self.stats.count(self.stats.transports, tunnel.transport_name, -1)
        self.stats.rtt.pop(tunnel.label, None)
        # The side of each flow this tunnel is: towards the connector (a connector tunnel, or a relay
        # tunnel this edge dialed), or towards the client (a client, or a peer edge relaying to here).
        connector = hello.role == "connector" or (hello.role == "edge" and tunnel.conn.dialer)
        if hello.role == "connector":
            filed = self.connectors.pop(tunnel, None)
            if filed is not None and tunnel in self.groups.get(filed, ()):
                self.groups[filed].remove(tunnel)
            code, reason = "connector_lost", f"connector {hello.node} lost: {tunnel.close_reason}"
            self._connectors_changed()
        elif hello.role == "edge":
            if tunnel.conn.dialer:
                if self.relay is not None:
                    self.relay.forget(tunnel)
            else:
                self.relays_in.discard(tunnel)
            code, reason = "relay_lost", f"relay tunnel to edge {hello.node} lost: {tunnel.close_reason}"
        else:
            self.clients.discard(tunnel)
            code, reason = "client_lost", f"client {hello.node} lost: {tunnel.close_reason}"
        if tunnel.close_code == "certificate_revoked":  # say why in the flows' resets and traffic records
            code = "certificate_revoked"
        for fid, route in list(tunnel.routes.items()):
            if type(route) is WebFlow:  # the front door's own flows: their requests answer 502
                del tunnel.routes[fid]
                route.reset(code, reason)
        live = sum(1 for splice in tunnel.routes.values() if splice.closed_sides != 2)
        if live:
            log.warning("flows reset", extra={"tunnel": tunnel.label, "flows": live, "code": code, "reason": reason})
        for splice in list(tunnel.routes.values()):
            if splice.closed_sides == 2:
                continue
            if connector:
                other, ofid = splice.client, splice.cfid
            else:
                other, ofid = splice.connector, splice.kfid
            if connector and not splice.accepted:
                if other.has_flow(ofid):
                    other.reject(ofid, code, reason)
                self.stats.count(self.stats.open_failures, code)
            else:
                other.reset(ofid, code, reason)
            self._finish(splice, code, reason)
        tunnel.routes.clear()

    def tunnel_writable(self, tunnel: EdgeTunnel, writable: bool) -> None:
        """A tunnel that takes data again: the bytes its flows were given meanwhile are credited
        back to their senders (``_acknowledge``), who send more."""
        if not writable or tunnel not in self._stalled:
            return
        self._stalled.discard(tunnel)
        for splice in list(tunnel.routes.values()):
            if type(splice) is not Splice:
                continue
            if tunnel is splice.connector and splice.up_owed:
                splice.client.acknowledge(splice.cfid, splice.up_owed)
                splice.up_owed = 0
            elif tunnel is splice.client and splice.down_owed:
                splice.connector.acknowledge(splice.kfid, splice.down_owed)
                splice.down_owed = 0

    def goaway_received(self, tunnel: EdgeTunnel, event: ev.GoAwayReceived) -> None:
        """A draining connector is skipped by pick_connector (Tunnel.draining), and no longer
        reported as held here."""
        if tunnel in self.connectors:
            self._connectors_changed()

    def pick_connector(self, group: str) -> EdgeTunnel | None:
        """Least-loaded healthy connector of the group, then its least-loaded tunnel."""
        candidates = [t for t in self.groups.get(group, ()) if t.up and not t.closed and not t.draining]
        if not candidates:
            return None
        load: dict[str, int] = {}
        for t in candidates:
            load[t.peer_name] = load.get(t.peer_name, 0) + t.load
        return min(candidates, key=lambda t: (load[t.peer_name], t.load))

    # ------------------------------------------------------------------ opening
    def flow_requested(self, tunnel: EdgeTunnel, event: ev.FlowRequested) -> None:
        """Admission's verdict, then refuse the OPEN or open the flow on a connector."""
        fid = event.flow_id
        request = event.open
        if not tunnel.has_flow(fid):
            return  # OPEN and RST arrived in the same read: already cancelled
        access = tunnel.state
        if isinstance(access, RelayPeer):  # a flow a peer edge decided, to a connector held here
            self._relayed_open(tunnel, access, fid, request)
            return
        if access is None:  # only client tunnels have one
            self._refuse(tunnel, fid, "not_allowed", "connectors cannot open flows")
            return
        process = client_reported(request.process)
        if process is not request.process:
            request = msgspec.structs.replace(request, process=process)
        now = time.time()
        verdict = admit(AccessRequest(host=request.host, port=request.port, protocol=request.protocol,
                                      source=tunnel.peer_addr), access.principal, self.tables, now)
        if not verdict.allowed:
            self._refuse(tunnel, fid, verdict.code, verdict.reason, request, verdict)
            return
        match = verdict.match
        group = match.app.connector_group if match is not None else DEFAULT_GROUP
        connector = self.pick_connector(group)
        if connector is None:
            relays = self.relay.candidates(group) if self.relay is not None else []
            if relays:  # peer edges hold connectors of the group: relay the flow to one of them
                self._relay_open(tunnel, fid, request, verdict, relays)
                return
            wanted = (f"application '{match.app.name}'" if match is not None
                      else f"private DNS name {request.host}")
            self._refuse(tunnel, fid, "no_connector", f"no connector of group '{group}' is connected for {wanted}",
                         request, verdict)
            return
        self._open(tunnel, fid, request, verdict, connector, connector.peer_name)

    def _relay_open(self, tunnel: EdgeTunnel, fid: int, request: Open, verdict: Verdict,
                    relays: list[tuple[PresenceEdge, str]]) -> None:
        """Open the flow on the relay tunnel to the first of ``relays`` (peer edge, its connector) that
        has one up, or can be dialed now (at most ``MAX_RELAY_TRIES`` of them)."""
        assert self.relay is not None
        peer, connector = relays[0]
        out = self.relay.tunnel(peer.name)
        if out is not None:
            self._open(tunnel, fid, request, verdict, out, connector)
            return

        async def dial_then_open() -> None:
            try:
                out, connector = await self.relay_route(relays)
            except RelayError as exc:
                if tunnel.has_flow(fid) and fid not in tunnel.routes:
                    self._refuse(tunnel, fid, exc.code, str(exc), request, verdict)
                return
            if tunnel.has_flow(fid) and fid not in tunnel.routes and not tunnel.closed:
                self._open(tunnel, fid, request, verdict, out, connector)

        task = asyncio.get_running_loop().create_task(dial_then_open())
        self._relaying.add(task)
        task.add_done_callback(self._relaying.discard)

    async def relay_route(self, relays: list[tuple[PresenceEdge, str]]) -> tuple[EdgeTunnel, str]:
        """(relay tunnel, connector) for the first of ``relays`` (a sibling worker or peer edge, and
        the connector of the group it holds) whose relay tunnel is up or can be dialed within
        FERRYMAN_OPEN_TIMEOUT, trying at most ``MAX_RELAY_TRIES``; ``RelayError`` when none can.
        Client flows (``_relay_open``) and the front door's backend flows both route this way."""
        assert self.relay is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.open_timeout
        failure = RelayError("relay_unavailable", "no peer edge holding a connector of the group was found")
        for peer, connector in relays[:MAX_RELAY_TRIES]:
            try:
                out = await asyncio.wait_for(self.relay.connect(peer), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise RelayError("open_timeout", f"no relay tunnel to edge {peer.name} within "
                                                 f"{self.settings.open_timeout:g}s") from None
            except RelayError as exc:
                log.warning("relay tunnel failed", extra={"peer": peer.name, "code": exc.code, "reason": str(exc)})
                failure = exc
                continue
            return out, connector
        raise failure

    def _open(self, tunnel: EdgeTunnel, fid: int, request: Open, verdict: Verdict, out: EdgeTunnel,
              connector_name: str) -> None:
        """Sign the grant for ``connector_name`` and open the flow on ``out``: a tunnel of that
        connector, or a relay tunnel to the peer edge that holds it."""
        relayed = out not in self.connectors
        match = verdict.match
        connection = new_connection_id()
        principal = verdict.principal
        user = principal.upn if principal is not None else ""
        device = principal.device_id if principal is not None else tunnel.peer_name
        who = user or f"device {tunnel.peer_name}"
        waiting = self.waiting.get((out, who), 0)
        if waiting >= self._share:
            self._refuse(tunnel, fid, "too_many_pending",
                         f"{waiting} flows of {who} already wait for {'edge' if relayed else 'connector'} "
                         f"{out.peer_name} to answer (at most FERRYMAN_PENDING_OPENS_SHARE of "
                         f"FERRYMAN_MAX_PENDING_OPENS: {self._share})", request, verdict)
            return
        app = match.app.name if match is not None else ""
        now = time.time()
        # MAC'd under the grant key the connector sent on its tunnel; signed when it sent none, and always
        # for a relayed flow (this edge shares no key with a connector behind a peer edge, and the peer
        # must not be able to make the grant: the connector verifies the signature with this edge's
        # certificate, carried in the OPEN).
        key = out.hello.grant_key if not relayed and out.hello is not None else b""
        signed = len(key) < GRANT_KEY_SIZE
        if not signed:
            grant = mac_grant(key, edge=self.name, connector=connector_name, host=request.host,
                              port=request.port, protocol=request.protocol, connection=connection, user=user,
                              device=device, now=now, app=app)
        else:  # with the certificate that verifies it: after a renewal, a tunnel older than it knows the old key
            grant = sign_grant(self._grant_key, edge=self.name, connector=connector_name, host=request.host,
                               port=request.port, protocol=request.protocol, connection=connection, user=user,
                               device=device, now=now, app=app)
        try:
            kfid = out.open_flow(Open(
                host=request.host, port=request.port, protocol=request.protocol,
                source=request.source or tunnel.peer_addr, app=app, user=user,
                device=device, connection=connection, process=request.process, grant=grant,
                relay_to=connector_name if relayed else "", signer=self._cert_der if signed else b"",
            ))
        except FlowError as exc:
            self._refuse(tunnel, fid, exc.code, f"{'edge' if relayed else 'connector'} {out.peer_name}: {exc.message}")
            return
        splice = Splice(tunnel, fid, out, kfid, f"{request.host}:{request.port}", app, connection, verdict, now,
                        request, segment_text(match.segment) if match is not None else "")
        if relayed:
            splice.relay_to = connector_name
            self.stats.count(self.stats.relayed, "out")
        self._track(splice, who, waiting)

    def _track(self, splice: Splice, who: str, waiting: int) -> None:
        """Route both halves of ``splice`` and start the wait for the connector's answer."""
        splice.client.routes[splice.cfid] = splice
        splice.connector.routes[splice.kfid] = splice
        splice.waiting = (splice.connector, who)
        self.waiting[splice.waiting] = waiting + 1
        splice.timer = asyncio.get_running_loop().call_later(self.settings.open_timeout, self._open_expired, splice)

    def _relayed_open(self, tunnel: EdgeTunnel, peer: RelayPeer, fid: int, request: Open) -> None:
        """An OPEN relayed by peer edge ``peer``, which decided it: hand it unchanged to a tunnel of the
        connector it names. The grant and the deciding edge's certificate travel with it; the
        connector checks them (this edge decides nothing and signs nothing for it)."""
        name = request.relay_to
        if not name or not request.grant or not request.signer:
            self._refuse(tunnel, fid, "relay_invalid", f"a relayed OPEN from edge {peer.edge} must name its connector "
                                                       f"and carry the grant and the deciding edge's certificate")
            return
        candidates = [t for t in self.connectors
                      if t.peer_name == name and t.up and not t.closed and not t.draining and self.connectors[t]]
        sibling = (self.relay.sibling_holding(name) if not candidates and self.relay is not None
                   and not is_sibling(tunnel) else None)
        if sibling is not None:  # another worker of this edge holds the connector: on to it, unchanged
            candidates = [sibling]
        if not candidates:
            self._refuse(tunnel, fid, "relay_no_connector", f"edge {self.name} holds no usable tunnel to connector "
                                                            f"{name} (relayed from edge {peer.edge})")
            return
        connector = min(candidates, key=lambda t: t.load)
        who = f"edge {peer.edge}"
        waiting = self.waiting.get((connector, who), 0)
        if waiting >= self._share:
            self._refuse(tunnel, fid, "too_many_pending",
                         f"{waiting} flows relayed from edge {peer.edge} already wait for connector {name} to answer "
                         f"(at most FERRYMAN_PENDING_OPENS_SHARE of FERRYMAN_MAX_PENDING_OPENS: {self._share})")
            return
        try:
            kfid = connector.open_flow(request if sibling is not None else msgspec.structs.replace(request, relay_to=""))
        except FlowError as exc:
            self._refuse(tunnel, fid, exc.code, f"connector {name}: {exc.message}")
            return
        splice = Splice(tunnel, fid, connector, kfid, f"{request.host}:{request.port}", request.app,
                        request.connection, Verdict(allowed=True), time.time(), request, "")
        splice.relayed_for = peer.edge
        self.stats.count(self.stats.relayed, "in")
        self._track(splice, who, waiting)

    def _answered(self, splice: Splice) -> None:
        """The connector answered ``splice``'s OPEN (or the flow ended): it no longer waits."""
        if splice.timer is not None:
            splice.timer.cancel()
            splice.timer = None
        key = splice.waiting
        if key is not None:
            splice.waiting = None
            left = self.waiting.get(key, 1) - 1
            if left > 0:
                self.waiting[key] = left
            else:
                self.waiting.pop(key, None)

    def _open_expired(self, splice: Splice) -> None:
        """The connector did not answer the OPEN in time: RST to it, OPEN_FAIL to the client."""
        splice.timer = None
        if splice.accepted or splice.closed_sides == -1:
            return
        code = "open_timeout"
        reason = (f"connector {splice.connector.peer_name} did not answer within "
                  f"{self.settings.open_timeout:g}s")
        self.stats.count(self.stats.open_failures, code)
        self.stats.log_limit.log(log, logging.WARNING, splice.client.peer_name, "open failed at connector", {
            "client": splice.client.peer_name, "connector": splice.connector.peer_name, "dest": splice.dest,
            "code": code, "reason": reason})
        splice.connector.reset(splice.kfid, code, reason)
        if splice.client.has_flow(splice.cfid):
            splice.client.reject(splice.cfid, code, reason)
        self._finish(splice, code, reason)

    def _refuse(self, tunnel: EdgeTunnel, fid: int, code: str, reason: str, request: Open | None = None,
                verdict: Verdict | None = None) -> None:
        """OPEN_FAIL ``code``/``reason``; with the request, a traffic-log record of the refused attempt
        (unless admission refused it before looking at its destination)."""
        tunnel.reject(fid, code, reason)
        self.stats.count(self.stats.open_failures, code)
        self.stats.log_limit.log(log, logging.INFO, tunnel.peer_name, "open refused", {
            "client": tunnel.peer_name, "flow": fid, "code": code, "reason": reason})
        if request is not None and (verdict is None or verdict.recorded):
            access = tunnel.state
            principal = access.principal if access is not None else None
            self.records.refused(tunnel, request, principal if isinstance(principal, Principal) else None,
                                 code, reason, verdict)

    def open_refused(self, tunnel: EdgeTunnel, event: ev.OpenRefused) -> None:
        self.stats.count(self.stats.open_failures, event.code)

    def flow_accepted(self, tunnel: EdgeTunnel, event: ev.FlowAccepted) -> None:
        splice = tunnel.routes.get(event.flow_id)
        if splice is None:
            return
        if type(splice) is WebFlow:
            splice.accepted(event.remote)
            return
        splice.accepted = True
        splice.remote = event.remote
        self._answered(splice)
        client = splice.client
        if client.has_flow(splice.cfid):
            # The connector's own address (``bound``) is not the client's business; the edge that decided a
            # relayed flow records the backend's address (``remote``).
            client.accept(splice.cfid, remote=event.remote if splice.relayed_for else "")
            self.stats.flows_active += 1
            self.stats.flows_opened += 1
        else:  # the client gave up while the connector was dialing
            tunnel.reset(event.flow_id, "cancelled", "client cancelled the flow")
            tunnel.routes.pop(event.flow_id, None)

    def flow_rejected(self, tunnel: EdgeTunnel, event: ev.FlowRejected) -> None:
        splice = tunnel.routes.pop(event.flow_id, None)
        if splice is None:
            return
        if type(splice) is WebFlow:
            self.stats.count(self.stats.open_failures, event.code)
            splice.refused(event.code, event.reason)
            return
        self._answered(splice)
        client = splice.client
        client.routes.pop(splice.cfid, None)
        if client.has_flow(splice.cfid):
            client.reject(splice.cfid, event.code, event.reason)
        self.stats.count(self.stats.open_failures, event.code)
        self.stats.log_limit.log(log, logging.INFO, client.peer_name, "open failed at connector", {
            "client": client.peer_name, "connector": tunnel.peer_name, "dest": splice.dest, "code": event.code,
            "reason": event.reason})
        self.records.finished(splice, event.code, event.reason)

    # ------------------------------------------------------------------ splicing
    def data_received(self, tunnel: EdgeTunnel, event: ev.DataReceived) -> None:
        splice = tunnel.routes.get(event.flow_id)
        if splice is None:
            return
        if type(splice) is WebFlow:
            self.stats.bytes_tx += len(event.data)
            splice.data(event.data)
            return
        data = event.data
        size = len(data)
        if tunnel is splice.client:
            out, ofid, pending = splice.connector, splice.kfid, splice.up_pending
            self.stats.bytes_rx += size
            splice.sent += size
        else:
            out, ofid, pending = splice.client, splice.cfid, splice.down_pending
            self.stats.bytes_tx += size
            splice.received += size
        if pending:
            pending.append(kept(data))
            return
        sent = out.send_data(ofid, data)  # 0 when the other side just ended: its end event follows
        if sent:
            self._acknowledge(splice, out, sent)
        if sent < size:
            pending.append(kept(data[sent:]))

    def _acknowledge(self, splice: Splice, out: EdgeTunnel, sent: int) -> None:
        """Credit back to the sender the bytes ``out`` was given, once ``out`` takes data: a
        tunnel whose peer does not read is given no more than the sender's credit."""
        if out.writable:
            if out is splice.connector:
                splice.client.acknowledge(splice.cfid, sent)
            else:
                splice.connector.acknowledge(splice.kfid, sent)
            return
        if out is splice.connector:
            splice.up_owed += sent
        else:
            splice.down_owed += sent
        self._stalled.add(out)

    def credit_available(self, tunnel: EdgeTunnel, event: ev.CreditAvailable) -> None:
        splice = tunnel.routes.get(event.flow_id)
        if splice is None:
            return
        if type(splice) is WebFlow:
            splice.credit()
            return
        pending, fin = (splice.up_pending, splice.up_fin) if tunnel is splice.connector else \
            (splice.down_pending, splice.down_fin)
        if not pending:
            return
        fid = event.flow_id
        while pending:
            chunk = pending[0]
            sent = tunnel.send_data(fid, chunk)
            if sent:
                self._acknowledge(splice, tunnel, sent)
            if sent < len(chunk):
                pending[0] = chunk[sent:]
                return
            pending.popleft()
        if fin:
            self._forward_fin(splice, to=tunnel, fid=fid)

    def flow_ended(self, tunnel: EdgeTunnel, event: ev.FlowEnded) -> None:
        splice = tunnel.routes.get(event.flow_id)
        if splice is None:
            return
        if type(splice) is WebFlow:
            splice.ended()
            return
        if tunnel is splice.client:
            if splice.up_pending:
                splice.up_fin = True
            else:
                self._forward_fin(splice, to=splice.connector, fid=splice.kfid)
        else:
            if splice.down_pending:
                splice.down_fin = True
            else:
                self._forward_fin(splice, to=splice.client, fid=splice.cfid)

    def _forward_fin(self, splice: Splice, to: EdgeTunnel, fid: int) -> None:
        if not to.has_flow(fid):
            return
        if to is splice.connector:
            splice.up_fin = False
        else:
            splice.down_fin = False
        if to.send_fin(fid):
            self._side_closed(splice, to, fid)

    def flow_closed(self, tunnel: EdgeTunnel, event: ev.FlowClosed) -> None:
        splice = tunnel.routes.get(event.flow_id)
        if type(splice) is WebFlow:
            tunnel.routes.pop(event.flow_id, None)
            splice.ended()
        elif splice is not None:
            self._side_closed(splice, tunnel, event.flow_id)

    def _side_closed(self, splice: Splice, tunnel: EdgeTunnel, fid: int) -> None:
        tunnel.routes.pop(fid, None)
        splice.closed_sides += 1
        if splice.closed_sides == 2:
            self._finish(splice, "fin")

    def flow_reset(self, tunnel: EdgeTunnel, event: ev.FlowReset) -> None:
        splice = tunnel.routes.pop(event.flow_id, None)
        if splice is None:
            return
        if type(splice) is WebFlow:
            splice.reset(event.code, event.reason)
            return
        if tunnel is splice.client:
            other, ofid = splice.connector, splice.kfid
        else:
            other, ofid = splice.client, splice.cfid
        other.routes.pop(ofid, None)
        if other.has_flow(ofid):
            if other is splice.client and not splice.accepted:
                other.reject(ofid, event.code, event.reason)
            else:
                other.reset(ofid, event.code, event.reason)
        self._finish(splice, event.code, event.reason)

    def _finish(self, splice: Splice, reason: str, text: str = "") -> None:
        self._answered(splice)
        splice.client.routes.pop(splice.cfid, None)
        splice.connector.routes.pop(splice.kfid, None)
        splice.up_pending.clear()
        splice.down_pending.clear()
        if splice.accepted and splice.closed_sides != -1:
            self.stats.flows_active -= 1
            self.stats.count(self.stats.flows_closed, reason)
        if splice.closed_sides != -1:
            self.records.finished(splice, reason, text)
        splice.closed_sides = -1

    def datagram_received(self, tunnel: EdgeTunnel, event: ev.DatagramReceived) -> None:
        """A UDP flow's datagram: passed to the other tunnel as the same slice, or dropped and
        counted when that tunnel's write buffer is full or holds ``FERRYMAN_UDP_BACKLOG`` bytes
        already (datagrams are never queued here, nor behind much else)."""
        splice = tunnel.routes.get(event.flow_id)
        stats = self.stats
        if splice is None or type(splice) is WebFlow:
            stats.count(stats.datagrams_dropped, "flow_closed")
            return
        data = event.data
        size = len(data)
        upstream = tunnel is splice.client
        out, ofid = (splice.connector, splice.kfid) if upstream else (splice.client, splice.cfid)
        stats.datagrams_rx += 1
        if upstream:  # as for DATA: rx is what clients send, tx what they are sent
            stats.bytes_rx += size
        else:
            stats.bytes_tx += size
        if not out.takes_datagram(self._udp_backlog):
            stats.count(stats.datagrams_dropped, "tunnel_busy")
            return
        try:
            if not out.send_datagram(ofid, data):  # the other side just ended: its end event follows
                stats.count(stats.datagrams_dropped, "flow_closed")
                return
        except FlowError as exc:  # the datagram exceeds that tunnel's limit
            stats.count(stats.datagrams_dropped, exc.code)
            return
        # The traffic log counts what went through, not what arrived here.
        if upstream:
            splice.sent += size
        else:
            splice.received += size
        stats.datagrams_tx += 1


def _load_certificate_der(path: str) -> bytes:
    """The edge's certificate (DER), sent with the grants of relayed flows."""
    try:
        with open(path, "rb") as fh:
            return x509.load_pem_x509_certificate(fh.read()).public_bytes(serialization.Encoding.DER)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load the edge certificate {path}: {exc}") from None


def _load_key(path: str) -> ec.EllipticCurvePrivateKey:
    """The edge's certificate key, which signs flow grants."""
    try:
        with open(path, "rb") as fh:
            key = serialization.load_pem_private_key(fh.read(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"cannot load the edge key {path} to sign flow grants: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"the edge key {path} is not an EC key: flow grants need ECDSA")
    return key
