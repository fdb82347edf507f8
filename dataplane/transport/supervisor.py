"""Tunnel supervision for the nodes that dial edges (connector, client agent).

``keep_tunnel`` keeps one tunnel slot up: dial (TLS/TCP, through an HTTP CONNECT proxy when
configured, or QUIC, as ``TransportChoice`` says for FERRYMAN_TRANSPORT), wait for the HELLO
exchange, run the node's session until the tunnel ends, back off with jitter (``Backoff``)
and dial again; on an ``auto`` fallback to TLS/TCP it probes QUIC and moves over when it
answers, and a client agent's slot replaces a tunnel its edge drains (GOAWAY ``draining``) or
asks to move to its renewed certificate (``renewed``): the old tunnel retires, closing once
its flows are done.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from ..basics import pki
from ..basics.settings import DialerSettings
from ..wire.connection import WireConfig
from .proxy import dial_tls, egress_proxy
from .quic import dial_quic, load_credentials
from .tunnel import Tunnel, TunnelBase, TunnelHandler, close_when_idle, ssl_handshake_error

AnyTunnel = TunnelBase[Any, Any]
# GOAWAY codes of an edge that make a client agent's slot dial a replacement at once: the edge shuts
# down (``draining``), or renewed its certificate (``renewed``) and asks for a tunnel presenting it.
MOVE_CODES = ("draining", "renewed")

log = logging.getLogger("ferryman.dial")


class Backoff:
    """Exponential reconnect delay with full jitter: uniform(0, min(max, base * 2**attempt))."""

    def __init__(self, base: float, ceiling: float) -> None:
        self.base = base
        self.ceiling = ceiling
        self.attempt = 0

    def next(self) -> float:
        cap = min(self.ceiling, self.base * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return random.uniform(self.base / 2, max(self.base / 2, cap))

    def reset(self) -> None:
        self.attempt = 0


class TransportChoice:
    """Which transport the next dial of one tunnel slot uses (FERRYMAN_TRANSPORT).

    ``quic`` and ``tcp`` always use that one. ``auto`` tries QUIC first; when a QUIC
    handshake gets no answer within FERRYMAN_QUIC_TIMEOUT (UDP blocked) or is refused, the
    slot falls back to TLS/TCP at once and stays there, trying QUIC again every
    FERRYMAN_QUIC_PROBE_INTERVAL seconds (see ``keep_tunnel``)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.quic_failed_at: float | None = None  # loop time of the last QUIC failure (auto)

    def first(self) -> str:
        if self.mode == "auto":
            return "tcp" if self.quic_failed_at is not None else "quic"
        return self.mode


