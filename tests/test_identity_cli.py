"""Tests of the identity and traffic commands of ``ferryman admin`` (``users``, ``user-groups``,
``devices``, ``sessions``, ``logs``, ``discovery`` in ``control/admin/``) against a real
control plane.

As in ``test_admin_cli.py``: the control plane runs as ``python -m dataplane control`` in a
subprocess (SQLite in a temporary directory, started with ``controlplane.py``), and each
command as ``python -m dataplane admin ...`` in a subprocess that finds it through
``FERRYMAN_CONTROL_LISTEN`` and the bootstrap key in ``FERRYMAN_DATA_DIR/admin.key``. Sign-ins
(for sessions and devices) go through the public API; traffic records are written straight
into the control plane's database with the store's own ``traffic.insert_records``, as the
edges' ``POST /v1/node/traffic`` does. Tests run in file order: the empty-store checks come
before the records are inserted.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from control.admin.output import millis_text, size_text
from dataplane.basics.pki import new_key_and_csr
from dataplane.contract.flowrecord import FlowRecord

from controlplane import PUBLIC_EDGE, ROOT, Control, environment

pytestmark = pytest.mark.timeout(60)

PASSWORD = "correct horse battery"
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC).timestamp()


class Cli:
    """``ferryman admin`` (and, for set-up and cross-checks, the API) against one control plane."""

    def __init__(self, control: Control) -> None:
        self.control = control

    def api(self, method: str, path: str, body: Any = None, *, key: str | None = "") -> Any:
        status, payload, _ = self.control.call(method, path, body, key=key)
        assert status < 300, (status, payload)
        return payload

    def run(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        env = environment(self.control.data_dir)
        env["FERRYMAN_CONTROL_LISTEN"] = urllib.parse.urlsplit(self.control.url).netloc
        return subprocess.run([sys.executable, "-m", "dataplane", "admin", *args], cwd=ROOT, env=env,
                              input=stdin, capture_output=True, text=True, timeout=30)

    def ok(self, *args: str, stdin: str = "") -> str:
        result = self.run(*args, stdin=stdin)
        assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        assert result.stderr == ""
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def fails(self, *args: str, status: int = 1, stdin: str = "") -> str:
        """The last stderr line of a refused command (the only one, unless argparse printed its usage)."""
        result = self.run(*args, stdin=stdin)
        assert result.returncode == status, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        if status == 1:
            assert len(lines) == 1, result.stderr
        return lines[-1]

    def insert_traffic(self, *records: FlowRecord, edge: str = "edge-1") -> None:
        from control.store import database_url, open_store, traffic

        with open_store(database_url(str(self.control.data_dir), env={})) as store, store.begin() as session:
            assert traffic.insert_records(session, edge, records) == len(records)


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    with Control.running(tmp_path_factory.mktemp("identity-cli"), edges=[PUBLIC_EDGE]) as control:
        yield Cli(control)


def rows(output: str) -> list[list[str]]:
    """A table's lines split on runs of two or more spaces (cells may hold single spaces)."""
    return [re.split(r"\s{2,}", line.strip()) for line in output.strip().splitlines()]


def detail(output: str) -> dict[str, str]:
    """``key: value`` lines as a dict (other lines skipped)."""
    out = {}
    for line in output.strip().splitlines():
        key, sep, value = line.partition(": ")
        if sep and not key.startswith(" "):
            out[key] = value.strip()
    return out


# ---------------------------------------------------------------------------- users


