"""Process bootstrap shared by every node: TLS identity, wire limits, signals, reconnect backoff.

A node process (edge, connector, client) is started by ``dataplane.run``; this module
turns ``Settings`` into what the node needs and runs its main coroutine on uvloop with
SIGINT/SIGTERM wired to a stop event.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import random
import resource
import signal
import ssl
from collections.abc import Awaitable, Callable

import uvloop

from . import pki
from .settings import Settings, SettingsError
from .transport.proxy import dial_tls, egress_proxy
from .transport.tunnel import Tunnel, TunnelHandler, ssl_handshake_error
from .wire.connection import WireConfig

log = logging.getLogger("ferryman.dial")

SOFTWARE = "ferryman/0.1.0"


class NodeIdentity:
    """This node's certificate-backed identity and TLS contexts."""

    def __init__(self, settings: Settings, role: str) -> None:
        missing = [name for name, value in (("FERRYMAN_TLS_CA", settings.tls_ca),
                                            ("FERRYMAN_TLS_CERT", settings.tls_cert),
                                            ("FERRYMAN_TLS_KEY", settings.tls_key)) if not value]
        if missing:
            register = (f"register it (`ferryman {role} register --control URL --token T`), or "
                        if role in ("edge", "connector") else "")
            raise SettingsError(
                f"{', '.join(missing)} not set: {register}run `ferryman pki init DIR` and point the "
                f"FERRYMAN_TLS_* variables (or --ca/--cert/--key) at its files"
            )
        me = pki.load_identity(settings.tls_cert)
        if me.role != role:
            raise SettingsError(f"{settings.tls_cert} is a {me.role} certificate; a {role} needs a {role} certificate")
        self.role = role
        self.name = me.name
        self.settings = settings

    def server_context(self) -> ssl.SSLContext:
        s = self.settings
        return pki.server_context(s.tls_cert, s.tls_key, s.tls_ca)

    def client_context(self) -> ssl.SSLContext:
        s = self.settings
        return pki.client_context(s.tls_cert, s.tls_key, s.tls_ca)

    def wire_config(self, group: str = "") -> WireConfig:
        s = self.settings
        return WireConfig(
            role=self.role, node=self.name, group=group, max_frame=s.max_frame, window=s.flow_window,
            max_flows=s.max_flows, max_pending_opens=s.max_pending_opens, software=SOFTWARE,
        )


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


async def keep_tunnel(
    node: TunnelHandler,
    settings: Settings,
    wire: WireConfig | Callable[[], WireConfig],
    ssl_ctx: ssl.SSLContext | Callable[[], ssl.SSLContext],
    edges: list[tuple[str, int]],
    session: Callable[[Tunnel], Awaitable[None]],
    running: Callable[[], bool],
    *,
    first: int = 0,
    label: str = "",
) -> None:
    """Keep one tunnel to an edge up while ``running()``: dial (moving to the next edge
    after a failure), wait for the HELLO exchange, run ``session(tunnel)`` until it
    returns (normally when the tunnel ends), then back off with jitter and dial again.

    ``ssl_ctx`` and ``wire`` may be functions returning what to use for the next dial (a
    node whose certificate is renewed hands out the new context, a client its current
    access token in the HELLO); ``edges`` is read at every dial,
    so a node may replace its contents (new edges from the control plane)."""
    proxy = egress_proxy(settings)  # HTTP CONNECT proxy for TLS/TCP dials (None: direct)
    backoff = Backoff(settings.reconnect_min, settings.reconnect_max)
    attempt = 0
    while running():
        host, port = edges[(first + attempt) % len(edges)]
        context = ssl_ctx() if callable(ssl_ctx) else ssl_ctx
        config = wire() if callable(wire) else wire
        name = f"{label}{host}:{port}"
        try:
            _, tunnel = await dial_tls(
                lambda: Tunnel(node, config, dialer=True, accept_roles=("edge",),
                               keepalive=settings.keepalive_interval, handshake_timeout=settings.handshake_timeout,
                               write_buffer_high=settings.write_buffer_high, label=name),
                host, port, context, handshake_timeout=settings.handshake_timeout, proxy=proxy,
            )
            await tunnel.up_waiter
        except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
            delay = backoff.next()
            log.warning("edge unreachable", extra={"edge": f"{host}:{port}", "reason": ssl_handshake_error(exc),
                                                   "retry_in_s": round(delay, 2)})
        else:
            backoff.reset()
            await session(tunnel)
            if not running():
                return
            delay = backoff.next()
        attempt += 1
        node.stats.reconnects += 1
        await asyncio.sleep(delay)


def raise_nofile_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def tune_malloc() -> None:
    """Keep glibc from mapping and unmapping (or trimming) memory for every large buffer.

    Tunnel reads and writes allocate buffers of up to a few hundred KiB per call; by
    default glibc serves those with fresh mmaps or gives the heap top back after each
    free, and the page faults that follow cost about a third of the edge's CPU in bulk
    transfers. Memory stays bounded by the flow-control windows either way.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 * 1024 * 1024)
    mallopt(m_trim_threshold, 128 * 1024 * 1024)


def run_node(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)`` on uvloop; SIGINT/SIGTERM set ``stop``."""
    raise_nofile_limit()
    tune_malloc()

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    uvloop.run(runner())
