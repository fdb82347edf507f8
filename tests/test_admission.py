"""Admission alone (``dataplane.access.admission.admit``): every verdict a request can get.

Hand-built snapshots and principals, no node and no clock: each test names the request,
who asks, the tables and ``now``, and checks the whole verdict (allowed, code, reason, the
application and segment, the principal and decision it carries, whether a refusal is a
traffic-log attempt, and the action/policy/rule a traffic record takes from it). Covered:
the protocols carried, a missing configuration, the private DNS name rule (with and without
an application covering the name), application matching (tcp and udp, per-app before quick
access), no identity enforced, sign-in required, each identity, assignment and policy
refusal (block, MFA, compliant device, named location of the source, token expiry at
``now``), report-only, and the re-check of a live flow (its application kept, the
destination not matched again).
"""

from __future__ import annotations

import pytest

from dataplane.access.admission import AccessRequest, AccessTables, Unauthenticated, Verdict, admit
from dataplane.access.apptable import app_table
from dataplane.access.policy import AccessIndex, Principal
from dataplane.contract.snapshot import (
    ConfigSnapshot,
    SnapApp,
    SnapConditions,
    SnapDevice,
    SnapLocation,
    SnapPolicy,
    SnapSegment,
    SnapUser,
)

pytestmark = pytest.mark.timeout(30)

NOW = 1_900_000_000.0
KEY = {"kty": "OKP", "crv": "Ed25519", "x": "AAAA", "kid": "k1"}
SOURCE = "203.0.113.9:5000"
ALICE = Principal(user_id="u-alice", upn="alice@corp.example", session_id="s-1", device_id="d-alice", amr=("pwd",),
                  auth_time=int(NOW) - 60, expires=int(NOW) + 3000)
MALLORY = Principal(user_id="u-mallory", upn="mallory@corp.example", session_id="s-2", device_id="d-mallory",
                    amr=("pwd", "mfa"), auth_time=int(NOW) - 60, expires=int(NOW) + 3000)


def snapshot(*policies: SnapPolicy, token_keys: bool = True) -> ConfigSnapshot:
    return ConfigSnapshot(
        version=3, issued_at="t", token_keys=[KEY] if token_keys else [], dns_suffixes=["Corp.Example."],
        applications=[
            SnapApp(name="Finance RDP", kind="per_app", connector_group="finance", users=["u-alice"],
                    segments=[SnapSegment(destination="10.20.0.0/16", ports="3389")]),
            SnapApp(name="Wiki", kind="per_app", connector_group="default", groups=["g-staff"],
                    segments=[SnapSegment(destination="wiki.corp.example", ports="443"),
                              SnapSegment(destination="10.30.0.53", ports="53", protocol="udp")]),
            SnapApp(name="Quick Access", kind="quick_access", connector_group="qa", users=["u-alice"],
                    segments=[SnapSegment(destination="10.0.0.0/8", ports="1-65535")]),
        ],
        users=[SnapUser(id="u-alice", upn="alice@corp.example", groups=["g-staff"]),
               SnapUser(id="u-mallory", upn="mallory@corp.example", disabled=True)],
        devices=[SnapDevice(id="d-alice", user_id="u-alice", os="Windows", compliant=False),
                 SnapDevice(id="d-mallory", user_id="u-mallory", os="linux")],
        locations=[SnapLocation(name="office", cidrs=["198.51.100.0/24"])],
        policies=list(policies),
    )


def tables(*policies: SnapPolicy, token_keys: bool = True) -> AccessTables:
    snap = snapshot(*policies, token_keys=token_keys)
    return AccessTables(app_table(snap), dns_suffixes=snap.dns_suffixes, access=AccessIndex(snap))


def request(host: str = "10.20.0.5", port: int = 3389, protocol: str = "tcp", source: str = SOURCE,
            application: str | None = None) -> AccessRequest:
    return AccessRequest(host=host, port=port, protocol=protocol, source=source, application=application)


def app_of(verdict: Verdict) -> str:
    assert verdict.match is not None
    return verdict.match.app.name


def policy(pid: int, grant: str, state: str = "on", **kw: object) -> SnapPolicy:
    return SnapPolicy(id=pid, name=f"p{pid}", state=state, grant=grant, **kw)  # type: ignore[arg-type]


def refused(verdict: Verdict) -> tuple[bool, str, str]:
    return verdict.allowed, verdict.code, verdict.reason


# ---------------------------------------------------------------------------- what a request is for


@pytest.mark.parametrize("protocol", ["sctp", "http", ""])
def test_a_protocol_the_fabric_does_not_carry_is_refused_before_anything_else(protocol: str) -> None:
    verdict = admit(request(protocol=protocol), Unauthenticated(), tables(), NOW)
    assert refused(verdict) == (False, "unsupported_protocol",
                                f"{protocol!r} flows are not supported (tcp, udp or dns)")
    assert verdict.recorded is False and verdict.match is None and verdict.action == "deny"


