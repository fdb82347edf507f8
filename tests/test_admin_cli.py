"""Tests of ``ferryman admin`` (``control/admin/``) against the real control plane.

The control plane is started as in ``test_api.py`` (``python -m dataplane control`` in a
subprocess, SQLite in a temporary directory, by ``controlplane.py``); the CLI runs as
``python -m dataplane admin`` in a subprocess too, finding the control plane through ``FERRYMAN_CONTROL_LISTEN`` and the
bootstrap key through ``FERRYMAN_DATA_DIR/admin.key`` (or the flags). ``apply`` gets a control
plane of its own, since ``--prune`` deletes every application the file does not name.
"""

from __future__ import annotations

import argparse
import json
import stat
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from control.admin.args import parse_duration, parse_segment
from control.admin.output import table

from controlplane import PUBLIC_EDGE, ROOT, Control, environment
from controlplane import free_port as _free_port

pytestmark = pytest.mark.timeout(90)


class Cli:
    """``ferryman admin`` against one control plane."""

    def __init__(self, control: Control) -> None:
        self.control = control

    def env(self) -> dict[str, str]:
        env = environment(self.control.data_dir)  # FERRYMAN_DATA_DIR: the bootstrap key file is found there
        env["FERRYMAN_CONTROL_LISTEN"] = urllib.parse.urlsplit(self.control.url).netloc
        return env

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dataplane", "admin", *args], cwd=ROOT,
                              env=self.env() if env is None else env, capture_output=True, text=True, timeout=60)

    def ok(self, *args: str) -> str:
        result = self.run(*args)
        assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def fails(self, *args: str, status: int = 1) -> str:
        """The one stderr line of a refused command."""
        result = self.run(*args)
        assert result.returncode == status, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        return lines[0]

    def last_audit_id(self) -> int:
        records = self.json("audit", "--limit", "1")
        return records[0]["id"] if records else 0


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    with Control.running(tmp_path_factory.mktemp("admin-cli"), edges=[PUBLIC_EDGE]) as control:
        yield Cli(control)


@pytest.fixture
def apply_cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    with Control.running(tmp_path_factory.mktemp("admin-apply"), edges=[PUBLIC_EDGE]) as control:
        yield Cli(control)


def _columns(line: str, headers: list[str]) -> list[int]:
    return [line.index(h) for h in headers]


# ---------------------------------------------------------------------------- resources


def test_apps_create_then_list_as_table_and_json(cli: Cli) -> None:
    out = cli.ok("apps", "create", "intranet", "--segment", "*.Corp.Example:443,80",
                 "--segment", "10.20.0.0/16:22,3389/tcp")
    assert "created application 'intranet'" in out
    assert "*.corp.example  wildcard  80,443" in out  # normalised by the API, shown with segment ids
    cli.ok("apps", "create", "dns-udp", "--segment", "[2001:db8::/32]:53/udp")

    listing = cli.ok("apps", "list").splitlines()
    headers = ["NAME", "KIND", "GROUP", "SEGMENTS"]
    assert listing[0].split() == headers
    starts = _columns(listing[0], headers)
    rows = {line.split()[0]: line for line in listing[1:]}
    assert set(rows) >= {"intranet", "dns-udp"}
    for line in rows.values():  # aligned: every cell starts under its header
        assert all(line[start - 1] == " " and line[start] != " " for start in starts[1:])
    assert rows["intranet"][starts[1]:].split()[:2] == ["per_app", "default"]
    assert rows["intranet"].endswith("*.corp.example:80,443/tcp, 10.20.0.0/16:22,3389/tcp")
    assert rows["dns-udp"].endswith("[2001:db8::/32]:53/udp")

    status, api_apps, _ = cli.control.call("GET", "/v1/applications")
    assert status == 200
    assert cli.json("apps", "list") == api_apps  # --json is the API's JSON
    shown = cli.json("apps", "show", "intranet")
    assert [(s["destination"], s["ports"]) for s in shown["segments"]] == [("*.corp.example", "80,443"),
                                                                           ("10.20.0.0/16", "22,3389")]
    # Global options may come before the command words too.
    assert json.loads(cli.ok("--json", "apps", "show", "intranet")) == shown

    assert cli.fails("apps", "show", "no-such-app") == "ferryman admin: application 'no-such-app' does not exist"