def test_users_create_list_show_update_delete(cli: Cli) -> None:
    assert cli.ok("users", "list").strip() == "no users"
    out = cli.ok("users", "create", "Alice@Corp.Example", "--name", "Alice Liddell", "--password-stdin",
                 stdin=PASSWORD + "\n")
    alice = cli.api("GET", "/v1/users/alice@corp.example")
    assert out.splitlines()[0] == "created user 'alice@corp.example'"
    assert {k: v for k, v in detail(out).items() if k not in ("created", "updated")} == {
        "id": alice["id"], "UPN": "alice@corp.example", "display name": "Alice Liddell", "disabled": "no",
        "risk level": "none", "password": "set", "TOTP": "not set up", "groups": "-", "OIDC account": "not linked",
        "console role": "none"}
    # The password is the first line of stdin without its line ending: alice can sign in with it.
    status, _, _ = cli.control.call("POST", "/v1/auth/sign-in", {"upn": "alice@corp.example", "password": PASSWORD},
                                    key=None)
    assert status == 200
    out = cli.ok("users", "create", "bob@corp.example")
    assert out.strip().splitlines()[-1] == ("no password: the user cannot sign in until one is set "
                                            "(`ferryman admin users update bob@corp.example --password-stdin`)")
    bob = cli.api("GET", "/v1/users/bob@corp.example")

    assert rows(cli.ok("users", "list")) == [
        ["UPN", "NAME", "DISABLED", "RISK", "PASSWORD", "TOTP", "GROUPS", "ID"],
        ["alice@corp.example", "Alice Liddell", "no", "none", "yes", "no", "-", alice["id"]],
        ["bob@corp.example", "-", "no", "none", "no", "no", "-", bob["id"]],
    ]
    assert cli.json("users", "list") == cli.api("GET", "/v1/users")
    assert cli.json("users", "show", alice["id"]) == cli.api("GET", "/v1/users/alice@corp.example")

    out = cli.ok("users", "update", "alice@corp.example", "--risk", "high", "--disable")
    assert out.splitlines()[0] == "updated user 'alice@corp.example'"
    assert (detail(out)["risk level"], detail(out)["disabled"]) == ("high", "yes")
    stored = cli.api("GET", "/v1/users/alice@corp.example")
    assert (stored["risk_level"], stored["disabled"]) == ("high", True)
    cli.ok("users", "update", "alice@corp.example", "--enable", "--name", "Alice L.", "--risk", "none")
    stored = cli.api("GET", "/v1/users/alice@corp.example")
    assert (stored["disabled"], stored["display_name"], stored["risk_level"]) == (False, "Alice L.", "none")
    out = cli.ok("users", "update", "alice@corp.example", "--console-role", "reader")
    assert detail(out)["console role"] == "reader"
    assert cli.api("GET", "/v1/users/alice@corp.example")["console_role"] == "reader"

    # Passwords: from stdin only, validated by the control plane.
    assert cli.fails("users", "update", "bob@corp.example", "--password-stdin").startswith(
        "ferryman admin: --password-stdin: the password is empty (give it on the first line of standard input")
    assert cli.fails("users", "update", "bob@corp.example", "--password-stdin", stdin="short\n") == (
        "ferryman admin: password must be at least 8 characters long")
    assert detail(cli.ok("users", "update", "bob@corp.example", "--password-stdin",
                         stdin="another secret\r\nignored\n"))["password"] == "set"
    assert cli.fails("users", "update", "bob@corp.example", status=2) == (
        "ferryman admin: users update: nothing to change (see `ferryman admin users update -h`)")
    assert cli.fails("users", "update", "bob@corp.example", "--risk", "extreme", status=2).endswith(
        "argument --risk: invalid choice: 'extreme' (choose from 'none', 'low', 'medium', 'high')")
    assert cli.fails("users", "update", "bob@corp.example", "--disable", "--enable", status=2).endswith(
        "argument --enable: not allowed with argument --disable")
    assert cli.fails("users", "update", "bob@corp.example", "--oidc-subject", "b-1").startswith(
        "ferryman admin: OIDC sign-in is not configured on this control plane (FERRYMAN_OIDC_ISSUER)")

    for args in (("show", "carol@corp.example"), ("update", "carol@corp.example", "--risk", "low"),
                 ("delete", "carol@corp.example")):
        assert cli.fails("users", *args) == "ferryman admin: user 'carol@corp.example' does not exist"
    assert cli.fails("users", "create", "ALICE@corp.example") == (
        "ferryman admin: user 'alice@corp.example' already exists")
    assert cli.fails("users", "reset-totp", "bob@corp.example") == (
        "ferryman admin: bob@corp.example has no TOTP set up: nothing to reset")

    assert cli.ok("users", "delete", "bob@corp.example").strip() == (
        "deleted user 'bob@corp.example' (its devices are revoked, its sessions and group memberships gone)")
    assert [u["upn"] for u in cli.api("GET", "/v1/users")] == ["alice@corp.example"]


