"""Connector groups' dial lists (``allowed_addresses`` / ``denied_addresses``) in the control plane:
the admin API (create, show, update with precise refusals, audit records, configuration
versions), ``ferryman admin groups`` (flags, output, errors), the store's canonical form and
the snapshot that carries the lists to connectors.

The control plane runs for real (``python -m dataplane control`` in a subprocess, SQLite);
the CLI runs as ``python -m dataplane admin``. What connectors do with the lists is in
``test_e2e_dialguard.py`` and ``test_destinations.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from control.snapshot import build_snapshot
from control.store import Store, StoreError, connector_groups, open_store
from dataplane.contract.snapshot import SnapGroup, decode, encode

from controlplane import PUBLIC_EDGE, ROOT, Control, environment

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Control]:
    with Control.running(tmp_path_factory.mktemp("dial-lists"), edges=[PUBLIC_EDGE]) as control:
        yield control


def _audit(control: Control) -> list[dict]:
    status, records, _ = control.admin("GET", "/v1/audit?object_type=connector_group&limit=5")
    assert status == 200
    return records


def test_api_creates_shows_and_updates_dial_lists(control: Control) -> None:
    before = control.version()
    status, group, _ = control.admin("POST", "/v1/connector-groups", {
        "name": "lab", "allowed_addresses": ["10.0.0.0/8", " 2001:DB8::/32 "], "denied_addresses": ["10.0.5.1"]})
    assert status == 201, group
    assert (group["allowed_addresses"], group["denied_addresses"]) == (["10.0.0.0/8", "2001:db8::/32"],
                                                                       ["10.0.5.1/32"])
    assert control.version() == before + 1
    status, shown, _ = control.admin("GET", "/v1/connector-groups/lab")
    assert status == 200 and shown == group
    status, listed, _ = control.admin("GET", "/v1/connector-groups")
    assert [g for g in listed if g["name"] == "lab"] == [group]
    assert [g["denied_addresses"] for g in listed if g["name"] == "default"] == [[]]

    status, updated, _ = control.admin("PATCH", "/v1/connector-groups/lab", {"denied_addresses": ["10.0.5.0/24"]})
    assert status == 200, updated
    assert updated["denied_addresses"] == ["10.0.5.0/24"]
    assert updated["allowed_addresses"] == ["10.0.0.0/8", "2001:db8::/32"]  # left out: unchanged
    assert control.version() == before + 2
    record = _audit(control)[0]
    assert record["action"] == "connector_group.update" and record["object_id"] == str(group["id"])
    assert record["before"]["denied_addresses"] == "10.0.5.1/32"
    assert record["after"]["denied_addresses"] == "10.0.5.0/24"
    assert record["actor"] == "bootstrap"  # the admin key's name

    # The same lists again change nothing: no audit record, no new configuration.
    status, _, _ = control.admin("PATCH", "/v1/connector-groups/lab", {"denied_addresses": ["10.0.5.0/24"]})
    assert status == 200
    assert control.version() == before + 2 and _audit(control)[0]["id"] == record["id"]

    status, cleared, _ = control.admin("PATCH", "/v1/connector-groups/lab", {"allowed_addresses": []})
    assert status == 200 and cleared["allowed_addresses"] == [] and cleared["denied_addresses"] == ["10.0.5.0/24"]


@pytest.mark.parametrize("body, status, code, message", [
    ({"denied_addresses": ["10.0.0.1/8"]}, 422, "invalid",
     "connector group 'default': denied_addresses entry 1 '10.0.0.1/8' has host bits set: the network is 10.0.0.0/8 "
     "(or give the single address 10.0.0.1)"),
    ({"allowed_addresses": ["10.0.0.0/8", "db.corp.example"]}, 422, "invalid",
     "connector group 'default': allowed_addresses entry 2 'db.corp.example' is not an IP address or network "
     "(expected e.g. 10.0.0.0/8, 10.1.2.3 or 2001:db8::/32)"),
    ({"denied_addresses": ["10.0.0.0/8", "10.0.0.0/8"]}, 422, "invalid",
     "connector group 'default': denied_addresses entry 2 '10.0.0.0/8' is the same network as entry 1 (10.0.0.0/8)"),
    ({"denied_addresses": "10.0.0.0/8"}, 400, "validation",
     "invalid request: denied_addresses: Expected `array | null`, got `str`"),
    ({"denied": ["10.0.0.0/8"]}, 400, "validation", "invalid request: data: Object contains unknown field `denied`"),
])
def test_api_refuses_bad_lists_precisely_and_changes_nothing(control: Control, body: dict, status: int, code: str,
                                                             message: str) -> None:
    before = control.version()
    got, answer, _ = control.admin("PATCH", "/v1/connector-groups/default", body)
    assert (got, answer["code"], answer["error"]) == (status, code, message)
    assert "Traceback" not in json.dumps(answer)
    assert control.version() == before
    _, group, _ = control.admin("GET", "/v1/connector-groups/default")
    assert group["denied_addresses"] == [] and group["allowed_addresses"] == []


def test_api_unknown_group_is_404(control: Control) -> None:
    status, answer, _ = control.admin("PATCH", "/v1/connector-groups/nowhere", {"denied_addresses": []})
    assert (status, answer["code"], answer["error"]) == (404, "not_found", "connector group 'nowhere' does not exist")
    status, answer, _ = control.admin("GET", "/v1/connector-groups/nowhere")
    assert status == 404


# ---------------------------------------------------------------------------- the CLI


def _admin(control: Control, *args: str) -> subprocess.CompletedProcess[str]:
    env = environment(control.data_dir)
    env["FERRYMAN_CONTROL_LISTEN"] = urllib.parse.urlsplit(control.url).netloc
    return subprocess.run([sys.executable, "-m", "dataplane", "admin", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def _ok(control: Control, *args: str) -> str:
    done = _admin(control, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_cli_sets_shows_and_clears_dial_lists(control: Control) -> None:
    out = _ok(control, "groups", "create", "dmz", "--allow", "192.0.2.0/24,198.51.100.7", "--deny", "192.0.2.128/25")
    assert out.strip() == ("created connector group 'dmz': connectors dial 192.0.2.0/24, 198.51.100.7/32; "
                           "denied: 192.0.2.128/25")
    show = _ok(control, "groups", "show", "dmz")
    assert "allowed addresses: 192.0.2.0/24, 198.51.100.7/32" in show
    assert "denied addresses:  192.0.2.128/25" in show
    listing = _ok(control, "groups", "list").splitlines()
    assert listing[0].split() == ["NAME", "REGION", "DEFAULT", "ALLOWED", "DENIED", "CREATED"]
    (row,) = [line for line in listing if line.startswith("dmz ")]
    assert row.split()[1:5] == ["-", "no", "192.0.2.0/24,198.51.100.7/32", "192.0.2.128/25"]

    out = _ok(control, "groups", "update", "dmz", "--deny", "192.0.2.1", "--deny", "192.0.2.2")
    assert out.strip() == ("updated connector group 'dmz': connectors dial 192.0.2.0/24, 198.51.100.7/32; denied: "
                           "192.0.2.1/32, 192.0.2.2/32 (its connectors apply it within seconds)")
    out = _ok(control, "groups", "update", "dmz", "--no-allow", "--no-deny")
    assert out.strip() == ("updated connector group 'dmz': connectors dial any address; denied: none "
                           "(its connectors apply it within seconds)")
    assert json.loads(_ok(control, "groups", "show", "dmz", "--json"))["allowed_addresses"] == []


def test_cli_errors_are_one_precise_line(control: Control) -> None:
    done = _admin(control, "groups", "update", "default", "--deny", "10.0.0.1/8")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "ferryman admin: connector group 'default': denied_addresses entry 1 '10.0.0.1/8' has host bits set: the "
        "network is 10.0.0.0/8 (or give the single address 10.0.0.1)"]
    done = _admin(control, "groups", "update", "default")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith(
        "groups update: nothing to change (give --region, --allow/--no-allow and/or --deny/--no-deny)")
    done = _admin(control, "groups", "update", "default", "--deny", "10.0.0.0/8", "--no-deny")
    assert done.returncode == 2 and "not allowed with argument" in done.stderr


# ---------------------------------------------------------------------------- store and snapshot


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(f"sqlite:///{tmp_path / 'data' / 'control.db'}") as opened:
        yield opened


def test_the_snapshot_carries_each_groups_lists(store: Store) -> None:
    with store.begin() as session:
        connector_groups.create_group(session, "admin-key:t", "lab", allowed=["10.0.0.0/8"], denied=["10.0.9.0/24"])
        connector_groups.update_group(session, "admin-key:t", "default", denied=["169.254.0.0/16"])
    with store.read() as session:
        snapshot = build_snapshot(session, edges=[])
    assert decode(encode(snapshot)).groups == [
        SnapGroup(name="default", denied_addresses=["169.254.0.0/16"]),
        SnapGroup(name="lab", allowed_addresses=["10.0.0.0/8"], denied_addresses=["10.0.9.0/24"])]
    with store.begin() as session, pytest.raises(StoreError) as caught:
        connector_groups.create_group(session, "admin-key:t", "bad", denied=[f"10.0.0.{i}" for i in range(257)])
    assert str(caught.value) == "connector group 'bad': denied_addresses has 257 entries; at most 256 are allowed"