async def keep_tunnel(
    node: TunnelHandler,
    settings: DialerSettings,
    wire: WireConfig | Callable[[], WireConfig],
    ssl_ctx: ssl.SSLContext | Callable[[], ssl.SSLContext],
    edges: list[tuple[str, int]],
    session: Callable[[AnyTunnel], Awaitable[bool | None]],
    running: Callable[[], bool],
    *,
    first: int = 0,
    label: str = "",
    back_to_first: bool = False,
    replace_draining: bool = False,
) -> None:
    """Keep one tunnel to an edge up while ``running()``: dial (moving to the next edge
    after a failure), wait for the HELLO exchange, run ``session(tunnel)`` until it
    returns (normally when the tunnel ends), then back off with jitter and dial again.

    The transport follows FERRYMAN_TRANSPORT (``TransportChoice``). With ``auto`` on a
    TLS/TCP fallback, QUIC is tried again every FERRYMAN_QUIC_PROBE_INTERVAL seconds while
    the TCP tunnel runs; once a QUIC tunnel is up it takes over (new flows use it) and the
    TCP tunnel drains: GOAWAY, then it closes when its flows have ended (at most
    FERRYMAN_DRAIN_GRACE later).

    With ``replace_draining`` (a client agent) a GOAWAY ``draining`` from the edge (it is
    shutting down) has the slot dial a replacement at once, trying the other edges first and
    the same address last (behind a load balancer it reaches another edge): new flows use
    the replacement while the old tunnel's flows finish on it. A GOAWAY ``renewed`` (the edge
    renewed its certificate) does the same with the same address first.

    ``ssl_ctx`` and ``wire`` may be functions returning what to use for the next dial (a
    node whose certificate is renewed hands out the new context, a client its current
    access token in the HELLO); ``edges`` is read at every dial,
    so a node may replace its contents (new edges from the control plane). With
    ``back_to_first`` a tunnel that ended is dialed again from ``edges[first]`` (the slot's own
    edge; the others are fallbacks while it is down) rather than the next edge."""
    loop = asyncio.get_running_loop()
    proxy = egress_proxy(settings)  # HTTP CONNECT proxy for TLS/TCP dials (None: direct)
    choice = TransportChoice(settings.transport)
    backoff = Backoff(settings.reconnect_min, settings.reconnect_max)

    async def dial(host: str, port: int) -> tuple[AnyTunnel | None, str]:
        """A tunnel to host:port whose HELLO exchange is done, on the transport ``choice`` says."""
        config = wire() if callable(wire) else wire
        name = f"{label}{host}:{port}"
        tunnel: AnyTunnel | None = None
        reason = ""
        if choice.first() == "quic":
            tunnel, reason = await _dial_quic(node, settings, config, host, port, name)
            if tunnel is None and choice.mode == "auto":
                choice.quic_failed_at = loop.time()
                node.stats.count(node.stats.transport_fallbacks, "tcp")
                log.warning("QUIC unreachable; falling back to TLS/TCP", extra={
                    "edge": f"{host}:{port}", "reason": reason, "quic_retry_in_s": settings.quic_probe_interval})
        if tunnel is None and choice.first() == "tcp":
            context = ssl_ctx() if callable(ssl_ctx) else ssl_ctx
            try:
                _, tunnel = await dial_tls(
                    lambda: Tunnel(node, config, dialer=True, accept_roles=("edge",),
                                   keepalive=settings.keepalive_interval, handshake_timeout=settings.handshake_timeout,
                                   write_buffer_high=settings.write_buffer_high, label=name),
                    host, port, context, handshake_timeout=settings.handshake_timeout, proxy=proxy,
                )
                await tunnel.up_waiter
            except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
                tunnel, reason = None, ssl_handshake_error(exc)
        if tunnel is not None:
            tunnel.dialed = (host, port)
        return tunnel, reason

    async def replacement(draining: AnyTunnel, same_first: bool) -> AnyTunnel | None:
        """A tunnel for one that drains: to another edge (or a new one behind the same address) when
        its edge shuts down; to the same address first when its edge renewed its certificate."""
        at = edges.index(draining.dialed) if draining.dialed in edges else -1
        order = [edges[(at + 1 + i) % len(edges)] for i in range(len(edges))]  # the draining address last
        if same_first and draining.dialed in edges:
            order = [order[-1], *order[:-1]]
        for host, port in order:
            tunnel, reason = await dial(host, port)
            if tunnel is not None:
                return tunnel
            log.warning("edge unreachable while replacing a draining tunnel",
                        extra={"edge": f"{host}:{port}", "reason": reason})
        return None

    attempt = 0
    while running():
        host, port = edges[(first + attempt) % len(edges)]
        tunnel, reason = await dial(host, port)
        if tunnel is None:
            if choice.mode == "auto":
                choice.quic_failed_at = None  # neither answered (the edge is down): QUIC first again next time
            delay = backoff.next()
            log.warning("edge unreachable", extra={"edge": f"{host}:{port}", "reason": reason,
                                                   "retry_in_s": round(delay, 2)})
        else:
            backoff.reset()
            last, moved = await _run_sessions(node, settings, choice, tunnel, session, running,
                                       lambda: _dial_quic(node, settings, wire() if callable(wire) else wire,
                                                          host, port, f"{label}{host}:{port}"),
                                       replacement if replace_draining else None)
            if not running():
                return
            # A session that handed its tunnel over to drain (a connector moving it to a renewed
            # certificate or to another edge: ``session`` returned True) wants its successor now:
            # a backoff would leave a connector of one slot without a tunnel for that long. A
            # tunnel that ended backs off.
            delay = 0.0 if moved else backoff.next()
            if back_to_first:
                attempt = -1
            elif last.dialed in edges and last.dialed != (host, port):  # replaced: go on from where it ended
                attempt = (edges.index(last.dialed) - first) % len(edges)
        attempt += 1
        node.stats.reconnects += 1
        await asyncio.sleep(delay)


async def _dial_quic(node: TunnelHandler, settings: DialerSettings, config: WireConfig, host: str, port: int,
                     name: str) -> tuple[AnyTunnel | None, str]:
    """(a QUIC tunnel whose HELLO exchange is done, "") or (None, why not)."""
    try:
        credentials = load_credentials(settings.tls_cert, settings.tls_key, settings.tls_ca)
    except (pki.PkiError, OSError, ValueError) as exc:
        return None, f"QUIC credentials: {exc}"
    try:
        tunnel = await dial_quic(node, config, host, port, settings, credentials, label=name)
        await tunnel.up_waiter
    except asyncio.TimeoutError:
        return None, f"no QUIC handshake within {settings.quic_timeout:g}s (UDP blocked?)"
    except (OSError, ConnectionError) as exc:
        return None, ssl_handshake_error(exc)
    return tunnel, ""


