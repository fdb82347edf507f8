"""Private DNS suffixes: the domains client agents resolve through the fabric (``corp.example``)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from .audit import change, record_change, row_state
from .config_version import lock_config
from .errors import StoreError
from .models import DnsSuffix, utcnow
from .segments import parse_segments
from .values import refuse_taken


def list_dns_suffixes(session: Session) -> list[DnsSuffix]:
    return list(session.scalars(select(DnsSuffix).order_by(DnsSuffix.suffix)))


def _suffix(value: object) -> str:
    if not isinstance(value, str) or not value.strip().lstrip("."):
        raise StoreError("invalid", f"DNS suffix {value!r} must be a non-empty domain name")
    try:
        (parsed,) = parse_segments("dns", [{"destination": value.strip().lstrip("."), "ports": "53"}])
    except StoreError:
        parsed = None
    if parsed is None or parsed.kind != "hostname":
        raise StoreError("invalid", f"DNS suffix {value!r} is not a domain name")
    return parsed.destination


@change
def add_dns_suffix(session: Session, actor: str, suffix: str) -> DnsSuffix:
    """A private DNS suffix (``corp.example``; a leading dot or trailing dot is dropped)."""
    lock_config(session)
    name = _suffix(suffix)
    refuse_taken(session, DnsSuffix.suffix, name, "DNS suffix")
    row = DnsSuffix(suffix=name, created_at=utcnow())
    session.add(row)
    session.flush()
    record_change(session, actor, "dns_suffix.create", "dns_suffix", row.id, None, row_state(row), config=True)
    return row


@change
def remove_dns_suffix(session: Session, actor: str, suffix: str) -> None:
    lock_config(session)
    name = _suffix(suffix)
    row = session.scalar(select(DnsSuffix).where(DnsSuffix.suffix == name))
    if row is None:
        raise StoreError("not_found", f"DNS suffix {name!r} does not exist")
    before = row_state(row)
    session.delete(row)
    session.flush()
    record_change(session, actor, "dns_suffix.delete", "dns_suffix", before["id"], before, None, config=True)
