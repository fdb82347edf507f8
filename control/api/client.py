"""The route signed-in client agents follow: their forwarding profile.

``GET /v1/client/profile?after=N&wait=S`` (``Authorization: Bearer <access token>``) answers
the profile (``dataplane.contract.snapshot.ClientProfile``: private applications' segments, private
DNS suffixes, fail mode, edges) once the configuration version is above ``N``, or 204
after waiting up to ``S`` seconds (the same long-poll as the nodes' configuration,
``longpoll.py``). The token's session must still be live: a revoked session, device or
disabled account gets 401 with the reason, so an agent learns it must sign in again. It is
checked when the request arrives and again after the wait: signing out (or any revocation)
bumps the configuration version, which wakes the session's own waiting poll, and that poll
must then be refused, not answered with the new profile.
"""

from __future__ import annotations

from typing import Annotated

import anyio.to_thread
import msgspec
from litestar import Request, Response, Router, get
from litestar.exceptions import HTTPException, NotAuthorizedException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter

from control.store import StoreError, sessions
from dataplane.contract.snapshot import client_profile

from .guards import Api, require_user
from .longpoll import Wait, config_response, wait_snapshot

_client_waiters = [0]  # profile long-polls waiting now (one event loop per control-plane process)


def _live(api: Api, session_id: str) -> None:
    with api.store.read() as session:
        sessions.active_session(session, session_id)


async def _require_live(api: Api, session_id: str) -> None:
    """401 (with the reason) unless the session may still act."""
    try:
        await anyio.to_thread.run_sync(_live, api, session_id)
    except StoreError as exc:
        raise NotAuthorizedException(f"access token refused: {exc}") from None


@get("/profile", guards=[require_user], security=[{"accessToken": []}],
     responses={204: ResponseSpec(None, description="no newer profile within `wait` seconds")},
     media_type="application/json")
async def profile(
    request: Request,
    after: Annotated[int, Parameter(ge=-1, description="the profile version the agent holds (-1: none)")] = -1,
    wait: Wait = 0.0,
) -> Response[bytes]:
    """The forwarding profile once its version is above ``after``; 204 after ``wait`` seconds without one."""
    api: Api = request.app.state.api
    sid = request.state.claims.sid
    await _require_live(api, sid)
    # Client agents may take at most half of the long-poll places: the rest stay for edges and
    # connectors, whose configuration (revocations) must never wait behind a large fleet of agents.
    hub = api.hub
    if wait > 0 and _client_waiters[0] >= hub.max_waiters // 2:
        raise HTTPException(status_code=503, detail=f"{_client_waiters[0]} client agents are already waiting for "
                                                    f"a profile change; retry shortly", headers={"Retry-After": "10"})
    _client_waiters[0] += 1
    try:
        snapshot = await wait_snapshot(api, after, wait, f"client session {sid}")
    finally:
        _client_waiters[0] -= 1
    if wait > 0:  # the session may have ended while the poll waited (its revocation is what woke it)
        await _require_live(api, sid)
    return config_response(snapshot, lambda s: msgspec.json.encode(client_profile(s)))


def client_router() -> Router:
    """The ``/v1/client`` routes (an access token, no admin key)."""
    return Router(path="/v1/client", route_handlers=[profile], security=[], tags=["clients"])
