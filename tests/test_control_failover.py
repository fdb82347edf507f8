"""Several control URLs without PostgreSQL: the node HTTP client and ``ferryman admin`` pass over a
control URL that cannot be reached, keep the one that answered, and refuse malformed lists;
``GET /ready`` of a single SQLite control plane.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import controlplane
from controlplane import Control
from control.admin.client import AdminError, control_url
from dataplane.controllink import http
from dataplane.controllink.registration import RegisterError, control_base

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Control]:
    with Control.running(tmp_path_factory.mktemp("control")) as control:
        yield control


def _dead_url() -> str:
    return f"http://127.0.0.1:{controlplane.free_port()}"  # nothing listens there


def test_the_node_client_passes_over_a_dead_url_and_keeps_the_live_one(control: Control) -> None:
    dead = _dead_url()
    base = f"{dead},{control.url}"

    async def twice() -> list[int]:
        first = await http.request(base, "GET", "/health", timeout=10)
        assert http._preferred[base] == 1  # the live one is tried first from now on
        second = await http.request(base, "GET", "/health", timeout=10)
        return [first.status, second.status]

    assert asyncio.run(twice()) == [200, 200]


def test_the_node_client_names_every_url_when_none_answers() -> None:
    one, two = _dead_url(), _dead_url()
    with pytest.raises(http.HttpError) as caught:
        asyncio.run(http.request(f"{one},{two}", "GET", "/health", timeout=10))
    message = str(caught.value)
    assert message.startswith("no control-plane node answered") and "Connection refused" in message
    assert one.rsplit(":", 1)[1] in message and two.rsplit(":", 1)[1] in message


def test_control_url_lists_are_checked() -> None:
    assert control_base("http://a:1/, https://b") == "http://a:1,https://b"
    for bad in ("http://a:1,,http://b:2", "http://a:1,ftp://b", "http://a:1, "):
        with pytest.raises(RegisterError):
            control_base(bad)
    assert control_url("a:1,https://b:2/") == "http://a:1,https://b:2"
    with pytest.raises(AdminError) as caught:
        control_url("http://a:1,")
    assert caught.value.status == 2 and "empty URL" in str(caught.value)


def _admin(control: Control, urls: str) -> subprocess.CompletedProcess[str]:
    env = controlplane.environment(control.data_dir)
    return subprocess.run([sys.executable, "-m", "dataplane", "admin", "--control", urls, "apps", "list", "--json"],
                          cwd=controlplane.ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_admin_fails_over_between_control_urls(control: Control) -> None:
    done = _admin(control, f"{_dead_url()},{control.url}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("[")
    dead_one, dead_two = _dead_url(), _dead_url()
    done = _admin(control, f"{dead_one},{dead_two}")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("ferryman admin: cannot reach any control-plane node: "), done.stderr
    assert dead_one in done.stderr and dead_two in done.stderr


def test_ready_on_sqlite(control: Control) -> None:
    status, body, _ = control.request("GET", "/ready")
    assert (status, body) == (200, {"status": "ready", "problems": []})


def test_a_client_agent_never_captures_any_of_its_control_urls() -> None:
    """The transparent capture leaves alone every control-plane node of the session, not only the first."""
    from types import SimpleNamespace

    from dataplane.basics.settings import ClientSettings
    from dataplane.client.node import Client

    agent = SimpleNamespace(edges=[("edge.example", 8443)], settings=ClientSettings(),
                            keeper=SimpleNamespace(session=SimpleNamespace(
                                control="http://control-a.example:8080,https://control-b.example")))
    assert Client._own_targets(agent) == [("edge.example", 8443), ("control-a.example", 8080),
                                          ("control-b.example", 443)]
