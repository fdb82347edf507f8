"""Edge: accepts client and connector tunnels and switches each flow between them.

For every OPEN from a client the edge finds the application whose segment covers the
destination, picks the least-loaded healthy connector tunnel of that application's
connector group (never a draining one), and opens the flow there. From then on it
splices the two flows: DATA payloads are passed from one tunnel to the other as the
same slices, credit is returned to the sender only for bytes the other side accepted
(so the edge holds at most one window per flow and direction), and FIN/RST travel
through. A lost tunnel resets every flow that used it, with a reason naming it.

Applications come from an application file (``FERRYMAN_APPS_FILE``, fixed for the life of
the process) or, for an edge registered with the control plane, from the configuration
snapshots its ``ControlLink`` receives: each new version replaces the application table
for the next OPENs (flows already running are not touched) and the set of revoked
certificate serials. A peer presenting a revoked certificate is refused at the handshake,
and tunnels already up with one are ended (GOAWAY ``certificate_revoked``, their flows
reset) as soon as the snapshot revoking it arrives.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..access.apptable import AppTable, Match, app_table, describe_miss
from ..access.grants import sign as sign_grant
from ..access.policy import AccessIndex, Decision, Principal
from ..access.tokens import TokenError, TokenVerifier
from ..basics.hostport import parse_hostport
from ..basics.metrics import Stats, start_metrics_server
from ..basics.pki import PeerCertificate
from ..basics.settings import Settings
from ..contract.apps import DEFAULT_GROUP, Segment
from ..contract.flowrecord import FlowRecord, is_ip, network_of, split_address
from ..contract.snapshot import ConfigSnapshot, revoked_set
from ..controllink.registration import Registration
from ..controllink.link import ControlLink, Report, cut_revoked
from ..controllink.traffic import TrafficQueue
from ..transport.credentials import NodeCredentials
from ..transport.supervisor import transport_of
from ..transport.tunnel import Tunnel, TunnelHandler, ssl_handshake_error
from ..wire import events as ev
from ..wire.connection import FlowError
from ..wire.frames import Open

log = logging.getLogger("ferryman.edge")


class Splice:
    """A client flow joined to a connector flow. ``up`` is client→connector."""

    __slots__ = ("client", "cfid", "conn", "kfid", "up_pending", "down_pending",
                 "up_fin", "down_fin", "accepted", "closed_sides", "dest", "app", "connection", "principal",
                 "decision", "start", "request", "segment", "sent", "received", "remote")

    def __init__(self, client: Tunnel, cfid: int, conn: Tunnel, kfid: int, dest: str, app: str,
                 connection: str = "", principal: Principal | None = None, decision: Decision | None = None,
                 start: float = 0.0) -> None:
        self.client = client
        self.cfid = cfid
        self.conn = conn
        self.kfid = kfid
        self.up_pending: list[memoryview] = []
        self.down_pending: list[memoryview] = []
        self.up_fin = False  # FIN from the client waits behind up_pending
        self.down_fin = False
        self.accepted = False
        self.closed_sides = 0
        self.dest = dest
        self.app = app
        self.connection = connection  # the traffic log's connection id
        self.principal = principal  # who opened it (None when no identity is enforced)
        self.decision = decision
        self.start = start  # Unix time of the OPEN
        self.request: Open | None = None  # the client's OPEN (for the traffic log)
        self.segment = ""
        self.sent = 0  # bytes client -> application
        self.received = 0
        self.remote = ""  # the backend address the connector reached


class Edge(TunnelHandler):
    """``apps``: a fixed application table, or None to take applications from the control plane;
    ``registered``: the registration stored by ``ferryman edge register`` (heartbeats, renewal,
    revocations and, without ``apps``, applications follow the control plane)."""

    def __init__(self, settings: Settings, credentials: NodeCredentials, apps: AppTable | None,
                 registered: Registration | None = None) -> None:
        if apps is None and registered is None:
            raise ValueError("an edge needs an application file or a control plane registration")
        self.settings = settings
        self.credentials = credentials
        self.name = credentials.name
        self.apps = apps if apps is not None else AppTable([])
        self.revoked: frozenset[int] = frozenset()
        self.access: AccessIndex | None = None  # identity and conditional access (from the control plane)
        self.tokens: TokenVerifier | None = None
        self.client_tokens: dict[Tunnel, str] = {}  # the latest token each client tunnel presented
        self._grant_key = _load_key(settings.tls_key)
        self.stats = Stats("edge", credentials.name)
        self.static_apps = apps is not None
        self.link: ControlLink | None = None
        self.traffic: TrafficQueue | None = None
        self.app_kinds: dict[str, str] = {}
        self.dns_suffixes: tuple[str, ...] = ()  # private DNS suffixes (from the control plane)
        self.device_os: dict[str, str] = {}
        if registered is not None:
            self.traffic = TrafficQueue(settings.traffic_queue)
            self.link = ControlLink(settings, registered, self._configure, self._report, self._renewed,
                                    traffic=self.traffic)
        self._server_ctx = credentials.server_context()
        self.groups: dict[str, list[Tunnel]] = {}
        self.clients: set[Tunnel] = set()
        self.listener: socket.socket | None = None
        self.quic: Any = None  # the QUIC listener (transport.quic.QuicServer), with FERRYMAN_EDGE_QUIC=on
        self._accepting = False
        self._handshakes: set[asyncio.Task[None]] = set()
        self._wire = credentials.wire_config()
        self.stats.extra = {
            "ferryman_edge_clients": ("Client tunnels connected", lambda: float(len(self.clients))),
            "ferryman_edge_connector_tunnels": (
                "Connector tunnels connected", lambda: float(sum(len(v) for v in self.groups.values()))),
            "ferryman_traffic_records_queued": (
                "Traffic log records waiting to be sent to the control plane",
                lambda: float(len(self.traffic) if self.traffic is not None else 0)),
            "ferryman_traffic_records_dropped_total": (
                "Traffic log records dropped because the queue was full (control plane unreachable)",
                lambda: float(self.traffic.dropped if self.traffic is not None else 0)),
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
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        self.listener = socket.create_server((host, port), family=family, backlog=1024)
        self.listener.setblocking(False)
        if self.link is not None:
            self.link.load_cached()
        accepting = loop.create_task(self._accept(self.listener))
        following = loop.create_task(self.link.run(stop)) if self.link is not None else None
        bound = self.listener.getsockname()
        if s.edge_quic == "on":  # QUIC tunnels on the same port number, over UDP
            from ..transport.quic import load_credentials, serve_quic

            self.quic = await serve_quic(self, self._wire, host, bound[1], s,
                                         load_credentials(s.tls_cert, s.tls_key, s.tls_ca))
        metrics = None
        if s.metrics_addr:
            metrics = await start_metrics_server(s.metrics_addr, self.stats, self.ready)
        source = s.apps_file if self.static_apps else f"control plane {self.link.base}"  # type: ignore[union-attr]
        log.info("edge listening", extra={"addr": f"{bound[0]}:{bound[1]}", "apps": len(self.apps.apps),
                                          "config": source, "transports": "tcp,quic" if self.quic else "tcp"})
        await stop.wait()
        log.info("edge stopping")
        accepting.cancel()
        await asyncio.gather(accepting, *([following] if following else []), return_exceptions=True)
        self.listener.close()
        if self.quic is not None:
            self.quic.close()
        for tunnel in list(self.clients) + [t for ts in self.groups.values() for t in ts]:
            tunnel.goaway("shutdown", f"edge {self.name} is shutting down")
            tunnel.close("shutdown", "edge stopped")
        if metrics is not None:
            metrics.close()

    def ready(self) -> bool:
        """Accepting tunnels, with a configuration (an application file, or a snapshot)."""
        return self._accepting and (self.static_apps or self.link is None or self.link.version is not None)

    # ------------------------------------------------------------------ control plane
    def _configure(self, snapshot: ConfigSnapshot) -> None:
        """A newer configuration: revocations for every tunnel first (they apply even if the rest
        of the snapshot cannot be used), then applications and access rules for the next OPENs,
        and the live flows decided again."""
        self.revoked = revoked_set(snapshot)
        tunnels = [*self.clients, *(t for group in self.groups.values() for t in group)]
        cut_revoked(tunnels, self.revoked, f"edge {self.name}")
        if not self.static_apps:
            self.apps = app_table(snapshot)  # SnapshotError: the link keeps the previous configuration
            access = AccessIndex(snapshot)
            self.app_kinds = {a.name: a.kind for a in snapshot.applications}
            self.dns_suffixes = tuple(s.lower().strip(".") for s in snapshot.dns_suffixes)
            self.device_os = {d.id: d.os for d in snapshot.devices}
            if self.tokens is None or (self.tokens.keys, self.tokens.issuer) != (snapshot.token_keys,
                                                                                 snapshot.token_issuer):
                try:
                    self.tokens = TokenVerifier(snapshot.token_keys, snapshot.token_issuer)
                except TokenError as exc:
                    log.error("%s; sign-ins cannot be verified", exc)
                    self.tokens = TokenVerifier([], snapshot.token_issuer)
                for client in self.clients:  # new keys: the tokens clients hold are checked again
                    self._authenticate(client, self.client_tokens.get(client, ""))
            self.access = access
        if self.access is not None and self.access.enforcing:
            self._recheck_flows()

    def _recheck_flows(self) -> None:
        """Continuous access: decide every live flow again; reset those now denied."""
        access = self.access
        assert access is not None
        now = time.time()
        for client in list(self.clients):
            for splice in list(client.routes.values()):
                if splice.closed_sides == -1 or splice.principal is None:
                    continue
                decision = (access.decide(splice.principal, splice.app, client.peer_addr, now) if splice.app
                            else access.identity(splice.principal, now))  # a DNS flow outside every application
                if decision.allowed:
                    splice.decision = decision
                    continue
                reason = f"access revoked: {decision.reason}"
                log.warning("flow cut by access change", extra={"client": client.peer_name, "dest": splice.dest,
                                                                "app": splice.app, "code": decision.code,
                                                                "reason": reason})
                splice.decision = decision
                self._cut(splice, decision.code, reason)

    def _cut(self, splice: Splice, code: str, reason: str) -> None:
        """Reset both halves of a spliced flow (access revoked)."""
        client, conn = splice.client, splice.conn
        if splice.cfid in client.conn.flows:
            if splice.accepted:
                client.conn.reset_flow(splice.cfid, code, reason)
            else:
                client.conn.reject_flow(splice.cfid, code, reason)
            client.flush_soon()
        if splice.kfid in conn.conn.flows:
            conn.conn.reset_flow(splice.kfid, code, reason)
            conn.flush_soon()
        self._finish(splice, code, reason)

    # ------------------------------------------------------------------ identity
    def _authenticate(self, tunnel: Tunnel, token: str) -> None:
        """Who a client tunnel speaks for, from its token (``tunnel.context``: a Principal or the refusal text)."""
        self.client_tokens[tunnel] = token
        verifier = self.tokens
        if verifier is None:
            tunnel.context = "this edge has no token keys from the control plane yet"
            return
        device = tunnel.peer_certificate.name if tunnel.peer_certificate is not None else ""
        try:
            tunnel.context = verifier.principal(token, device)
        except TokenError as exc:
            tunnel.context = str(exc)
            if token:
                log.warning("access token refused", extra={"client": tunnel.peer_name, "reason": str(exc)})

    def auth_received(self, tunnel: Tunnel, event: ev.AuthReceived) -> None:
        if tunnel.conn.peer is None or tunnel.conn.peer.role != "client":
            return
        previous = tunnel.context
        self._authenticate(tunnel, event.token)
        if isinstance(tunnel.context, Principal):
            log.info("access token renewed", extra={"client": tunnel.peer_name, "user": tunnel.context.upn,
                                                    "expires": tunnel.context.expires})
        elif isinstance(previous, Principal):
            log.warning("refreshed access token refused; new flows of this client are refused until a valid one "
                        "arrives", extra={"client": tunnel.peer_name, "reason": tunnel.context})

    def refuse_peer(self, peer: PeerCertificate) -> str | None:
        if peer.serial in self.revoked:
            self.stats.count(self.stats.tunnels_closed, "certificate_revoked")
            return f"{peer.role} {peer.name!r}: certificate {peer.serial:x} is revoked"
        return None

    def _report(self) -> Report:
        tunnels = len(self.clients) + sum(len(group) for group in self.groups.values())
        bound = self.listener.getsockname() if self.listener is not None else None
        return Report(tunnels=tunnels, active_flows=self.stats.flows_active,
                      addresses=[f"{bound[0]}:{bound[1]}"] if bound else [])

    def _renewed(self) -> None:
        """New tunnels are accepted with the renewed certificate (and grants signed with its key);
        running ones keep theirs."""
        self._server_ctx = self.credentials.server_context()
        self._grant_key = _load_key(self.settings.tls_key)
        if self.quic is not None:
            from ..transport.quic import load_credentials

            s = self.settings
            self.quic.credentials = load_credentials(s.tls_cert, s.tls_key, s.tls_ca)

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
                task = loop.create_task(self._handshake(sock, addr, self._server_ctx))
                self._handshakes.add(task)
                task.add_done_callback(self._handshakes.discard)
        finally:
            self._accepting = False

    async def _handshake(self, sock: socket.socket, addr: tuple, ctx: ssl.SSLContext) -> None:
        s = self.settings
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: Tunnel(self, self._wire, dialer=False, accept_roles=("client", "connector"),
                               keepalive=s.keepalive_interval, handshake_timeout=s.handshake_timeout,
                               write_buffer_high=s.write_buffer_high, label="in"),
                sock, ssl=ctx, ssl_handshake_timeout=s.handshake_timeout,
            )
        except (OSError, asyncio.TimeoutError) as exc:  # ssl.SSLError is an OSError
            self.stats.count(self.stats.tunnels_closed, "tls_handshake_failed")
            log.warning("tunnel refused", extra={"peer_addr": f"{addr[0]}:{addr[1]}",
                                                 "reason": f"TLS handshake failed: {ssl_handshake_error(exc)}"})

    # ------------------------------------------------------------------ tunnels
    def tunnel_up(self, tunnel: Tunnel) -> None:
        peer = tunnel.conn.peer
        assert peer is not None
        self.stats.tunnels_up += 1
        self.stats.tunnels_opened += 1
        tunnel.label = f"{peer.role}:{peer.node}@{tunnel.peer_addr}"
        self.stats.count(self.stats.transports, transport_of(tunnel))
        if peer.role == "connector":
            self.groups.setdefault(peer.group or "default", []).append(tunnel)
        else:
            self.clients.add(tunnel)
            self.client_tokens[tunnel] = peer.token
            if self.access is not None and self.access.enforcing:
                self._authenticate(tunnel, peer.token)
        user = tunnel.context.upn if isinstance(tunnel.context, Principal) else None
        log.info("tunnel up", extra={"tunnel": tunnel.label, "group": peer.group, "user": user,
                                     "transport": transport_of(tunnel)})

    def tunnel_down(self, tunnel: Tunnel) -> None:
        peer = tunnel.conn.peer
        if peer is None or not tunnel.up:
            return
        self.stats.tunnels_up -= 1
        self.stats.count(self.stats.tunnels_closed, tunnel.close_code)
        self.stats.count(self.stats.transports, transport_of(tunnel), -1)
        self.stats.rtt.pop(tunnel.label, None)
        if peer.role == "connector":
            group = self.groups.get(peer.group or "default", [])
            if tunnel in group:
                group.remove(tunnel)
            code, reason = "connector_lost", f"connector {peer.node} lost: {tunnel.close_reason}"
        else:
            self.clients.discard(tunnel)
            self.client_tokens.pop(tunnel, None)
            code, reason = "client_lost", f"client {peer.node} lost: {tunnel.close_reason}"
        if tunnel.close_code == "certificate_revoked":  # say why in the flows' resets and traffic records
            code = "certificate_revoked"
        live = sum(1 for splice in tunnel.routes.values() if splice.closed_sides != 2)
        if live:
            log.warning("flows reset", extra={"tunnel": tunnel.label, "flows": live, "code": code, "reason": reason})
        for fid, splice in list(tunnel.routes.items()):
            if splice.closed_sides == 2:
                continue
            if peer.role == "connector":
                other, ofid = splice.client, splice.cfid
            else:
                other, ofid = splice.conn, splice.kfid
            if peer.role == "connector" and not splice.accepted:
                if ofid in other.conn.flows:
                    other.conn.reject_flow(ofid, code, reason)
                self.stats.count(self.stats.open_failures, code)
            else:
                other.conn.reset_flow(ofid, code, reason)
            other.flush_soon()
            self._finish(splice, code, reason)
        tunnel.routes.clear()

    def tunnel_writable(self, tunnel: Tunnel, writable: bool) -> None:
        """Per-flow credit bounds what each flow queues here; nothing else to do."""

    def goaway_received(self, tunnel: Tunnel, event: ev.GoAwayReceived) -> None:
        """A draining connector is skipped by pick_connector (Tunnel.draining)."""

    def pick_connector(self, group: str) -> Tunnel | None:
        """Least-loaded healthy connector of the group, then its least-loaded tunnel."""
        candidates = [t for t in self.groups.get(group, ()) if t.up and not t.closed and not t.draining]
        if not candidates:
            return None
        load: dict[str, int] = {}
        for t in candidates:
            load[t.peer_name] = load.get(t.peer_name, 0) + t.load
        return min(candidates, key=lambda t: (load[t.peer_name], t.load))

    # ------------------------------------------------------------------ opening
    def flow_requested(self, tunnel: Tunnel, event: ev.FlowRequested) -> None:
        fid = event.flow_id
        request = event.open
        if fid not in tunnel.conn.flows:
            return  # OPEN and RST arrived in the same read: already cancelled
        if tunnel.conn.peer.role != "client":  # type: ignore[union-attr]
            self._refuse(tunnel, fid, "not_allowed", "connectors cannot open flows")
            return
        if request.protocol not in ("tcp", "udp", "dns"):
            self._refuse(tunnel, fid, "unsupported_protocol", f"{request.protocol!r} flows are not supported "
                                                              f"(tcp, udp or dns)")
            return
        if not self.static_apps and self.link is not None and self.link.version is None:
            self._refuse(tunnel, fid, "no_config", f"edge {self.name} has not received its configuration from "
                                                   f"the control plane yet (and has no cached copy)")
            return
        if request.protocol == "dns":
            # A private DNS query: the name must be under a private suffix; it belongs to the
            # application whose name segment covers it (its connector group answers), if any.
            if not self._private_name(request.host):
                suffixes = ", ".join(self.dns_suffixes) or "none are configured"
                self._refuse(tunnel, fid, "not_private_name", f"{request.host} is not under a private DNS suffix "
                                                              f"({suffixes})", request)
                return
            match = self.apps.covering_name(request.host)
        else:
            match = self.apps.match(request.host, request.port, request.protocol)
            if match is None:
                self._refuse(tunnel, fid, "no_application",
                             describe_miss(request.host, request.port, request.protocol), request)
                return
        principal: Principal | None = None
        decision: Decision | None = None
        now = time.time()
        if self.access is not None and self.access.enforcing:
            if not isinstance(tunnel.context, Principal):
                self._refuse(tunnel, fid, "sign_in_required", f"sign-in required: {tunnel.context or 'no token'}",
                             request, match)
                return
            principal = tunnel.context
            decision = (self.access.decide(principal, match.app.name, tunnel.peer_addr, now) if match is not None
                        else self.access.identity(principal, now))
            if not decision.allowed:
                self._refuse(tunnel, fid, decision.code, decision.reason, request, match, decision)
                return
        group = match.app.connector_group if match is not None else DEFAULT_GROUP
        connector = self.pick_connector(group)
        if connector is None:
            wanted = (f"application '{match.app.name}'" if match is not None
                      else f"private DNS name {request.host}")
            self._refuse(tunnel, fid, "no_connector", f"no connector of group '{group}' is connected for {wanted}",
                         request, match, decision)
            return
        connection = os.urandom(8).hex()
        user = principal.upn if principal is not None else ""
        device = principal.device_id if principal is not None else tunnel.peer_name
        grant = sign_grant(self._grant_key, edge=self.name, connector=connector.peer_name, host=request.host,
                           port=request.port, protocol=request.protocol, connection=connection, user=user,
                           device=device, now=now)
        try:
            kfid = connector.conn.open_flow(Open(
                host=request.host, port=request.port, protocol=request.protocol,
                source=request.source or tunnel.peer_addr, app=match.app.name if match is not None else "", user=user,
                device=device, connection=connection, process=request.process, grant=grant,
            ))
        except FlowError as exc:
            self._refuse(tunnel, fid, exc.code, f"connector {connector.peer_name}: {exc.message}")
            return
        splice = Splice(tunnel, fid, connector, kfid, f"{request.host}:{request.port}",
                        match.app.name if match is not None else "", connection, principal, decision, now)
        splice.request = request
        splice.segment = _segment_text(match.segment) if match is not None else ""
        tunnel.routes[fid] = splice
        connector.routes[kfid] = splice
        connector.flush_soon()

    def _private_name(self, host: str) -> bool:
        name = host.lower().rstrip(".")
        return any(name == s or name.endswith("." + s) for s in self.dns_suffixes)

    def _refuse(self, tunnel: Tunnel, fid: int, code: str, reason: str, request: Open | None = None,
                match: Match | None = None, decision: Decision | None = None) -> None:
        tunnel.conn.reject_flow(fid, code, reason)
        self.stats.count(self.stats.open_failures, code)
        log.info("open refused", extra={"client": tunnel.peer_name, "flow": fid, "code": code, "reason": reason})
        if self.traffic is not None and request is not None:
            record = self._record(tunnel, request, os.urandom(8).hex(), time.time(),
                                  tunnel.context if isinstance(tunnel.context, Principal) else None,
                                  match.app.name if match else "", _segment_text(match.segment) if match else "",
                                  decision)
            record.action, record.reason_code, record.close_reason = "deny", code, reason
            if decision is not None and decision.allowed:
                record.action = "allow"  # allowed by policy, but no connector could take it
            record.end = record.start
            self.traffic.put(record)

    # ------------------------------------------------------------------ traffic log
    def _record(self, client: Tunnel, request: Open, connection: str, start: float, principal: Principal | None,
                app: str, segment: str, decision: Decision | None) -> FlowRecord:
        source_ip, source_port = split_address(client.peer_addr)
        fqdn = "" if is_ip(request.host) else request.host
        record = FlowRecord(
            connection_id=connection, transaction_id=client.id, start=start, process=request.process,
            source_ip=source_ip, source_port=source_port, destination_ip=request.host if not fqdn else "",
            destination_port=request.port, destination_fqdn=fqdn,
            transport="udp" if request.protocol == "dns" else request.protocol,
            network=network_of(request.host, source_ip), application=app,
            application_kind=self.app_kinds.get(app, "per_app" if app else ""), segment=segment, edge=self.name,
            device_id=principal.device_id if principal else (client.peer_certificate.name if client.peer_certificate else ""),
        )
        if principal is not None:
            record.user_id, record.upn = principal.user_id, principal.upn
            record.device_os = self.device_os.get(principal.device_id, "")
        if decision is not None:
            record.policy = decision.policy
            record.rule = next((p.grant for p in decision.applied if p.policy == decision.policy), "")
            if decision.allowed and decision.report:
                record.action = "report"
                record.policy = decision.report[0].policy
                record.rule = decision.report[0].grant
        return record

    def _flow_record(self, splice: Splice, code: str, text: str) -> None:
        if self.traffic is None or splice.request is None:
            return
        end = time.time()
        record = self._record(splice.client, splice.request, splice.connection, splice.start, splice.principal,
                              splice.app, splice.segment, splice.decision)
        conn = splice.conn
        record.end, record.duration_ms = end, int((end - splice.start) * 1000)
        record.connector_name = conn.peer_name
        record.connector_id = format(conn.peer_certificate.serial, "x") if conn.peer_certificate is not None else ""
        record.connector_address = split_address(conn.peer_addr)[0]
        if splice.remote:
            record.destination_ip = split_address(splice.remote)[0]
            record.network = network_of(record.destination_ip) or record.network
        record.bytes_sent, record.bytes_received = splice.sent, splice.received
        record.reason_code = "" if code == "fin" else code
        record.close_reason = text or ("closed" if code == "fin" else code)
        if not splice.accepted and splice.decision is not None and not splice.decision.allowed:
            record.action = "deny"  # cut by an access change before it ever opened: a refused attempt
        self.traffic.put(record)

    def open_refused(self, tunnel: Tunnel, event: ev.OpenRefused) -> None:
        self.stats.count(self.stats.open_failures, event.code)

    def flow_accepted(self, tunnel: Tunnel, event: ev.FlowAccepted) -> None:
        splice = tunnel.routes.get(event.flow_id)
        if splice is None:
            return
        splice.accepted = True
        splice.remote = event.remote
        client = splice.client
        if splice.cfid in client.conn.flows:
            client.conn.accept_flow(splice.cfid, bound=event.bound)
            client.flush_soon()
            self.stats.flows_active += 1
            self.stats.flows_opened += 1
        else:  # the client gave up while the connector was dialing
            tunnel.conn.reset_flow(event.flow_id, "cancelled", "client cancelled the flow")
            tunnel.routes.pop(event.flow_id, None)

    def flow_rejected(self, tunnel: Tunnel, event: ev.FlowRejected) -> None:
        splice = tunnel.routes.pop(event.flow_id, None)
        if splice is None:
            return
        client = splice.client
        client.routes.pop(splice.cfid, None)
        if splice.cfid in client.conn.flows:
            client.conn.reject_flow(splice.cfid, event.code, event.reason)
            client.flush_soon()
        self.stats.count(self.stats.open_failures, event.code)
        log.info("open failed at connector", extra={"connector": tunnel.peer_name, "dest": splice.dest,
                                                    "code": event.code, "reason": event.reason})
        self._flow_record(splice, event.code, event.reason)

    # ------------------------------------------------------------------ splicing
    def data_received(self, tunnel: Tunnel, event: ev.DataReceived) -> None:
        splice = tunnel.routes.get(event.flow_id)
        if splice is None:
            return
        data = event.data
        if tunnel is splice.client:
            out, ofid, pending = splice.conn, splice.kfid, splice.up_pending
            self.stats.bytes_rx += len(data)
            splice.sent += len(data)
        else:
            out, ofid, pending = splice.client, splice.cfid, splice.down_pending
            self.stats.bytes_tx += len(data)
            splice.received += len(data)
        if pending:
            pending.append(data)
            return
        try:
            sent = out.conn.send_data(ofid, data)
        except FlowError:
            return  # the other side is being reset; its RST reaches this flow's peer
        if sent:
            tunnel.conn.acknowledge(event.flow_id, sent)
            out.flush_soon()
        if sent < len(data):
            pending.append(data[sent:])

    def credit_available(self, tunnel: Tunnel, event: ev.CreditAvailable) -> None:
        splice = tunnel.routes.get(event.flow_id)
        if splice is None:
            return
        if tunnel is splice.conn:
            source, sfid, pending, fin = splice.client, splice.cfid, splice.up_pending, splice.up_fin
        else:
            source, sfid, pending, fin = splice.conn, splice.kfid, splice.down_pending, splice.down_fin
        if not pending:
            return
        conn = tunnel.conn
        while pending:
            chunk = pending[0]
            sent = conn.send_data(event.flow_id, chunk)
            if sent:
                source.conn.acknowledge(sfid, sent)
            if sent < len(chunk):
                pending[0] = chunk[sent:]
                break
            pending.pop(0)
        source.flush_soon()
        if not pending and fin:
            self._forward_fin(splice, to=tunnel, fid=event.flow_id)

    def flow_ended(self, tunnel: Tunnel, event: ev.FlowEnded) -> None:
        splice = tunnel.routes.get(event.flow_id)
        if splice is None:
            return
        if tunnel is splice.client:
            if splice.up_pending:
                splice.up_fin = True
            else:
                self._forward_fin(splice, to=splice.conn, fid=splice.kfid)
        else:
            if splice.down_pending:
                splice.down_fin = True
            else:
                self._forward_fin(splice, to=splice.client, fid=splice.cfid)

    def _forward_fin(self, splice: Splice, to: Tunnel, fid: int) -> None:
        if fid not in to.conn.flows:
            return
        if to is splice.conn:
            splice.up_fin = False
        else:
            splice.down_fin = False
        closed = to.conn.send_fin(fid)
        to.flush_soon()
        if closed:
            self._side_closed(splice, to, fid)

    def flow_closed(self, tunnel: Tunnel, event: ev.FlowClosed) -> None:
        splice = tunnel.routes.get(event.flow_id)
        if splice is not None:
            self._side_closed(splice, tunnel, event.flow_id)

    def _side_closed(self, splice: Splice, tunnel: Tunnel, fid: int) -> None:
        tunnel.routes.pop(fid, None)
        splice.closed_sides += 1
        if splice.closed_sides == 2:
            self._finish(splice, "fin")

    def flow_reset(self, tunnel: Tunnel, event: ev.FlowReset) -> None:
        splice = tunnel.routes.pop(event.flow_id, None)
        if splice is None:
            return
        if tunnel is splice.client:
            other, ofid = splice.conn, splice.kfid
        else:
            other, ofid = splice.client, splice.cfid
        other.routes.pop(ofid, None)
        if ofid in other.conn.flows:
            if other is splice.client and not splice.accepted:
                other.conn.reject_flow(ofid, event.code, event.reason)
            else:
                other.conn.reset_flow(ofid, event.code, event.reason)
            other.flush_soon()
        self._finish(splice, event.code, event.reason)

    def _finish(self, splice: Splice, reason: str, text: str = "") -> None:
        splice.client.routes.pop(splice.cfid, None)
        splice.conn.routes.pop(splice.kfid, None)
        splice.up_pending.clear()
        splice.down_pending.clear()
        if splice.accepted and splice.closed_sides != -1:
            self.stats.flows_active -= 1
            self.stats.count(self.stats.flows_closed, reason)
        if splice.closed_sides != -1:
            self._flow_record(splice, reason, text)
        splice.closed_sides = -1

    def datagram_received(self, tunnel: Tunnel, event: ev.DatagramReceived) -> None:
        """A UDP flow's datagram: passed to the other tunnel as the same slice, or dropped and
        counted when that tunnel's write buffer is full (datagrams are never queued here)."""
        splice = tunnel.routes.get(event.flow_id)
        stats = self.stats
        if splice is None:
            stats.count(stats.datagrams_dropped, "flow_closed")
            return
        data = event.data
        size = len(data)
        upstream = tunnel is splice.client
        out, ofid = (splice.conn, splice.kfid) if upstream else (splice.client, splice.cfid)
        stats.datagrams_rx += 1
        if upstream:  # as for DATA: rx is what clients send, tx what they are sent
            stats.bytes_rx += size
        else:
            stats.bytes_tx += size
        if not out.writable:
            stats.count(stats.datagrams_dropped, "tunnel_busy")
            return
        try:
            out.conn.send_datagram(ofid, data)
        except FlowError as exc:  # the other side is being reset, or the datagram exceeds its limit
            stats.count(stats.datagrams_dropped, exc.code)
            return
        # The traffic log counts what went through, not what arrived here.
        if upstream:
            splice.sent += size
        else:
            splice.received += size
        stats.datagrams_tx += 1
        out.flush_soon()


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


def _segment_text(segment: Segment) -> str:
    """``10.20.0.0/16:22,3389/tcp``: the segment a flow matched, for the traffic log."""
    ports = ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in segment.ports)
    return f"{segment.destination}:{ports}/{segment.protocol}"
