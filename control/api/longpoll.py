"""The configuration long-poll, shared by nodes (``GET /v1/node/config``) and client agents
(``GET /v1/client/profile``): the answer comes as soon as the configuration version is above
the one the caller holds (``after``), or after ``wait`` seconds without one (204 No Content).

``wait_snapshot`` waits on the hub (``control.snapshot.SnapshotHub``, at most ``MAX_WAIT``
seconds); ``config_response`` is the answer (the version in ``X-Ferryman-Config-Version``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated

from litestar import Response
from litestar.exceptions import HTTPException
from litestar.params import Parameter

from control.snapshot import TooManyWaiters
from dataplane.contract.snapshot import ConfigSnapshot

from .guards import Api

log = logging.getLogger("ferryman.control.nodes")

MAX_WAIT = 120.0  # seconds a configuration long-poll waits at most (longer asks are cut to this)
# The ``wait`` query parameter of both long-polls.
Wait = Annotated[float, Parameter(ge=0, description=f"seconds to wait for a newer version (at most {MAX_WAIT:g})")]


async def wait_snapshot(api: Api, after: int, wait: float, caller: str) -> ConfigSnapshot | None:
    """The configuration snapshot once its version is above ``after`` (None after ``wait``
    seconds without one). A caller ahead of the store (the database was restored from a
    backup) gets the current one at once; 503 before the first snapshot is loaded or when
    too many long-polls wait."""
    current = api.hub.current
    if current is None:
        raise HTTPException(status_code=503, detail="the configuration has not been loaded from the store yet; "
                                                    "retry in a moment")
    if after > current.version:
        log.warning("%s holds configuration version %d, above the store's %d (database restored?); it is "
                    "sent version %d", caller, after, current.version, current.version)
        return current
    try:
        return await api.hub.wait_newer(after, min(wait, MAX_WAIT))
    except TooManyWaiters as exc:
        raise HTTPException(status_code=503, detail=str(exc), headers={"Retry-After": "5"}) from None


def config_response(snapshot: ConfigSnapshot | None, body: Callable[[ConfigSnapshot], bytes]) -> Response[bytes]:
    """204 without a newer snapshot; else 200 with ``body(snapshot)`` (JSON) and the snapshot's version."""
    if snapshot is None:
        return Response(b"", status_code=204, media_type="application/json")
    return Response(body(snapshot), status_code=200, media_type="application/json",
                    headers={"X-Ferryman-Config-Version": str(snapshot.version)})
