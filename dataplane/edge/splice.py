"""What the edge keeps per client tunnel (``ClientAccess``: who the client is) and per flow
(``Splice``: a client flow joined to a connector flow, with what admission decided)."""

from __future__ import annotations

import asyncio
from collections import deque

from ..access.admission import Unauthenticated, Verdict
from ..access.policy import Principal
from ..transport.tunnel import TunnelBase
from ..wire.frames import Open


class ClientAccess:
    """An edge's state of one client tunnel: the latest access token the client presented and
    who it speaks for (a ``Principal``, or ``Unauthenticated`` saying why not)."""

    __slots__ = ("token", "principal")

    def __init__(self, token: str) -> None:
        self.token = token
        self.principal: Principal | Unauthenticated = Unauthenticated()


def kept(data: bytes | memoryview) -> bytes | memoryview:
    """``data`` to hold while it waits: a copy when it is a small part of a larger read buffer,
    so that what waits holds at most four times its own size (a peer sending many tiny DATA
    frames, each in a read of its own, must not keep that many whole buffers alive)."""
    if type(data) is memoryview:
        base = data.obj
        if isinstance(base, (bytes, bytearray)) and data.nbytes * 4 < len(base):
            return bytes(data)
    return data


class Splice:
    """A client flow joined to a connector flow. ``up`` is client→connector. Either half may be
    a relay tunnel between edges (see ``relay_to`` and ``relayed_for``)."""

    __slots__ = ("client", "cfid", "connector", "kfid", "up_pending", "down_pending", "up_owed", "down_owed",
                 "up_fin", "down_fin", "accepted", "closed_sides", "dest", "app", "connection", "principal",
                 "verdict", "start", "request", "segment", "sent", "received", "remote", "waiting", "timer",
                 "relay_to", "relayed_for")

    def __init__(self, client: EdgeTunnel, cfid: int, connector: EdgeTunnel, kfid: int, dest: str, app: str,
                 connection: str, verdict: Verdict, start: float, request: Open, segment: str) -> None:
        self.client = client
        self.cfid = cfid
        self.connector = connector
        self.kfid = kfid
        # Bytes waiting for the other side's credit, not yet acknowledged to their sender (so its
        # credit bounds them); see ``kept``.
        self.up_pending: deque[bytes | memoryview] = deque()
        self.down_pending: deque[bytes | memoryview] = deque()
        # Bytes passed on to a tunnel that was not taking more (its peer does not read) and not yet
        # acknowledged to their sender: they are, once that tunnel is writable again. So the
        # sender's credit bounds what such a tunnel is given, and the pipe stays full meanwhile.
        self.up_owed = 0
        self.down_owed = 0
        self.up_fin = False  # FIN from the client waits behind up_pending
        self.down_fin = False
        self.accepted = False
        self.closed_sides = 0
        self.dest = dest
        self.app = app
        self.connection = connection  # the traffic log's connection id
        self.principal = verdict.principal  # who opened it (None when no identity is enforced)
        self.verdict = verdict  # the admission (again on every access change)
        self.start = start  # Unix time of the OPEN
        self.request = request  # the client's OPEN (for the traffic log)
        self.segment = segment
        self.sent = 0  # bytes client -> application
        self.received = 0
        self.remote = ""  # the backend address the connector reached
        self.waiting: tuple[EdgeTunnel, str] | None = None  # (connector tunnel, who) while its OPEN awaits an answer
        self.timer: asyncio.TimerHandle | None = None  # fails the flow when the connector does not answer in time
        # Relayed between edges (``relay.py``): decided here, ``connector`` is the relay tunnel to the peer
        # edge and ``relay_to`` the connector behind it; or carried here for ``relayed_for``, the edge that
        # decided it (``client`` is then that edge's relay tunnel).
        self.relay_to = ""
        self.relayed_for = ""


EdgeTunnel = TunnelBase[Splice, ClientAccess]  # a client tunnel's state is its ClientAccess; a connector's None
