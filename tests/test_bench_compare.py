"""``ferryman bench --compare`` and the per-process CPU figures: the comparison logic (pure),
the refusal of a file that is not a results file, and one quick run through the fabric."""

from __future__ import annotations

import json

import pytest

from bench import report
from tests.test_bench_cli import run_bench

pytestmark = pytest.mark.timeout(60)


def doc(medians: dict[str, dict[str, float]], ratios: dict[str, dict[str, float]] | None = None) -> dict:
    return {"paths": {name: {"status": "ok", "median": m} for name, m in medians.items()}, "ratios": ratios or {}}


def test_compare_says_which_way_each_metric_moved() -> None:
    base = doc({"ferryman": {"bulk_up_mbps": 400.0, "rr1_p50_us": 200.0, "connect_flows_s": 3000.0,
                             "cpu_s_per_gib": 3.0, "cpu_s_per_gib.edge-1": 1.2, "udp64_loss_pct": 0.0,
                             "idle_kib_per_flow": 5.0},
                "ssh": {"bulk_up_mbps": 380.0}},
               {"ferryman/ssh": {"bulk_up_mbps": 1.05, "rr1_p50_us": 0.9}})
    now = doc({"ferryman": {"bulk_up_mbps": 600.0, "rr1_p50_us": 260.0, "connect_flows_s": 3050.0,
                            "cpu_s_per_gib": 2.0, "cpu_s_per_gib.edge-1": 1.5, "udp64_loss_pct": 0.0,
                            "rr64_req_s": 40000.0},
               "ssh": {"bulk_up_mbps": 380.0}, "stunnel": {"bulk_up_mbps": 700.0}},
              {"ferryman/ssh": {"bulk_up_mbps": 1.58, "rr1_p50_us": 0.6}})
    rows = report.compare(base, now)
    got = {(r["what"], r["metric"]): (r["change_pct"], r["verdict"]) for r in rows}
    assert got == {
        ("ferryman", "bulk_up_mbps"): (50.0, "better"),          # a rate went up
        ("ferryman", "rr1_p50_us"): (30.0, "worse"),             # a latency went up
        ("ferryman", "connect_flows_s"): (pytest.approx(1.667, abs=1e-3), "~"),  # within the noise band
        ("ferryman", "cpu_s_per_gib"): (pytest.approx(-33.333, abs=1e-3), "better"),
        ("ferryman", "cpu_s_per_gib.edge-1"): (pytest.approx(25.0), "worse"),  # one process's CPU per GiB
        ("ferryman", "udp64_loss_pct"): (None, "same"),          # 0 before and after
        ("ssh", "bulk_up_mbps"): (0.0, "~"),
        ("ferryman/ssh", "bulk_up_mbps"): (pytest.approx(50.476, abs=1e-3), "better"),
        ("ferryman/ssh", "rr1_p50_us"): (pytest.approx(-33.333, abs=1e-3), "better"),  # a lower latency ratio
    }
    # Only metrics both runs have: not idle (gone), not rr64 or stunnel (new).
    assert [r["metric"] for r in rows if r["what"] == "ferryman"][:3] == ["bulk_up_mbps", "rr1_p50_us",
                                                                          "connect_flows_s"]
    text = report.compare_table(rows, "base.json")
    assert text.splitlines()[0] == "compared with base.json (4 better, 2 worse, changes under 5 % shown as ~):"
    line = next(ln for ln in text.splitlines() if "rr1_p50_us" in ln and ln.startswith("ferryman "))
    assert line.split() == ["ferryman", "rr1_p50_us", "200", "260", "+30.0", "%", "worse"]
    assert report.compare_table([], "x.json") == "compared with x.json: no metric in common"
    big = report.compare(doc({"p": {"rr1_p99_us": 3591.0}}), doc({"p": {"rr1_p99_us": 10004.2}}))
    assert report.compare_table(big, "b").splitlines()[-1].split()[2:4] == ["3,591", "10,004"]


