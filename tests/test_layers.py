"""The layers hold: import-linter's contracts in pyproject.toml (``[tool.importlinter]``), checked on
this tree, and shown to catch an upward import in a copy of it.

The contracts: the data plane's layers (basics, wire, transport, contract, access, control link,
the nodes, the fabric, the CLI: an import only ever points down, the three nodes independent of
each other); the control plane imports only ``dataplane.contract`` and ``dataplane.basics``;
nothing imports the CLI; contract and access do no I/O; aioquic is used by its QUIC engine only;
the client's capture front ends see the agent only as a flow opener; the edge's node sits on its
records and per-flow state.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())"]


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([*LINT, "--no-cache", "--no-logo", str(tree / "pyproject.toml")], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=100)


def test_every_contract_is_kept() -> None:
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "7 kept, 0 broken" in done.stdout, done.stdout


def test_an_upward_import_breaks_the_contracts(tmp_path: Path) -> None:
    for part in ("dataplane", "control", "bench"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "dataplane" / "wire" / "frames.py", "a") as fh:  # the wire reaching up to a node
        fh.write("\nfrom ..edge import node as _upward  # noqa: E402,F401\n")
    with open(tmp_path / "control" / "ca.py", "a") as fh:  # the control plane reaching into the transport
        fh.write("\nimport dataplane.transport.tunnel  # noqa: E402,F401\n")
    done = lint(tmp_path)
    assert done.returncode != 0
    out = " ".join(done.stdout.split())
    assert "imports point down (basics, wire, transport, contract, access, control link, nodes, fabric, CLI) BROKEN" \
        in out, done.stdout
    assert "The control plane imports only dataplane.contract and dataplane.basics from the data plane BROKEN" \
        in out, done.stdout
    assert "dataplane.wire.frames -> dataplane.edge.node" in out
    assert "control.ca -> dataplane.transport.tunnel" in out
