"""Tests of the access routes (``control/api/policies.py``) on a real control plane:
``python -m dataplane control`` in a subprocess (SQLite in a temporary directory), spoken to
over HTTP with urllib, as in ``test_api.py`` (both start it with ``controlplane.py``).

Covered: application assignments (by UPN, id, group name; body and query forms of DELETE),
named locations and policies (create, read, change, delete), the exact error for each kind of
bad input (400 for a malformed body, 404 / 409 / 422 from the store), names shown next to ids
(and following renames), audit records and configuration versions, the admin key guard, and
the OpenAPI document. Users and groups are made through the identity routes.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

import controlplane

pytestmark = pytest.mark.timeout(60)


class Control(controlplane.Control):
    """The shared control plane handle with this module's two-value ``call`` and its checks."""

    def call(self, method: str, path: str, body: Any = None, *, key: str | None = "",  # type: ignore[override]
             raw: bytes | None = None) -> tuple[int, Any]:
        """(status, decoded JSON body); ``key=""`` uses the bootstrap key, ``None`` sends none."""
        status, payload, _ = super().call(method, path, body, key=key, raw=raw)
        return status, payload

    def ok(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        got, payload = self.call(method, path, body)
        assert got == status, f"{method} {path}: {got} {payload}"
        return payload

    def error(self, method: str, path: str, body: Any = None, *, status: int) -> str:
        """The ``error`` message of a refused call (which must answer ``status`` with a JSON error)."""
        got, payload = self.call(method, path, body)
        assert got == status, f"{method} {path}: {got} {payload}"
        assert isinstance(payload, dict) and set(payload) >= {"error", "code"}, payload
        return payload["error"]

    def version(self) -> int:
        return self.ok("GET", "/v1/config-version")["version"]


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Control]:
    with Control.running(tmp_path_factory.mktemp("policy-api")) as control:
        _directory(control)
        yield control
    assert "Traceback" not in control.log.read_text(), control.log.read_text()


def _directory(control: Control) -> None:
    """Applications wiki, rdp, hr; users alice, bob, dave; group staff (alice, bob), admins (bob)."""
    for name, destination in (("wiki", "wiki.corp.example"), ("rdp", "10.1.0.0/16"), ("hr", "hr.corp.example")):
        control.ok("POST", "/v1/applications", {"name": name, "segments": [{"destination": destination,
                                                                            "ports": "443"}]}, 201)
    for upn in ("alice@corp.example", "bob@corp.example", "dave@corp.example"):
        control.ok("POST", "/v1/users", {"upn": upn}, 201)
    for group, members in (("staff", ["alice@corp.example", "bob@corp.example"]), ("admins", ["bob@corp.example"])):
        control.ok("POST", "/v1/user-groups", {"name": group}, 201)
        for upn in members:
            control.ok("POST", f"/v1/user-groups/{group}/members", {"user": upn}, 201)


def user_id(control: Control, upn: str) -> str:
    return control.ok("GET", f"/v1/users/{urllib.parse.quote(upn)}")["id"]


def group_id(control: Control, name: str) -> str:
    return next(g["id"] for g in control.ok("GET", "/v1/user-groups") if g["name"] == name)


# ---------------------------------------------------------------------------- assignments


def test_assignments_by_upn_id_and_group_name(control: Control) -> None:
    alice, staff = user_id(control, "alice@corp.example"), group_id(control, "staff")
    start = control.version()
    made = control.ok("POST", "/v1/applications/wiki/assignments", {"user": "Alice@Corp.Example"}, 201)
    assert (made["application"], made["user"], made["group"]) == ("wiki", {"id": alice, "upn": "alice@corp.example"},
                                                                  None)
    control.ok("POST", "/v1/applications/wiki/assignments", {"group": "staff"}, 201)
    control.ok("POST", "/v1/applications/wiki/assignments", {"user": user_id(control, "bob@corp.example")}, 201)
    assert control.version() == start + 3
    listed = control.ok("GET", "/v1/applications/wiki/assignments")
    assert [(a["user"] or {}).get("upn") or a["group"]["name"] for a in listed] == [
        "alice@corp.example", "bob@corp.example", "staff"]
    assert listed[2]["group"] == {"id": staff, "name": "staff"} and listed[2]["user"] is None
    audit = control.ok("GET", "/v1/audit?object_type=app_assignment&limit=1")[0]
    assert (audit["actor"], audit["action"], audit["after"]["upn"]) == ("bootstrap", "app_assignment.create",
                                                                       "bob@corp.example")

    # DELETE takes the target in the body or in the query.
    assert control.call("DELETE", "/v1/applications/wiki/assignments", {"user": "bob@corp.example"}) == (204, None)
    assert control.call("DELETE", "/v1/applications/wiki/assignments?group=staff") == (204, None)
    assert [a["user"]["upn"] for a in control.ok("GET", "/v1/applications/wiki/assignments")] == [
        "alice@corp.example"]
    assert control.version() == start + 5


