"""Smoke test of the benchmark CLI: ``python -m bench --quick`` on the direct path and, when
installed, the OpenSSH chain and stunnel; the JSON must hold real, positive measurements
that the backend confirms it saw.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from bench.paths import SshPath, StunnelPath

pytestmark = pytest.mark.timeout(300)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALWAYS = ["bulk_up_mbps", "bulk_down_mbps", "rr1_p50_us", "rr1_p99_us", "rr64_req_s", "connect_flows_s"]
PROXY_ONLY = ["idle_kib_per_flow", "cpu_s_per_gib"]


def run_bench(args: list[str], cwd: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "bench", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the bench stops what it started on SIGTERM
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"bench did not finish in {timeout}s\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_quick_run_measures_every_workload(tmp_path):
    paths = ["direct"] + [p.name for p in (SshPath, StunnelPath) if p(0).available() is None]
    result = run_bench(["--quick", "--paths", ",".join(paths), "--json", "out.json"], cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads((tmp_path / "out.json").read_text())

    assert doc["parameters"]["rounds"] == 1 and doc["parameters"]["paths"] == paths
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["uvloop"]
    bulk = doc["parameters"]["bulk_bytes"]
    for name in paths:
        entry = doc["paths"][name]
        assert entry["status"] == "ok", entry["reason"]
        (rnd,) = entry["rounds"]
        assert rnd["errors"] == {}
        median = entry["median"]
        for metric in ALWAYS:
            assert median[metric] > 0, (name, metric, median)
        assert median["rr1_p50_us"] <= median["rr1_p99_us"]
        # Loopback cannot be slower than 1 MB/s or faster than 1 µs per round trip.
        assert median["bulk_up_mbps"] > 1 and median["bulk_down_mbps"] > 1
        assert median["rr1_p50_us"] > 1
        for metric in PROXY_ONLY:
            assert (metric in median) == (name != "direct"), (name, metric, median)
            if name != "direct":
                assert median[metric] > 0, (name, metric, median)

        # The backend (read directly, not through the path) saw what the load generator counted.
        details = rnd["details"]
        assert details["bulk-up"]["backend"]["bytes_in"] == bulk
        assert details["bulk-down"]["backend"]["bytes_out"] == bulk
        assert details["rr64"]["backend"]["flows"]["E"] == doc["parameters"]["rr64_flows"]
        assert details["rr64"]["backend"]["bytes_in"] >= 64 * details["rr64"]["round_trips"] > 0
        assert details["connect"]["backend"]["flows"]["E"] >= details["connect"]["completed"] > 0
        if name != "direct":
            assert details["idle"]["flows"] == doc["parameters"]["idle_flows"]
            assert details["idle"]["backend"]["flows"]["E"] >= details["idle"]["flows"]
            # Bytes moved through the proxy's own processes: they spent CPU on the bulk transfers.
            assert details["bulk-up"]["cpu_s"] + details["bulk-down"]["cpu_s"] > 0

    table = result.stdout
    assert all(name in table.splitlines()[0] for name in paths)
    assert "targets (ferryman vs ssh" in table
    assert "[round 1/1] direct bulk-up 8 MiB ... " in result.stderr


def test_unknown_path_is_refused(tmp_path):
    result = run_bench(["--paths", "direct,carrier-pigeon"], cwd=str(tmp_path), timeout=60)
    assert result.returncode == 2
    assert "unknown path(s) carrier-pigeon" in result.stderr
    assert not (tmp_path / "bench-results.json").exists()