def test_segment_overlap_is_refused_with_the_api_message(cli: Cli) -> None:
    cli.ok("apps", "create", "ov-a", "--segment", "10.60.0.0/16:20-30")
    cli.ok("apps", "create", "ov-b")
    line = cli.fails("segments", "add", "ov-b", "10.60.2.7:25")
    assert line == ("ferryman admin: segment 10.60.2.7:25/tcp of app 'ov-b' overlaps segment "
                    "10.60.0.0/16:20-30/tcp of app 'ov-a'")
    line = cli.fails("apps", "create", "ov-c", "--segment", "10.60.1.0/24:22")
    assert "overlaps segment 10.60.0.0/16:20-30/tcp of app 'ov-a'" in line
    assert "ov-c" not in [a["name"] for a in cli.json("apps", "list")]
    assert "port 70000 out of range 1-65535" in cli.fails("segments", "add", "ov-b", "10.61.0.1:70000")

    out = cli.ok("segments", "add", "ov-b", "10.61.0.1:5432")
    segment_id = out.split()[2]
    assert out.startswith(f"added segment {segment_id} to 'ov-b': 10.61.0.1:5432/tcp")
    assert cli.ok("segments", "remove", "ov-b", segment_id).strip() == f"removed segment {segment_id} from 'ov-b'"
    assert cli.json("apps", "show", "ov-b")["segments"] == []


def test_groups_dns_and_tokens(cli: Cli) -> None:
    assert cli.ok("groups", "create", "site-a", "--region", "eu").strip() == "created connector group 'site-a' (region eu)"
    groups = cli.ok("groups", "list").splitlines()
    assert groups[0].split() == ["NAME", "REGION", "DEFAULT", "ALLOWED", "DENIED", "CREATED"]
    assert any(line.split()[:3] == ["site-a", "eu", "no"] for line in groups[1:])

    out = cli.ok("tokens", "create", "--role", "connector", "--group", "site-a", "--ttl", "30m").splitlines()
    assert "for a connector in group 'site-a'" in out[0]
    token = out[-1]
    assert token.startswith("fmr_") and " " not in token  # alone on its line, easy to copy
    created = cli.json("tokens", "create", "--role", "edge", "--ttl", "3600")
    assert created["role"] == "edge" and created["group"] is None and created["token"].startswith("fmr_")
    tokens = cli.json("tokens", "list")
    assert all("token" not in t for t in tokens)
    assert {t["id"]: (t["role"], t["group"], t["state"]) for t in tokens}[created["id"]] == ("edge", None, "unused")
    assert "edge registration token has no connector group" in cli.fails("tokens", "create", "--role", "edge",
                                                                         "--group", "site-a")

    cli.ok("dns", "add", "corp.example")
    assert "corp.example" in cli.ok("dns", "list")
    assert "already exists" in cli.fails("dns", "add", "corp.example")
    cli.ok("dns", "remove", "corp.example")
    assert "corp.example" not in [d["suffix"] for d in cli.json("dns", "list")]


def test_audit_shows_each_change_with_its_actor(cli: Cli, tmp_path: Path) -> None:
    out = cli.ok("keys", "create", "ops-bob").splitlines()
    key = out[-1]
    assert key.startswith("fmk_")
    key_file = tmp_path / "bob.key"
    key_file.write_text(key + "\n")
    cli.ok("--key-file", str(key_file), "dns", "add", "bob.example")
    cli.ok("apps", "create", "audited", "--key-file", str(key_file), "--segment", "audited.example:443")

    records = cli.json("audit", "--actor", "ops-bob")
    assert [(r["action"], r["actor"]) for r in records] == [("application.create", "ops-bob"),
                                                            ("dns_suffix.create", "ops-bob")]
    lines = cli.ok("audit", "--actor", "ops-bob", "--since", "1h").splitlines()
    assert lines[0].split() == ["ID", "TIME", "ACTOR", "ACTION", "OBJECT"]
    assert "ops-bob  application.create  application" in lines[1] and lines[1].endswith("(audited)")
    assert lines[2].endswith("(bob.example)")
    assert [r["action"] for r in cli.json("audit", "--type", "admin_key", "--actor", "bootstrap")][0] == \
        "admin_key.create"
    assert cli.ok("audit", "--since", "2999-01-01T00:00:00Z").strip() == "no audit records"

    keys = cli.ok("keys", "list")
    assert "ops-bob" in keys
    assert cli.ok("keys", "revoke", "ops-bob").strip() == "revoked admin key 'ops-bob'"
    line = cli.fails("--key-file", str(key_file), "apps", "list")
    assert line == (f"ferryman admin: admin key refused (admin key is not valid: unknown or revoked); "
                    f"the key came from {key_file}")


