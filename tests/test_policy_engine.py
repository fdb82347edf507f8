"""The edge's per-flow access decision (``dataplane.access.policy``), on hand-built snapshots.

Covered: each identity check (unknown or disabled user, revoked session, expired token,
unknown / foreign / revoked device), assignment directly and through a group, each grant
(block, MFA, compliant device) under each condition (named location, device OS, user risk,
sign-in age), policy targeting (apps, users, groups, everyone), report-only, off, and the
order in which policies decide.
"""

from __future__ import annotations

import pytest

from dataplane.access.policy import AccessIndex, Principal
from dataplane.contract.snapshot import (
    ConfigSnapshot,
    SnapApp,
    SnapConditions,
    SnapDevice,
    SnapLocation,
    SnapPolicy,
    SnapUser,
)

pytestmark = pytest.mark.timeout(30)

NOW = 1_900_000_000
KEY = {"kty": "OKP", "crv": "Ed25519", "x": "AAAA", "kid": "k1"}


def snapshot(*policies: SnapPolicy, **changes: object) -> ConfigSnapshot:
    base = dict(
        version=7, issued_at="t", token_keys=[KEY],
        applications=[SnapApp(name="Finance RDP", kind="per_app", connector_group="default", users=["u-alice"]),
                      SnapApp(name="Wiki", kind="per_app", connector_group="default", groups=["g-staff"]),
                      SnapApp(name="Nobody", kind="per_app", connector_group="default")],
        users=[SnapUser(id="u-alice", upn="alice@corp.example", groups=["g-staff"]),
               SnapUser(id="u-bob", upn="bob@corp.example", groups=["g-staff"], risk="high"),
               SnapUser(id="u-carol", upn="carol@corp.example", disabled=True)],
        devices=[SnapDevice(id="d-alice", user_id="u-alice", os="Windows", compliant=True),
                 SnapDevice(id="d-bob", user_id="u-bob", os="linux"),
                 SnapDevice(id="d-old", user_id="u-alice", os="Windows", revoked=True)],
        locations=[SnapLocation(name="office", cidrs=["198.51.100.0/24", "2001:db8::/32"])],
        policies=list(policies),
    )
    base.update(changes)
    return ConfigSnapshot(**base)  # type: ignore[arg-type]


def who(user: str = "u-alice", device: str = "d-alice", amr: tuple[str, ...] = ("pwd",), auth_age: int = 60,
        expires_in: int = 3000, session: str = "s-1") -> Principal:
    upn = {"u-alice": "alice@corp.example", "u-bob": "bob@corp.example"}.get(user, "x@corp.example")
    return Principal(user_id=user, upn=upn, session_id=session, device_id=device, amr=amr,
                     auth_time=NOW - auth_age, expires=NOW + expires_in)


def policy(pid: int, grant: str, state: str = "on", **kw: object) -> SnapPolicy:
    conditions = kw.pop("conditions", SnapConditions())
    return SnapPolicy(id=pid, name=f"p{pid}-{grant}", state=state, grant=grant,  # type: ignore[arg-type]
                      conditions=conditions, **kw)  # type: ignore[arg-type]


def decide(index: AccessIndex, principal: Principal, app: str = "Finance RDP", source: str = "203.0.113.9:5000"):
    return index.decide(principal, app, source, NOW)


def test_an_assigned_user_on_a_known_device_is_allowed() -> None:
    index = AccessIndex(snapshot())
    assert index.enforcing
    d = decide(index, who())
    assert (d.action, d.code, d.applied) == ("allow", "", ())
    assert decide(index, who(), app="Wiki").allowed  # through group g-staff


@pytest.mark.parametrize(("principal", "app", "code", "reason"), [
    (who(user="u-zed"), "Wiki", "user_unknown", "user x@corp.example is not known here: sign in again"),
    (who(user="u-carol"), "Wiki", "user_disabled", "the account carol@corp.example is disabled"),
    (who(session="s-revoked"), "Wiki", "session_revoked", "the sign-in session was revoked: sign in again"),
    (who(expires_in=-61), "Wiki", "token_expired",
     "the access token has expired: the client must refresh it or sign in again"),
    (who(device="d-none"), "Wiki", "device_unknown", "device d-none is not registered to alice@corp.example"),
    (who(device="d-bob"), "Wiki", "device_unknown", "device d-bob is not registered to alice@corp.example"),
    (who(device="d-old"), "Wiki", "device_revoked", "device d-old was revoked"),
    (who(user="u-bob", device="d-bob"), "Finance RDP", "not_assigned",
     "bob@corp.example is not assigned to application 'Finance RDP'"),
    (who(), "Nobody", "not_assigned", "alice@corp.example is not assigned to application 'Nobody'"),
])
def test_identity_and_assignment_refusals(principal: Principal, app: str, code: str, reason: str) -> None:
    d = decide(AccessIndex(snapshot(revoked_sessions=["s-revoked"])), principal, app)
    assert (d.action, d.code, d.reason) == ("deny", code, reason)


