"""The routes registered nodes call, authenticated by their certificate (``dataplane.nodeauth``).

- ``GET /v1/node/config?after=N&wait=S``: the configuration snapshot, as soon as its
  version is above ``N`` (long-poll: waits up to ``S`` seconds, then answers 204 No
  Content). A node holding nothing passes ``after=-1`` and gets the snapshot at once.
- ``POST /v1/node/heartbeat``: what the node reports (version, addresses, tunnels, active
  flows, the configuration version it runs); the admin API shows it active while they
  keep coming.
- ``POST /v1/node/renew``: a CSR for a fresh key; returns a new certificate for the same
  node (same role, name and, for an edge, the same host names) and the CA bundle.
- ``POST /v1/node/traffic``: a batch of an edge's traffic log records.

``require_node`` checks the request token: certificate issued by this control plane's CA,
within its validity, not revoked, recorded for a registered node; signature by that
certificate's key; issued within ``CLOCK_SKEW`` and not expired; bound to this method and
path; ``jti`` not seen before (``ReplayCache``). Each refusal is a 401 or 403 with its own
message, so an operator reading a node's log knows what to fix.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Annotated, Any

import anyio.to_thread
import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey
from litestar import Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.exceptions import HTTPException, NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter

from control.snapshot import TooManyWaiters
from dataplane.snapshot import ConfigSnapshot

log = logging.getLogger("ferryman.control.nodes")
from control.store import certificates, config_version, nodes, traffic
from control.store.models import Connector, Edge
from dataplane import pki
from dataplane.nodeauth import ALGORITHM, CLOCK_SKEW, MAX_JTI, TOKEN_LIFETIME, body_hash

from .deps import Api
from .schemas import HeartbeatIn, HeartbeatOut, RenewIn, RenewOut, TrafficIn, TrafficOut

MAX_WAIT = 120.0  # seconds a configuration long-poll waits at most (longer asks are cut to this)
_MAX_TOKEN = 16384  # characters; a token with a P-256 certificate is about 1.5 KiB
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="ferryman-node"'}
# joserfc's default header limit (512 bytes) is below a header carrying a certificate (x5c).
_REGISTRY = jws.JWSRegistry(algorithms=[ALGORITHM])
_REGISTRY.max_header_length = 8192


class NodeCaller(msgspec.Struct, frozen=True):
    """Who made a node request: the node's role and id and the certificate it signed with."""

    role: str
    node_id: str
    name: str
    serial: int
    certificate: Any  # x509.Certificate


class ReplayCache:
    """Token ids seen while they are still valid, so a captured token cannot be used twice.

    Bounded: at most ``limit`` ids are kept; an id is forgotten once its token has expired
    (an expired token is refused anyway). While it is full of live ids, new tokens are
    refused (503, retry) rather than forgetting ids that could still be replayed. The cache
    is per process: with several control-plane processes on one database, a token replayed
    to another process within its minute is accepted, but only for the same method, path
    and body (see ``dataplane.nodeauth``).
    """

    def __init__(self, limit: int = 200_000) -> None:
        self.limit = limit
        self._seen: OrderedDict[str, float] = OrderedDict()

    def first_use(self, jti: str, expires: float, now: float) -> bool | None:
        """Record ``jti``; False when it was already used, None when the cache is full of live ids."""
        while self._seen:
            oldest, until = next(iter(self._seen.items()))
            if until >= now:
                break
            del self._seen[oldest]
        if jti in self._seen:
            return False
        if len(self._seen) >= self.limit:
            return None
        self._seen[jti] = expires
        return True


def _unauthorized(message: str) -> NotAuthorizedException:
    return NotAuthorizedException(f"node credential refused: {message}", headers=_CHALLENGE)


def _certificate_of(token: str) -> x509.Certificate:
    try:
        header = jws.extract_compact(token.encode(), registry=_REGISTRY).headers()
    except (JoseError, ValueError, TypeError):
        raise _unauthorized("the bearer token is not a compact JWS") from None
    if header.get("alg") != ALGORITHM:
        raise _unauthorized(f"the token must be signed with {ALGORITHM}, not {header.get('alg')!r}")
    chain = header.get("x5c")
    if not isinstance(chain, list) or not chain or not isinstance(chain[0], str):
        raise _unauthorized("the token carries no certificate (x5c)")
    try:
        return x509.load_der_x509_certificate(base64.b64decode(chain[0], validate=True))
    except (ValueError, binascii.Error):
        raise _unauthorized("the token's certificate (x5c) cannot be parsed") from None


def _lookup(api: Api, serial: int) -> tuple[bool, Connector | Edge | None]:
    with api.store.read() as session:
        return certificates.is_revoked(session, serial), certificates.node_for_certificate(session, serial)


def _target(connection: ASGIConnection) -> str:
    path = connection.scope.get("raw_path") or connection.scope["path"].encode()
    query = connection.scope.get("query_string") or b""
    return (path.decode("latin-1") + ("?" + query.decode("latin-1") if query else ""))


