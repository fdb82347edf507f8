"""The console's "test access": what an edge would decide for a user's device asking for a
destination, decided by the edges' own code (``dataplane.access.admission.admit``) over the
configuration snapshot the control plane serves them, built from the store as it is now.

The principal is the user on that device with their newest live sign-in session on it (its
``amr`` and sign-in time); without one, a fresh sign-in is assumed, with MFA or not as asked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from control.snapshot import build_snapshot
from control.store import StoreError, devices, sessions, users
from control.store.models import utcnow
from dataplane.access.admission import AccessRequest, AccessTables, Verdict, admit
from dataplane.access.apptable import app_table
from dataplane.access.policy import AccessIndex, Principal
from dataplane.contract.snapshot import SnapshotError

TOKEN_SECONDS = 300  # the assumed access token's remaining lifetime


@dataclass(frozen=True)
class Trial:
    """A test-access answer: the edge's verdict and what it was decided for."""

    verdict: Verdict
    upn: str
    device: str
    session: str  # which session the principal stands for ("" : an assumed fresh sign-in)
    amr: tuple[str, ...]
    enforcing: bool


def try_access(api: object, *, user: str, device_id: str, host: str, port: int, protocol: str, source: str,
               mfa: bool) -> Trial:
    """Decide as an edge would (see the module doc); ``StoreError`` for an unknown user or device."""
    store = api.store  # type: ignore[attr-defined]
    signer = api.token_signer  # type: ignore[attr-defined]
    if not 1 <= port <= 65535:
        raise StoreError("invalid", f"port must be 1-65535, not {port}")
    host = host.strip()
    if not host:
        raise StoreError("invalid", "give a destination host name or address")
    now = utcnow()
    with store.read() as session:
        person = users.get_user(session, user)
        device = devices.get_device(session, device_id)
        if device.user_id != person.id:
            raise StoreError("invalid", f"device {device_id} is registered to another user, not {person.upn}")
        live = [row for row in sessions.list_sessions(session, person.id)
                if row.device_id == device.id and sessions.session_status(row, now) == "active"]
        snapshot = build_snapshot(session, edges=api.edges_public, token_keys=signer.public_jwks(),  # type: ignore[attr-defined]
                                  token_issuer=signer.issuer, token_lifetime=signer.lifetime)
    try:
        apps = app_table(snapshot)
    except SnapshotError as exc:  # the store validates applications; kept for a clear message if not
        raise StoreError("invalid", f"the configuration's applications do not load: {exc}") from None
    access = AccessIndex(snapshot)
    tables = AccessTables(apps, dns_suffixes=snapshot.dns_suffixes, access=access)
    clock = time.time()
    if live:
        newest = max(live, key=lambda r: r.auth_time)
        amr = tuple(newest.amr.split(","))
        principal = Principal(user_id=person.id, upn=person.upn, session_id=newest.id, device_id=device.id, amr=amr,
                              auth_time=int(newest.auth_time.timestamp()), expires=int(clock) + TOKEN_SECONDS)
        used = newest.id
    else:
        amr = ("pwd", "mfa") if mfa else ("pwd",)
        principal = Principal(user_id=person.id, upn=person.upn, session_id="", device_id=device.id, amr=amr,
                              auth_time=int(clock), expires=int(clock) + TOKEN_SECONDS)
        used = ""
    verdict = admit(AccessRequest(host=host, port=port, protocol=protocol, source=source.strip()), principal, tables,
                    clock)
    return Trial(verdict=verdict, upn=person.upn, device=device.id, session=used, amr=amr, enforcing=tables.enforcing)