def test_connectors_and_edges_are_listed(cli: Cli) -> None:
    assert cli.json("connectors", "list") == []
    assert cli.ok("connectors", "list").strip() == "no connectors"
    assert cli.ok("edges", "list").strip() == "no edges"
    assert cli.fails("connectors", "show", "nope") == "ferryman admin: connector 'nope' does not exist"
    assert cli.fails("connectors", "revoke", "nope", "--reason", "x") == "ferryman admin: connector 'nope' does not exist"


def test_client_certificates_are_issued_to_a_local_key_and_revoked_by_serial(cli: Cli, tmp_path: Path) -> None:
    issued = cli.json("certs", "client", "laptop-1", "--dir", str(tmp_path / "laptop"), "--days", "7")
    cert = x509.load_pem_x509_certificate((tmp_path / "laptop" / "laptop-1.pem").read_bytes())
    assert format(cert.serial_number, "x") == issued["serial"]
    assert cert.subject.rfc4514_string() == "CN=laptop-1,OU=client"
    assert 6 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 8
    assert stat.S_IMODE((tmp_path / "laptop" / "laptop-1.key").stat().st_mode) == 0o600
    assert issued["key"] == str(tmp_path / "laptop" / "laptop-1.key")

    line = cli.ok("certs", "revoke", issued["serial"], "--reason", "lost").strip()
    assert line == (f"revoked certificate {issued['serial']}; edges refuse it once they hold the next "
                    f"configuration version")
    assert issued["serial"] in cli.ok("certs", "revoked")
    assert cli.fails("certs", "revoke", issued["serial"]) == \
        f"ferryman admin: certificate {issued['serial']} is already revoked"
    assert "invalid request" in cli.fails("certs", "revoke", "not-hex")
    assert cli.fails("certs", "client", "bad name!", "--dir", str(tmp_path / "x"), status=2).startswith(
        "ferryman admin: ")


# ---------------------------------------------------------------------------- connection and usage errors


def test_unreachable_control_plane(cli: Cli) -> None:
    port = _free_port()
    line = cli.fails("--control", f"https://127.0.0.1:{port}", "apps", "list")
    assert line == f"ferryman admin: cannot reach the control plane at https://127.0.0.1:{port}: connection refused"
    env = cli.env()
    env["FERRYMAN_CONTROL_LISTEN"] = f"0.0.0.0:{port}"  # a wildcard listen address means this host
    result = cli.run("apps", "list", env=env)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"ferryman admin: cannot reach the control plane at https://127.0.0.1:{port}: "
                                     f"connection refused")


def test_bad_or_missing_admin_key(cli: Cli, tmp_path: Path) -> None:
    line = cli.fails("--key", "fmk_not-a-key", "apps", "list")
    assert line == ("ferryman admin: admin key refused (admin key is not valid: unknown or revoked); "
                    "the key came from --key")
    missing = tmp_path / "none.key"
    assert cli.fails("--key-file", str(missing), "apps", "list", status=2) == \
        f"ferryman admin: admin key file {missing} not found"
    env = cli.env()
    env["FERRYMAN_DATA_DIR"] = str(tmp_path)
    result = cli.run("apps", "list", env=env)
    assert result.returncode == 2 and f"admin key file {tmp_path / 'admin.key'} not found" in result.stderr
    # The explicit flags work without any FERRYMAN_* setting (the CA pinned by --ca-hash).
    bare = {k: v for k, v in env.items() if not k.startswith("FERRYMAN_")}
    result = cli.run("--control", cli.control.url, "--key-file", str(cli.control.data_dir / "admin.key"),
                     "--ca-hash", cli.control.ca_hash, "groups", "list", env=bare)
    assert result.returncode == 0 and "default" in result.stdout
    env["FERRYMAN_NO_SUCH_SETTING"] = "1"
    result = cli.run("apps", "list", env=env)
    assert result.returncode == 2 and "FERRYMAN_NO_SUCH_SETTING: unknown Ferryman setting" in result.stderr


