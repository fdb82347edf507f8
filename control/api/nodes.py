"""The routes registered nodes call, authenticated by their certificate (``guards.require_node``).

- ``GET /v1/node/config?after=N&wait=S``: the configuration snapshot, as soon as its
  version is above ``N`` (long-poll: waits up to ``S`` seconds, then answers 204 No
  Content; ``longpoll.py``). A node holding nothing passes ``after=-1`` and gets the
  snapshot at once. An edge gets the whole snapshot, a connector its narrow view (no users,
  devices, policies, locations, sessions, applications or token keys).
- ``POST /v1/node/heartbeat``: what the node reports (version, addresses, tunnels, active
  flows, the configuration version it runs); the admin API shows it active while they
  keep coming.
- ``POST /v1/node/renew``: a CSR for a fresh key; returns a new certificate for the same
  node (same role, name and, for an edge, the same host names) and the CA bundle; at most
  ``FERRYMAN_NODE_CERTIFICATES_PER_DAY`` certificates per node in 24 hours (429 beyond).
- ``POST /v1/node/traffic``: a batch of an edge's traffic log records.
- ``GET /v1/node/presence?after=TAG&wait=S`` (edges): which edge holds tunnels to which
  connectors (``presence.py``).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Annotated

import anyio.to_thread
import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from litestar import Request, Response, get, post
from litestar.exceptions import HTTPException, PermissionDeniedException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter

from control.store import certificates, config_version, nodes, presence, traffic
from control.store import Store
from control.store.models import Edge
from dataplane.basics import pki
from dataplane.contract.flowrecord import MAX_BATCH_BYTES

from .guards import Api, NodeCaller, recheck_node, require_node
from .longpoll import Wait, config_response, wait_snapshot
from .presence import node_presence, presence_waiters
from .sweeps import sweep_every
from .schemas import HeartbeatIn, HeartbeatOut, RenewIn, RenewOut, TrafficIn, TrafficOut

log = logging.getLogger("ferryman.control.nodes")
DEFAULT_SUPERSEDED_CERT_GRACE = 86400.0  # seconds a renewed node's old certificate stays good (FERRYMAN_SUPERSEDED_CERT_GRACE)

# ---------------------------------------------------------------------------- configuration


@get("/v1/node/config", guards=[require_node], security=[{"nodeToken": []}], tags=["nodes"],
     responses={204: ResponseSpec(None, description="no newer configuration within `wait` seconds")},
     media_type="application/json")
async def node_config(
    request: Request,
    after: Annotated[int, Parameter(ge=-1, description="the version the node holds (-1: none)")] = -1,
    wait: Wait = 0.0,
) -> Response[bytes]:
    """The configuration snapshot once its version is above ``after``; 204 after ``wait`` seconds without one.

    An edge gets all of it; a connector only what it needs (``control.snapshot.connector_view``)."""
    api: Api = request.app.state.api
    node: NodeCaller = request.state.node
    snapshot = await wait_snapshot(api, after, wait, f"node {node.name}")
    if wait > 0:
        await recheck_node(api, node)
    return config_response(snapshot, lambda s: api.hub.body_for(s, node.role, node.node_id))


# ---------------------------------------------------------------------------- heartbeat


def _heartbeat(api: Api, node: NodeCaller, data: HeartbeatIn, external: str) -> tuple[HeartbeatOut, bool]:
    """The answer, and whether the edge's presence (the connectors it holds) changed."""
    with api.store.begin() as session:
        internal = ",".join(a.strip() for a in data.addresses)
        row = nodes.record_heartbeat(session, node.role, node.node_id, version=data.version.strip(),
                                     external_addr=external, internal_addr=internal[:255], tunnels=data.tunnels,
                                     active_flows=data.active_flows, config_version=data.config_version,
                                     records_dropped=data.records_dropped)
        certificates.mark_used(session, node.serial)  # the proof a renewed node holds its new certificate
        changed = False
        if data.connectors is not None and isinstance(row, Edge):
            changed = presence.record(session, row, data.connectors)
        return HeartbeatOut(node_id=node.node_id, status="active", heartbeat_interval=api.heartbeat_interval,
                            config_version=config_version.config_version(session)), changed


@post("/v1/node/heartbeat", guards=[require_node], security=[{"nodeToken": []}], tags=["nodes"], status_code=200)
async def node_heartbeat(request: Request, data: HeartbeatIn) -> HeartbeatOut:
    """A node's report; the node counts as active until it misses three in a row. An edge also
    reports the connectors it holds tunnels to (its presence, ``GET /v1/node/presence``)."""
    api: Api = request.app.state.api
    node: NodeCaller = request.state.node
    if data.connectors is not None and node.role != "edge":
        raise ValidationException(f"only edges report the connectors they hold tunnels to; {node.role} "
                                  f"{node.name!r} may not")
    client = request.client
    external = client.host if client is not None else ""
    answer, changed = await anyio.to_thread.run_sync(_heartbeat, api, node, data, external)
    if changed:
        presence_waiters(request.app).wake()
    return answer


