"""The forwarding profile's settings that client agents follow: the fail mode (one row, made by migration 0005)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from .audit import change, record_change, row_state
from .config_version import lock_config
from .errors import StoreError
from .models import FAIL_MODES, ForwardingProfile, utcnow


def forwarding_profile(session: Session) -> ForwardingProfile:
    """The one forwarding-profile row (migration 0005 creates it)."""
    row = session.get(ForwardingProfile, 1)
    if row is None:
        raise StoreError("not_found", "the forwarding profile is missing: run the control plane's migrations")
    return row


@change
def set_fail_mode(session: Session, actor: str, fail_mode: str) -> ForwardingProfile:
    """What client agents do with private destinations while no edge is reachable."""
    if fail_mode not in FAIL_MODES:
        raise StoreError("invalid", f"fail mode {fail_mode!r} must be one of {', '.join(FAIL_MODES)}")
    lock_config(session)
    row = forwarding_profile(session)
    if row.fail_mode == fail_mode:
        return row
    before = row_state(row)
    row.fail_mode = fail_mode
    row.updated_at = utcnow()
    session.flush()
    record_change(session, actor, "forwarding_profile.update", "forwarding_profile", row.id, before, row_state(row),
                  config=True)
    return row
