"""``GET /v1/node/presence?after=TAG&wait=S``: the presence map edges relay flows by.

Edges report the connectors they hold tunnels to in their heartbeats (``store.presence``);
an edge follows the map with this long-poll, apart from the configuration: the answer comes
as soon as the map's ``tag`` differs from ``after`` (a heartbeat that changes an edge's
report wakes the waiting requests of this process at once; a change recorded by another
control-plane process on the same database, or an edge going inactive, is seen within
``RECHECK`` seconds), or 204 after ``wait`` seconds without a change (or once the control plane
shuts down). Only edges may ask. A request reads the map itself first; while waiting, the
requests of a process share their reads (``PresenceWaiters.current``: one read at a time,
reused for half of ``RECHECK`` unless a heartbeat or a configuration change came since), so
the store is read a few times a second however many wait.
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio.to_thread
import msgspec
from litestar import Request, Response, get
from litestar.exceptions import PermissionDeniedException
from litestar.openapi.datastructures import ResponseSpec

from control.store import presence
from control.store.models import utcnow
from dataplane.contract.presence import Presence

from .guards import Api, NodeCaller, recheck_node, require_node
from .longpoll import MAX_WAIT, Wait

RECHECK = 1.0  # seconds between reads of the store while a request waits


class PresenceWaiters:
    """The presence long-polls of this process: woken when a heartbeat changed the map, and
    sharing their reads of it (``current``)."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()
        self._map: Presence | None = None
        self._read_at = 0.0
        self._version: int | None = None  # the configuration version when it was read (revocations)
        self._reading: asyncio.Task[Presence] | None = None

    def wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        self._map = None  # read again: a read under way may have begun before the change
        self._reading = None

    async def current(self, api: Api) -> Presence:
        """The map as the store has it: read once for every request asking meanwhile, and reused
        for ``RECHECK / 2`` seconds (not after a ``wake`` or a new configuration version). Each
        waiting request used to read and decode the whole map every second: one edge opening
        many long-polls made that the control plane's whole work."""
        loop = asyncio.get_running_loop()
        if (self._map is not None and loop.time() - self._read_at < RECHECK / 2
                and self._version == _version(api)):
            return self._map
        reading = self._reading
        if reading is None or reading.done():
            reading = self._reading = loop.create_task(self._read(api))
        return await asyncio.shield(reading)

    async def _read(self, api: Api) -> Presence:
        started, version = asyncio.get_running_loop().time(), _version(api)
        try:
            found = await anyio.to_thread.run_sync(_read, api)
        except BaseException:
            if self._reading is asyncio.current_task():
                self._reading = None
            raise
        if self._reading is asyncio.current_task():  # (not invalidated by a wake meanwhile)
            self._map, self._read_at, self._version, self._reading = found, started, version, None
        return found

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass


def _version(api: Api) -> int | None:
    """The configuration version the process serves (a revocation changes it)."""
    current = api.hub.current
    return current.version if current is not None else None


def presence_waiters(app: Any) -> PresenceWaiters:
    waiters = getattr(app.state, "presence_waiters", None)
    if waiters is None:
        waiters = app.state.presence_waiters = PresenceWaiters()
    return waiters


def _read(api: Api) -> Presence:
    with api.store.read() as session:
        return presence.presence_map(session, utcnow(), api.heartbeat_interval)


@get("/v1/node/presence", guards=[require_node], security=[{"nodeToken": []}], tags=["nodes"],
     responses={204: ResponseSpec(None, description="the map did not change within `wait` seconds")},
     media_type="application/json")
async def node_presence(request: Request, after: str = "", wait: Wait = 0.0) -> Response[bytes]:
    """The presence map once its tag differs from ``after``; 204 after ``wait`` seconds without a change."""
    node: NodeCaller = request.state.node
    if node.role != "edge":
        raise PermissionDeniedException(f"only edges follow the presence map; {node.role} {node.name!r} may not")
    api: Api = request.app.state.api
    waiters = presence_waiters(request.app)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(wait, MAX_WAIT)
    fresh = True  # the first read is the request's own: what it is answered at once is never stale
    while True:
        current = await anyio.to_thread.run_sync(_read, api) if fresh else await waiters.current(api)
        fresh = False
        if current.tag != after:
            if wait > 0:
                await recheck_node(api, node)
            return Response(msgspec.json.encode(current), status_code=200, media_type="application/json")
        left = deadline - loop.time()
        if left <= 0 or api.hub.closed:  # shutting down: answer now (within RECHECK at worst)
            return Response(b"", status_code=204, media_type="application/json")
        await waiters.wait(min(RECHECK, left))
