"""Which group a connector tunnel serves (``dataplane.access.connectors``), and the application
file's ``connectors`` list it is read from when an edge runs without a control plane.

The end-to-end side (real edge, control plane and connectors) is ``test_e2e_trust.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from control.admin.apply import load_desired
from control.admin.client import AdminError
from dataplane.access.apptable import AppTable
from dataplane.access.connectors import ConnectorGroups, GroupDecision
from dataplane.basics.pki import PeerCertificate
from dataplane.contract.apps import AppsError
from dataplane.contract.snapshot import ConfigSnapshot, SnapConnector

pytestmark = pytest.mark.timeout(30)

APPS = [{"name": "wiki", "connector_group": "lab", "segments": [{"destination": "10.1.0.0/16", "ports": "443"}]}]


def peer(name: str, serial: int) -> PeerCertificate:
    return PeerCertificate(role="connector", name=name, serial=serial, not_after=0.0, fingerprint="")


def recorded() -> ConnectorGroups:
    return ConnectorGroups.from_snapshot(ConfigSnapshot(version=7, issued_at="", connectors=[
        SnapConnector(id="c-1", name="lab-1", group="lab", serials=["a1", "1a2"]),
        SnapConnector(id="c-2", name="prod-1", group="default", serials=["b1"]),
    ]))


def test_the_control_plane_s_record_decides_whatever_the_hello_says() -> None:
    groups = recorded()
    assert not groups.trusts_hello
    for serial in (0xA1, 0x1A2):  # any of its usable certificates
        assert groups.group_of(peer("lab-1", serial), "lab") == GroupDecision("lab")
        assert groups.group_of(peer("lab-1", serial), "") == GroupDecision("lab")  # naming none claims nothing
    assert groups.group_of(peer("lab-1", 0xA1), "default") == GroupDecision(
        None, "group_mismatch", "connector 'lab-1' names group 'default' in its HELLO, but serves group 'lab' "
                                "according to the control plane's configuration (version 7)")


def test_a_connector_the_record_does_not_know_serves_no_group() -> None:
    groups = recorded()
    assert groups.group_of(peer("lab-2", 0xC1), "lab") == GroupDecision(
        None, "connector_unknown", "connector 'lab-2' (certificate c1) is not in the control plane's configuration "
                                   "(version 7): it serves no group until it is")
    # A certificate of one connector presented under another name is nobody's.
    assert groups.group_of(peer("prod-1", 0xA1), "") == GroupDecision(
        None, "connector_unknown", "connector 'prod-1': certificate a1 belongs to connector 'lab-1' in the control "
                                   "plane's configuration (version 7); serving no group")
    # Before any configuration arrived, nobody serves anything.
    empty = ConnectorGroups(by_serial={}, source="a configuration from the control plane (none received yet)")
    assert empty.group_of(peer("lab-1", 0xA1), "lab").code == "connector_unknown"


def test_an_application_file_list_decides_by_certificate_name() -> None:
    groups = ConnectorGroups.from_names({"lab-1": "lab"}, "the application file apps.toml")
    assert groups.group_of(peer("lab-1", 1), "") == GroupDecision("lab")
    assert groups.group_of(peer("lab-1", 1), "default").code == "group_mismatch"
    assert groups.group_of(peer("lab-2", 2), "lab") == GroupDecision(
        None, "connector_unknown", "connector 'lab-2' (certificate 2) is not in the application file apps.toml: it "
                                   "serves no group until it is")


def test_without_a_list_the_hello_names_the_group() -> None:
    groups = ConnectorGroups.hello_decides()
    assert groups.trusts_hello
    assert groups.group_of(peer("any", 1), "lab") == GroupDecision("lab")
    assert groups.group_of(peer("any", 1), "") == GroupDecision("default")


def test_a_snapshot_of_a_control_plane_that_records_no_groups_leaves_the_hello_to_decide() -> None:
    """An older control plane (or a cache it filled) sends no ``connectors``: refusing every connector
    would stop all traffic until the next change, so the HELLO decides, as it did then."""
    old = ConnectorGroups.from_snapshot(ConfigSnapshot(version=3, issued_at=""))
    assert old.trusts_hello and old.group_of(peer("lab-1", 0xA1), "lab") == GroupDecision("lab")
    none_registered = ConnectorGroups.from_snapshot(ConfigSnapshot(version=3, issued_at="", connectors=[]))
    assert none_registered.group_of(peer("lab-1", 0xA1), "lab").code == "connector_unknown"


def test_the_application_file_s_connectors_list() -> None:
    assert AppTable.from_obj({"apps": APPS}).connectors is None
    table = AppTable.from_obj({"apps": APPS, "connectors": [{"name": " lab-1 ", "group": "lab"},
                                                            {"name": "lab-2", "group": "lab"}]})
    assert table.connectors == {"lab-1": "lab", "lab-2": "lab"}
    assert AppTable.from_obj({"apps": APPS, "connectors": []}).connectors == {}  # nobody serves anything


@pytest.mark.parametrize(("connectors", "message"), [
    ({"name": "x"}, "apps.toml: 'connectors' must be a list"),
    (["lab-1"], "apps.toml: connector 1: must be a table"),
    ([{"name": "lab-1"}], "apps.toml: connector 1: group must be a non-empty string"),
    ([{"group": "lab"}], "apps.toml: connector 1: name must be a non-empty string (the connector certificate's name)"),
    ([{"name": "lab-1", "group": "lab", "region": "eu"}],
     "apps.toml: connector 1: unknown key 'region' (expected name, group)"),
    ([{"name": "lab-1", "group": "lab"}, {"name": "lab-1", "group": "prod"}], "apps.toml: connector 'lab-1' is listed "
                                                                               "twice"),
])
def test_connectors_list_errors(connectors: object, message: str) -> None:
    with pytest.raises(AppsError) as err:
        AppTable.from_obj({"apps": APPS, "connectors": connectors}, source="apps.toml")
    assert str(err.value) == message


def test_admin_apply_refuses_a_connectors_list(tmp_path: Path) -> None:
    path = tmp_path / "apps.json"
    path.write_text(json.dumps({"apps": APPS, "connectors": [{"name": "lab-1", "group": "lab"}]}))
    with pytest.raises(AdminError) as err:
        load_desired(str(path))
    assert str(err.value) == (
        f"{path}: a 'connectors' list is for an edge running from this file without a control plane; the control "
        f"plane gives each connector its group when it registers (`ferryman admin tokens create --role connector "
        f"--group GROUP`)")
