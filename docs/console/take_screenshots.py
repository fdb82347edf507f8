"""Screenshots of the web console for the README: ``python docs/console/take_screenshots.py``.

Seeds a store like ``bench/console_pages.py`` does (10,000 traffic records over 24 hours, 300
users, 120 applications), starts a control plane on it, signs in with Debian's Chromium
(Playwright with ``executable_path``; nothing is downloaded) and saves one PNG per main page
next to this file.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import pyotp
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.console_pages import ADMIN, PASSWORD, seed, start_control  # noqa: E402

HERE = Path(__file__).resolve().parent
SHOTS = [
    ("overview", "/console"),
    ("applications", "/console/applications"),
    ("application", "/console/applications/5"),
    ("connectors", "/console/connectors"),
    ("users", "/console/users"),
    ("traffic", "/console/traffic?hours=24&action=deny"),
    ("traffic-record", "/console/traffic/42"),
    ("audit", "/console/audit"),
]


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="ferryman-console-shots-") as tmp:
        data_dir = os.path.join(tmp, "data")
        secret = seed(data_dir, records=10_000)
        proc, url = start_control(data_dir, os.path.join(tmp, "control.log"))
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
                page = browser.new_page(viewport={"width": 1360, "height": 860}, ignore_https_errors=True)  # its own CA
                page.goto(url + "/console/sign-in")
                page.screenshot(path=str(HERE / "sign-in.png"))
                page.fill("input[name=upn]", ADMIN)
                page.fill("input[name=password]", PASSWORD)
                page.fill("input[name=code]", pyotp.TOTP(secret).at(time.time() + 30))
                page.click("button[type=submit]")
                page.wait_for_url(url + "/console")
                for name, path in SHOTS:
                    page.goto(url + path)
                    page.screenshot(path=str(HERE / f"{name}.png"))
                page.goto(url + "/console/test-access")
                page.select_option("select[name=user]", label=ADMIN)
                page.fill("input[name=host]", "app-005-ssh.corp.example")
                page.fill("input[name=port]", "443")
                page.click("form.stack button[type=submit]")
                page.wait_for_selector(".verdict")
                page.screenshot(path=str(HERE / "test-access.png"))
                browser.close()
        finally:
            proc.terminate()
            proc.wait(timeout=15)
    print("screenshots in", HERE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
