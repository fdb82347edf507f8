"""Every fuzz target runs briefly and must find nothing: its seeds (which include the inputs of past
findings) and random mutations of them, in this process (``fuzz.smoke``); and the coverage-guided
runner itself (``python -m fuzz``, atheris) runs one target end to end. Long runs are for outside CI:
``python -m fuzz TARGET --time S`` (README, "Fuzzing")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fuzz import CORPUS, TARGETS
from fuzz.__main__ import run_target

SECONDS = 1.5  # per target: with the imports, the whole file stays within about 30 s

pytestmark = pytest.mark.timeout(90)


def test_every_fuzz_target_finds_nothing() -> None:
    """All targets in one child process (their globals stay out of this one)."""
    for target in TARGETS:
        assert any((CORPUS / target).iterdir()), f"no seed corpus for {target}"
    done = subprocess.run([sys.executable, "-m", "fuzz", "smoke", "--time", str(SECONDS)], capture_output=True,
                          text=True, timeout=50, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for target in TARGETS:
        assert f"fuzz {target}: " in done.stdout and "no findings" in done.stdout, done.stdout


def test_coverage_guided_runner_runs_a_target_and_counts_inputs(tmp_path: Path) -> None:
    code, runs, output = run_target("frames", 2, work=str(tmp_path / "work"), findings=str(tmp_path / "found"),
                                    seed=1, timeout=50)
    assert code == 0, output[-4000:]
    assert runs > 100, output[-2000:]
    assert not (tmp_path / "found").exists() or not any((tmp_path / "found").iterdir())
    assert any((tmp_path / "work" / "frames").iterdir()), "no working corpus grown"


def test_unknown_target_is_refused_with_the_list_hint() -> None:
    done = subprocess.run([sys.executable, "-m", "fuzz", "nosuch"], capture_output=True, text=True, timeout=30,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2
    assert "unknown target 'nosuch'" in done.stderr and "python -m fuzz list" in done.stderr
