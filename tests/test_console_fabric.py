"""The web console in a real headless browser (Debian's Chromium driven by Playwright) over a real
fabric: control plane, edge, connector and a signed-in client agent as separate processes, as
``ferryman up`` runs them. The demo user (the fabric's console admin) signs in for the first time
and sets up TOTP in the page; a flow pushed through the fabric is found in the traffic logs by its
user and its detail names the app, the connector and the bytes; a live flow is counted on the
overview; revoking the client's device from the devices page cuts that live flow (the socket is
closed within five seconds, no byte passes any more) and its record says why.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Iterator

import pyotp
import pytest

from browser import chromium, skip_module_without_chromium

pytestmark = [pytest.mark.timeout(60)]

FAST = {"FERRYMAN_HEARTBEAT_INTERVAL": "0.5", "FERRYMAN_RECONNECT_MAX": "1"}

skip_module_without_chromium()


@pytest.fixture
def browser() -> Iterator[object]:
    with chromium() as launched:
        yield launched


def _until(page: object, url: str, selector: str, text: str, seconds: float, what: str) -> None:
    """Load ``url`` until ``selector`` shows ``text`` (records reach the control plane in batches)."""
    deadline = time.monotonic() + seconds
    while True:
        page.goto(url)  # type: ignore[attr-defined]
        if text in page.inner_text(selector):  # type: ignore[attr-defined]
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: {text!r} not in {selector} within {seconds:g}s:\n"
                        f"{page.inner_text(selector)[:2000]}")  # type: ignore[attr-defined]
        time.sleep(0.3)


def _device_id(fab) -> str:
    with open(os.path.join(fab.workdir, "nodes", "client-1", "client", "session.json")) as fh:
        return json.load(fh)["device_id"]


def test_a_flow_through_the_fabric_is_seen_in_the_console_and_revoking_its_device_cuts_it(
        backend, fabric, xfer, browser) -> None:
    echo = backend("echo")
    fab = fabric([echo], env=FAST, managed=True)
    port = fab.forward_ports[0]
    device = _device_id(fab)
    payload = os.urandom(3000)
    assert xfer.echo(port, payload) == payload  # one finished flow, 3000 bytes each way

    context = browser.new_context(ignore_https_errors=True)  # type: ignore[attr-defined]  # the control plane's CA
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())  # the revoke button asks first
    # First sign-in of the demo user (the fabric's console admin): password, then TOTP set up here.
    page.goto(fab.console_url)
    assert "/console/sign-in" in page.url
    page.fill("input[name=upn]", fab.user)
    page.fill("input[name=password]", fab.password)
    page.click("button[type=submit]")
    page.wait_for_selector("h1 >> text=Set up your second factor")
    secret = page.inner_text("#secret").strip()
    page.fill("input[name=password]", fab.password)
    page.fill("input[name=code]", pyotp.TOTP(secret).now())
    page.click("button[type=submit]")
    page.wait_for_selector("h1 >> text=TOTP is on")
    assert page.locator("ul.codes li").count() >= 8
    page.click("text=Continue to the console")  # a boosted link: the whole overview page, not its partial
    page.wait_for_selector("h1 >> text=Overview")

    # The finished flow in the traffic logs, found by its user; its detail has the fabric's names.
    traffic = f"{fab.console_url}/traffic?user={fab.user}"
    _until(page, traffic, "#traffic-rows", "forward-1", 10.0, "the finished flow's record")
    assert fab.user in page.inner_text("#traffic-rows")
    page.click("#traffic-rows >> text=details")
    page.wait_for_selector("h1 >> text=Traffic record")
    detail = page.inner_text("dl.fields")
    assert "forward-1" in detail and "connector-1" in detail and device in detail and fab.user in detail
    assert re.search(r"bytes sent\s+3000 \(", detail) and re.search(r"bytes received\s+3000 \(", detail), detail

    # A live flow: counted on the overview (the edge's heartbeat), then cut by revoking the device.
    live = socket.create_connection(("127.0.0.1", port), timeout=10)
    with live:
        live.sendall(b"hello")
        assert live.recv(5) == b"hello"
        _until(page, fab.console_url, "div.card:has(h3:text('Active flows')) p.big", "1", 10.0,
               "the live flow on the overview")
        page.goto(f"{fab.console_url}/devices")
        row = page.locator("tr", has_text=device)
        assert "active" in row.inner_text()
        row.locator("button", has_text="Revoke").click()
        row.locator("button", has_text="Revoke").wait_for(state="detached")  # the page came back without it
        assert "revoked" in page.locator("tr", has_text=device).inner_text()
        revoked_at = time.monotonic()
        live.settimeout(5.0)
        try:
            while live.recv(65536):
                pass
        except ConnectionResetError:
            pass
        except TimeoutError:
            pytest.fail("the live flow was still open 5 s after its device was revoked in the console")
        took = time.monotonic() - revoked_at
        with pytest.raises(OSError):  # no byte passes any more
            for _ in range(50):
                live.sendall(b"x" * 65536)
                time.sleep(0.01)
    assert took < 5.0

    # Its record: the 5 bytes each way, ended because the device's certificate was revoked.
    _until(page, f"{traffic}&reason=certificate_revoked", "#traffic-rows", "certificate_revoked", 10.0,
           "the cut flow's record")
    page.click("#traffic-rows >> text=details")
    page.wait_for_selector("h1 >> text=Traffic record")
    detail = page.inner_text("dl.fields")
    assert "certificate_revoked" in detail and "revoked" in detail and device in detail
    assert re.search(r"bytes sent\s+5 \(", detail) and re.search(r"bytes received\s+5 \(", detail), detail

    page.goto(f"{fab.console_url}/audit")
    assert f"console:{fab.user}" in page.inner_text("table") and "device.revoke" in page.inner_text("table")
    context.close()