def test_a_token_within_the_clock_leeway_still_works() -> None:
    assert decide(AccessIndex(snapshot()), who(expires_in=-59)).allowed


def test_mfa_policy_denies_without_mfa_and_allows_with_it() -> None:
    index = AccessIndex(snapshot(policy(1, "require_mfa", applications=["Finance RDP"])))
    d = decide(index, who())
    assert (d.action, d.code, d.policy) == ("deny", "mfa_required", "p1-require_mfa")
    assert d.reason == ("MFA required for app 'Finance RDP' (policy 'p1-require_mfa'): sign in again with your "
                        "second factor")
    ok = decide(index, who(amr=("pwd", "mfa")))
    assert ok.allowed and ok.policy == "p1-require_mfa" and ok.applied[0].satisfied
    assert decide(index, who(), app="Wiki").allowed  # the policy targets Finance RDP only


def test_compliant_device_policy() -> None:
    index = AccessIndex(snapshot(policy(1, "require_compliant_device")))
    assert decide(index, who()).allowed  # d-alice is compliant
    d = decide(index, who(user="u-bob", device="d-bob"), app="Wiki")
    assert (d.code, d.reason) == ("device_not_compliant",
                                  "a compliant device is required for app 'Wiki' (policy 'p1-require_compliant_device')")


@pytest.mark.parametrize(("conditions", "source", "principal", "blocked"), [
    (SnapConditions(locations=["office"]), "198.51.100.7:4000", who(), True),
    (SnapConditions(locations=["office"]), "203.0.113.9:4000", who(), False),
    (SnapConditions(locations=["office"]), "2001:db8::5:4000", who(), True),
    (SnapConditions(locations=["office"]), "", who(), False),
    (SnapConditions(device_os=["windows"]), "203.0.113.9:1", who(), True),
    (SnapConditions(device_os=["macOS"]), "203.0.113.9:1", who(), False),
    (SnapConditions(user_risk_at_least="medium"), "203.0.113.9:1", who(user="u-bob", device="d-bob"), True),
    (SnapConditions(user_risk_at_least="medium"), "203.0.113.9:1", who(), False),
    (SnapConditions(signin_older_than=3600), "203.0.113.9:1", who(auth_age=3601), True),
    (SnapConditions(signin_older_than=3600), "203.0.113.9:1", who(auth_age=3600), False),
    (SnapConditions(locations=["office"], device_os=["windows"]), "198.51.100.1:1", who(), True),
    (SnapConditions(locations=["office"], device_os=["linux"]), "198.51.100.1:1", who(), False),
])
def test_conditions_decide_whether_a_policy_applies(conditions: SnapConditions, source: str, principal: Principal,
                                                    blocked: bool) -> None:
    index = AccessIndex(snapshot(policy(1, "block", conditions=conditions)))
    d = decide(index, principal, app="Wiki", source=source)
    assert d.allowed is not blocked
    if blocked:
        assert (d.code, d.reason) == ("blocked_by_policy", "access to 'Wiki' is blocked by policy 'p1-block'")


def test_policy_targets_users_and_groups() -> None:
    for targets, alice_blocked, bob_blocked in [
        ({}, True, True), ({"users": ["u-alice"]}, True, False), ({"groups": ["g-staff"]}, True, True),
        ({"groups": ["g-other"]}, False, False), ({"users": ["u-bob"], "groups": ["g-none"]}, False, True),
    ]:
        index = AccessIndex(snapshot(policy(1, "block", **targets)))
        assert decide(index, who(), app="Wiki").allowed is not alice_blocked, targets
        assert decide(index, who(user="u-bob", device="d-bob"), app="Wiki").allowed is not bob_blocked, targets


def test_report_only_never_denies_but_reports_and_off_is_ignored() -> None:
    index = AccessIndex(snapshot(policy(1, "block", state="report_only"), policy(2, "require_mfa", state="off")))
    d = decide(index, who())
    assert d.allowed and d.policy == "p1-block"
    assert [(p.policy, p.state, p.satisfied) for p in d.report] == [("p1-block", "report_only", False)]
    assert [p.policy for p in d.applied] == ["p1-block"]


def test_the_first_unmet_policy_by_id_names_the_denial_and_all_applied_are_listed() -> None:
    index = AccessIndex(snapshot(policy(5, "block"), policy(2, "require_mfa"), policy(9, "require_compliant_device")))
    d = decide(index, who())
    assert (d.code, d.policy) == ("mfa_required", "p2-require_mfa")
    assert [(p.policy, p.satisfied) for p in d.applied] == [
        ("p2-require_mfa", False), ("p5-block", False), ("p9-require_compliant_device", True)]


def test_without_token_keys_nothing_is_enforced() -> None:
    assert not AccessIndex(snapshot(token_keys=[])).enforcing
