"""Settings: parsing, validation messages, config file, and the README table staying in sync."""

import os

import pytest

from dataplane.basics.settings import ConnectorSettings, SettingsError, load, markdown_table

pytestmark = pytest.mark.timeout(30)


def test_defaults_and_environment() -> None:
    s = load(ConnectorSettings, environ={"FERRYMAN_CONNECTOR_TUNNELS": "4", "FERRYMAN_LOG_FORMAT": "json"})
    assert s.connector_tunnels == 4
    assert s.log_format == "json"
    assert s.flow_window == 524288


def test_flag_overrides_win_over_environment() -> None:
    s = load(ConnectorSettings, {"connector_tunnels": 3}, environ={"FERRYMAN_CONNECTOR_TUNNELS": "4"})
    assert s.connector_tunnels == 3


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FERRYMAN_MAX_FLOWS": "many"}, "FERRYMAN_MAX_FLOWS='many': expected int"),
        ({"FERRYMAN_FLOW_WINDOW": "100"}, "FERRYMAN_FLOW_WINDOW='100': must be between 16384 and"),
        ({"FERRYMAN_LOG_FORMAT": "xml"}, "FERRYMAN_LOG_FORMAT='xml': must be 'text' or 'json'"),
        ({"FERRYMAN_TUNNELZ": "1"}, "FERRYMAN_TUNNELZ: unknown Ferryman setting"),
        ({"FERRYMAN_RECONNECT_MIN": "5", "FERRYMAN_RECONNECT_MAX": "1"}, "must not be below FERRYMAN_RECONNECT_MIN"),
    ],
)
def test_bad_values_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as err:
        load(ConnectorSettings, environ=env)
    assert message in str(err.value)


def test_config_file_with_and_without_prefix(tmp_path) -> None:
    path = tmp_path / "ferryman.toml"
    path.write_text('FERRYMAN_MAX_FLOWS = 10\nkeepalive_interval = 2.5\n')
    s = load(ConnectorSettings, environ={"FERRYMAN_CONFIG": str(path), "FERRYMAN_MAX_FLOWS": "20"})
    assert s.max_flows == 20  # the environment wins over the file
    assert s.keepalive_interval == 2.5
    path.write_text("bogus = 1\n")
    with pytest.raises(SettingsError, match="unknown setting 'bogus'"):
        load(ConnectorSettings, environ={"FERRYMAN_CONFIG": str(path)})


def test_readme_lists_every_variable() -> None:
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    assert markdown_table() in readme, "README settings table is stale: paste `ferryman config vars`"
