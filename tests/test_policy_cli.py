"""Tests of the access commands of ``ferryman admin`` (``assignments``, ``locations``,
``policies`` in ``control/admin/``) against a real control plane.

As in ``test_admin_cli.py``: the control plane runs as ``python -m dataplane control`` in a
subprocess (SQLite in a temporary directory), and each command as ``python -m dataplane
admin ...`` in a subprocess that finds it through ``FERRYMAN_CONTROL_LISTEN`` and the
bootstrap key in ``FERRYMAN_DATA_DIR/admin.key``; the control plane is started with
``controlplane.py``. Users and groups are made through the identity routes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

from control.admin.args import parse_duration
from control.admin.output import duration_text

from controlplane import ROOT, Control, environment

pytestmark = pytest.mark.timeout(90)


class Cli:
    """``ferryman admin`` (and, for set-up and cross-checks, the API) against one control plane."""

    def __init__(self, control: Control) -> None:
        self.control = control

    def api(self, method: str, path: str, body: Any = None) -> Any:
        status, payload, _ = self.control.admin(method, path, body)
        assert status < 300, (status, payload)
        return payload

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = environment(self.control.data_dir)
        env["FERRYMAN_CONTROL_LISTEN"] = urllib.parse.urlsplit(self.control.url).netloc
        return subprocess.run([sys.executable, "-m", "dataplane", "admin", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)

    def ok(self, *args: str) -> str:
        result = self.run(*args)
        assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def fails(self, *args: str, status: int = 1) -> str:
        """The last stderr line of a refused command (the only one, unless argparse printed its usage)."""
        result = self.run(*args)
        assert result.returncode == status, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        if status == 1:
            assert len(lines) == 1, result.stderr
        return lines[-1]


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    with Control.running(tmp_path_factory.mktemp("policy-cli")) as control:
        cli = Cli(control)
        for name in ("wiki", "rdp"):
            cli.api("POST", "/v1/applications", {"name": name, "segments": [{"destination": f"{name}.corp.example",
                                                                             "ports": "443"}]})
        for upn in ("alice@corp.example", "bob@corp.example"):
            cli.api("POST", "/v1/users", {"upn": upn})
        cli.api("POST", "/v1/user-groups", {"name": "staff"})
        cli.api("POST", "/v1/user-groups/staff/members", {"user": "bob@corp.example"})
        yield cli


def rows(output: str) -> list[list[str]]:
    """A table's lines split on runs of two or more spaces (cells may hold single spaces)."""
    import re

    return [re.split(r"\s{2,}", line.strip()) for line in output.strip().splitlines()]


# ---------------------------------------------------------------------------- assignments


def test_assignments_add_list_remove(cli: Cli) -> None:
    alice = cli.api("GET", "/v1/users/alice@corp.example")["id"]
    staff = next(g["id"] for g in cli.api("GET", "/v1/user-groups") if g["name"] == "staff")
    assert cli.ok("assignments", "list", "wiki").strip() == "application 'wiki' is assigned to nobody"
    assert cli.ok("assignments", "add", "wiki", "--user", "Alice@corp.example").strip() == (
        f"assigned application 'wiki' to user 'alice@corp.example' ({alice})")
    assert cli.ok("assignments", "add", "wiki", "--group", "staff").strip() == (
        f"assigned application 'wiki' to group 'staff' ({staff})")
    assert rows(cli.ok("assignments", "list", "wiki")) == [["TYPE", "NAME", "ID"],
                                                            ["user", "alice@corp.example", alice],
                                                            ["group", "staff", staff]]
    assert cli.json("assignments", "list", "wiki") == cli.api("GET", "/v1/applications/wiki/assignments")

    assert cli.fails("assignments", "add", "wiki", "--group", staff) == (
        "ferryman admin: application 'wiki' is already assigned to group 'staff'")
    assert cli.fails("assignments", "add", "wiki", "--user", "carol@corp.example") == (
        "ferryman admin: user 'carol@corp.example' does not exist")
    assert cli.fails("assignments", "remove", "rdp", "--user", "alice@corp.example") == (
        "ferryman admin: application 'rdp' is not assigned to user 'alice@corp.example'")
    assert cli.fails("assignments", "add", "wiki", "--user", "a@x", "--group", "staff", status=2).endswith(
        "argument --group: not allowed with argument --user")
    assert cli.fails("assignments", "add", "wiki", status=2).endswith(
        "one of the arguments --user --group is required")

    assert cli.ok("assignments", "remove", "wiki", "--group", "staff").strip() == (
        "application 'wiki' is no longer assigned to group 'staff'")
    assert [a["user"]["upn"] for a in cli.api("GET", "/v1/applications/wiki/assignments")] == ["alice@corp.example"]