def test_a_metric_that_was_zero_and_is_no_more_is_new() -> None:
    rows = report.compare(doc({"p": {"udp64_loss_pct": 0.0}}), doc({"p": {"udp64_loss_pct": 1.5}}))
    assert [(r["change_pct"], r["verdict"]) for r in rows] == [(None, "new")]
    assert "n/a" in report.compare_table(rows, "b")


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot read"),
    ("{not json", "is not JSON"),
    ('{"machine": {}}', 'is not a `ferryman bench` results file (no "paths" with medians)'),
    ('{"paths": {"ferryman": {"median": [1, 2]}}}', "is not a `ferryman bench` results file"),
])
def test_a_baseline_that_is_no_results_file_is_refused_before_anything_runs(tmp_path, content, message) -> None:
    baseline = tmp_path / "base.json"
    if content is not None:
        baseline.write_text(content)
    result = run_bench(["--quick", "--paths", "direct", "--compare", str(baseline)], cwd=str(tmp_path), timeout=30)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--compare: " in result.stderr and message in result.stderr, result.stderr
    assert "backend on" not in result.stderr and not (tmp_path / "bench-results.json").exists()


def test_bulk_through_the_fabric_reports_cpu_per_process_and_compares(tmp_path) -> None:
    baseline = tmp_path / "base.json"
    baseline.write_text(json.dumps(doc({"ferryman": {"bulk_up_mbps": 1.0, "cpu_s_per_gib.edge-1": 1000.0}})))
    # 32 MiB rather than --quick's 8: CPU time is counted in 10 ms clock ticks, and a process that
    # spent a few milliseconds on 8 MiB can be counted 0 ticks on a busy machine.
    result = run_bench(["--quick", "--bulk-mib", "32", "--paths", "ferryman", "--workloads", "bulk-up,bulk-down",
                        "--compare", str(baseline), "--json", "out.json"], cwd=str(tmp_path), timeout=50)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    median = out["paths"]["ferryman"]["median"]
    per_process = {k.split(".", 1)[1]: v for k, v in median.items() if k.startswith("cpu_s_per_gib.")}
    # Every fabric process is measured on its own, and each carried the bytes (spent CPU on them).
    assert set(per_process) == {"edge-1", "connector-1", "client-1"}, median
    assert all(v > 0 for v in per_process.values()), per_process
    assert sum(per_process.values()) <= median["cpu_s_per_gib"] * 1.0001
    assert "CPU s/GiB by process, ferryman: client-1 " in result.stdout
    rows = {(r["what"], r["metric"]): r for r in out["comparison"]["rows"]}
    assert set(rows) == {("ferryman", "bulk_up_mbps"), ("ferryman", "cpu_s_per_gib.edge-1")}
    assert rows[("ferryman", "bulk_up_mbps")]["verdict"] == "better"  # faster than 1 MB/s
    assert rows[("ferryman", "cpu_s_per_gib.edge-1")]["verdict"] == "better"  # less than 1000 s/GiB
    assert "compared with " in result.stdout


def test_floor_note_puts_the_round_trip_target_against_three_plain_relays() -> None:
    meds = {"ferryman": {"rr1_p50_us": 320.0}, "ssh": {"rr1_p50_us": 250.0}, "relay-floor": {"rr1_p50_us": 180.0}}
    (note,) = report.floor_notes(meds)
    assert "180 µs = 0.72x the ssh chain's 250 µs" in note
    assert "the target 0.7x is 175 µs, -5 µs from that floor" in note
    assert report.floor_notes({"ferryman": {"rr1_p50_us": 320.0}, "ssh": {"rr1_p50_us": 250.0}}) == []


def test_relay_floor_path_carries_verified_bytes(tmp_path) -> None:
    from bench.paths import RelayFloorPath

    if RelayFloorPath(0).available() is not None:
        pytest.skip("haproxy is not installed")
    result = run_bench(["--quick", "--paths", "direct,relay-floor", "--workloads", "bulk-up,bulk-down,rr1",
                        "--bulk-mib", "64", "--json", "out.json"], cwd=str(tmp_path), timeout=50)
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads((tmp_path / "out.json").read_text())
    floor = doc["paths"]["relay-floor"]
    assert floor["status"] == "ok", floor
    assert floor["median"]["bulk_up_mbps"] > 0 and floor["median"]["rr1_p50_us"] > 0
    assert set(floor["median"]) >= {"cpu_s_per_gib.relay-1", "cpu_s_per_gib.relay-2", "cpu_s_per_gib.relay-3"}