@pytest.mark.parametrize(("method", "path", "body", "status", "message"), [
    ("POST", "/v1/applications/hr/assignments", {"user": "carol@corp.example"}, 404,
     "user 'carol@corp.example' does not exist"),
    ("POST", "/v1/applications/hr/assignments", {"group": "contractors"}, 404,
     "user group 'contractors' does not exist"),
    ("POST", "/v1/applications/payroll/assignments", {"group": "staff"}, 404, "application 'payroll' does not exist"),
    ("POST", "/v1/applications/hr/assignments", {"user": "dave@corp.example", "group": "staff"}, 422,
     "an assignment names exactly one target: a user (id or UPN) or a group (id or name)"),
    ("POST", "/v1/applications/hr/assignments", {}, 422,
     "an assignment names exactly one target: a user (id or UPN) or a group (id or name)"),
    ("POST", "/v1/applications/hr/assignments", {"users": "dave@corp.example"}, 400,
     "invalid request: data: Object contains unknown field `users`"),
    ("POST", "/v1/applications/hr/assignments", {"user": 7}, 400,
     "invalid request: user: Expected `str | null`, got `int`"),
    ("DELETE", "/v1/applications/hr/assignments", {"user": "dave@corp.example"}, 404,
     "application 'hr' is not assigned to user 'dave@corp.example'"),
    ("DELETE", "/v1/applications/hr/assignments?user=dave@corp.example", {"group": "staff"}, 400,
     "invalid request: give the user or group either in the body or as a query parameter, not both"),
    ("GET", "/v1/applications/payroll/assignments", None, 404, "application 'payroll' does not exist"),
])
def test_assignment_errors(control: Control, method: str, path: str, body: Any, status: int, message: str) -> None:
    assert control.error(method, path, body, status=status) == message


def test_a_duplicate_assignment_conflicts_and_the_admin_key_is_required(control: Control) -> None:
    control.ok("POST", "/v1/applications/rdp/assignments", {"group": "admins"}, 201)
    assert control.error("POST", "/v1/applications/rdp/assignments", {"group": group_id(control, "admins")},
                         status=409) == "application 'rdp' is already assigned to group 'admins'"
    status, body = control.call("GET", "/v1/applications/rdp/assignments", key=None)
    assert status == 401 and body["error"] == "missing 'Authorization: Bearer <admin key>' header"
    for method, path in (("POST", "/v1/policies"), ("GET", "/v1/named-locations"), ("DELETE", "/v1/policies/x")):
        status, body = control.call(method, path, {"name": "x"} if method == "POST" else None, key="fmk_wrong")
        assert status == 401 and body["error"] == "admin key is not valid: unknown or revoked", (method, path)


# ---------------------------------------------------------------------------- named locations


def test_named_locations_lifecycle(control: Control) -> None:
    start = control.version()
    made = control.ok("POST", "/v1/named-locations", {"name": "branch", "cidrs": ["192.0.2.9/24", "2001:DB8:1::/48"]},
                      201)
    assert (made["name"], made["cidrs"], made["policies"]) == ("branch", ["192.0.2.0/24", "2001:db8:1::/48"], [])
    assert control.ok("GET", "/v1/named-locations/branch") == made
    changed = control.ok("PATCH", "/v1/named-locations/branch", {"name": "branch-eu", "cidrs": ["198.18.0.0/15"]})
    assert (changed["id"], changed["name"], changed["cidrs"]) == (made["id"], "branch-eu", ["198.18.0.0/15"])
    assert "branch-eu" in [loc["name"] for loc in control.ok("GET", "/v1/named-locations")]
    assert control.call("DELETE", "/v1/named-locations/branch-eu") == (204, None)
    assert control.error("GET", "/v1/named-locations/branch-eu", status=404) == (
        "named location 'branch-eu' does not exist")
    assert control.version() == start + 3
    actions = [r["action"] for r in control.ok("GET", "/v1/audit?object_type=named_location&limit=3")]
    assert actions == ["named_location.delete", "named_location.update", "named_location.create"]


