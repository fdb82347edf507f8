"""Edge presence: which connectors each edge holds tunnels to, from the edges' heartbeats.

An edge's heartbeat carries the connectors it holds usable tunnels to; ``record`` keeps that
report on its row (``edges.presence``), and ``presence_map`` gives every edge that is active
(heartbeats arriving) and whose current certificate is not revoked, with the address other
edges dial it at. This is soft state: it is not audited and never changes the configuration
version (a connector tunnel flapping must not make every node fetch a new snapshot).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from dataplane.contract.presence import Presence, PresenceConnector, PresenceEdge, decode_connectors, encode_connectors
from dataplane.contract.presence import make as make_presence

from .certificates import revoked_serials
from .models import Edge


def record(session: Session, edge: Edge, connectors: list[PresenceConnector]) -> bool:
    """Keep ``edge``'s reported connectors; whether they differ from its previous report."""
    text = encode_connectors(connectors)
    if edge.presence == text:
        return False
    edge.presence = text
    session.flush()
    return True


def presence_map(session: Session, now: datetime, heartbeat_interval: float) -> Presence:
    """Every active edge with an unrevoked certificate: name, address and connectors."""
    revoked = revoked_serials(session)
    edges = [PresenceEdge(name=e.name, address=e.address, connectors=decode_connectors(e.presence))
             for e in session.scalars(select(Edge))
             if e.cert_serial not in revoked and e.status(now, heartbeat_interval) == "active"]
    return make_presence(edges)