def test_user_sessions_show_and_revoke(cli: Cli) -> None:
    cli.api("POST", "/v1/users", {"upn": "sam@corp.example", "password": PASSWORD})
    sam = cli.api("GET", "/v1/users/sam@corp.example")
    assert cli.ok("users", "sessions", "sam@corp.example").strip() == "user 'sam@corp.example' has no sign-in sessions"
    signed = cli.api("POST", "/v1/auth/sign-in", {"upn": "sam@corp.example", "password": PASSWORD}, key=None)
    session_id = signed["session_id"]

    listing = rows(cli.ok("users", "sessions", "sam@corp.example"))
    assert listing[0] == ["ID", "STATUS", "DEVICE", "AMR", "SIGNED IN", "EXPIRES", "LAST REFRESH", "REVOKED"]
    assert len(listing) == 2 and listing[1][:4] == [session_id, "active", "-", "pwd"]
    assert listing[1][-2:] == ["-", "-"]
    shown = detail(cli.ok("sessions", "show", session_id))
    assert (shown["id"], shown["user"], shown["status"], shown["AMR"], shown["revoked"]) == (
        session_id, f"sam@corp.example ({sam['id']})", "active", "pwd", "no")

    assert cli.ok("sessions", "revoke", session_id, "--reason", "lost laptop").strip() == (
        f"revoked session {session_id}: its refresh token stops working and edges refuse its access tokens")
    assert cli.json("sessions", "show", session_id)["status"] == "revoked"
    assert cli.fails("sessions", "revoke", session_id).startswith(
        f"ferryman admin: session {session_id} was already revoked at ")
    assert cli.fails("sessions", "show", "no-such-session") == (
        "ferryman admin: session 'no-such-session' does not exist")
    assert cli.fails("users", "sessions", "nobody@corp.example") == (
        "ferryman admin: user 'nobody@corp.example' does not exist")


# ---------------------------------------------------------------------------- user groups


def test_user_groups_and_membership(cli: Cli) -> None:
    cli.api("POST", "/v1/users", {"upn": "carol@corp.example", "display_name": "Carol"})
    assert cli.ok("user-groups", "list").strip() == "no user groups"
    out = cli.ok("user-groups", "create", "staff").strip()
    staff = cli.api("GET", "/v1/user-groups")[0]
    assert out == f"created user group 'staff' ({staff['id']})"
    assert cli.fails("user-groups", "create", "staff") == "ferryman admin: user group 'staff' already exists"

    assert cli.ok("user-groups", "add-member", "staff", "Carol@corp.example").strip() == (
        "added user 'carol@corp.example' to user group 'staff'")
    assert cli.fails("user-groups", "add-member", staff["id"], "carol@corp.example") == (
        "ferryman admin: user 'carol@corp.example' is already a member of group 'staff'")
    assert cli.fails("user-groups", "add-member", "staff", "dan@corp.example") == (
        "ferryman admin: user 'dan@corp.example' does not exist")
    carol = cli.api("GET", "/v1/users/carol@corp.example")
    assert rows(cli.ok("user-groups", "members", "staff")) == [
        ["UPN", "NAME", "DISABLED", "RISK", "PASSWORD", "TOTP", "GROUPS", "ID"],
        ["carol@corp.example", "Carol", "no", "none", "no", "no", "staff", carol["id"]]]
    assert rows(cli.ok("user-groups", "list"))[:2] == [["NAME", "MEMBERS", "ID", "CREATED"],
                                                       ["staff", "1", staff["id"], rows_time(staff["created_at"])]]
    assert detail(cli.ok("users", "show", "carol@corp.example"))["groups"] == "staff"

    assert cli.ok("user-groups", "remove-member", "staff", "carol@corp.example").strip() == (
        "removed user 'carol@corp.example' from user group 'staff'")
    assert cli.fails("user-groups", "remove-member", "staff", "carol@corp.example") == (
        "ferryman admin: user 'carol@corp.example' is not a member of group 'staff'")
    assert cli.ok("user-groups", "members", "staff").strip() == "user group 'staff' has no members"

    assert cli.ok("user-groups", "rename", "staff", "team").strip() == "renamed user group 'staff' to 'team'"
    assert cli.json("user-groups", "list") == cli.api("GET", "/v1/user-groups")
    assert cli.ok("user-groups", "delete", "team").strip() == (
        "deleted user group 'team' (with its memberships and application assignments)")
    assert cli.fails("user-groups", "delete", "team") == "ferryman admin: user group 'team' does not exist"