def test_nothing_is_admitted_without_a_configuration() -> None:
    empty = AccessTables(app_table(ConfigSnapshot(version=0, issued_at="t")),
                         unconfigured="edge e1 has not received its configuration from the control plane yet")
    verdict = admit(request(), ALICE, empty, NOW)
    assert refused(verdict) == (False, "no_config",
                                "edge e1 has not received its configuration from the control plane yet")
    assert verdict.recorded is False


def test_a_dns_query_must_name_a_private_host() -> None:
    verdict = admit(request("www.example.org", 53, "dns"), ALICE, tables(), NOW)
    assert refused(verdict) == (False, "not_private_name",
                                "www.example.org is not under a private DNS suffix (corp.example)")
    assert verdict.recorded is True and verdict.match is None
    none = AccessTables(tables().apps)
    assert admit(request("db.corp.example", 53, "dns"), ALICE, none, NOW).reason == \
        "db.corp.example is not under a private DNS suffix (none are configured)"


def test_a_private_name_belongs_to_the_application_whose_name_segment_covers_it() -> None:
    verdict = admit(request("WIKI.corp.example.", 53, "dns"), ALICE, tables(), NOW)
    assert verdict.allowed and verdict.match is not None and verdict.match.app.name == "Wiki"
    assert verdict.decision is not None and verdict.decision.allowed and verdict.principal == ALICE


def test_a_private_name_outside_every_application_is_decided_on_the_user_alone() -> None:
    verdict = admit(request("files.corp.example", 53, "dns"), ALICE, tables(), NOW)
    assert verdict.allowed and verdict.match is None and verdict.principal == ALICE
    assert verdict.decision is not None and verdict.decision.applied == ()
    gone = admit(request("files.corp.example", 53, "dns"), MALLORY, tables(), NOW)
    assert refused(gone) == (False, "user_disabled", "the account mallory@corp.example is disabled")


@pytest.mark.parametrize(("host", "port", "protocol", "reason"), [
    ("192.168.1.1", 3389, "tcp", "no application covers 192.168.1.1:3389"),
    ("db.corp.example", 5432, "tcp", "no application covers db.corp.example:5432"),
    ("192.168.1.1", 53, "udp", "no application covers 192.168.1.1:53/udp"),
])
def test_a_destination_no_application_covers_is_refused(host: str, port: int, protocol: str, reason: str) -> None:
    verdict = admit(request(host, port, protocol), ALICE, tables(), NOW)
    assert refused(verdict) == (False, "no_application", reason)
    assert verdict.recorded is True and verdict.decision is None


def test_the_most_specific_per_app_segment_wins_over_quick_access() -> None:
    assert app_of(admit(request("10.20.0.5", 3389), ALICE, tables(), NOW)) == "Finance RDP"
    fallback = admit(request("10.20.0.5", 22), ALICE, tables(), NOW)
    assert fallback.allowed and app_of(fallback) == "Quick Access"
    assert fallback.match is not None and fallback.match.segment.destination == "10.0.0.0/8"
    udp = admit(request("10.30.0.53", 53, "udp"), ALICE, tables(), NOW)
    assert udp.allowed and app_of(udp) == "Wiki"


# ---------------------------------------------------------------------------- who asks


def test_without_token_keys_no_identity_is_enforced() -> None:
    verdict = admit(request(), Unauthenticated("no access token"), tables(token_keys=False), NOW)
    assert verdict.allowed and verdict.principal is None and verdict.decision is None
    assert verdict.match is not None and verdict.match.app.connector_group == "finance"
    assert (verdict.action, verdict.policy, verdict.rule) == ("allow", "", "")
    static = AccessTables(tables().apps)  # an application file: no access index at all
    assert admit(request(), Unauthenticated(), static, NOW).allowed


@pytest.mark.parametrize(("principal", "reason"), [
    (Unauthenticated(), "sign-in required: no token"),
    (Unauthenticated("the access token does not verify"), "sign-in required: the access token does not verify"),
])
def test_identity_enforced_needs_a_signed_in_principal(principal: Unauthenticated, reason: str) -> None:
    verdict = admit(request(), principal, tables(), NOW)
    assert refused(verdict) == (False, "sign_in_required", reason)
    assert verdict.match is not None and verdict.match.app.name == "Finance RDP"  # for the traffic record
    assert verdict.principal is None and verdict.decision is None and verdict.recorded


def test_an_assigned_user_is_allowed_with_the_decision() -> None:
    verdict = admit(request("wiki.corp.example", 443), ALICE, tables(), NOW)
    assert verdict.allowed and verdict.principal == ALICE
    assert verdict.decision is not None and verdict.decision.allowed and verdict.action == "allow"


def test_identity_assignment_and_expiry_refusals() -> None:
    assert refused(admit(request(), MALLORY, tables(), NOW)) == (
        False, "user_disabled", "the account mallory@corp.example is disabled")
    assert admit(request(), ALICE, tables(), NOW + 3060).allowed  # within the leeway past expiry
    assert refused(admit(request(), ALICE, tables(), NOW + 3061)) == (
        False, "token_expired", "the access token has expired: the client must refresh it or sign in again")
    foreign_device = Principal(user_id="u-alice", upn="alice@corp.example", session_id="s-1", device_id="d-mallory",
                               amr=("pwd",), auth_time=int(NOW) - 60, expires=int(NOW) + 3000)
    verdict = admit(request("10.20.0.5", 3389), foreign_device, tables(), NOW)
    assert refused(verdict) == (False, "device_unknown", "device d-mallory is not registered to alice@corp.example")
    assert verdict.decision is not None and not verdict.decision.allowed