async def require_node(connection: ASGIConnection, _handler: BaseRouteHandler) -> None:
    """Guard of the node routes: the request must carry a valid node token (see module doc)."""
    header = connection.headers.get("authorization")
    if not header:
        raise _unauthorized("missing 'Authorization: Bearer <node token>' header")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized("the Authorization header must be 'Bearer <node token>'")
    if len(token) > _MAX_TOKEN:
        raise _unauthorized(f"the token is longer than {_MAX_TOKEN} characters")
    api: Api = connection.app.state.api
    cert = _certificate_of(token)
    if not pki.issued_by(cert, api.ca.certificate):
        raise _unauthorized("the certificate was not issued by this control plane's CA")
    now = datetime.now(UTC)
    if now < cert.not_valid_before_utc:
        raise _unauthorized(f"the certificate is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC")
    if now >= cert.not_valid_after_utc:
        raise _unauthorized(f"the certificate expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC: "
                            f"register the node again with a new token")
    try:
        identity = pki.certificate_identity(cert, cert.public_bytes(serialization.Encoding.DER), "the certificate")
    except pki.PkiError as exc:
        raise _unauthorized(str(exc)) from None
    try:
        decoded = jwt.decode(token, ECKey.import_key(cert.public_key()), algorithms=[ALGORITHM],  # type: ignore[arg-type]
                             registry=_REGISTRY)
    except (JoseError, ValueError, TypeError):
        raise _unauthorized("the token's signature does not verify with its certificate's key") from None
    claims = decoded.claims
    if not isinstance(claims, dict):
        raise _unauthorized("the token's payload is not a JSON object")
    wall = time.time()
    iat, exp, jti = claims.get("iat"), claims.get("exp"), claims.get("jti")
    if not isinstance(iat, int) or not isinstance(exp, int) or not isinstance(jti, str) or not jti:
        raise _unauthorized("the token needs integer 'iat' and 'exp' claims and a 'jti'")
    if not (0 < iat < 2**40 and 0 < exp < 2**40) or len(jti) > MAX_JTI:
        raise _unauthorized(f"the token's 'iat'/'exp' are out of range or its 'jti' is longer than {MAX_JTI}")
    if abs(wall - iat) > CLOCK_SKEW:
        raise _unauthorized(f"the token was issued {wall - iat:+.0f}s from the control plane's clock "
                            f"(more than {CLOCK_SKEW}s apart: check the node's clock)")
    if exp <= wall - CLOCK_SKEW or exp - iat > TOKEN_LIFETIME:
        raise _unauthorized(f"the token has expired or lives longer than {TOKEN_LIFETIME}s")
    if claims.get("htm") != connection.scope.get("method") or claims.get("htu") != _target(connection):
        raise _unauthorized("the token was made for another request (method or path differ)")
    body = await connection.body() if isinstance(connection, Request) else b""
    if claims.get("bsh") != body_hash(body):
        raise _unauthorized("the token was made for another request body")
    if claims.get("sub") != f"{identity.role}:{identity.name}":
        raise _unauthorized("the token's subject does not name its certificate")
    fresh = api.replay.first_use(jti, exp + CLOCK_SKEW, wall)
    if fresh is None:
        raise HTTPException(status_code=503, detail="too many node requests in the last minutes; retry shortly",
                            headers={"Retry-After": "5"})
    if not fresh:
        raise _unauthorized("the token was already used (replayed request)")
    revoked, node = await anyio.to_thread.run_sync(_lookup, api, cert.serial_number)
    if revoked:
        raise PermissionDeniedException(f"node credential refused: certificate {cert.serial_number:x} of "
                                        f"{identity.role} {identity.name!r} is revoked")
    if node is None:
        raise PermissionDeniedException(f"node credential refused: certificate {cert.serial_number:x} was not "
                                        f"issued to a registered node (register it with a token)")
    role = "connector" if isinstance(node, Connector) else "edge"
    if role != identity.role:
        raise PermissionDeniedException(f"node credential refused: the certificate says {identity.role}, "
                                        f"the node it was issued to is a {role}")
    connection.state.node = NodeCaller(role=role, node_id=node.id, name=node.name, serial=cert.serial_number,
                                       certificate=cert)


def provide_node(request: Request) -> NodeCaller:
    return request.state.node


# ---------------------------------------------------------------------------- configuration


async def wait_snapshot(api: Api, after: int, wait: float, caller: str) -> ConfigSnapshot | None:
    """The configuration snapshot once its version is above ``after`` (None after ``wait``
    seconds without one). A caller ahead of the store (the database was restored from a
    backup) gets the current one at once; 503 before the first snapshot is loaded or when
    too many long-polls wait."""
    current = api.hub.current
    if current is None:
        raise HTTPException(status_code=503, detail="the configuration has not been loaded from the store yet; "
                                                    "retry in a moment")
    if after > current.version:
        log.warning("%s holds configuration version %d, above the store's %d (database restored?); it is "
                    "sent version %d", caller, after, current.version, current.version)
        return current
    try:
        return await api.hub.wait_newer(after, min(wait, MAX_WAIT))
    except TooManyWaiters as exc:
        raise HTTPException(status_code=503, detail=str(exc), headers={"Retry-After": "5"}) from None


