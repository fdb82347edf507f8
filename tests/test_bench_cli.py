"""Smoke test of the benchmark CLI: ``python -m bench --quick`` on the direct path and, when
installed, the OpenSSH chain and stunnel; the JSON must hold real, positive measurements
that the backend confirms it saw. The UDP rows run quick on direct and Ferryman: verified
answers, zero corruption, the echo backend's counters covering them, drops accounted.
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


UDP = ["udp64", "udp1200", "udp64-max"]


@pytest.mark.timeout(60)
def test_quick_udp_rows_on_direct_and_ferryman(tmp_path):
    result = run_bench(["--quick", "--paths", "direct,ferryman", "--workloads", ",".join(UDP),
                        "--udp-rate", "20000", "--json", "out.json"], cwd=str(tmp_path), timeout=45)
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["parameters"]["workloads"] == UDP and doc["parameters"]["udp_rate"] == 20000
    for name in ("direct", "ferryman"):
        entry = doc["paths"][name]
        assert entry["status"] == "ok", entry["reason"]
        (rnd,) = entry["rounds"]
        assert rnd["errors"] == {}
        assert set(rnd["details"]) == set(UDP)  # and no TCP workload ran
        for workload in UDP:
            key = workload.replace("-", "")
            detail = rnd["details"][workload]
            assert detail["corrupted"] == 0 and detail["duplicates"] == 0, detail
            assert 0 < detail["received"] <= detail["sent"] and detail["lost"] == detail["sent"] - detail["received"]
            assert detail["backend"]["datagrams_in"] >= detail["received"] <= detail["backend"]["datagrams_out"]
            assert rnd["metrics"][f"{key}_dgram_s"] > 0 and 0 <= rnd["metrics"][f"{key}_loss_pct"] <= 100
            assert 0 < rnd["metrics"][f"{key}_p50_us"] <= rnd["metrics"][f"{key}_p99_us"]
            drops = detail["drops"]
            assert {"generator", "backend"} <= set(drops["kernel_socket_drops"]) and drops["where"]
            if name == "ferryman":  # the nodes' own counters: every node scraped, datagrams seen
                assert set(drops["nodes"]) == {"edge-1", "connector-1", "client-1"}
                assert drops["nodes"]["client-1"]["tx"] >= detail["received"]
        assert rnd["details"]["udp64"]["size"] == 64 and rnd["details"]["udp1200"]["size"] == 1200
        # The generator paces to the offered rate, never above it (below it only when the machine
        # has no CPU to spare: that is the run's result, not something a test may time).
        assert 0 < rnd["details"]["udp64"]["sent_per_s"] <= 20000 * 1.01
    table = result.stdout
    assert "udp 64 B answers/s" in table and "udp 1200 B loss %" in table and "bulk up MB/s" not in table
    assert "ferryman/direct" in table.splitlines()[0]
    assert "udp64 loss < 0.1 % n/a (offered 20,000/s)" in table


def test_paths_without_udp_show_why(tmp_path):
    paths = [p.name for p in (SshPath, StunnelPath) if p(0).available() is None]
    if not paths:
        pytest.skip("neither OpenSSH nor stunnel is installed")
    result = run_bench(["--quick", "--paths", f"direct,{paths[0]}", "--workloads", "udp64", "--udp-rate", "5000",
                        "--json", "out.json"], cwd=str(tmp_path), timeout=45)
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads((tmp_path / "out.json").read_text())
    (rnd,) = doc["paths"][paths[0]]["rounds"]
    assert "TCP" in rnd["details"]["udp64"]["unsupported"] and not rnd["metrics"]
    assert f"{paths[0]}: – UDP:" in result.stdout


def test_unknown_path_is_refused(tmp_path):
    result = run_bench(["--paths", "direct,carrier-pigeon"], cwd=str(tmp_path), timeout=60)
    assert result.returncode == 2
    assert "unknown path(s) carrier-pigeon" in result.stderr
    assert not (tmp_path / "bench-results.json").exists()
    result = run_bench(["--workloads", "udp64,smoke-signals"], cwd=str(tmp_path), timeout=60)
    assert result.returncode == 2 and "unknown workload(s) smoke-signals" in result.stderr
