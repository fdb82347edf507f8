"""Application assignments: who an application is assigned to (users directly, or through groups).

At the edge a flow is allowed only to a user assigned directly or through a group. Users are
named by id or UPN, groups by id or name. (The schema's unique index cannot catch a
duplicate, since one of its columns is always NULL; ``assign_application`` checks it under
the configuration lock.) Every change is configuration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .applications import get_application
from .audit import change, record_change
from .config_version import lock_config
from .errors import StoreError
from .models import AppAssignment, Application, User, UserGroup
from .user_groups import find_group, group_names_of
from .users import find_user, upns_of


@dataclass(frozen=True)
class AssignmentView:
    """An assignment with names: exactly one of ``user_id`` (with ``upn``) and ``group_id`` (with ``group``)."""

    id: int
    application: str
    user_id: str | None
    upn: str | None
    group_id: str | None
    group: str | None

    def target(self) -> str:
        return f"user {self.upn!r}" if self.user_id is not None else f"group {self.group!r}"

    def state(self) -> dict[str, Any]:
        return {"id": self.id, "application": self.application, "user_id": self.user_id, "upn": self.upn,
                "group_id": self.group_id, "group": self.group}


def assignment_views(session: Session, app: Application, rows: Sequence[AppAssignment]) -> list[AssignmentView]:
    """``rows`` (assignments of ``app``) with UPNs and group names: users by UPN, then groups by name."""
    upns = upns_of(session, (r.user_id for r in rows if r.user_id is not None))
    groups = group_names_of(session, (r.group_id for r in rows if r.group_id is not None))
    views = [AssignmentView(id=r.id, application=app.name, user_id=r.user_id,
                            upn=None if r.user_id is None else upns.get(r.user_id),
                            group_id=r.group_id, group=None if r.group_id is None else groups.get(r.group_id))
             for r in rows]
    return sorted(views, key=lambda v: (v.user_id is None, v.upn or v.group or "", v.id))


def list_assignments(session: Session, app_name: str) -> list[AssignmentView]:
    """Who application ``app_name`` is assigned to (users by UPN, then groups by name)."""
    app = get_application(session, app_name)
    rows = list(session.scalars(select(AppAssignment).where(AppAssignment.application_id == app.id)))
    return assignment_views(session, app, rows)


def _target(session: Session, user: str | None, group: str | None) -> tuple[User | None, UserGroup | None]:
    if (user is None) == (group is None):
        raise StoreError("invalid", "an assignment names exactly one target: a user (id or UPN) or a group "
                                    "(id or name)")
    if user is not None:
        return find_user(session, user), None
    return None, find_group(session, group)


def _find_assignment(session: Session, app: Application, user: User | None,
                     group: UserGroup | None) -> AppAssignment | None:
    query = select(AppAssignment).where(AppAssignment.application_id == app.id)
    if user is not None:
        query = query.where(AppAssignment.user_id == user.id)
    else:
        assert group is not None
        query = query.where(AppAssignment.group_id == group.id)
    return session.scalar(query)


def _target_text(user: User | None, group: UserGroup | None) -> str:
    return f"user {user.upn!r}" if user is not None else f"group {group.name!r}"  # type: ignore[union-attr]


@change
def assign_application(session: Session, actor: str, app_name: str, *, user: str | None = None,
                       group: str | None = None) -> AssignmentView:
    """Assign application ``app_name`` to one user (id or UPN) or one group (id or name).

    Refused: ``not_found`` for an unknown application, user or group; ``conflict`` when the
    assignment exists already; ``invalid`` unless exactly one of ``user`` and ``group`` is given.
    """
    lock_config(session)
    app = get_application(session, app_name)
    target_user, target_group = _target(session, user, group)
    if _find_assignment(session, app, target_user, target_group) is not None:
        raise StoreError("conflict", f"application {app.name!r} is already assigned to "
                                     f"{_target_text(target_user, target_group)}")
    row = AppAssignment(application_id=app.id, user_id=target_user.id if target_user else None,
                        group_id=target_group.id if target_group else None)
    session.add(row)
    session.flush()
    (view,) = assignment_views(session, app, [row])
    record_change(session, actor, "app_assignment.create", "app_assignment", row.id, None, view.state(), config=True)
    return view


@change
def unassign_application(session: Session, actor: str, app_name: str, *, user: str | None = None,
                         group: str | None = None) -> None:
    """Remove the assignment of ``app_name`` to a user (id or UPN) or a group (id or name)."""
    lock_config(session)
    app = get_application(session, app_name)
    target_user, target_group = _target(session, user, group)
    row = _find_assignment(session, app, target_user, target_group)
    if row is None:
        raise StoreError("not_found", f"application {app.name!r} is not assigned to "
                                      f"{_target_text(target_user, target_group)}")
    (view,) = assignment_views(session, app, [row])
    session.delete(row)
    session.flush()
    record_change(session, actor, "app_assignment.delete", "app_assignment", view.id, view.state(), None, config=True)
