"""A real browser through the front door: Debian's Chromium driven by Playwright.

Headless Chromium (``/usr/bin/chromium``, every host mapped to 127.0.0.1) opens a web app,
is sent to the sign-in host, signs in with password + TOTP, sees the backend's page with
its internal links translated, follows one, opens a WebSocket from the page and gets its
message echoed, reaches a second app without signing in again, signs out, and is sent to
sign-in again on both apps.
"""

from __future__ import annotations

from pathlib import Path

import pyotp
import pytest

from browser import WEB_ARGS, chromium
from web_support import ALICE, Backend, start_door, stop_door

pytestmark = pytest.mark.timeout(120)


def test_browser_sign_in_page_websocket_sso_sign_out(tmp_path: Path) -> None:
    d = start_door(tmp_path)
    try:
        wiki = Backend("wiki", "wiki.internal")
        docs = Backend("docs", "docs.internal")
        d.backends.update(wiki=wiki, docs=docs)
        d.set_apps([d.app("wiki", "wiki.test", wiki, translate_body=True), d.app("docs", "docs.test", docs)])
        with chromium(*WEB_ARGS) as browser:
            context = browser.new_context(ignore_https_errors=True)
            context.set_default_timeout(20000)
            page = context.new_page()
            page.goto(d.url("wiki.test", "/page"))
            assert page.url.startswith(d.url("auth.test", "/.ferryman/sign_in"))
            assert page.locator("#destination").inner_text() == "wiki"
            page.fill("#upn", ALICE.upn)
            page.fill("#password", ALICE.password)
            page.fill("#otp", pyotp.TOTP(ALICE.totp).now())
            page.click("#submit")
            page.wait_for_url(d.url("wiki.test", "/page"))
            assert page.locator("#title").inner_text() == "Internal page"
            href = page.locator("#next").get_attribute("href")
            assert href == d.url("wiki.test", "/next")  # translated from http://wiki.internal:<port>/next
            page.click("#next")
            page.wait_for_url(d.url("wiki.test", "/next"))
            assert page.locator("#title").inner_text() == "Next page"
            echoed = page.evaluate("""url => new Promise((resolve, reject) => {
                const ws = new WebSocket(url);
                ws.onopen = () => ws.send("hello through the edge");
                ws.onmessage = e => { resolve(e.data); ws.close(); };
                ws.onerror = () => reject(new Error("websocket failed"));
            })""", f"wss://wiki.test:{d.port}/ws")
            assert echoed == "hello through the edge"
            page.goto(d.url("docs.test", "/hello"))  # single sign-on: no form this time
            assert page.url == d.url("docs.test", "/hello")
            assert page.locator("body").inner_text().strip() == "hello from backend docs"
            assert len(d.users.sessions) == 1
            page.goto(d.url("docs.test", "/.ferryman/"))
            assert page.locator("#upn").inner_text() == ALICE.upn
            page.click("#sign-out")
            page.wait_for_url(lambda url: "/.ferryman/sign_in" in url)
            assert page.locator("#password").is_visible()
            assert d.users.sign_outs == [next(iter(d.users.sessions))]
            page.goto(d.url("wiki.test", "/page"))
            assert "/.ferryman/sign_in" in page.url and page.locator("#password").is_visible()
        ws_record = d.wait_record(lambda r: r.websocket)
        assert ws_record.app == "wiki" and ws_record.upn == ALICE.upn and ws_record.bytes_in > 0
        page_record = d.wait_record(lambda r: r.path == "/next" and r.status == 200)
        assert page_record.protocol == "HTTP/2" and page_record.user_agent.startswith("Mozilla/")
    finally:
        stop_door(d)