async def _run_sessions(node: TunnelHandler, settings: DialerSettings, choice: TransportChoice, tunnel: AnyTunnel,
                        session: Callable[[Any], Awaitable[bool | None]], running: Callable[[], bool],
                        redial_quic: Callable[[], Awaitable[tuple[AnyTunnel | None, str]]],
                        replacement: Callable[[AnyTunnel, bool], Awaitable[AnyTunnel | None]] | None
                        ) -> tuple[AnyTunnel, bool]:
    """Run ``session(tunnel)`` until the tunnel ends, moving the session to a new tunnel (the old
    one retires: it closes once its flows ended) when an ``auto`` TCP fallback finds QUIC
    reachable again, or, with ``replacement``, when the edge drains the tunnel (GOAWAY
    ``draining``: it shuts down) or asks it to move (``renewed``: its certificate was renewed,
    and the tunnel still presents the old one). Returns the tunnel the session ended on, and
    whether the session handed it over to drain (``session`` returned True: dial again now)."""
    loop = asyncio.get_running_loop()
    stats = node.stats
    kind = tunnel.transport_name
    stats.count(stats.transports, kind)
    task = asyncio.ensure_future(session(tunnel))
    # Replacement dials back off like reconnects (FERRYMAN_RECONNECT_MIN doubling up to _MAX; reset
    # once a tunnel served a minute), so an edge that drains every tunnel it takes is not dialed in
    # a tight loop; a replacement that found no edge is dialed again while the old tunnel lasts.
    backoff = Backoff(settings.reconnect_min, settings.reconnect_max)
    since = loop.time()
    try:
        while running():
            probing = choice.mode == "auto" and tunnel.transport_name == "tcp"
            watch: set[asyncio.Future[Any]] = {task}
            if replacement is not None and not tunnel.goaway_waiter.done():
                watch.add(tunnel.goaway_waiter)
            if not probing and len(watch) == 1:
                break
            done, _ = await asyncio.wait(watch, timeout=settings.quic_probe_interval if probing else None,
                                         return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                break
            new: AnyTunnel | None = None
            if replacement is not None and tunnel.goaway_waiter.done():
                why = tunnel.goaway_waiter.result()
                if why not in MOVE_CODES:
                    continue  # e.g. the tunnel is being refused or revoked: it closes, and the slot dials again
                renewed = why == "renewed"
                log.info("edge renewed its certificate: dialing a new tunnel to it for new flows" if renewed else
                         "edge draining: dialing a replacement tunnel for new flows", extra={"tunnel": tunnel.label})
                if loop.time() - since > 60.0:
                    backoff.reset()
                elif backoff.attempt:  # the tunnel being replaced was itself a recent replacement
                    await asyncio.wait({task}, timeout=backoff.next())
                while not task.done() and running():
                    new = await replacement(tunnel, renewed)
                    if new is not None:
                        break
                    delay = backoff.next()
                    log.warning("no edge took a replacement tunnel: new flows wait for one (or for the "
                                "draining tunnel to close)", extra={"tunnel": tunnel.label, "retry_in_s": round(delay, 2)})
                    await asyncio.wait({task}, timeout=delay)
                if new is None:
                    continue
                if not backoff.attempt:
                    backoff.next()  # the next replacement soon after this one waits
                since = loop.time()
                log.info("new flows use the replacement tunnel; the draining one closes when its flows end",
                         extra={"old": tunnel.label, "new": new.label})
                # A tunnel replaced because its edge renewed keeps its flows until they end (the edge
                # stays; the revocation of its old certificate, a day later, cuts what still runs).
                _retire(tunnel, None if renewed else settings.drain_grace, "edge_renewed" if renewed else "edge_draining",
                        "replaced: its edge renewed its certificate" if renewed else
                        "replaced: its edge is shutting down")
            elif probing:
                new, reason = await redial_quic()
                if new is None:
                    choice.quic_failed_at = loop.time()
                    log.info("QUIC still unreachable; staying on TLS/TCP", extra={"reason": reason})
                    continue
                choice.quic_failed_at = None
                log.info("QUIC reachable again: new flows use the QUIC tunnel, the TLS/TCP one drains",
                         extra={"tunnel": new.label})
                new.dialed = tunnel.dialed
                _retire(tunnel, settings.drain_grace, "transport_upgrade", "replaced by a QUIC tunnel")
            if new is None:
                continue
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            stats.count(stats.transports, kind, -1)
            tunnel, kind = new, new.transport_name
            stats.count(stats.transports, kind)
            task = asyncio.ensure_future(session(tunnel))
        moved = bool(await task)
    finally:
        task.cancel()
        stats.count(stats.transports, kind, -1)
    return tunnel, moved


_retiring: set[asyncio.Task[None]] = set()  # retired tunnels waiting for their flows to end


def _retire(tunnel: AnyTunnel, grace: float | None, code: str, reason: str) -> None:
    """Drain a tunnel that another one replaces: GOAWAY now, close once its flows ended (or after
    ``grace`` seconds; None: however long they run)."""
    tunnel.goaway(code, reason)
    close_when_idle(tunnel, code, reason, grace, keep=_retiring)