@pytest.mark.parametrize(("method", "path", "body", "status", "message"), [
    ("POST", "/v1/named-locations", {"name": "lab", "cidrs": ["10.0.0.0/8", "10.0.0.256"]}, 422,
     "named location 'lab': entry 2 '10.0.0.256' is not an IP network (expected an address or a CIDR such as "
     "10.0.0.0/8 or 2001:db8::/32)"),
    ("POST", "/v1/named-locations", {"name": "lab", "cidrs": []}, 422,
     "named location 'lab' needs at least one network"),
    ("POST", "/v1/named-locations", {"name": "lab", "cidrs": "10.0.0.0/8"}, 400,
     "invalid request: cidrs: Expected `array`, got `str`"),
    ("POST", "/v1/named-locations", {"name": "lab"}, 400,
     "invalid request: data: Object missing required field `cidrs`"),
    ("PATCH", "/v1/named-locations/nowhere", {"cidrs": ["10.0.0.0/8"]}, 404, "named location 'nowhere' does not exist"),
    ("DELETE", "/v1/named-locations/nowhere", None, 404, "named location 'nowhere' does not exist"),
])
def test_named_location_errors(control: Control, method: str, path: str, body: Any, status: int,
                               message: str) -> None:
    assert control.error(method, path, body, status=status) == message


# ---------------------------------------------------------------------------- policies


def test_policies_lifecycle_with_names_shown(control: Control) -> None:
    control.ok("POST", "/v1/named-locations", {"name": "office", "cidrs": ["198.51.100.0/24"]}, 201)
    dave = user_id(control, "dave@corp.example")
    start = control.version()
    made = control.ok("POST", "/v1/policies", {
        "name": "mfa-hr", "grant": "require_mfa", "applications": ["hr", "rdp"], "users": [dave],
        "groups": ["admins"], "conditions": {"locations": ["office"], "device_os": ["Windows"],
                                             "user_risk_at_least": "low", "signin_older_than": 43200},
    }, 201)
    assert (made["state"], made["grant"]) == ("on", "require_mfa")
    assert [a["name"] for a in made["applications"]] == ["hr", "rdp"]
    assert made["users"] == [{"id": dave, "upn": "dave@corp.example"}]
    assert made["groups"] == [{"id": group_id(control, "admins"), "name": "admins"}]
    assert made["conditions"] == {"locations": ["office"], "device_os": ["Windows"], "user_risk_at_least": "low",
                                  "signin_older_than": 43200}
    assert control.ok("GET", "/v1/policies/mfa-hr") == made
    assert control.ok("GET", "/v1/named-locations/office")["policies"] == ["mfa-hr"]
    assert control.version() == start + 1

    # A renamed application shows under its new name; one targeted by a policy cannot be deleted.
    control.ok("PATCH", "/v1/applications/hr", {"name": "people"})
    assert [a["name"] for a in control.ok("GET", "/v1/policies/mfa-hr")["applications"]] == ["people", "rdp"]
    assert control.error("DELETE", "/v1/applications/people", status=409) == (
        "application 'people' is targeted by policy 'mfa-hr': remove the application from that policy (or delete "
        "that policy) first")
    assert control.error("DELETE", "/v1/named-locations/office", status=409) == (
        "named location 'office' is used by policy 'mfa-hr': remove it from its conditions first")

    changed = control.ok("PATCH", "/v1/policies/mfa-hr", {"name": "mfa-people", "state": "report_only",
                                                          "applications": ["people"], "conditions": {}})
    assert (changed["name"], changed["state"], changed["conditions"]) == ("mfa-people", "report_only", {})
    assert [a["name"] for a in changed["applications"]] == ["people"]
    assert changed["users"] == made["users"] and changed["groups"] == made["groups"]  # left out: unchanged
    audit = control.ok("GET", "/v1/audit?object_type=access_policy&limit=1")[0]
    assert (audit["action"], audit["before"]["name"], audit["after"]["name"]) == (
        "access_policy.update", "mfa-hr", "mfa-people")
    assert "mfa-people" in [p["name"] for p in control.ok("GET", "/v1/policies")]

    # A user deleted since shows with a null UPN (the policy keeps targeting what is left).
    assert control.call("DELETE", "/v1/users/dave@corp.example") == (204, None)
    assert control.ok("GET", "/v1/policies/mfa-people")["users"] == [{"id": dave, "upn": None}]

    assert control.call("DELETE", "/v1/policies/mfa-people") == (204, None)
    assert control.error("GET", "/v1/policies/mfa-people", status=404) == "policy 'mfa-people' does not exist"
    assert control.call("DELETE", "/v1/named-locations/office") == (204, None)
    assert control.call("DELETE", "/v1/applications/people") == (204, None)