def test_usage_errors_exit_2(cli: Cli) -> None:
    for args in (["apps", "create", "x", "--segment", "10.0.0.1"], ["tokens", "create", "--role", "edge", "--ttl", "1y"],
                 ["tokens", "create", "--role", "robot"], ["apps"], ["--key", "a", "--key-file", "b", "apps", "list"],
                 ["audit", "--since", "2024-05-01T12:00:00"], ["--control", "ftp://x", "apps", "list"]):
        result = cli.run(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_argument_parsers() -> None:
    assert parse_segment("10.0.0.0/16:22,3389") == {"destination": "10.0.0.0/16", "ports": "22,3389"}
    assert parse_segment("*.corp.example:443/TCP") == {"destination": "*.corp.example", "ports": "443",
                                                        "protocol": "tcp"}
    assert parse_segment("[2001:db8::/32]:53/udp") == {"destination": "2001:db8::/32", "ports": "53",
                                                        "protocol": "udp"}
    for bad in ("10.0.0.1", "2001:db8::1:53", ":80", "host:", "host:80/"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_segment(bad)
    assert [parse_duration(t) for t in ("3600", "90s", "30m", "1h", "7d", "1h30m")] == [3600, 90, 1800, 3600,
                                                                                       604800, 5400]
    for bad in ("", "0", "1y", "h", "-5"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration(bad)
    assert table(["A", "LONG"], [["xyz", None], ["q", "v"]]) == "A    LONG\nxyz  -\nq    v"


# ---------------------------------------------------------------------------- apply

APPS_V1 = """
[[apps]]
name = "intranet"
segments = [
  { destination = "*.Corp.Example", ports = "443,80" },
  { destination = "10.20.0.0/16", ports = [22, "3389"], protocol = "tcp" },
]

[[apps]]
name = "wiki"
connector_group = "site-a"
segments = [{ destination = "wiki.internal.example", ports = 443 }]

[[apps]]
name = "everything"
kind = "quick_access"
segments = [{ destination = "10.0.0.0/8", ports = "1-65535" }]
"""


def _plan(out: str) -> dict[str, str]:
    """{app: action} from apply's human plan."""
    plan = {}
    for line in out.splitlines():
        words = line.split()
        if line.startswith("  ") and words and words[0] in ("create", "update", "delete", "unchanged"):
            plan[words[1]] = words[0]
    return plan


def _state(cli: Cli) -> dict[str, tuple[str, str, list[tuple[str, str, str]]]]:
    return {a["name"]: (a["kind"], a["connector_group"],
                        [(s["destination"], s["ports"], s["protocol"]) for s in a["segments"]])
            for a in cli.json("apps", "list")}


def test_apply_makes_the_control_plane_match_the_file(apply_cli: Cli, tmp_path: Path) -> None:
    cli = apply_cli
    cli.ok("groups", "create", "site-a")
    cli.ok("apps", "create", "legacy", "--segment", "legacy.example:80")
    path = tmp_path / "apps.toml"
    path.write_text(APPS_V1)

    # --dry-run: the plan, and nothing changes.
    before = cli.last_audit_id()
    out = cli.ok("apply", str(path), "--dry-run")
    assert _plan(out) == {"intranet": "create", "wiki": "create", "everything": "create"}
    assert "not in the file, kept (--prune deletes them): legacy" in out and "dry run: nothing changed" in out
    assert set(_state(cli)) == {"legacy"} and cli.last_audit_id() == before

    # First run creates.
    out = cli.ok("apply", str(path))
    assert _plan(out) == {"intranet": "create", "wiki": "create", "everything": "create"}
    assert "applied: 3 created, 0 updated, 0 deleted, 0 unchanged" in out
    state = _state(cli)
    assert state["intranet"] == ("per_app", "default", [("*.corp.example", "80,443", "tcp"),
                                                        ("10.20.0.0/16", "22,3389", "tcp")])
    assert state["wiki"] == ("per_app", "site-a", [("wiki.internal.example", "443", "tcp")])
    assert state["everything"] == ("quick_access", "default", [("10.0.0.0/8", "1-65535", "tcp")])
    created = cli.json("audit", "--type", "application", "--limit", "3")
    assert sorted((r["action"], r["actor"], r["after"]["name"]) for r in created) == [
        ("application.create", "bootstrap", "everything"), ("application.create", "bootstrap", "intranet"),
        ("application.create", "bootstrap", "wiki")]

    # Second run: everything unchanged, and not one audit record.
    before = cli.last_audit_id()
    out = cli.ok("apply", str(path))
    assert _plan(out) == {"intranet": "unchanged", "wiki": "unchanged", "everything": "unchanged"}
    assert f"the control plane already matches {path}: nothing to do" in out
    assert cli.last_audit_id() == before
    report = cli.json("apply", str(path))
    assert [(p["name"], p["action"]) for p in report["plan"]] == [
        ("intranet", "unchanged"), ("wiki", "unchanged"), ("everything", "unchanged")]
    assert report["kept"] == ["legacy"] and report["calls_made"] == 0
    assert cli.last_audit_id() == before

    # An edited file updates that one application only.
    path.write_text(APPS_V1.replace('ports = [22, "3389"]', "ports = [22]"))
    out = cli.ok("apply", str(path))
    assert _plan(out) == {"intranet": "update", "wiki": "unchanged", "everything": "unchanged"}
    assert "segments +10.20.0.0/16:22/tcp -10.20.0.0/16:22,3389/tcp" in out
    updates = cli.json("audit", "--since", "1h", "--limit", "10")
    updates = [r for r in updates if r["id"] > before]
    assert [(r["action"], r["after"]["name"]) for r in updates] == [("application.update", "intranet")]
    assert _state(cli)["intranet"][2] == [("*.corp.example", "80,443", "tcp"), ("10.20.0.0/16", "22", "tcp")]

    # --prune deletes what the file does not name; with --dry-run it only says so.
    before = cli.last_audit_id()
    out = cli.ok("apply", str(path), "--prune", "--dry-run")
    assert _plan(out)["legacy"] == "delete" and cli.last_audit_id() == before and "legacy" in _state(cli)
    out = cli.ok("apply", str(path), "--prune")
    assert _plan(out)["legacy"] == "delete" and "1 deleted" in out
    assert set(_state(cli)) == {"intranet", "wiki", "everything"}
    assert [r["action"] for r in cli.json("audit", "--limit", "1")] == ["application.delete"]


def test_apply_moves_segments_between_applications(apply_cli: Cli, tmp_path: Path) -> None:
    cli = apply_cli
    path = tmp_path / "apps.json"
    first = {"apps": [{"name": "a", "segments": [{"destination": "a.example", "ports": 443}]},
                      {"name": "b", "segments": [{"destination": "b.example", "ports": 443}]}]}
    path.write_text(json.dumps(first))
    cli.ok("apply", str(path))
    swapped = {"apps": [{"name": "a", "segments": [{"destination": "b.example", "ports": 443}]},
                        {"name": "b", "segments": [{"destination": "a.example", "ports": 443}]},
                        {"name": "c", "segments": [{"destination": "c.example", "ports": "80"}]}]}
    path.write_text(json.dumps(swapped))
    out = cli.ok("apply", str(path))
    assert _plan(out) == {"a": "update", "b": "update", "c": "create"}
    assert {n: s[2] for n, s in _state(cli).items()} == {"a": [("b.example", "443", "tcp")],
                                                         "b": [("a.example", "443", "tcp")],
                                                         "c": [("c.example", "80", "tcp")]}
    assert "nothing to do" in cli.ok("apply", str(path))


def test_apply_refuses_a_bad_file_and_changes_nothing(apply_cli: Cli, tmp_path: Path) -> None:
    cli = apply_cli
    base = APPS_V1.replace('connector_group = "site-a"\n', "")  # no such group on this control plane
    path = tmp_path / "apps.toml"
    path.write_text(base)
    cli.ok("apply", str(path))
    before, state = cli.last_audit_id(), _state(cli)

    new_app = '\n[[apps]]\nname = "new"\nsegments = [{ destination = "new.example", ports = 80 }]\n'
    cases = {
        # A new valid application next to an invalid one: neither is applied.
        'ports = 443 }': ('ports = 70000 }', "app 'wiki' segment 1: port 70000 out of range 1-65535"),
        'name = "wiki"': ('name = "wiki"\ncolour = "red"', "app 'wiki': unknown key 'colour'"),
        'kind = "quick_access"': ('kind = "fast"', "app 'everything': kind must be 'per_app' or 'quick_access', "
                                                   "not 'fast'"),
        '10.0.0.0/8': ('10.0.0.1/8', "app 'everything' segment 1: '10.0.0.1/8' has host bits set"),
        '"wiki.internal.example"': ('"api.corp.example"', "segment api.corp.example:443/tcp of app 'wiki' overlaps "
                                                          "segment *.corp.example:80,443/tcp of app 'intranet'"),
        'name = "everything"': ('name = "intranet"', "duplicate app name 'intranet'"),
    }
    for old, (new, message) in cases.items():
        assert old in base
        path.write_text(base.replace(old, new) + new_app)
        line = cli.fails("apply", str(path))
        assert line.startswith(f"ferryman admin: {path}: ") and message in line, line
    path.write_text(APPS_V1 + new_app)
    assert cli.fails("apply", str(path)) == (f"ferryman admin: {path}: app 'wiki': connector group 'site-a' does "
                                             f"not exist on the control plane (create it with `ferryman admin "
                                             f"groups create site-a`)")
    path.write_text(base.replace('kind = "quick_access"\n', "") + new_app)
    assert "kind cannot change" in cli.fails("apply", str(path))
    path.write_text("[[apps]\nname = 1")
    assert cli.fails("apply", str(path)).startswith(f"ferryman admin: {path}: invalid TOML")
    assert cli.fails("apply", str(tmp_path / "missing.toml")) == f"ferryman admin: {tmp_path / 'missing.toml'}: file not found"
    assert cli.last_audit_id() == before and _state(cli) == state