# ---------------------------------------------------------------------------- certificate renewal


def _edge_hosts(cert: x509.Certificate) -> list[str]:
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*names.get_values_for_type(x509.DNSName), *(str(ip) for ip in names.get_values_for_type(x509.IPAddress))]


def _renew(api: Api, node: NodeCaller, data: RenewIn) -> RenewOut:
    hosts = _edge_hosts(node.certificate) if node.role == "edge" else None
    with api.store.begin() as session:
        # Checked again under the configuration lock: a revocation committed since the request
        # was authenticated wins, and nothing renews a certificate the node has moved on from.
        config_version.lock_config(session)
        row = nodes.get_node(session, node.role, node.node_id)
        serial = format(node.serial, "x")
        if certificates.is_revoked(session, node.serial):
            raise PermissionDeniedException(f"node credential refused: certificate {serial} is revoked")
        if row.cert_serial != serial:
            raise PermissionDeniedException(f"certificate {serial} was already renewed (the current one is "
                                            f"{row.cert_serial}): renew with the current certificate")
        # A node renews once in most of its certificate's lifetime. A stolen key renewing in a loop
        # would make each renewal a configuration change for every node (a connector's) and grow
        # the serials every snapshot lists.
        day_ago = datetime.now(UTC) - timedelta(days=1)
        issued_today = certificates.certificates_issued_since(session, node.node_id, day_ago)
        if issued_today >= api.node_certificates_per_day:
            raise HTTPException(status_code=429, headers={"Retry-After": "3600"},
                                detail=f"{node.role} {node.name!r} was issued {issued_today} certificates in the "
                                       f"last 24 hours, the most a node may be (FERRYMAN_NODE_CERTIFICATES_PER_DAY)")
        issued = api.ca.sign_csr(data.csr_pem.encode(), role=node.role, name=pki.certificate_identity(
            node.certificate, node.certificate.public_bytes(serialization.Encoding.DER), "the certificate").name,
            hosts=hosts or None, lifetime_days=api.cert_lifetime_days)
        nodes.renew_certificate(session, row, issued.serial, issued.not_after)
    return RenewOut(certificate_pem=issued.cert_pem.decode(), ca_pem=api.ca.bundle().decode(),
                    serial=format(issued.serial, "x"), not_after=issued.not_after)


async def certificate_retirement(store: Store, grace: float, interval: float | None = None) -> None:
    """Revoke the node certificates a renewal replaced once their nodes have used the renewed
    ones for ``grace`` seconds (``certificates.retire_superseded``), now and then every
    ``interval`` seconds (a quarter of the grace, at most ten minutes) until cancelled. With
    several control-plane processes on one database each may sweep: the configuration lock
    orders them, and a certificate is revoked once."""

    def sweep() -> None:
        with store.begin() as session:
            retired = certificates.retire_superseded(session, timedelta(seconds=grace))
        if retired:
            log.info("superseded node certificates revoked: %s (their nodes have used the renewed ones for %g s)",
                     ", ".join(retired), grace)

    await sweep_every(interval if interval is not None else min(grace / 4, 600.0), sweep,
                      "retiring superseded node certificates")


@post("/v1/node/renew", guards=[require_node], security=[{"nodeToken": []}], tags=["nodes"], status_code=201)
async def node_renew(request: Request, data: RenewIn) -> RenewOut:
    """A new certificate for the calling node's new key (same identity, a fresh lifetime)."""
    return await anyio.to_thread.run_sync(_renew, request.app.state.api, request.state.node, data)


# ---------------------------------------------------------------------------- traffic logs


def _store_traffic(api: Api, node: NodeCaller, data: TrafficIn) -> int:
    with api.store.begin() as session:
        return traffic.insert_records(session, node.name, data.records)


@post("/v1/node/traffic", guards=[require_node], security=[{"nodeToken": []}], tags=["nodes"], status_code=200,
      request_max_body_size=MAX_BATCH_BYTES)
async def node_traffic(request: Request, data: TrafficIn) -> TrafficOut:
    """A batch of an edge's traffic log records (at most ``MAX_BATCH`` of them and
    ``MAX_BATCH_BYTES`` of JSON; other requests may carry at most 1 MiB)."""
    node: NodeCaller = request.state.node
    if node.role != "edge":
        raise PermissionDeniedException(f"only edges send traffic logs; {node.role} {node.name!r} may not")
    stored = await anyio.to_thread.run_sync(_store_traffic, request.app.state.api, node, data)
    return TrafficOut(stored=stored)


NODE_ROUTES = [node_config, node_heartbeat, node_renew, node_traffic, node_presence]
