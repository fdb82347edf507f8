"""A captured TCP connection, connected: through the tunnel or directly, as the agent routes it.

The SOCKS5 and HTTP CONNECT front ends parse their handshake and then hand the app's
connection to ``connect``: a destination the forwarding profile routes ``"tunnel"`` becomes a
``ClientFlow`` on the same transport (OPEN through the tunnel, the socket read only once the
edge answers), one it routes ``"direct"`` a ``DirectRelay`` dialed from this device. Either
way ``on_result(code, reason)`` is called once the outcome is known, with the same codes
(``""``: connected), so the front end answers the app in its own protocol; after a failure
the connection is closed. Bytes the app sent right after its request (``early``) go first.

``local_user_refusal`` is the front ends' first step: why the account behind a connection may
not use the agent (``FERRYMAN_LOCAL_USERS``, ``process.LocalUsers``), counted and logged.
"""

from __future__ import annotations

import asyncio
import logging

from .direct import DirectRelay, Result
from .process import CLOSED_EARLY
from .opener import ClientFlow, FlowOpener

log = logging.getLogger("ferryman.capture")


def local_user_refusal(opener: FlowOpener, transport: asyncio.BaseTransport, protocol: str = "tcp",
                       peer: tuple[str, int] | None = None) -> str:
    """Why the local account behind ``transport``'s connection (or, for UDP, the sender at
    ``peer``) may not use the agent: "" when it may. A refusal is counted
    (``local_user_refused`` in ``ferryman_open_failures_total``) and logged at a limited rate."""
    if peer is None:
        peer = transport.get_extra_info("peername")
    ours = transport.get_extra_info("sockname")
    why = opener.local_users.refusal(protocol, peer[:2] if peer else None,
                                     ours[:2] if ours and protocol == "tcp" else None)
    if why:
        stats = opener.stats
        source = f"{peer[0]}:{peer[1]}" if peer else "?"
        if why.startswith(CLOSED_EARLY):  # the application gave up on it already: nobody is refused
            stats.count(stats.open_failures, "local_closed_early")
            log.debug("local connection closed before its owner could be checked", extra={"source": source})
            return why
        stats.count(stats.open_failures, "local_user_refused")
        stats.log_limit.log(log, logging.WARNING, ("local_user", why), "local connection refused",
                            {"source": source, "reason": why})
    return why


def connect(opener: FlowOpener, transport: asyncio.Transport, dest: tuple[str, int], early: bytes,
            on_result: Result) -> None:
    """Carry the app's connection ``transport`` to ``dest`` (see the module doc)."""
    host, port = dest
    if opener.route(host, port, "tcp") == "direct":
        DirectRelay(opener, transport, host, port, early, on_result)
        return
    transport.pause_reading()

    def opened(flow: ClientFlow, code: str, reason: str) -> None:
        if transport.is_closing():
            return
        on_result(code, reason)
        if code:
            transport.close()

    flow = ClientFlow(opener, dest, opened)
    if early:
        flow.pending = memoryview(early)  # sent first once the flow is open (before reading resumes)
    transport.set_protocol(flow)
    flow.connection_made(transport)
    opener.open(flow)