@get("/v1/node/config", guards=[require_node], security=[{"nodeToken": []}], tags=["nodes"],
     responses={204: ResponseSpec(None, description="no newer configuration within `wait` seconds")},
     media_type="application/json")
async def node_config(
    request: Request,
    after: Annotated[int, Parameter(ge=-1, description="the version the node holds (-1: none)")] = -1,
    wait: Annotated[float, Parameter(ge=0, description=f"seconds to wait for a newer version (at most {MAX_WAIT:g})")]
    = 0.0,
) -> Response[bytes]:
    """The configuration snapshot once its version is above ``after``; 204 after ``wait`` seconds without one."""
    api: Api = request.app.state.api
    snapshot = await wait_snapshot(api, after, wait, f"node {request.state.node.name}")
    if snapshot is None:
        return Response(b"", status_code=204, media_type="application/json")
    body = api.hub.encoded if snapshot is api.hub.current else msgspec.json.encode(snapshot)
    return Response(body or b"", status_code=200, media_type="application/json",
                    headers={"X-Ferryman-Config-Version": str(snapshot.version)})


# ---------------------------------------------------------------------------- heartbeat


def _heartbeat(api: Api, node: NodeCaller, data: HeartbeatIn, external: str) -> HeartbeatOut:
    with api.store.begin() as session:
        internal = ",".join(a.strip() for a in data.addresses)
        nodes.record_heartbeat(session, node.role, node.node_id, version=data.version.strip(), external_addr=external,
                               internal_addr=internal[:255], tunnels=data.tunnels, active_flows=data.active_flows,
                               config_version=data.config_version)
        return HeartbeatOut(node_id=node.node_id, status="active", heartbeat_interval=api.heartbeat_interval,
                            config_version=config_version.config_version(session))


@post("/v1/node/heartbeat", guards=[require_node], security=[{"nodeToken": []}], tags=["nodes"], status_code=200)
async def node_heartbeat(request: Request, data: HeartbeatIn) -> HeartbeatOut:
    """A node's report; the node counts as active until it misses three in a row."""
    api: Api = request.app.state.api
    client = request.client
    external = client.host if client is not None else ""
    return await anyio.to_thread.run_sync(_heartbeat, api, request.state.node, data, external)


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
        row = (nodes.get_connector(session, node.node_id) if node.role == "connector"
               else nodes.get_edge(session, node.node_id))
        serial = format(node.serial, "x")
        if certificates.is_revoked(session, node.serial):
            raise PermissionDeniedException(f"node credential refused: certificate {serial} is revoked")
        if row.cert_serial != serial:
            raise PermissionDeniedException(f"certificate {serial} was already renewed (the current one is "
                                            f"{row.cert_serial}): renew with the current certificate")
        issued = api.ca.sign_csr(data.csr_pem.encode(), role=node.role, name=pki.certificate_identity(
            node.certificate, node.certificate.public_bytes(serialization.Encoding.DER), "the certificate").name,
            hosts=hosts or None, lifetime_days=api.cert_lifetime_days)
        nodes.renew_certificate(session, row, issued.serial, issued.not_after)
    return RenewOut(certificate_pem=issued.cert_pem.decode(), ca_pem=api.ca.bundle().decode(),
                    serial=format(issued.serial, "x"), not_after=issued.not_after)


@post("/v1/node/renew", guards=[require_node], security=[{"nodeToken": []}], tags=["nodes"], status_code=201)
async def node_renew(request: Request, data: RenewIn) -> RenewOut:
    """A new certificate for the calling node's new key (same identity, a fresh lifetime)."""
    return await anyio.to_thread.run_sync(_renew, request.app.state.api, request.state.node, data)


# ---------------------------------------------------------------------------- traffic logs


def _store_traffic(api: Api, node: NodeCaller, data: TrafficIn) -> int:
    with api.store.begin() as session:
        return traffic.insert_records(session, node.name, (msgspec.structs.asdict(r) for r in data.records))


@post("/v1/node/traffic", guards=[require_node], security=[{"nodeToken": []}], tags=["nodes"], status_code=200)
async def node_traffic(request: Request, data: TrafficIn) -> TrafficOut:
    """A batch of an edge's traffic log records (at most 500)."""
    node: NodeCaller = request.state.node
    if node.role != "edge":
        raise PermissionDeniedException(f"only edges send traffic logs; {node.role} {node.name!r} may not")
    stored = await anyio.to_thread.run_sync(_store_traffic, request.app.state.api, node, data)
    return TrafficOut(stored=stored)


NODE_ROUTES = [node_config, node_heartbeat, node_renew, node_traffic]
