"""The edge's traffic log: a ``FlowRecord`` for every flow when it ends, and for every refused
OPEN (an attempt), put in the queue its control link ships to the control plane.

A record names the client (transaction = its tunnel, source address, user, device and its
OS, initiating process), the destination (address or FQDN, port, transport), what admission
said (application and its kind, segment, policy and rule, ``allow`` / ``deny`` / ``report``),
the connector that carried it (and the peer edge that relayed it there, ``relay_edge``), the
bytes each way, duration and why it closed. A relayed flow is recorded once, by the edge that
decided it. An edge
without a control plane keeps no records.
"""

from __future__ import annotations

import time
from typing import Any

from ..access.admission import Verdict
from ..basics.pki import PeerCertificate
from ..access.policy import Principal
from ..contract.apps import Segment
from ..contract.flowrecord import FlowRecord, is_ip, network_of, new_connection_id, split_address
from ..contract.snapshot import ConfigSnapshot
from ..controllink.traffic import TrafficQueue
from ..transport.tunnel import TunnelBase
from ..wire.frames import Open
from .splice import Splice


def segment_text(segment: Segment) -> str:
    """``10.20.0.0/16:22,3389/tcp``: the segment a flow matched, for the traffic log."""
    ports = ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in segment.ports)
    return f"{segment.destination}:{ports}/{segment.protocol}"


class Records:
    """Writes the traffic records of one edge into ``queue`` (None: no control plane, no records)."""

    def __init__(self, edge: str, queue: TrafficQueue | None) -> None:
        self.edge = edge
        self.queue = queue
        self.app_kinds: dict[str, str] = {}  # application -> per_app / quick_access
        self.device_os: dict[str, tuple[str, str]] = {}  # device id -> its OS and OS version
        self.connectors: dict[int, tuple[str, str]] = {}  # certificate serial -> (connector id, name)

    def configure(self, snapshot: ConfigSnapshot) -> None:
        """What records name from the configuration: application kinds, devices' OS, connectors' ids."""
        self.app_kinds = {a.name: a.kind for a in snapshot.applications}
        self.device_os = {d.id: (d.os, d.os_version) for d in snapshot.devices}
        self.connectors = {int(serial, 16): (c.id, c.name) for c in snapshot.connectors or () for serial in c.serials}

    def connector_id(self, peer: PeerCertificate) -> str:
        """The id the control plane knows the connector by (what the API and ``ferryman admin
        connectors list`` show, so logs filter by it); the certificate's serial (hex) when the
        configuration does not list it."""
        known = self.connectors.get(peer.serial)
        return known[0] if known is not None and known[1] == peer.name else format(peer.serial, "x")

    def refused(self, client: TunnelBase[Any, Any], request: Open, principal: Principal | None, code: str,
                reason: str, verdict: Verdict | None) -> None:
        """A refused OPEN of ``client``: an attempt, denied (or allowed by policy but not carried)."""
        if self.queue is None:
            return
        match = verdict.match if verdict is not None else None
        record = self._record(client, request, new_connection_id(), time.time(), principal,
                              match.app.name if match else "", segment_text(match.segment) if match else "", verdict)
        record.action, record.reason_code, record.close_reason = "deny", code, reason
        if verdict is not None and verdict.decision is not None and verdict.allowed:
            record.action = "allow"  # allowed by policy, but no connector could take it
        record.end = record.start
        self.queue.put(record)

    def finished(self, splice: Splice, code: str, text: str) -> None:
        """A spliced flow ended (``code`` ``fin`` when it closed cleanly) or was refused by its connector."""
        if self.queue is None or splice.relayed_for:  # a relayed flow is recorded by the edge that decided it
            return
        end = time.time()
        verdict = splice.verdict
        record = self._record(splice.client, splice.request, splice.connection, splice.start, splice.principal,
                              splice.app, splice.segment, verdict)
        connector = splice.connector
        record.end, record.duration_ms = end, int((end - splice.start) * 1000)
        record.connector_name = connector.peer_name
        record.connector_id = (self.connector_id(connector.peer_certificate)
                               if connector.peer_certificate is not None else "")
        record.connector_address = split_address(connector.peer_addr)[0]
        if splice.relay_to:  # carried by a peer edge: the connector is behind it
            record.relay_edge = connector.peer_name
            record.connector_name, record.connector_id, record.connector_address = splice.relay_to, "", ""
        if splice.remote:
            record.destination_ip = split_address(splice.remote)[0]
            record.network = network_of(record.destination_ip) or record.network
        record.bytes_sent, record.bytes_received = splice.sent, splice.received
        record.reason_code = "" if code == "fin" else code
        record.close_reason = text or ("closed" if code == "fin" else code)
        if not splice.accepted and verdict.decision is not None and not verdict.allowed:
            record.action = "deny"  # cut by an access change before it ever opened: a refused attempt
        self.queue.put(record)

    def _record(self, client: TunnelBase[Any, Any], request: Open, connection: str, start: float,
                principal: Principal | None, app: str, segment: str, verdict: Verdict | None) -> FlowRecord:
        source_ip, source_port = split_address(client.peer_addr)
        local_ip, local_port = local_source(request.source)
        fqdn = "" if is_ip(request.host) else request.host
        certificate = client.peer_certificate
        record = FlowRecord(
            connection_id=connection, transaction_id=client.id, start=start, process=request.process,
            source_ip=source_ip, source_port=source_port, local_source_ip=local_ip, local_source_port=local_port,
            destination_ip=request.host if not fqdn else "",
            destination_port=request.port, destination_fqdn=fqdn,
            transport="udp" if request.protocol == "dns" else request.protocol,
            network=network_of(request.host, source_ip), application=app,
            application_kind=self.app_kinds.get(app, "per_app" if app else ""), segment=segment, edge=self.edge,
            device_id=principal.device_id if principal else (certificate.name if certificate else ""),
            client_version=client.hello.software if client.hello is not None else "",
        )
        if principal is not None:
            record.user_id, record.upn = principal.user_id, principal.upn
            record.device_os, record.device_os_version = self.device_os.get(principal.device_id, ("", ""))
        if verdict is not None and verdict.decision is not None:
            record.policy, record.rule = verdict.policy, verdict.rule
            if verdict.action == "report":
                record.action = "report"
        return record


def local_source(claimed: str) -> tuple[str, int]:
    """The app's local address from an OPEN's ``source`` (``"10.1.2.3:50122"``, ``"[fe80::1]:5353"``),
    as the client agent claims it; ``("", 0)`` for anything that is not an IP address and port
    (a DNS query's ``dns:NAME``, a readiness probe, or garbage from a hostile client)."""
    ip, port = split_address(claimed)
    if not is_ip(ip) or not 0 < port < 65536:
        return "", 0
    return ip, port
