"""Edge to edge relay: a flow decided here, carried by a peer edge to a connector only it holds.

A client may land on any edge; the connector its application needs may hold tunnels to other
edges only. Every edge reports the connectors it holds usable tunnels to in its heartbeats,
and follows the control plane's presence map (``contract.presence``: each active edge, the
address peers dial it at, its connectors). When an edge has no local tunnel to a healthy
connector of the application's group, it still decides the flow itself (admission, the
connector, the grant), picks a peer edge that holds that connector and opens the flow on an
edge⇄edge tunnel to it: the same wire protocol and framing as every tunnel, mutual TLS with
both edges' certificates from the control plane's CA, many flows per tunnel.

The OPEN on that tunnel names the chosen connector (``relay_to``) and carries the grant this
edge signed for it together with this edge's certificate (``signer``): the peer hands the
flow to a tunnel of exactly that connector, unchanged, and the connector checks the grant
against the deciding edge's certificate (``connector.relayed``). The relaying peer cannot
change the destination, the user or the connector of a flow, and cannot make a grant in this
edge's name; it can only refuse or drop the flow.

``Relay`` holds the presence map, the outgoing relay tunnels (dialed when a first flow needs
one, kept while the peer is in the map) and who may relay through this edge: only edges
registered with the same control plane (an edge certificate of this CA, not revoked, whose
name is in the presence map). An edge without a control plane neither relays nor accepts
relayed flows.

The workers of one edge (``edge.workers``) are peers of each other too, its *siblings*: they
share the edge's certificate and ports, and a flow decided by one worker for a connector whose
tunnel landed on another is relayed to it the same way, over a Unix socket instead of mutual
TLS (``LocalTunnel``: same wire protocol, many flows per tunnel; only a process of the edge's
own user may connect, checked with ``SO_PEERCRED``). The grant is signed and carried as for a
peer edge, and the connector checks it. Siblings are tried before peer edges.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Any

from ..basics.hostport import parse_hostport
from ..basics.pki import PeerCertificate
from ..basics.settings import EdgeSettings
from ..contract.presence import Presence, PresenceConnector, PresenceEdge
from ..transport.proxy import dial_tls
from ..transport.tunnel import Tunnel, TunnelBase, TunnelHandler, close_when_idle, ssl_handshake_error
from ..wire.connection import WireConfig

log = logging.getLogger("ferryman.edge.relay")

AnyTunnel = TunnelBase[Any, Any]
FAILED_FOR = 10.0  # seconds a peer edge whose relay tunnel could not be dialed is tried last


class RelayError(Exception):
    """A peer edge cannot carry a flow now; ``code`` is the OPEN_FAIL code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class LocalTunnel(Tunnel):
    """A tunnel between two workers of one edge over a Unix socket: no TLS; the peer is the edge
    itself (``identity``: this edge's certificate), provided it runs as the same user."""

    sibling = True
    dialed_path = ""  # the socket a dialed one reached

    def __init__(self, identity: PeerCertificate, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._identity = identity

    def peer_certificate_der(self) -> bytes | None:
        return None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.peer_addr = "worker"
        transport.set_write_buffer_limits(high=self.write_buffer_high, low=self.write_buffer_high // 4)
        refusal = same_user(transport.get_extra_info("socket"))
        if refusal is not None:
            self.close("role_refused", refusal, error=True)
            return
        self.peer_certificate = self._identity
        self._last_rx = self.loop.time()
        self._timer = self.loop.call_later(self.handshake_timeout, self._handshake_expired)
        self.conn.initiate()
        self._flush()


def _dial_done(task: asyncio.Future[Any]) -> None:
    """A tunnel to a sibling worker dialed ahead of need: its failure is logged (flows then dial again)."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.info("relay tunnel to a worker of this edge not up", extra={"reason": str(exc)})


def same_user(sock: Any) -> str | None:
    """Why the process at the other end of Unix socket ``sock`` may not be a worker of this edge
    (None: it runs as this process's user)."""
    if sock is None or getattr(sock, "family", None) != socket.AF_UNIX:
        return "a worker tunnel must be a Unix socket"
    try:
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              struct.calcsize("3i")))
    except OSError as exc:
        return f"the peer of a worker tunnel cannot be identified: {exc.strerror}"
    if uid != os.getuid():
        return f"the peer of a worker tunnel runs as uid {uid}, not as this edge's uid {os.getuid()}"
    return None


def is_sibling(tunnel: Any) -> bool:
    """Whether ``tunnel`` connects two workers of this edge."""
    return getattr(tunnel, "sibling", False)


class RelayPeer:
    """The state of an incoming relay tunnel: the peer edge that decided the flows it carries."""

    __slots__ = ("edge",)

    def __init__(self, edge: str) -> None:
        self.edge = edge


class Relay:
    """One edge's view of its peers (see the module doc)."""

    def __init__(self, name: str, settings: EdgeSettings, handler: TunnelHandler[Any, Any],
                 wire: Callable[[], WireConfig], ssl_ctx: Callable[[], ssl.SSLContext]) -> None:
        self.name = name
        self.settings = settings
        self.handler = handler
        self._wire = wire
        self._ssl = ssl_ctx
        self.presence: Presence | None = None
        self.peers: dict[str, PresenceEdge] = {}  # every other edge in the map, by certificate name
        self.out: dict[str, AnyTunnel] = {}  # peer edge -> the relay tunnel this edge dialed to it
        self._dialing: dict[str, asyncio.Task[AnyTunnel]] = {}
        self._failed: dict[str, float] = {}  # peer -> loop time until which its failed dial ranks it last
        self._closing: set[asyncio.Task[None]] = set()  # relay tunnels to peers gone from the map, until idle
        # The other workers of this edge (name ``worker-N``, address: its Unix socket), and who this edge is to them.
        self.siblings: dict[str, PresenceEdge] = {}
        self.identity: PeerCertificate | None = None

    # ------------------------------------------------------------------ the presence map
    def update(self, presence: Presence) -> None:
        """A new presence map: peers that left it lose their relay tunnel (GOAWAY: running flows go on)."""
        self.presence = presence
        self.peers = {e.name: e for e in presence.edges if e.name != self.name}
        self._failed = {name: until for name, until in self._failed.items() if name in self.peers}
        for name, tunnel in list(self.out.items()):
            if name not in self.peers and name not in self.siblings:  # no new flows go there; closed once idle
                del self.out[name]
                self._close_when_idle(tunnel, f"edge {name} left the presence map")
        log.info("presence map updated", extra={"edges": len(presence.edges), "tag": presence.tag,
                                                "relay_connectors": sum(len(e.connectors) for e in self.peers.values())})

    def set_siblings(self, siblings: list[PresenceEdge]) -> None:
        """The other workers of this edge now: those gone lose their relay tunnel once it is idle; a
        tunnel to each of the others is dialed now (flows relayed to this edge by peer edges are
        passed on to the worker holding their connector only over a tunnel that is up)."""
        self.siblings = {s.name: s for s in siblings}
        self._failed = {name: until for name, until in self._failed.items()
                        if name in self.peers or name in self.siblings}
        for name, tunnel in list(self.out.items()):
            if is_sibling(tunnel) and (name not in self.siblings or self.siblings[name].address != tunnel.dialed_path):
                del self.out[name]
                self._close_when_idle(tunnel, f"{name} of this edge stopped")
        if self.identity is None:
            return
        for name, sibling in self.siblings.items():
            if self.tunnel(name) is None and name not in self._dialing:
                asyncio.ensure_future(self.connect(sibling)).add_done_callback(_dial_done)

    def sibling_holding(self, connector: str) -> AnyTunnel | None:
        """A relay tunnel up to a sibling worker that holds a tunnel to ``connector`` (the least loaded)."""
        tunnels = [t for name, sibling in self.siblings.items() if any(c.name == connector for c in sibling.connectors)
                   if (t := self.tunnel(name)) is not None]
        return min(tunnels, key=lambda t: t.load) if tunnels else None

    def candidates(self, group: str) -> list[tuple[PresenceEdge, str]]:
        """Sibling workers, then peer edges, holding a connector of ``group``, each with that connector,
        best first: a relay tunnel up (no dial; the least loaded first), then those to dial, and last
        those whose dial failed less than ``FAILED_FOR`` seconds ago; ties broken at random (spreads
        the load)."""
        candidates = [(peer, c.name) for peers in (self.siblings, self.peers) for peer in peers.values()
                      for c in peer.connectors if c.group == group]
        random.shuffle(candidates)
        now = asyncio.get_running_loop().time()

        def rank(item: tuple[PresenceEdge, str]) -> tuple[int, int]:
            sibling = 0 if item[0].name in self.siblings else 3
            tunnel = self.tunnel(item[0].name)
            if tunnel is not None:
                return sibling, tunnel.load
            return sibling + (2 if self._failed.get(item[0].name, 0.0) > now else 1), 0

        return sorted(candidates, key=rank)

    def tunnel(self, peer: str) -> AnyTunnel | None:
        """The relay tunnel to ``peer`` if it is up and takes new flows."""
        tunnel = self.out.get(peer)
        if tunnel is None or not tunnel.up or tunnel.closed or tunnel.draining:
            return None
        return tunnel

    async def connect(self, peer: PresenceEdge) -> AnyTunnel:
        """The relay tunnel to ``peer``, dialed now if there is none (one dial per peer at a time)."""
        tunnel = self.tunnel(peer.name)
        if tunnel is not None:
            return tunnel
        task = self._dialing.get(peer.name)
        if task is None:
            task = asyncio.ensure_future(self._dial(peer))
            self._dialing[peer.name] = task
            task.add_done_callback(lambda _t: self._dialing.pop(peer.name, None))
        try:
            return await asyncio.shield(task)
        except RelayError:
            self._failed[peer.name] = asyncio.get_running_loop().time() + FAILED_FOR
            raise

    async def _dial(self, peer: PresenceEdge) -> AnyTunnel:
        if peer.name in self.siblings:
            return await self._dial_sibling(peer)
        s = self.settings
        try:
            host, port = parse_hostport(peer.address, f"address of edge {peer.name}")
        except ValueError as exc:
            raise RelayError("relay_unreachable", str(exc)) from None
        label = f"relay->{peer.name}@{host}:{port}"
        try:
            _, tunnel = await dial_tls(
                lambda: Tunnel(self.handler, self._wire(), dialer=True, accept_roles=("edge",),
                               keepalive=s.keepalive_interval, handshake_timeout=s.handshake_timeout,
                               write_buffer_high=s.write_buffer_high, label=label),
                host, port, self._ssl(), handshake_timeout=s.handshake_timeout)
            self.out[peer.name] = tunnel  # before HELLO: tunnel_up knows it as an outgoing relay tunnel
            await asyncio.wait_for(tunnel.up_waiter, s.handshake_timeout)
        except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
            if self.out.get(peer.name) is not None and not self.out[peer.name].up:
                self.out.pop(peer.name, None)
            raise RelayError("relay_unreachable", f"edge {peer.name} at {peer.address} cannot be reached to relay "
                                                  f"the flow: {ssl_handshake_error(exc)}") from None
        if tunnel.closed or not tunnel.up:
            self.out.pop(peer.name, None)
            raise RelayError("relay_refused", f"edge {peer.name} refused the relay tunnel: {tunnel.close_reason}")
        if tunnel.hello is None or tunnel.hello.node != peer.name:
            tunnel.close("relay_refused", "not the edge the presence map names at this address")
            self.out.pop(peer.name, None)
            raise RelayError("relay_refused", f"the edge at {peer.address} is not {peer.name}")
        self._failed.pop(peer.name, None)
        return tunnel

    async def _dial_sibling(self, peer: PresenceEdge) -> AnyTunnel:
        """The relay tunnel to a sibling worker, over its Unix socket."""
        s = self.settings
        identity = self.identity
        assert identity is not None
        loop = asyncio.get_running_loop()
        try:
            _, tunnel = await asyncio.wait_for(loop.create_unix_connection(
                lambda: LocalTunnel(identity, self.handler, self._wire(), dialer=True, accept_roles=("edge",),
                                    keepalive=s.keepalive_interval, handshake_timeout=s.handshake_timeout,
                                    write_buffer_high=s.write_buffer_high, label=f"relay->{peer.name}"),
                peer.address), s.handshake_timeout)
            tunnel.dialed_path = peer.address
            self.out[peer.name] = tunnel
            await asyncio.wait_for(tunnel.up_waiter, s.handshake_timeout)
        except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
            if self.out.get(peer.name) is not None and not self.out[peer.name].up:
                self.out.pop(peer.name, None)
            raise RelayError("relay_unreachable", f"{peer.name} of this edge cannot be reached at {peer.address} "
                                                  f"to relay the flow: {exc}") from None
        if tunnel.closed or not tunnel.up:
            self.out.pop(peer.name, None)
            raise RelayError("relay_refused", f"{peer.name} of this edge refused the relay tunnel: "
                                              f"{tunnel.close_reason}")
        self._failed.pop(peer.name, None)
        return tunnel

    def _close_when_idle(self, tunnel: AnyTunnel, reason: str) -> None:
        close_when_idle(tunnel, "peer_gone", reason, keep=self._closing)

    def forget(self, tunnel: AnyTunnel) -> None:
        """An outgoing relay tunnel ended."""
        for name, t in list(self.out.items()):
            if t is tunnel:
                del self.out[name]

    # ------------------------------------------------------------------ who may relay through this edge
    def refuse_peer_edge(self, peer: str) -> str | None:
        """Why an incoming relay tunnel from edge ``peer`` is refused (None: accepted)."""
        if self.presence is None:
            return (f"edge {self.name} has no presence map from the control plane yet: it accepts relayed flows "
                    f"only from edges registered with it")
        if peer == self.name or peer not in self.peers:
            return f"edge {peer!r} is not an active edge registered with the control plane"
        return None

    def close(self) -> None:
        for task in [*self._dialing.values(), *self._closing]:
            task.cancel()
        for tunnel in list(self.out.values()):
            tunnel.goaway("shutdown", f"edge {self.name} is shutting down")
            tunnel.close("shutdown", "edge stopped")


def local_presence(connectors: dict[AnyTunnel, str | None]) -> list[PresenceConnector]:
    """The connectors with at least one usable tunnel here (up, not draining), by name and group."""
    held = {(t.peer_name, group) for t, group in connectors.items()
            if group is not None and t.up and not t.closed and not t.draining}
    return [PresenceConnector(name=name, group=group) for name, group in sorted(held)]
