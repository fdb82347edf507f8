"""What ``pip install .`` (not editable) puts on disk: every file the packages read at run time.

Templates, static files and migrations are read from the package's directory, not imported, so
setuptools installs them only when ``[tool.setuptools.package-data]`` names them. A file left out
works in a checkout and in an editable install, and fails only for someone who installed the
package (the front door's sign-in and error pages did, once: every page rendered from a template
failed and the request hung). This checks the globs as setuptools expands them.
"""

from __future__ import annotations

import glob
import os
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(30)


def test_every_file_the_packages_read_is_installed() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = config["tool"]["setuptools"]
    patterns: dict[str, list[str]] = setuptools.get("package-data", {})
    packages = [p.rstrip("*") for p in setuptools["packages"]["find"]["include"]]
    installed: set[Path] = set()
    for package, globs in patterns.items():
        for pattern in globs:
            matched = glob.glob(os.path.join(ROOT, package.replace(".", "/"), pattern))
            assert matched, f"package-data {package}: {pattern!r} matches nothing"
            installed.update(Path(m) for m in matched if os.path.isfile(m))
    data = {path for package in packages for path in (ROOT / package).rglob("*")
            if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts}
    missing = sorted(str(p.relative_to(ROOT)) for p in data - installed)
    assert not missing, f"not installed by pip install . (add to [tool.setuptools.package-data]): {missing}"
    assert ROOT / "dataplane/edge/web/templates/error.html" in installed


def test_the_error_page_is_served_even_when_its_template_cannot_render(monkeypatch) -> None:
    from dataplane.edge.web import pages

    def broken(template: str, **values: object) -> bytes:
        raise FileNotFoundError(template)

    monkeypatch.setattr(pages, "render", broken)
    body = pages.error_page(502, "The application <broke> off.", "backend_error", link="/x?a=1&b=2")
    assert body.startswith(b"<!doctype html>") and b"Application unreachable" in body
    assert b"The application &lt;broke&gt; off." in body and b"backend_error" in body
    assert b'href="/x?a=1&amp;b=2"' in body
