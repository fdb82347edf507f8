"""What the client agent's capture front ends need of it: the flow opener, and the tunnelled TCP flow.

The front ends (port forwards, SOCKS5, HTTP CONNECT, transparent capture, the private DNS
resolver) depend on ``FlowOpener``, never on the agent class: ``route`` says whether a
destination goes through the tunnel or is dialed directly from this device, ``route_name``
the same for a DNS name, and ``open`` sends a captured flow's OPEN through the tunnel
(the answer comes to ``flow.on_opened``). ``ClientFlow`` is a captured TCP connection
carried as one tunnel flow; ``capture.connect`` puts the two together for the proxies.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Literal, Protocol, Self

from ..basics.metrics import Stats
from ..basics.settings import ClientSettings
from ..transport.socketflow import BufferBudget, FlowNode, SocketFlow
from ..transport.udpflow import UdpFlow
from .process import LocalUsers
from .profile import Profile

Route = Literal["tunnel", "direct"]
# A DNS name: "tunnel" (private, resolved through the tunnel), "closed" (private, but no edge is
# reachable and the profile fails closed: not resolved), "open" (private, no edge, fail open: the
# system resolver answers, not cached), "public" (not private: the system resolver).
NameRoute = Literal["tunnel", "closed", "open", "public"]

# on_opened(flow, code, reason): code "" means the flow is open.
Opened = Callable[["ClientFlow", str, str], None]


class FlowOpener(Protocol):
    """The client agent as its capture front ends see it."""

    settings: ClientSettings
    stats: Stats
    socket_buffer: int
    buffer_budget: BufferBudget  # FERRYMAN_FLOW_BUFFER_BUDGET
    profile: Profile | None  # the forwarding profile (None: everything captured is private)
    local_users: LocalUsers  # who on this device may use the listeners
    dns_rebind_allow: tuple[str, ...]  # FERRYMAN_DNS_REBIND_ALLOW: public names that may point into segments

    def route(self, host: str, port: int, protocol: str = "tcp") -> Route:
        """Where a captured connection to host:port goes: through the tunnel, or direct."""
        ...

    def route_name(self, name: str) -> NameRoute:
        """Where a DNS query for ``name`` is resolved."""
        ...

    def open(self, flow: ClientFlow | UdpFlow, process: str | None = None,
             local: tuple[str, int] | None = None) -> None:
        """Send OPEN for ``flow`` through the tunnel (``flow.on_opened`` gets the answer). ``process``:
        the app's process when known ("" for none); else it is looked up from the flow's source
        and ``local`` (the address the app connected to; default: the socket's own)."""
        ...


class ClientFlow(SocketFlow):
    """A captured TCP connection carried as one tunnel flow: ``dest`` is what it is opened to,
    ``on_opened`` gets the edge's answer (``open_timeout`` later at most: ``timer``)."""

    __slots__ = ("dest", "on_opened", "timer")
    protocol = "tcp"

    def __init__(self, node: FlowNode, dest: tuple[str, int] | None = None, on_opened: Opened | None = None,
                 on_connect: Callable[[Self], None] | None = None) -> None:
        super().__init__(node, on_connect)
        self.dest = dest
        self.on_opened = on_opened
        self.timer: asyncio.TimerHandle | None = None

    def opened(self, code: str, reason: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        callback, self.on_opened = self.on_opened, None
        if callback is not None:
            callback(self, code, reason)
