"""The presence map: which edge holds tunnels to which connectors, for relaying flows between edges.

An edge reports the connectors it holds usable tunnels to (``PresenceConnector``: name and
the group it files them under) in its heartbeats; the control plane answers
``GET /v1/node/presence`` with every active, unrevoked edge's entry (``PresenceEdge``: its
certificate name, the address other edges dial it at, its connectors) and a ``tag`` that
changes whenever any of it does. Presence is soft state kept apart from the configuration
snapshot: a connector tunnel coming or going never bumps the configuration version every node
follows. No I/O here.
"""

from __future__ import annotations

import hashlib
from typing import Annotated

import msgspec

MAX_CONNECTORS = 4096  # connectors one edge may report
MAX_EDGES = 4096  # edges in one presence map

# No control characters: names are shown to operators, and PostgreSQL text cannot hold NUL.
_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]+$")]


class PresenceConnector(msgspec.Struct, frozen=True):
    """A connector an edge holds at least one usable (up, not draining) tunnel to."""

    name: _Name
    group: _Name


class PresenceEdge(msgspec.Struct, frozen=True):
    """An edge: ``name`` is its certificate's name, ``address`` the HOST:PORT peer edges dial."""

    name: _Name
    address: _Name
    connectors: Annotated[list[PresenceConnector], msgspec.Meta(max_length=MAX_CONNECTORS)] = []


class Presence(msgspec.Struct, frozen=True):
    tag: str = ""
    edges: Annotated[list[PresenceEdge], msgspec.Meta(max_length=MAX_EDGES)] = []


def tag_of(edges: list[PresenceEdge]) -> str:
    """A short digest of the map's contents: equal maps have equal tags."""
    return hashlib.sha256(msgspec.json.encode(edges)).hexdigest()[:16]


def make(edges: list[PresenceEdge]) -> Presence:
    ordered = sorted(edges, key=lambda e: e.name)
    return Presence(tag=tag_of(ordered), edges=ordered)


_decoder = msgspec.json.Decoder(Presence)


def decode(data: bytes) -> Presence:
    """A presence map from the control plane; ``ValueError`` saying why it cannot be read."""
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"presence map from the control plane cannot be read: {exc}") from None


def encode_connectors(connectors: list[PresenceConnector]) -> str:
    """The JSON text the control plane stores for one edge's report."""
    return msgspec.json.encode(sorted(connectors, key=lambda c: (c.name, c.group))).decode()


_connectors_decoder = msgspec.json.Decoder(list[PresenceConnector])


def decode_connectors(text: str) -> list[PresenceConnector]:
    """An edge's stored report (empty or unreadable text: no connectors)."""
    if not text:
        return []
    try:
        return _connectors_decoder.decode(text)
    except msgspec.DecodeError:
        return []
