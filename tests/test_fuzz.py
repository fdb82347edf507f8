"""Every fuzz target runs briefly (coverage-guided, from its seed corpus, which includes the inputs
of past findings) and must find nothing. Long runs are for outside CI: ``python -m fuzz TARGET
--time S`` (README, "Fuzzing")."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz import CORPUS, TARGETS
from fuzz.__main__ import run_target

SECONDS = 2  # per target: nine targets stay well within 40 s with their start-up

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_target_finds_nothing(target: str, tmp_path: Path) -> None:
    assert any((CORPUS / target).iterdir()), f"no seed corpus for {target}"
    code, runs, output = run_target(target, SECONDS, work=str(tmp_path / "work"), findings=str(tmp_path / "found"),
                                    seed=1, timeout=80)
    found = sorted(p.name for p in (tmp_path / "found").iterdir()) if (tmp_path / "found").exists() else []
    assert code == 0 and not found, f"{target}: {found}\n{output[-6000:]}"
    assert runs >= len(list((CORPUS / target).iterdir())), output[-3000:]


def test_unknown_target_is_refused_with_the_list_hint() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "fuzz", "nosuch"], capture_output=True, text=True, timeout=30,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2
    assert "unknown target 'nosuch'" in done.stderr and "python -m fuzz list" in done.stderr