# ---------------------------------------------------------------------------- named locations


def test_locations_create_list_update_delete(cli: Cli) -> None:
    assert cli.ok("locations", "create", "office", "198.51.100.7/24", "2001:DB8::/32").strip() == (
        "created named location 'office': 198.51.100.0/24, 2001:db8::/32")
    assert cli.fails("locations", "create", "lab", "10.0.0.0/8", "10.0.0.0/40") == (
        "ferryman admin: named location 'lab': entry 2 '10.0.0.0/40' is not an IP network (expected an address or "
        "a CIDR such as 10.0.0.0/8 or 2001:db8::/32)")
    assert cli.fails("locations", "create", "office", "192.0.2.0/24") == (
        "ferryman admin: named location 'office' already exists")
    assert cli.ok("locations", "update", "office", "--rename", "hq").strip() == (
        "updated named location 'hq': 198.51.100.0/24, 2001:db8::/32")
    assert cli.ok("locations", "update", "hq", "203.0.113.0/24").strip() == (
        "updated named location 'hq': 203.0.113.0/24")
    assert cli.fails("locations", "update", "hq", status=2) == (
        "ferryman admin: locations update: nothing to change (give networks and/or --rename NEW)")
    cli.ok("locations", "create", "spare", "192.0.2.0/24")
    assert rows(cli.ok("locations", "list")) == [["NAME", "NETWORKS", "POLICIES"], ["hq", "203.0.113.0/24", "-"],
                                                 ["spare", "192.0.2.0/24", "-"]]
    assert cli.json("locations", "list") == cli.api("GET", "/v1/named-locations")
    assert cli.ok("locations", "delete", "spare").strip() == "deleted named location 'spare'"
    assert cli.fails("locations", "delete", "spare") == "ferryman admin: named location 'spare' does not exist"


# ---------------------------------------------------------------------------- policies