def rows_time(value: str) -> str:
    """An API time as the tables show it."""
    return datetime.fromisoformat(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


# ---------------------------------------------------------------------------- devices


def test_devices_list_show_update_revoke(cli: Cli) -> None:
    assert cli.ok("devices", "list").strip() == "no devices"
    assert cli.fails("devices", "show", "no-such-device") == "ferryman admin: device 'no-such-device' does not exist"
    assert cli.fails("devices", "list", "--user", "nobody@corp.example") == (
        "ferryman admin: user 'nobody@corp.example' does not exist")

    cli.api("POST", "/v1/users", {"upn": "dave@corp.example", "password": PASSWORD})
    _, csr = new_key_and_csr("dave-laptop")
    signed = cli.api("POST", "/v1/auth/sign-in", {"upn": "dave@corp.example", "password": PASSWORD,
                                                  "device": {"csr_pem": csr.decode(), "name": "dave-laptop",
                                                             "os": "macOS", "os_version": "14.4"}}, key=None)
    device = signed["device"]["id"]
    seen = rows_time(cli.api("GET", f"/v1/devices/{device}")["last_seen"])  # the sign-in
    assert rows(cli.ok("devices", "list", "--user", "dave@corp.example")) == [
        ["ID", "USER", "NAME", "OS", "COMPLIANT", "LAST SEEN", "REVOKED"],
        [device, "dave@corp.example", "dave-laptop", "macOS 14.4", "no", seen, "-"]]

    out = cli.ok("devices", "update", device, "--compliant", "yes", "--os", "Windows", "--os-version", "11")
    assert out.splitlines()[0] == f"updated device {device}"
    shown = detail(out)
    assert (shown["OS"], shown["OS version"], shown["compliant"], shown["user"]) == (
        "Windows", "11", "yes", f"dave@corp.example ({signed['user']['id']})")
    assert shown["certificate"] == signed["device"]["serial"]
    assert cli.json("devices", "show", device) == cli.api("GET", f"/v1/devices/{device}")
    assert cli.fails("devices", "update", device, status=2) == (
        "ferryman admin: devices update: nothing to change (give --compliant, --os, --os-version and/or --name)")

    assert cli.ok("devices", "revoke", device, "--reason", "stolen").strip() == (
        f"revoked device {device} of 'dave@corp.example': its certificate and live sessions; edges refuse it "
        f"within seconds")
    assert cli.api("GET", f"/v1/devices/{device}")["revoked_at"] is not None
    assert cli.api("GET", f"/v1/sessions/{signed['session_id']}")["status"] == "revoked"
    assert cli.fails("devices", "revoke", device).startswith(f"ferryman admin: device {device} was already revoked at ")


# ---------------------------------------------------------------------------- traffic logs


def test_logs_on_an_empty_store_and_filter_validation(cli: Cli) -> None:
    assert cli.ok("logs").strip() == "no traffic records"
    assert cli.json("logs", "--user", "alice@corp.example") == []
    assert cli.ok("logs", "--export", "-") == ""
    assert cli.fails("logs", "--action", "block", status=2).endswith(
        "argument --action: invalid choice: 'block' (choose from 'allow', 'deny', 'report')")
    assert cli.fails("logs", "--since", "yesterday", status=2).endswith(
        "argument --since: 'yesterday' is not a time like 2024-05-01T12:00:00Z or a duration like 1h")
    assert cli.fails("logs", "--since", "2024-05-02", "--until", "2024-05-01", status=2) == (
        "ferryman admin: logs: --since (2024-05-02 00:00:00Z) must be before --until (2024-05-01 00:00:00Z)")
    assert cli.fails("logs", "--limit", "0", status=2) == "ferryman admin: logs: --limit must be at least 1"
    assert cli.fails("logs", "--export", "-", "--limit", "5", status=2) == (
        "ferryman admin: logs: --limit does not apply to --export, which writes every matching record")


def _record(n: int, **fields: Any) -> FlowRecord:
    base: dict[str, Any] = {"connection_id": f"c{n}", "transaction_id": f"t{n}", "start": T0 + 60 * n,
                            "end": T0 + 60 * n + 1.5, "duration_ms": 1500, "transport": "tcp", "action": "allow"}
    return FlowRecord(**{**base, **fields})


def test_logs_table_filters_and_export(cli: Cli, tmp_path: Path) -> None:
    cli.insert_traffic(
        _record(0, user_id="u-alice", upn="alice@corp.example", device_id="dev-a", source_ip="198.51.100.7",
                source_port=51000, destination_fqdn="wiki.corp.example", destination_ip="10.0.0.5",
                destination_port=443, application="wiki", application_kind="per_app", connector_name="conn-1",
                bytes_sent=1536, bytes_received=2 * 1024 * 1024),
        _record(1, user_id="u-bob", upn="bob@corp.example", device_id="dev-b", source_ip="2001:db8::7",
                source_port=40000, destination_ip="10.1.2.3", destination_port=22, application="qa",
                application_kind="quick_access", connector_name="conn-2", bytes_sent=100, bytes_received=200),
        _record(2, user_id="u-alice", upn="alice@corp.example", device_id="dev-a", source_ip="198.51.100.7",
                source_port=51001, destination_fqdn="wiki.corp.example", destination_port=443, application="wiki",
                application_kind="per_app", action="deny", policy="block-risky", rule="block",
                reason_code="policy_denied", end=T0 + 120, duration_ms=0),
        _record(3, user_id="u-bob", upn="bob@corp.example", device_id="dev-b", source_ip="2001:db8::7",
                source_port=40001, destination_fqdn="files.corp.example", destination_port=445, application="qa",
                application_kind="quick_access", action="report", policy="mfa-files", connector_name="conn-2",
                bytes_sent=4096, bytes_received=0, duration_ms=65000),
        _record(4, user_id="u-alice", upn="alice@corp.example", device_id="dev-a2", source_ip="198.51.100.8",
                source_port=51002, destination_ip="10.1.2.3", destination_port=22, application="qa",
                application_kind="quick_access", connector_name="conn-2", bytes_sent=10, bytes_received=20),
    )
    api_records = cli.api("GET", "/v1/traffic")
    assert [r["connection_id"] for r in api_records] == ["c4", "c3", "c2", "c1", "c0"]

    assert rows(cli.ok("logs")) == [
        ["TIME", "USER", "DEVICE", "SOURCE", "DESTINATION", "APP", "ACTION", "POLICY", "REASON", "SENT", "RECEIVED",
         "DURATION"],
        ["2024-05-01 12:04:00Z", "alice@corp.example", "dev-a2", "198.51.100.8:51002", "10.1.2.3:22/tcp", "qa",
         "allow", "-", "-", "10B", "20B", "1.5s"],
        ["2024-05-01 12:03:00Z", "bob@corp.example", "dev-b", "[2001:db8::7]:40001", "files.corp.example:445/tcp",
         "qa", "report", "mfa-files", "-", "4.0KiB", "0B", "1m5s"],
        ["2024-05-01 12:02:00Z", "alice@corp.example", "dev-a", "198.51.100.7:51001", "wiki.corp.example:443/tcp",
         "wiki", "deny", "block-risky", "policy_denied", "0B", "0B", "0ms"],
        ["2024-05-01 12:01:00Z", "bob@corp.example", "dev-b", "[2001:db8::7]:40000", "10.1.2.3:22/tcp", "qa",
         "allow", "-", "-", "100B", "200B", "1.5s"],
        ["2024-05-01 12:00:00Z", "alice@corp.example", "dev-a", "198.51.100.7:51000", "wiki.corp.example:443/tcp",
         "wiki", "allow", "-", "-", "1.5KiB", "2.0MiB", "1.5s"],
    ]
    assert cli.json("logs") == api_records
    assert [r[1] for r in rows(cli.ok("logs", "--user", "bob@corp.example"))[1:]] == ["bob@corp.example"] * 2
    assert [r["connection_id"] for r in cli.json("logs", "--action", "deny")] == ["c2"]
    assert [r["connection_id"] for r in cli.json("logs", "--since", "2024-05-01T12:01:00Z",
                                                 "--until", "2024-05-01T14:03:00+02:00")] == ["c2", "c1"]
    assert [r["connection_id"] for r in cli.json("logs", "--app", "qa", "--connector", "conn-2",
                                                 "--limit", "2")] == ["c4", "c3"]
    assert cli.ok("logs", "--user", "nobody@corp.example").strip() == "no traffic records"

    # --export: JSON Lines, oldest first, every record, the same objects as the API's.
    exported = cli.ok("logs", "--export", "-").splitlines()
    assert [json.loads(line) for line in exported] == list(reversed(api_records))
    target = tmp_path / "alice.jsonl"
    assert cli.ok("logs", "--export", str(target), "--user", "alice@corp.example").strip() == (
        f"exported 3 traffic records to {target}")
    assert [json.loads(line)["connection_id"] for line in target.read_text().splitlines()] == ["c0", "c2", "c4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alice.jsonl"]  # no partial file left behind
    assert cli.fails("logs", "--export", str(tmp_path / "missing" / "x.jsonl")).startswith(
        f"ferryman admin: --export {tmp_path / 'missing' / 'x.jsonl'}: cannot write there: ")


def test_logs_and_export_take_every_page(cli: Cli) -> None:
    before = len(cli.api("GET", "/v1/traffic?limit=1000"))
    cli.insert_traffic(*(_record(100 + i, application="bulk", application_kind="per_app", upn="bulk@corp.example",
                                 destination_ip="10.9.0.1", destination_port=80) for i in range(1205)))
    listed = cli.json("logs", "--app", "bulk", "--limit", "1100")
    ids = [r["id"] for r in listed]
    assert len(ids) == 1100 and ids == sorted(set(ids), reverse=True)
    exported = cli.ok("logs", "--export", "-", "--app", "bulk").splitlines()
    assert len(exported) == 1205
    assert [json.loads(line)["connection_id"] for line in exported] == [f"c{100 + i}" for i in range(1205)]
    assert before + 1205 == len(cli.ok("logs", "--export", "-").splitlines())


def test_discovery_list_and_promote(cli: Cli) -> None:
    assert rows(cli.ok("discovery", "list")) == [
        ["DESTINATION", "PORT", "PROTOCOL", "USERS", "DEVICES", "FLOWS", "BYTES", "FIRST SEEN", "LAST SEEN"],
        ["10.1.2.3", "22", "tcp", "2", "2", "2", "330B", "2024-05-01 12:01:00Z", "2024-05-01 12:04:00Z"],
        ["files.corp.example", "445", "tcp", "1", "1", "1", "4.0KiB", "2024-05-01 12:03:00Z",
         "2024-05-01 12:03:00Z"],
    ]
    assert [(d["destination"], d["flows"]) for d in cli.json("discovery", "list", "--since",
                                                              "2024-05-01T12:02:00Z")] == [
        ("10.1.2.3", 1), ("files.corp.example", 1)]
    assert cli.ok("discovery", "list", "--since", "2024-05-01T12:05:00Z").strip() == (
        "no destinations used through quick access")

    out = cli.ok("discovery", "promote", "ssh-jump", "10.1.2.3", "22")
    app = cli.api("GET", "/v1/applications/ssh-jump")
    assert [(s["destination"], s["ports"], s["protocol"]) for s in app["segments"]] == [("10.1.2.3", "22", "tcp")]
    assert out.splitlines()[0] == "created application 'ssh-jump' for 10.1.2.3:22/tcp: it now wins over quick access"
    assert detail(cli.ok("apps", "show", "ssh-jump"))["kind"] == "per_app"
    assert cli.fails("discovery", "promote", "ssh-jump", "files.corp.example", "445") == (
        "ferryman admin: application 'ssh-jump' already exists")
    assert cli.fails("discovery", "promote", "x", "10.1.2.3", "22", "--protocol", "icmp", status=2).endswith(
        "argument --protocol: invalid choice: 'icmp' (choose from 'tcp', 'udp')")


def test_size_and_duration_texts() -> None:
    assert [size_text(n) for n in (0, 1023, 1024, 1536, 5 * 1024 ** 2, 3 * 1024 ** 4, 2048 * 1024 ** 4)] == [
        "0B", "1023B", "1.0KiB", "1.5KiB", "5.0MiB", "3.0TiB", "2048.0TiB"]
    assert [millis_text(n) for n in (0, 999, 1000, 59999, 60000, 5400000)] == [
        "0ms", "999ms", "1.0s", "59.9s", "1m", "1h30m"]
