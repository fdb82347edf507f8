"""The web console in a real headless browser (Debian's Chromium driven by Playwright, never a
downloaded one) against a real control plane: an admin signs in with password + TOTP, navigates,
creates a connector group and an application with segments through the forms, sees it listed and
sees the store's message for an overlapping segment, finds a flow in the traffic logs by its user
(the rows swapped in place by htmx) and opens its detail, opens the audit log (the change is under
their name) and signs out; a reader signs in and finds no form that changes anything, and a
change forged from their page is refused. The page's Content-Security-Policy holds (no
violation reported: htmx runs without inline script or style).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from browser import chromium, skip_module_without_chromium
from controlplane import Control
from test_console_http import PASSWORD, Person, enrol, next_code

pytestmark = [pytest.mark.timeout(90)]

skip_module_without_chromium()


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Control]:
    with Control.running(tmp_path_factory.mktemp("console-browser")) as c:
        yield c


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with chromium() as launched:
        yield launched


def _store_records(control: Control, flows: list[tuple[str, str, str]]) -> None:
    """Traffic records as an edge sends them, written into the control plane's store."""
    from control.store import open_store, traffic
    from control.store.db import database_url
    from dataplane.contract.flowrecord import FlowRecord
    store = open_store(database_url(str(control.data_dir)))
    now = time.time()
    try:
        with store.begin() as session:
            traffic.insert_records(session, "edge-1", [
                FlowRecord(connection_id=connection, transaction_id="t", start=now - 5, end=now, upn=upn,
                           user_id=upn, action=action, destination_ip="10.80.1.9", destination_port=8443,
                           application="payroll", connector_name="c-1", bytes_sent=10, bytes_received=20)
                for connection, upn, action in flows])
    finally:
        store.close()


def sign_in(page: object, control: Control, person: Person, code: str) -> None:
    page.goto(control.url + "/console")  # type: ignore[attr-defined]
    assert "/console/sign-in" in page.url  # type: ignore[attr-defined]
    page.fill("input[name=upn]", person.upn)  # type: ignore[attr-defined]
    page.fill("input[name=password]", PASSWORD)  # type: ignore[attr-defined]
    page.fill("input[name=code]", code)  # type: ignore[attr-defined]
    page.click("button[type=submit]")  # type: ignore[attr-defined]
    page.wait_for_url(control.url + "/console")  # type: ignore[attr-defined]


def test_admin_signs_in_creates_a_group_and_an_app_and_signs_out(control: Control, browser: object) -> None:
    admin = enrol(control, "ada@corp.example", "admin")
    context = browser.new_context(ignore_https_errors=True)  # type: ignore[attr-defined]  # its own CA
    page = context.new_page()
    violations: list[str] = []
    page.on("console", lambda msg: violations.append(msg.text) if "Content Security Policy" in msg.text else None)
    sign_in(page, control, admin, next_code(admin))
    assert page.locator("h1").inner_text() == "Overview"
    assert page.locator("svg.chart").count() == 5
    cookies = {c["name"]: c for c in context.cookies()}
    assert cookies["ferryman_console"]["httpOnly"] and cookies["ferryman_console"]["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # HttpOnly: scripts cannot read it

    page.click("nav >> text=Connectors")
    page.wait_for_url("**/console/connectors")
    form = page.locator("form#new-group")
    form.locator("input[name=name]").fill("lab-eu")
    form.locator("input[name=region]").fill("eu-west")
    form.locator("input[name=allowed]").fill("10.80.0.0/16")
    form.locator("button[type=submit]").click()
    page.wait_for_selector("text=lab-eu")
    assert "10.80.0.0/16" in page.locator("table").nth(1).inner_text()

    page.click("nav >> text=Applications")
    page.wait_for_url("**/console/applications")
    form = page.locator("form#new-app")
    form.locator("input[name=name]").fill("payroll")
    form.locator("select[name=connector_group]").select_option("lab-eu")
    form.locator("textarea[name=segments]").fill("payroll.corp.example 443\n10.80.1.0/24 8443 tcp")
    form.locator("button[type=submit]").click()
    page.wait_for_selector("h1 >> text=payroll")
    assert "lab-eu" in page.inner_text("main")
    assert page.locator("table").first.locator("tr").count() == 3  # header + two segments

    page.click("nav >> text=Applications")
    page.wait_for_selector("td >> text=payroll")
    form = page.locator("form#new-app")
    form.locator("input[name=name]").fill("payroll-copy")
    form.locator("textarea[name=segments]").fill("10.80.1.7 8443")
    form.locator("button[type=submit]").click()
    error = page.locator("p.error")
    error.wait_for()
    assert "overlap" in error.inner_text()
    assert form.locator("input[name=name]").input_value() == "payroll-copy"  # the form is kept

    # Traffic logs: filter by user (htmx swaps the rows in place), open a record's detail.
    _store_records(control, [("flow-of-ada", admin.upn, "allow"), ("flow-of-bob", "bob@corp.example", "deny")])
    page.click("nav >> text=Traffic")
    page.wait_for_url("**/console/traffic")
    bob = page.locator("#traffic-rows >> text=bob@corp.example")
    bob.wait_for()
    page.fill("form.filters input[name=user]", admin.upn)
    page.click("form.filters button[type=submit]")
    bob.wait_for(state="detached")
    assert admin.upn in page.inner_text("#traffic-rows")
    assert "user=ada" in page.url  # the filter is in the address (pushed by htmx)
    page.click("#traffic-rows >> text=details")
    page.wait_for_selector("h1 >> text=Traffic record")
    assert "flow-of-ada" in page.inner_text("dl.fields")

    page.click("nav >> text=Audit")
    page.wait_for_url("**/console/audit")
    audit = page.inner_text("table")
    assert "console:ada@corp.example" in audit and "application.create" in audit

    page.click("text=Sign out")
    page.wait_for_url("**/console/sign-in")
    page.goto(control.url + "/console/applications")
    assert "/console/sign-in" in page.url
    assert violations == []
    context.close()


def test_a_reader_sees_everything_and_changes_nothing(control: Control, browser: object) -> None:
    reader = enrol(control, "rhea@corp.example", "reader")
    context = browser.new_context(ignore_https_errors=True)  # type: ignore[attr-defined]  # its own CA
    page = context.new_page()
    sign_in(page, control, reader, reader.recovery.pop())
    for target in ("Applications", "Connectors", "Users", "Settings"):
        link = "DNS & profile" if target == "Settings" else target
        page.click(f"nav >> text={link}")
        page.wait_for_load_state()
        assert page.locator("main form[method=post]").count() == 0, target
    # A change forged from the reader's own page (right token, right origin) is refused by role.
    status = page.evaluate("""async () => {
        const body = new URLSearchParams({csrf: document.querySelector('header input[name=csrf]').value,
                                          name: 'forged', segments: '10.81.0.1 22'});
        const r = await fetch('/console/applications', {method: 'POST', body});
        return [r.status, await r.text()];
    }""")
    assert status[0] == 403 and "may not change anything" in status[1]
    assert control.call("GET", "/v1/applications/forged")[0] == 404
    context.close()
