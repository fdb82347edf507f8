"""User groups and their members (named by id or name); applications and policies target them.

Every change here is configuration: edges decide flows from each user's groups.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .audit import change, record_change
from .config_version import lock_config
from .errors import StoreError
from .models import GroupMember, User, UserGroup, utcnow
from .users import MAX_DISPLAY_NAME, get_user
from .values import UUID_RE, iso, names_by_id, refuse_taken, valid_name

MAX_GROUPS_PER_USER = 100  # they all go into every access token, which must fit a HELLO (8192 characters)


def _group_state(group: UserGroup) -> dict[str, Any]:
    return {"id": group.id, "name": group.name, "created_at": iso(group.created_at)}


def list_user_groups(session: Session) -> list[UserGroup]:
    return list(session.scalars(select(UserGroup).order_by(UserGroup.name)))


def get_user_group(session: Session, ref: str) -> UserGroup:
    """The user group with id ``ref``, else the one named ``ref``."""
    group = None
    if isinstance(ref, str) and ref.strip():
        group = session.get(UserGroup, ref.strip()) or session.scalar(
            select(UserGroup).where(UserGroup.name == ref.strip()))
    if group is None:
        raise StoreError("not_found", f"user group {ref!r} does not exist")
    return group


def find_group(session: Session, ref: object) -> UserGroup:
    """The user group whose id or name is ``ref`` (``get_user_group``), ``ref`` checked first; else ``not_found``."""
    return get_user_group(session, valid_name(ref, "group (id or name)"))


def group_names_of(session: Session, ids: Iterable[str]) -> dict[str, str]:
    """The names of the user groups with these ids (ids of deleted groups left out)."""
    return names_by_id(session, UserGroup.id, UserGroup.name, ids)


def group_members(session: Session, ref: str) -> list[User]:
    """The members of a group, by UPN."""
    group = get_user_group(session, ref)
    return list(session.scalars(select(User).join(GroupMember, GroupMember.user_id == User.id)
                                .where(GroupMember.group_id == group.id).order_by(User.upn)))


def _group_name_free(session: Session, name: str) -> None:
    refuse_taken(session, UserGroup.name, name, "user group")
    if UUID_RE.fullmatch(name) and session.get(UserGroup, name) is not None:
        raise StoreError("conflict", f"user group name {name!r} is the id of another group")


@change
def create_user_group(session: Session, actor: str, name: str) -> UserGroup:
    lock_config(session)
    name = valid_name(name, "user group name", MAX_DISPLAY_NAME)
    _group_name_free(session, name)
    group = UserGroup(id=str(uuid.uuid4()), name=name, created_at=utcnow())
    session.add(group)
    session.flush()
    record_change(session, actor, "user_group.create", "user_group", group.id, None, _group_state(group),
                  config=True)
    return group


@change
def rename_user_group(session: Session, actor: str, ref: str, new_name: str) -> UserGroup:
    lock_config(session)
    group = get_user_group(session, ref)
    new_name = valid_name(new_name, "user group name", MAX_DISPLAY_NAME)
    if new_name == group.name:
        return group
    _group_name_free(session, new_name)
    before = _group_state(group)
    group.name = new_name
    session.flush()
    record_change(session, actor, "user_group.update", "user_group", group.id, before, _group_state(group),
                  config=True)
    return group


@change
def delete_user_group(session: Session, actor: str, ref: str) -> None:
    """Delete a group; its memberships and application assignments go with it (cascade)."""
    lock_config(session)
    group = get_user_group(session, ref)
    before = {**_group_state(group), "members": [u.id for u in group_members(session, group.id)]}
    session.delete(group)
    session.flush()
    session.expire_all()
    record_change(session, actor, "user_group.delete", "user_group", before["id"], before, None, config=True)


@change
def add_group_member(session: Session, actor: str, group_ref: str, user_ref: str) -> GroupMember:
    lock_config(session)
    group = get_user_group(session, group_ref)
    user = get_user(session, user_ref)
    if session.get(GroupMember, (group.id, user.id)) is not None:
        raise StoreError("conflict", f"user {user.upn!r} is already a member of group {group.name!r}")
    count = session.scalar(select(func.count()).select_from(GroupMember).where(GroupMember.user_id == user.id))
    if count is not None and count >= MAX_GROUPS_PER_USER:
        raise StoreError("conflict", f"user {user.upn!r} is already in {count} groups, the most a user may be in "
                                     f"({MAX_GROUPS_PER_USER}, every one goes into each access token)")
    member = GroupMember(group_id=group.id, user_id=user.id)
    session.add(member)
    session.flush()
    record_change(session, actor, "user_group.add_member", "user_group", group.id, None,
                  {"group": group.name, "user_id": user.id, "upn": user.upn}, config=True)
    return member


@change
def remove_group_member(session: Session, actor: str, group_ref: str, user_ref: str) -> None:
    lock_config(session)
    group = get_user_group(session, group_ref)
    user = get_user(session, user_ref)
    member = session.get(GroupMember, (group.id, user.id))
    if member is None:
        raise StoreError("not_found", f"user {user.upn!r} is not a member of group {group.name!r}")
    session.delete(member)
    session.flush()
    record_change(session, actor, "user_group.remove_member", "user_group", group.id,
                  {"group": group.name, "user_id": user.id, "upn": user.upn}, None, config=True)
