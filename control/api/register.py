"""``POST /v1/register``: a connector or an edge trades a one-time token and a CSR for its certificate.

No admin key: the registration token is the credential. In one transaction:

1. the token is consumed (``registration_tokens.consume_registration_token``): unknown, used and expired
   tokens are refused with 403 and the store's precise message. The token decides the role
   (connector or edge) and, for a connector, its connector group;
2. the name must not belong to a registered node of that role whose certificate is still
   valid (409: revoke the old one first);
3. the CA signs the CSR (``CertificateAuthority.sign_csr``): the identity (role, name, and
   for an edge the hosts of its addresses) comes from here, never from the CSR (422 for a
   CSR that cannot be signed);
4. the connector or edge is recorded with the certificate's serial and expiry.

Any refusal rolls everything back, so a token is used up only by a registration that
succeeded. The answer carries the certificate, the CA bundle and the edges to dial.
"""

from __future__ import annotations

from litestar import post

from control.store import StoreError, nodes, registration_tokens
from control.store.models import Connector, Edge
from dataplane.basics.controltls import ControlTlsError, ca_pin, split_token
from dataplane.basics.hostport import parse_hostport

from .guards import Api
from .schemas import RegisterRequest, RegisterResponse

_ADDRESS_COLUMN = 255  # connectors.internal_addr / edges.address


def _edge_hosts(addresses: list[str]) -> list[str]:
    if not addresses:
        raise StoreError("invalid", "an edge registers with at least one address: the HOST:PORT that "
                                    "connectors and clients dial")
    hosts = []
    for number, address in enumerate(addresses, 1):
        try:
            host, _port = parse_hostport(address, f"address {number}")
        except ValueError as exc:
            raise StoreError("invalid", str(exc)) from None
        if len(address.strip()) > _ADDRESS_COLUMN:
            raise StoreError("invalid", f"address {number} is longer than {_ADDRESS_COLUMN} characters")
        hosts.append(host)
    return list(dict.fromkeys(hosts))


@post("/v1/register", sync_to_thread=True, security=[], tags=["registration"])
def register(api: Api, data: RegisterRequest) -> RegisterResponse:
    """Register a connector or an edge with a one-time token; returns its certificate, the CA and the edges."""
    name = data.name.strip()
    addresses = [a.strip() for a in data.addresses]
    try:
        secret, pin = split_token(data.token)
    except ControlTlsError as exc:
        raise StoreError("token_unknown", str(exc)) from None
    if pin is not None and pin != ca_pin(api.ca.certificate):
        raise StoreError("token_unknown", "registration token carries the CA hash of another control plane")
    with api.store.begin() as session:
        role = data.role or registration_tokens.token_role(session, secret)
        token = registration_tokens.consume_registration_token(session, secret, role, used_by=f"{role}:{name}")
        hosts = _edge_hosts(addresses) if role == "edge" else None
        nodes.refuse_live_duplicate(session, role, name)
        issued = api.ca.sign_csr(data.csr_pem.encode(), role=role, name=name, hosts=hosts,
                                 lifetime_days=api.cert_lifetime_days)
        actor = f"registration-token:{token.id}"
        group = None
        node: Connector | Edge
        if role == "connector":
            internal = ",".join(addresses)
            if len(internal) > _ADDRESS_COLUMN:
                raise StoreError("invalid", f"addresses take more than {_ADDRESS_COLUMN} characters together")
            group = token.group.name if token.group else None
            node = nodes.add_connector(session, actor, name, group=group, cert_serial=issued.serial,
                                       cert_not_after=issued.not_after)
            node.internal_addr = internal
        else:
            node = nodes.add_edge(session, actor, name, addresses[0], cert_serial=issued.serial,
                                  cert_not_after=issued.not_after)
        node.version = data.version.strip()
        session.flush()
        return RegisterResponse(
            node_id=node.id, role=role, name=name, group=group,  # type: ignore[arg-type]
            certificate_pem=issued.cert_pem.decode(), ca_pem=api.ca.bundle().decode(),
            serial=format(issued.serial, "x"), not_after=issued.not_after, edges=api.edge_addresses(session),
        )
