"""Which edges a connector holds tunnels to, and which tunnel goes where.

A connector keeps tunnels to at most ``FERRYMAN_CONNECTOR_EDGES`` of the edges it knows (the
control plane's list, or ``FERRYMAN_EDGES``): ``choose`` picks them by rendezvous hashing of
the connector's name with each edge's address, so the connectors of a large fleet spread over
the edges evenly, each connector's choice stays put while its edges stay, and an edge coming
or going moves only the connectors that chose (or now choose) it. Flows that land on an edge
without a tunnel to the connector their application needs are relayed by the edges
(``dataplane.edge.relay``).

``plan`` gives each tunnel slot the list of edges it dials, in order: its own edge first
(slots go round the chosen edges, so each gets at least one tunnel), then the other chosen
edges, then the rest as fallbacks while those are down. Pure: no I/O.
"""

from __future__ import annotations

import hashlib

Endpoint = tuple[str, int]


def _score(name: str, edge: Endpoint) -> bytes:
    return hashlib.sha256(f"{name}\x00{edge[0]}:{edge[1]}".encode()).digest()


def choose(name: str, edges: list[Endpoint], count: int) -> list[Endpoint]:
    """At most ``count`` of ``edges`` for connector ``name`` (rendezvous hashing, highest score first)."""
    unique = list(dict.fromkeys(edges))
    return sorted(unique, key=lambda e: _score(name, e), reverse=True)[:max(1, count)]


def slots(chosen: list[Endpoint], tunnels: int) -> int:
    """How many tunnels: ``FERRYMAN_CONNECTOR_TUNNELS``, and at least one per chosen edge."""
    return max(tunnels, len(chosen))


def plan(chosen: list[Endpoint], edges: list[Endpoint], count: int) -> list[list[Endpoint]]:
    """The dial order of each of ``count`` slots over the ``chosen`` edges, with the others of ``edges``
    last (fallbacks)."""
    rest = [e for e in dict.fromkeys(edges) if e not in chosen]
    order = []
    for i in range(count):
        k = i % len(chosen)
        order.append([*chosen[k:], *chosen[:k], *rest])
    return order
