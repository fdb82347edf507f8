"""Tests of control/store/assignments.py, named_locations.py and policies.py on a real SQLite
store: application assignments, named locations and conditional-access policies, each change
with its audit record and configuration version, and every refusal with its exact message.

Users and groups are made with ``control.store.users`` and ``user_groups`` (tested on their
own); the functions under test look them up by id, UPN or group name.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from control.store import (
    Store,
    StoreError,
    applications,
    assignments,
    config_version,
    named_locations,
    open_store,
    policies,
    user_groups,
    users,
)
from control.store.audit import list_audit
from control.store.models import AccessPolicy, AppAssignment, AuditRecord, UserGroup

pytestmark = pytest.mark.timeout(60)

ACTOR = "admin-key:tests"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(f"sqlite:///{tmp_path / 'data' / 'control.db'}") as opened:
        yield opened


def add_user(session: Session, upn: str, *groups: str) -> str:
    """A user (``users.create_user``) who is a member of ``groups`` (created when new)."""
    user = users.create_user(session, ACTOR, upn)
    for name in groups:
        if session.scalar(select(UserGroup.id).where(UserGroup.name == name)) is None:
            user_groups.create_user_group(session, ACTOR, name)
        user_groups.add_group_member(session, ACTOR, name, user.id)
    return user.id


def group_id(session: Session, name: str) -> str:
    return session.scalars(select(UserGroup.id).where(UserGroup.name == name)).one()


@pytest.fixture
def directory(store: Store) -> dict[str, str]:
    """Applications wiki, rdp; users alice (staff), bob (staff, admins); groups staff, admins, empty."""
    with store.begin() as session:
        applications.create_application(session, ACTOR, "wiki",
                                        segments=[{"destination": "wiki.corp.example", "ports": 443}])
        applications.create_application(session, ACTOR, "rdp", segments=[{"destination": "10.1.0.0/16", "ports": 3389}])
        ids = {"alice": add_user(session, "Alice@Corp.Example", "staff"),
               "bob": add_user(session, "bob@corp.example", "staff", "admins")}
        user_groups.create_user_group(session, ACTOR, "empty")
        ids |= {g: group_id(session, g) for g in ("staff", "admins", "empty")}
    return ids


def refused(store: Store, code: str, call: Any, *args: Any, **kwargs: Any) -> str:
    """The message of the ``StoreError`` that ``call`` raises (with ``code``); the store keeps nothing of it."""
    with store.read() as session:
        version = config_version.config_version(session)
    with store.begin() as session:
        with pytest.raises(StoreError) as info:
            call(session, *args, **kwargs)
        assert info.value.code == code, str(info.value)
    with store.read() as session:
        assert config_version.config_version(session) == version
    return str(info.value)


def last_audit(store: Store) -> AuditRecord:
    with store.read() as session:
        return list_audit(session, limit=1)[0]


def version(store: Store) -> int:
    with store.read() as session:
        return config_version.config_version(session)


# ---------------------------------------------------------------------------- assignments


def test_assign_by_upn_id_and_group_name_with_audit(store: Store, directory: dict[str, str]) -> None:
    start = version(store)
    with store.begin() as session:
        alice = assignments.assign_application(session, ACTOR, "wiki", user="ALICE@corp.example")  # UPNs: any case
        assert (alice.application, alice.user_id, alice.upn, alice.group_id) == ("wiki", directory["alice"],
                                                                                 "alice@corp.example", None)
        assignments.assign_application(session, ACTOR, "wiki", user=directory["bob"])  # by id
        assignments.assign_application(session, ACTOR, "wiki", group="staff")  # by name
        assignments.assign_application(session, ACTOR, "wiki", group=directory["admins"])  # by id
        assignments.assign_application(session, ACTOR, "rdp", group="admins")
    assert version(store) == start + 5
    record = last_audit(store)
    assert (record.actor, record.action, record.object_type) == (ACTOR, "app_assignment.create", "app_assignment")
    assert record.after == {"id": int(record.object_id), "application": "rdp", "user_id": None, "upn": None,
                            "group_id": directory["admins"], "group": "admins"}
    with store.read() as session:
        listed = assignments.list_assignments(session, "wiki")
    # Users by UPN, then groups by name.
    assert [(v.upn, v.group) for v in listed] == [("alice@corp.example", None), ("bob@corp.example", None),
                                                  (None, "admins"), (None, "staff")]

    with store.begin() as session:
        assignments.unassign_application(session, ACTOR, "wiki", user="alice@corp.example")
        assignments.unassign_application(session, ACTOR, "wiki", group="staff")
    record = last_audit(store)
    assert (record.action, record.after, record.before["group"]) == ("app_assignment.delete", None, "staff")
    with store.read() as session:
        assert [(v.upn, v.group) for v in assignments.list_assignments(session, "wiki")] == [
            ("bob@corp.example", None), (None, "admins")]
    assert version(store) == start + 7


def test_assignment_refusals(store: Store, directory: dict[str, str]) -> None:
    with store.begin() as session:
        assignments.assign_application(session, ACTOR, "wiki", user="alice@corp.example")
        assignments.assign_application(session, ACTOR, "wiki", group="staff")
    assign, unassign = assignments.assign_application, assignments.unassign_application
    assert refused(store, "conflict", assign, ACTOR, "wiki", user=directory["alice"]) == (
        "application 'wiki' is already assigned to user 'alice@corp.example'")
    assert refused(store, "conflict", assign, ACTOR, "wiki", group=directory["staff"]) == (
        "application 'wiki' is already assigned to group 'staff'")
    assert refused(store, "not_found", assign, ACTOR, "payroll", user="alice@corp.example") == (
        "application 'payroll' does not exist")
    assert refused(store, "not_found", assign, ACTOR, "wiki", user="carol@corp.example") == (
        "user 'carol@corp.example' does not exist")
    assert refused(store, "not_found", assign, ACTOR, "wiki", group="contractors") == (
        "user group 'contractors' does not exist")
    both = "an assignment names exactly one target: a user (id or UPN) or a group (id or name)"
    assert refused(store, "invalid", assign, ACTOR, "wiki", user="bob@corp.example", group="staff") == both
    assert refused(store, "invalid", assign, ACTOR, "wiki") == both
    assert refused(store, "invalid", assign, ACTOR, "wiki", user="  ") == "user (id or UPN) must be a non-empty string"
    assert refused(store, "not_found", unassign, ACTOR, "wiki", user="bob@corp.example") == (
        "application 'wiki' is not assigned to user 'bob@corp.example'")
    assert refused(store, "not_found", unassign, ACTOR, "rdp", group="staff") == (
        "application 'rdp' is not assigned to group 'staff'")
    with store.read() as session:
        assert len(assignments.list_assignments(session, "wiki")) == 2


def test_assignments_go_with_their_application_user_or_group(store: Store, directory: dict[str, str]) -> None:
    with store.begin() as session:
        assignments.assign_application(session, ACTOR, "wiki", user="alice@corp.example")
        assignments.assign_application(session, ACTOR, "wiki", user="bob@corp.example")
        assignments.assign_application(session, ACTOR, "wiki", group="admins")
        assignments.assign_application(session, ACTOR, "rdp", group="staff")
    with store.begin() as session:
        users.delete_user(session, ACTOR, directory["bob"])
        user_groups.delete_user_group(session, ACTOR, "admins")
    with store.read() as session:
        assert [(v.upn, v.group) for v in assignments.list_assignments(session, "wiki")] == [
            ("alice@corp.example", None)]
    with store.begin() as session:
        applications.delete_application(session, ACTOR, "wiki")
    with store.read() as session:
        rows = session.execute(select(AppAssignment.group_id)).scalars().all()
    assert rows == [directory["staff"]]  # only rdp's assignment is left


# ---------------------------------------------------------------------------- named locations


def test_named_locations_are_stored_canonical_and_audited(store: Store) -> None:
    start = version(store)
    with store.begin() as session:
        location = named_locations.create_location(session, ACTOR, " office ",
                                                   ["10.1.2.3/8", " 2001:DB8::1/32", "198.51.100.7"])
        assert (location.name, named_locations.location_cidrs(location)) == (
            "office", ["10.0.0.0/8", "2001:db8::/32", "198.51.100.7/32"])
        named_locations.create_location(session, ACTOR, "branch", ["192.0.2.0/24"])
    assert version(store) == start + 2
    record = last_audit(store)
    assert (record.action, record.after["name"], record.after["cidrs"]) == (
        "named_location.create", "branch", ["192.0.2.0/24"])
    with store.begin() as session:
        named_locations.update_location(session, ACTOR, "office", cidrs=["10.0.0.0/8", "2001:db8::/32", "198.51.100.7"])
    assert version(store) == start + 2  # the same networks: nothing changed, nothing recorded
    with store.begin() as session:
        named_locations.update_location(session, ACTOR, "office", cidrs=["172.16.0.0/12"])
    record = last_audit(store)
    assert (record.action, record.before["cidrs"], record.after["cidrs"]) == (
        "named_location.update", ["10.0.0.0/8", "2001:db8::/32", "198.51.100.7/32"], ["172.16.0.0/12"])
    with store.begin() as session:
        named_locations.delete_location(session, ACTOR, "branch")
    with store.read() as session:
        assert [loc.name for loc in named_locations.list_locations(session)] == ["office"]
    assert last_audit(store).action == "named_location.delete"
    assert version(store) == start + 4


@pytest.mark.parametrize(("cidrs", "code", "message"), [
    (["10.0.0.0/8", "10.0.0.300/8"], "invalid",
     "named location 'lab': entry 2 '10.0.0.300/8' is not an IP network (expected an address or a CIDR such as "
     "10.0.0.0/8 or 2001:db8::/32)"),
    (["corp.example"], "invalid", "named location 'lab': entry 1 'corp.example' is not an IP network (expected an "
                                  "address or a CIDR such as 10.0.0.0/8 or 2001:db8::/32)"),
    (["10.0.0.0/33"], "invalid", "named location 'lab': entry 1 '10.0.0.0/33' is not an IP network (expected an "
                                 "address or a CIDR such as 10.0.0.0/8 or 2001:db8::/32)"),
    (["10.0.0.0/8", 7], "invalid", "named location 'lab': entry 2 (7) must be a network such as 10.0.0.0/8"),
    (["10.0.0.0/8", "192.0.2.0/24", "10.9.9.9/8"], "invalid",
     "named location 'lab': entry 3 '10.9.9.9/8' is the same network as entry 1 (10.0.0.0/8)"),
    ([], "invalid", "named location 'lab' needs at least one network"),
    ("10.0.0.0/8", "invalid", "named location 'lab': cidrs must be a list of networks such as ['10.0.0.0/8', "
                              "'2001:db8::/32']"),
    ([f"10.{i // 256}.{i % 256}.0/24" for i in range(1001)], "invalid",
     "named location 'lab' has 1001 networks; at most 1000 are allowed"),
])
def test_bad_location_networks_are_named(store: Store, cidrs: Any, code: str, message: str) -> None:
    assert refused(store, code, named_locations.create_location, ACTOR, "lab", cidrs) == message
    with store.read() as session:
        assert named_locations.list_locations(session) == []


def test_location_limits_and_name_conflicts(store: Store) -> None:
    with store.begin() as session:
        named_locations.create_location(session, ACTOR, "big", [f"10.{i // 256}.{i % 256}.0/24" for i in range(1000)])
        named_locations.create_location(session, ACTOR, "home", ["192.0.2.0/24"])
    assert refused(store, "conflict", named_locations.create_location, ACTOR, "home", ["198.51.100.0/24"]) == (
        "named location 'home' already exists")
    assert refused(store, "conflict", named_locations.update_location, ACTOR, "big", new_name="home") == (
        "named location 'home' already exists")
    assert refused(store, "not_found", named_locations.update_location, ACTOR, "away", cidrs=["192.0.2.0/24"]) == (
        "named location 'away' does not exist")
    assert refused(store, "not_found", named_locations.delete_location, ACTOR, "away") == \
        "named location 'away' does not exist"
    assert refused(store, "invalid", named_locations.create_location, ACTOR, "", ["192.0.2.0/24"]) == (
        "named location name must be a non-empty string")
    with store.read() as session:
        assert len(named_locations.location_cidrs(named_locations.get_location(session, "big"))) == 1000


def test_renaming_a_location_renames_it_in_policies_and_deleting_a_used_one_is_refused(
        store: Store, directory: dict[str, str]) -> None:
    with store.begin() as session:
        named_locations.create_location(session, ACTOR, "office", ["198.51.100.0/24"])
        named_locations.create_location(session, ACTOR, "vpn", ["203.0.113.0/24"])
        policies.create_policy(session, ACTOR, "block-outside", grant="block", conditions={"locations": ["office"]})
        policies.create_policy(session, ACTOR, "mfa-office", grant="require_mfa",
                               conditions={"locations": ["vpn", "office"], "user_risk_at_least": "low"})
    assert refused(store, "conflict", named_locations.delete_location, ACTOR, "office") == (
        "named location 'office' is used by policies 'block-outside', 'mfa-office': remove it from their conditions "
        "first")
    assert refused(store, "conflict", named_locations.delete_location, ACTOR, "vpn") == (
        "named location 'vpn' is used by policy 'mfa-office': remove it from its conditions first")
    start = version(store)
    with store.begin() as session:
        named_locations.update_location(session, ACTOR, "office", new_name="hq")
    with store.read() as session:
        conditions = {p.name: p.conditions for p in policies.list_policies(session)}
        actions = [r.action for r in list_audit(session, limit=3)]
    assert conditions == {"block-outside": {"locations": ["hq"]},
                        "mfa-office": {"locations": ["vpn", "hq"], "user_risk_at_least": "low"}}
    assert sorted(actions) == ["access_policy.update", "access_policy.update", "named_location.update"]
    assert version(store) == start + 3
    with store.begin() as session:
        policies.update_policy(session, ACTOR, "mfa-office", conditions={"locations": ["hq"]})
        named_locations.delete_location(session, ACTOR, "vpn")
    with store.read() as session:
        assert [loc.name for loc in named_locations.list_locations(session)] == ["hq"]


# ---------------------------------------------------------------------------- policies


def test_create_a_policy_stores_ids_and_shows_names(store: Store, directory: dict[str, str]) -> None:
    with store.begin() as session:
        named_locations.create_location(session, ACTOR, "office", ["198.51.100.0/24"])
    start = version(store)
    with store.begin() as session:
        policy = policies.create_policy(
            session, ACTOR, "mfa-for-rdp", grant="require_mfa", state="report_only", applications=["rdp", "wiki"],
            users=["Alice@corp.example"], groups=["admins", directory["staff"]],
            conditions={"locations": ["office"], "device_os": [" Windows ", "macOS"], "user_risk_at_least": "medium",
                        "signin_older_than": 3600})
        wiki = applications.get_application(session, "wiki").id
        rdp = applications.get_application(session, "rdp").id
    assert version(store) == start + 1
    assert (policy.state, policy.grant_control, policy.applications) == ("report_only", "require_mfa", [rdp, wiki])
    assert (policy.users, policy.groups) == ([directory["alice"]], [directory["admins"], directory["staff"]])
    assert policy.conditions == {"locations": ["office"], "device_os": ["Windows", "macOS"],
                                 "user_risk_at_least": "medium", "signin_older_than": 3600}
    record = last_audit(store)
    assert (record.action, record.object_type, record.object_id) == ("access_policy.create", "access_policy",
                                                                     str(policy.id))
    assert record.after["applications"] == [{"id": rdp, "name": "rdp"}, {"id": wiki, "name": "wiki"}]
    assert record.after["users"] == [{"id": directory["alice"], "upn": "alice@corp.example"}]
    assert record.after["groups"] == [{"id": directory["admins"], "name": "admins"},
                                      {"id": directory["staff"], "name": "staff"}]
    # Empty conditions (and a zero sign-in age) are not stored; defaults: state on, everyone.
    with store.begin() as session:
        everyone = policies.create_policy(session, ACTOR, "block-high-risk", grant="block",
                                          conditions={"device_os": [], "signin_older_than": 0, "locations": None})
        assert (everyone.state, everyone.applications, everyone.users, everyone.groups, everyone.conditions) == (
            "on", [], [], [], {})
    # A renamed application stays targeted (ids are stored); views show the new name.
    with store.begin() as session:
        applications.update_application(session, ACTOR, "rdp", new_name="rdp-finance")
    with store.read() as session:
        (view,) = policies.policy_views(session, [policies.get_policy(session, "mfa-for-rdp")])
    assert view.applications == [(rdp, "rdp-finance"), (wiki, "wiki")]


@pytest.mark.parametrize(("kwargs", "code", "message"), [
    ({"grant": "allow"}, "invalid", "policy 'p': grant 'allow' is not one of block, require_mfa, "
                                    "require_compliant_device"),
    ({"grant": "block", "state": "enabled"}, "invalid", "policy 'p': state 'enabled' is not one of on, off, "
                                                        "report_only"),
    ({"grant": "block", "applications": ["wiki", "payroll"]}, "not_found",
     "policy 'p': application 'payroll' does not exist"),
    ({"grant": "block", "applications": ["wiki", "wiki"]}, "invalid", "policy 'p': application 'wiki' is listed twice"),
    ({"grant": "block", "applications": "wiki"}, "invalid", "policy 'p': applications must be a list, not str"),
    ({"grant": "block", "users": ["carol@corp.example"]}, "not_found",
     "policy 'p': user 'carol@corp.example' does not exist"),
    ({"grant": "block", "users": ["alice@corp.example", "ALICE@corp.example"]}, "invalid",
     "policy 'p': user 'ALICE@corp.example' is listed twice (as 'alice@corp.example')"),
    ({"grant": "block", "groups": ["staff", "contractors"]}, "not_found",
     "policy 'p': user group 'contractors' does not exist"),
    ({"grant": "block", "conditions": {"locations": ["office"], "network": "corp"}}, "invalid",
     "policy 'p': unknown condition 'network' (known conditions: locations, device_os, user_risk_at_least, "
     "signin_older_than)"),
    ({"grant": "block", "conditions": ["locations"]}, "invalid",
     "policy 'p': conditions must be an object with the keys locations, device_os, user_risk_at_least, "
     "signin_older_than"),
    ({"grant": "block", "conditions": {"locations": ["home"]}}, "not_found",
     "policy 'p': named location 'home' does not exist"),
    ({"grant": "block", "conditions": {"locations": ["office", "office"]}}, "invalid",
     "policy 'p': location 'office' is listed twice"),
    ({"grant": "block", "conditions": {"user_risk_at_least": "extreme"}}, "invalid",
     "policy 'p': user_risk_at_least 'extreme' is not one of low, medium, high"),
    ({"grant": "block", "conditions": {"user_risk_at_least": "none"}}, "invalid",
     "policy 'p': user_risk_at_least 'none' is not one of low, medium, high"),
    ({"grant": "block", "conditions": {"signin_older_than": 31536001}}, "invalid",
     "policy 'p': signin_older_than 31536001 must be a number of seconds from 0 to 31536000"),
    ({"grant": "block", "conditions": {"signin_older_than": -1}}, "invalid",
     "policy 'p': signin_older_than -1 must be a number of seconds from 0 to 31536000"),
    ({"grant": "block", "conditions": {"signin_older_than": True}}, "invalid",
     "policy 'p': signin_older_than True must be a number of seconds from 0 to 31536000"),
    ({"grant": "block", "conditions": {"signin_older_than": "1h"}}, "invalid",
     "policy 'p': signin_older_than '1h' must be a number of seconds from 0 to 31536000"),
    ({"grant": "block", "conditions": {"device_os": ["Windows", ""]}}, "invalid",
     "policy 'p': device_os entry '' must be a non-empty string such as 'Windows'"),
    ({"grant": "block", "conditions": {"device_os": ["x" * 65]}}, "invalid",
     "policy 'p': device_os entry 'xxxxxxxxxxxxxxxxxxxx'... is longer than 64 characters"),
    ({"grant": "block", "conditions": {"device_os": ["Windows", "windows"]}}, "invalid",
     "policy 'p': device OS 'windows' is listed twice (as 'Windows')"),
    ({"grant": "block", "conditions": {"device_os": [f"os{i}" for i in range(21)]}}, "invalid",
     "policy 'p': 21 device_os entries; at most 20 are allowed"),
])
def test_policy_refusals_name_the_culprit(store: Store, directory: dict[str, str], kwargs: dict[str, Any],
                                          code: str, message: str) -> None:
    with store.begin() as session:
        named_locations.create_location(session, ACTOR, "office", ["198.51.100.0/24"])
    assert refused(store, code, policies.create_policy, ACTOR, "p", **kwargs) == message
    with store.read() as session:
        assert policies.list_policies(session) == []


def test_update_replaces_only_what_is_given_and_skips_no_ops(store: Store, directory: dict[str, str]) -> None:
    with store.begin() as session:
        named_locations.create_location(session, ACTOR, "office", ["198.51.100.0/24"])
        policies.create_policy(session, ACTOR, "p", grant="require_mfa", applications=["wiki"],
                               users=["alice@corp.example"],
                               conditions={"locations": ["office"], "user_risk_at_least": "high"})
    start = version(store)
    with store.begin() as session:
        policies.update_policy(session, ACTOR, "p", grant="require_mfa", applications=["wiki"],
                               conditions={"user_risk_at_least": "high", "locations": ["office"]})
    assert version(store) == start  # nothing changed: no audit record, no new version
    with store.begin() as session:
        policy = policies.update_policy(session, ACTOR, "p", new_name="p2", state="off", groups=["staff"],
                                        conditions={"device_os": ["Linux"]})
        assert (policy.name, policy.state, policy.grant_control) == ("p2", "off", "require_mfa")
        assert (policy.users, policy.groups) == ([directory["alice"]], [directory["staff"]])
        assert policy.conditions == {"device_os": ["Linux"]}  # conditions are replaced as a whole
    record = last_audit(store)
    assert (record.action, record.before["name"], record.after["name"]) == ("access_policy.update", "p", "p2")
    assert record.before["conditions"] == {"locations": ["office"], "user_risk_at_least": "high"}
    assert version(store) == start + 1
    with store.begin() as session:
        policies.create_policy(session, ACTOR, "other", grant="block")
    assert refused(store, "conflict", policies.update_policy, ACTOR, "p2", new_name="other") == (
        "policy 'other' already exists")
    assert refused(store, "invalid", policies.update_policy, ACTOR, "p2",
                   users=["bob@corp.example", directory["bob"]]) == (
        f"policy 'p2': user {directory['bob']!r} is listed twice (as 'bob@corp.example')")
    assert refused(store, "not_found", policies.update_policy, ACTOR, "p", state="on") == "policy 'p' does not exist"
    assert refused(store, "conflict", policies.create_policy, ACTOR, "other", grant="block") == (
        "policy 'other' already exists")
    with store.begin() as session:
        policies.delete_policy(session, ACTOR, "p2")
    record = last_audit(store)
    assert (record.action, record.before["name"], record.after) == ("access_policy.delete", "p2", None)
    assert refused(store, "not_found", policies.delete_policy, ACTOR, "p2") == "policy 'p2' does not exist"


def test_at_most_200_policies(store: Store) -> None:
    with store.begin() as session:
        for i in range(policies.MAX_POLICIES):
            policies.create_policy(session, ACTOR, f"p{i:03}", grant="block", state="off")
    assert refused(store, "conflict", policies.create_policy, ACTOR, "one-more", grant="block") == (
        "there are already 200 policies, the most allowed (200): delete one first")
    with store.begin() as session:
        policies.delete_policy(session, ACTOR, "p000")
        policies.create_policy(session, ACTOR, "one-more", grant="block")
        assert len(policies.list_policies(session)) == 200


def test_an_application_targeted_by_a_policy_cannot_be_deleted(store: Store, directory: dict[str, str]) -> None:
    with store.begin() as session:
        policies.create_policy(session, ACTOR, "mfa-wiki", grant="require_mfa", applications=["wiki"])
        policies.create_policy(session, ACTOR, "block-all", grant="block", applications=["wiki", "rdp"], state="off")
    assert refused(store, "conflict", applications.delete_application, ACTOR, "wiki") == (
        "application 'wiki' is targeted by policies 'block-all', 'mfa-wiki': remove the application from those "
        "policies (or delete those policies) first")
    with store.begin() as session:
        policies.delete_policy(session, ACTOR, "mfa-wiki")
        policies.update_policy(session, ACTOR, "block-all", applications=["rdp"])
        applications.delete_application(session, ACTOR, "wiki")
    assert refused(store, "conflict", applications.delete_application, ACTOR, "rdp") == (
        "application 'rdp' is targeted by policy 'block-all': remove the application from that policy (or delete "
        "that policy) first")


def test_a_refused_change_keeps_the_transaction_usable(store: Store, directory: dict[str, str]) -> None:
    with store.begin() as session:
        policies.create_policy(session, ACTOR, "kept", grant="block", applications=["wiki"])
        with pytest.raises(StoreError):
            policies.create_policy(session, ACTOR, "half", grant="block", applications=["wiki"], users=["nobody"])
        with pytest.raises(StoreError):
            assignments.assign_application(session, ACTOR, "wiki", group="nobody")
        assignments.assign_application(session, ACTOR, "wiki", group="staff")
    with store.read() as session:
        assert [p.name for p in session.scalars(select(AccessPolicy))] == ["kept"]
        assert [v.group for v in assignments.list_assignments(session, "wiki")] == ["staff"]
        actions = [r.action for r in list_audit(session, limit=2)]
    assert actions == ["app_assignment.create", "access_policy.create"]