@pytest.mark.parametrize(("method", "path", "body", "status", "message"), [
    ("POST", "/v1/policies", {"name": "p", "grant": "allow"}, 422,
     "policy 'p': grant 'allow' is not one of block, require_mfa, require_compliant_device"),
    ("POST", "/v1/policies", {"name": "p", "grant": "block", "state": "enabled"}, 422,
     "policy 'p': state 'enabled' is not one of on, off, report_only"),
    ("POST", "/v1/policies", {"name": "p"}, 400, "invalid request: data: Object missing required field `grant`"),
    ("POST", "/v1/policies", {"name": "p", "grant": "block", "applications": ["payroll"]}, 404,
     "policy 'p': application 'payroll' does not exist"),
    ("POST", "/v1/policies", {"name": "p", "grant": "block", "users": ["carol@corp.example"]}, 404,
     "policy 'p': user 'carol@corp.example' does not exist"),
    ("POST", "/v1/policies", {"name": "p", "grant": "block", "groups": ["staff", "staff"]}, 422,
     "policy 'p': group 'staff' is listed twice"),
    ("POST", "/v1/policies", {"name": "p", "grant": "block", "conditions": {"network": "corp"}}, 400,
     "invalid request: conditions: Object contains unknown field `network`"),
    ("POST", "/v1/policies", {"name": "p", "grant": "block", "conditions": {"locations": ["mars"]}}, 404,
     "policy 'p': named location 'mars' does not exist"),
    ("POST", "/v1/policies", {"name": "p", "grant": "block", "conditions": {"user_risk_at_least": "extreme"}}, 422,
     "policy 'p': user_risk_at_least 'extreme' is not one of low, medium, high"),
    ("POST", "/v1/policies", {"name": "p", "grant": "block", "conditions": {"signin_older_than": 99999999}}, 422,
     "policy 'p': signin_older_than 99999999 must be a number of seconds from 0 to 31536000"),
    ("POST", "/v1/policies", {"name": "p", "grant": "block", "conditions": {"signin_older_than": "1h"}}, 400,
     "invalid request: conditions.signin_older_than: Expected `int | null`, got `str`"),
    ("POST", "/v1/policies", {"name": " ", "grant": "block"}, 422, "policy name must be a non-empty string"),
    ("PATCH", "/v1/policies/nothing", {"state": "off"}, 404, "policy 'nothing' does not exist"),
    ("DELETE", "/v1/policies/nothing", None, 404, "policy 'nothing' does not exist"),
])
def test_policy_errors(control: Control, method: str, path: str, body: Any, status: int, message: str) -> None:
    assert control.error(method, path, body, status=status) == message
    assert "p" not in [p["name"] for p in control.ok("GET", "/v1/policies")]


def test_malformed_bodies_get_a_json_error(control: Control) -> None:
    for path in ("/v1/policies", "/v1/named-locations", "/v1/applications/wiki/assignments"):
        status, body = control.call("POST", path, raw=b'{"name": "p",')
        assert status == 400 and body["code"] == "validation" and body["error"].startswith("invalid request: "), body


def test_openapi_lists_the_access_routes(control: Control) -> None:
    status, doc = control.call("GET", "/schema/openapi.json", key=None)
    assert status == 200
    paths = doc["paths"]
    assert set(paths["/v1/applications/{name}/assignments"]) >= {"get", "post", "delete"}
    assert set(paths["/v1/named-locations"]) >= {"get", "post"}
    assert set(paths["/v1/named-locations/{name}"]) >= {"get", "patch", "delete"}
    assert set(paths["/v1/policies"]) >= {"get", "post"}
    assert set(paths["/v1/policies/{name}"]) >= {"get", "patch", "delete"}
    assert paths["/v1/policies"]["post"]["security"] == [{"adminKey": []}]