def test_policies_create_show_update_delete(cli: Cli) -> None:
    if "hq" not in [loc["name"] for loc in cli.api("GET", "/v1/named-locations")]:
        cli.api("POST", "/v1/named-locations", {"name": "hq", "cidrs": ["203.0.113.0/24"]})
    out = cli.ok("policies", "create", "mfa-wiki", "--grant", "require_mfa", "--app", "wiki", "--app", "rdp",
                 "--user", "alice@corp.example", "--group", "staff", "--location", "hq", "--device-os", "Windows",
                 "--risk-at-least", "medium", "--signin-older-than", "12h")
    assert out.splitlines()[0] == "created policy 'mfa-wiki'"
    detail = dict(line.split(":", 1) for line in out.strip().splitlines()[2:])
    assert {k: v.strip() for k, v in detail.items() if k not in ("created", "updated")} == {
        "name": "mfa-wiki", "state": "on", "grant": "require_mfa", "applications": "wiki, rdp",
        "users": "alice@corp.example, group staff",
        "when": "from hq; device OS Windows; user risk medium or higher; sign-in older than 12h"}
    stored = cli.api("GET", "/v1/policies/mfa-wiki")
    assert stored["conditions"] == {"locations": ["hq"], "device_os": ["Windows"], "user_risk_at_least": "medium",
                                    "signin_older_than": 43200}
    assert cli.json("policies", "show", "mfa-wiki") == stored
    cli.ok("policies", "create", "block-risky", "--grant", "block", "--state", "report_only", "--risk-at-least",
           "high")
    assert rows(cli.ok("policies", "list")) == [
        ["NAME", "STATE", "GRANT", "APPLICATIONS", "USERS", "WHEN"],
        ["block-risky", "report_only", "block", "all applications", "everyone", "user risk high or higher"],
        ["mfa-wiki", "on", "require_mfa", "wiki, rdp", "alice@corp.example, group staff",
         "from hq; device OS Windows; user risk medium or higher; sign-in older than 12h"],
    ]
    assert cli.json("policies", "list") == cli.api("GET", "/v1/policies")
    assert rows(cli.ok("locations", "list"))[1] == ["hq", "203.0.113.0/24", "mfa-wiki"]
    assert cli.fails("locations", "delete", "hq") == (
        "ferryman admin: named location 'hq' is used by policy 'mfa-wiki': remove it from its conditions first")

    # update: only what is given; other conditions are kept unless --clear-conditions.
    cli.ok("policies", "update", "mfa-wiki", "--state", "off", "--device-os", "macOS", "--app", "rdp")
    changed = cli.api("GET", "/v1/policies/mfa-wiki")
    assert (changed["state"], [a["name"] for a in changed["applications"]]) == ("off", ["rdp"])
    assert changed["conditions"] == {"locations": ["hq"], "device_os": ["macOS"], "user_risk_at_least": "medium",
                                     "signin_older_than": 43200}
    assert [u["upn"] for u in changed["users"]] == ["alice@corp.example"]
    assert cli.fails("apps", "delete", "rdp") == (
        "ferryman admin: application 'rdp' is targeted by policy 'mfa-wiki': remove the application from that "
        "policy (or delete that policy) first")
    out = cli.ok("policies", "update", "mfa-wiki", "--clear-conditions", "--signin-older-than", "1h30m",
                 "--all-users", "--all-apps", "--rename", "mfa-all")
    assert out.splitlines()[0] == "updated policy 'mfa-all'"
    changed = cli.api("GET", "/v1/policies/mfa-all")
    assert (changed["applications"], changed["users"], changed["groups"]) == ([], [], [])
    assert changed["conditions"] == {"signin_older_than": 5400}
    assert "when:         sign-in older than 1h30m" in out

    assert cli.fails("policies", "update", "mfa-all", status=2) == (
        "ferryman admin: policies update: nothing to change (see `ferryman admin policies update -h`)")
    assert cli.fails("policies", "update", "mfa-all", "--app", "wiki", "--all-apps", status=2) == (
        "ferryman admin: policies update: give either --app or --all-apps, not both")
    assert cli.fails("policies", "create", "x", "--grant", "block", "--app", "payroll") == (
        "ferryman admin: policy 'x': application 'payroll' does not exist")
    refusal = cli.fails("policies", "create", "x", "--grant", "allow", status=2)
    assert "argument --grant: invalid choice: 'allow' (choose from " in refusal and "require_mfa" in refusal
    assert cli.fails("policies", "create", "x", "--grant", "block", "--signin-older-than", "soon", status=2).endswith(
        "argument --signin-older-than: 'soon' is not a duration like 3600, 90s, 30m, 1h, 7d or 1h30m")
    assert cli.ok("policies", "delete", "mfa-all").strip() == "deleted policy 'mfa-all'"
    assert cli.fails("policies", "show", "mfa-all") == "ferryman admin: policy 'mfa-all' does not exist"
    assert [p["name"] for p in cli.api("GET", "/v1/policies")] == ["block-risky"]


def test_duration_text_is_the_inverse_of_parse_duration() -> None:
    for text in ("45s", "30m", "12h", "7d", "1h30m", "1d2h3m4s"):
        assert duration_text(parse_duration(text)) == text
    assert (duration_text(90), duration_text(3600), duration_text(0)) == ("1m30s", "1h", "0s")
