"""A real Chromium for the browser tests (Debian's ``/usr/bin/chromium``, driven by Playwright)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
# For the web front door: no background traffic, and every host name (the apps' own) is loopback.
WEB_ARGS = ("--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--host-resolver-rules=MAP * 127.0.0.1")


def skip_module_without_chromium() -> None:
    """Skip the calling test module when Playwright or Chromium is not installed."""
    pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):  # pragma: no cover - the CI image installs Debian's chromium
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)


@contextmanager
def chromium(*args: str) -> Iterator[Any]:
    """A headless Chromium (Playwright ``Browser``) launched with ``args`` besides the sandbox and
    GPU switches; closed afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", *args])
        try:
            yield browser
        finally:
            browser.close()