def test_a_user_not_assigned_to_the_application_is_refused() -> None:
    verdict = admit(request("10.20.0.5", 3389), ALICE, AccessTables(tables().apps, access=AccessIndex(ConfigSnapshot(
        version=1, issued_at="t", token_keys=[KEY], users=[SnapUser(id="u-alice", upn="alice@corp.example")],
        devices=[SnapDevice(id="d-alice", user_id="u-alice")],
        applications=[SnapApp(name="Finance RDP", kind="per_app", connector_group="finance")]))), NOW)
    assert refused(verdict) == (False, "not_assigned",
                                "alice@corp.example is not assigned to application 'Finance RDP'")
    assert verdict.match is not None and verdict.principal == ALICE


@pytest.mark.parametrize(("grant", "code", "reason"), [
    ("block", "blocked_by_policy", "access to 'Finance RDP' is blocked by policy 'p1'"),
    ("require_mfa", "mfa_required",
     "MFA required for app 'Finance RDP' (policy 'p1'): sign in again with your second factor"),
    ("require_compliant_device", "device_not_compliant",
     "a compliant device is required for app 'Finance RDP' (policy 'p1')"),
])
def test_a_policy_that_is_on_and_unmet_refuses(grant: str, code: str, reason: str) -> None:
    verdict = admit(request(), ALICE, tables(policy(1, grant, applications=["Finance RDP"])), NOW)
    assert refused(verdict) == (False, code, reason)
    assert (verdict.action, verdict.policy, verdict.rule) == ("deny", "p1", grant)


def test_mfa_in_the_token_meets_a_require_mfa_policy() -> None:
    strong = Principal(user_id="u-alice", upn="alice@corp.example", session_id="s-1", device_id="d-alice",
                       amr=("pwd", "mfa"), auth_time=int(NOW) - 60, expires=int(NOW) + 3000)
    verdict = admit(request(), strong, tables(policy(1, "require_mfa")), NOW)
    assert verdict.allowed and (verdict.action, verdict.policy, verdict.rule) == ("allow", "p1", "require_mfa")


def test_the_source_address_decides_a_named_location_condition() -> None:
    office = policy(1, "block", conditions=SnapConditions(locations=["office"]))
    assert refused(admit(request(source="198.51.100.7:40000"), ALICE, tables(office), NOW))[1] == "blocked_by_policy"
    assert admit(request(source="203.0.113.9:40000"), ALICE, tables(office), NOW).allowed


def test_report_only_reports_and_never_refuses() -> None:
    verdict = admit(request(), ALICE, tables(policy(1, "block", state="report_only"),
                                             policy(2, "require_compliant_device", state="report_only")), NOW)
    assert verdict.allowed and verdict.action == "report"
    assert (verdict.policy, verdict.rule) == ("p1", "block")  # the first report-only policy that would have denied
    assert [p.policy for p in verdict.decision.report] == ["p1", "p2"]  # type: ignore[union-attr]


# ---------------------------------------------------------------------------- live flows decided again


def test_a_live_flow_keeps_its_application_when_decided_again() -> None:
    # The flow was admitted to Finance RDP; a re-check decides access for that application even
    # for a destination no application covers any more, and does not look at protocol or table.
    live = request("192.168.1.1", 3389, "tcp", application="Finance RDP")
    assert admit(live, ALICE, tables(), NOW).allowed
    assert refused(admit(live, ALICE, tables(policy(1, "block")), NOW)) == (
        False, "blocked_by_policy", "access to 'Finance RDP' is blocked by policy 'p1'")
    revoked = AccessTables(tables().apps, access=AccessIndex(ConfigSnapshot(
        version=4, issued_at="t", token_keys=[KEY], users=[SnapUser(id="u-alice", upn="alice@corp.example")],
        devices=[SnapDevice(id="d-alice", user_id="u-alice")], revoked_sessions=["s-1"])))
    verdict = admit(live, ALICE, revoked, NOW)
    assert refused(verdict) == (False, "session_revoked", "the sign-in session was revoked: sign in again")
    assert verdict.match is None  # not matched again


def test_a_live_dns_flow_outside_every_application_is_decided_on_the_user() -> None:
    live = request("files.corp.example", 53, "dns", application="")
    assert admit(live, ALICE, tables(), NOW).allowed
    assert refused(admit(live, MALLORY, tables(), NOW))[1] == "user_disabled"


def test_the_request_is_not_a_wire_frame() -> None:
    # What a web front door will ask: the same request type, another kind.
    web = AccessRequest(host="wiki.corp.example", port=443, protocol="tcp", source=SOURCE, kind="web")
    verdict = admit(web, ALICE, tables(), NOW)
    assert verdict.allowed and verdict.match is not None and verdict.match.app.name == "Wiki"
