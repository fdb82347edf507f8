"""What the benchmark reports: medians over rounds, Ferryman's ratios to each other path,
the target checks against the OpenSSH chain, the text table and the JSON document.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys

import uvloop

from .runner import METRICS_OF, PathRun

# key, table label, number format
METRICS = [
    ("bulk_up_mbps", "bulk up MB/s", "{:.0f}"),
    ("bulk_down_mbps", "bulk down MB/s", "{:.0f}"),
    ("rr1_p50_us", "rr1 p50 µs", "{:.0f}"),
    ("rr1_p99_us", "rr1 p99 µs", "{:.0f}"),
    ("rr64_req_s", "rr64 req/s", "{:.0f}"),
    ("connect_flows_s", "connect flows/s", "{:.0f}"),
    ("idle_kib_per_flow", "idle KiB/flow", "{:.1f}"),
    ("cpu_s_per_gib", "CPU s/GiB", "{:.2f}"),
]
# The workloads behind each metric, to show a workload's error in the metric's cell.
WORKLOADS_OF = {key: tuple(w for w, keys in METRICS_OF.items() if key in keys) for key, _, _ in METRICS}
SUBJECT, REFERENCE = "ferryman", "ssh"
# label, metric, comparison, threshold, ratio to REFERENCE (else Ferryman's own value)
TARGETS = [
    ("bulk up >= 1.5x", "bulk_up_mbps", ">=", 1.5, True),
    ("bulk down >= 1.5x", "bulk_down_mbps", ">=", 1.5, True),
    ("rr64 >= 1.5x", "rr64_req_s", ">=", 1.5, True),
    ("connect >= 3x", "connect_flows_s", ">=", 3.0, True),
    ("rr1 p50 <= 1.0x", "rr1_p50_us", "<=", 1.0, True),
    ("idle <= 16 KiB/flow", "idle_kib_per_flow", "<=", 16.0, False),
]
MEMORY_METRIC = "Pss from /proc/PID/smaps_rollup, summed over the path's processes (Rss kept in details)"
CPU_METRIC = "utime+stime+cutime+cstime from /proc/PID/stat of the path's process trees, over both bulk transfers"


# Idle memory is the growth of the path's processes while they hold the flows. Only the
# first round measures it on processes that never held that many flows: later rounds
# reuse heap freed by the first and show almost nothing. So it reports the largest round.
WORST_OF_ROUNDS = {"idle_kib_per_flow": max}


def medians(run: PathRun) -> dict[str, float]:
    values: dict[str, list[float]] = {}
    for rnd in run.rounds:
        for key, value in rnd.metrics.items():
            values.setdefault(key, []).append(value)
    return {key: WORST_OF_ROUNDS.get(key, statistics.median)(v) for key, v in values.items()}


def ratios(meds: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """``{"ferryman/ssh": {metric: ferryman / ssh}}`` for every other path with numbers."""
    mine = meds.get(SUBJECT, {})
    out = {}
    for name, theirs in meds.items():
        if name != SUBJECT and mine:
            out[f"{SUBJECT}/{name}"] = {k: mine[k] / theirs[k] for k, _, _ in METRICS
                                        if k in mine and theirs.get(k)}
    return out


def targets(meds: dict[str, dict[str, float]], rats: dict[str, dict[str, float]]) -> list[dict]:
    checks = []
    for label, metric, op, threshold, relative in TARGETS:
        value = rats.get(f"{SUBJECT}/{REFERENCE}", {}).get(metric) if relative else meds.get(SUBJECT, {}).get(metric)
        if value is None:
            result = "n/a"
        else:
            result = "PASS" if (value >= threshold if op == ">=" else value <= threshold) else "MISS"
        checks.append({"target": label, "metric": metric, "relative_to": REFERENCE if relative else None,
                       "op": op, "threshold": threshold, "value": value, "result": result})
    return checks


def _shown(check: dict) -> str:
    if check["value"] is None:
        return ""
    return f" ({check['value']:.2f}x)" if check["relative_to"] else f" ({check['value']:.1f})"


def _errors(run: PathRun, metric: str) -> list[str]:
    return [f"round {i + 1}: {rnd.errors[w]}" for i, rnd in enumerate(run.rounds)
            for w in WORKLOADS_OF[metric] if w in rnd.errors]


def table(runs: dict[str, PathRun], meds: dict[str, dict[str, float]], rats: dict[str, dict[str, float]],
          checks: list[dict]) -> str:
    """The text report: metrics × paths, Ferryman's ratios, notes for every error, the target line."""
    names = list(runs)
    header = ["metric", *names, *rats]
    notes: list[str] = []
    rows = []
    for key, label, fmt in METRICS:
        row = [label]
        for name in names:
            run = runs[name]
            if run.status == "unavailable":
                row.append("unavail.")
            elif key in meds[name]:
                errs = _errors(run, key)
                row.append(fmt.format(meds[name][key]) + ("*" if errs else ""))
                notes += [f"* {name} {label}: {e} (median of the other rounds)" for e in errs]
            elif _errors(run, key) or run.status == "failed":
                row.append("ERROR")
                notes += [f"{name} {label}: {e}" for e in _errors(run, key)]
            else:
                row.append("-")
        row += [f"{rats[r][key]:.2f}x" if key in rats[r] else "-" for r in rats]
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    for name, run in runs.items():
        if run.status != "ok":
            notes.append(f"{name}: {run.status}: {run.reason}")
        for i, rnd in enumerate(run.rounds):
            connect = rnd.details.get("connect", {})
            if connect.get("errors"):
                notes.append(f"{name} connect round {i + 1}: {connect['errors']} failed flows "
                             f"(first: {connect['first_error']})")
            if "capped" in rnd.details.get("idle", {}):
                notes.append(f"{name} idle round {i + 1}: {rnd.details['idle']['capped']}")
    notes.append("idle KiB/flow: Pss (smaps_rollup) growth of the path's processes, largest round "
                 "(later rounds reuse memory freed by the first); CPU: their utime+stime "
                 "(10 ms ticks, coarse for small bulk sizes); - = not applicable (no proxy process)")
    verdicts = "; ".join(f"{c['target']} {c['result']}" + _shown(c) for c in checks)
    lines += ["", *notes, "", f"targets ({SUBJECT} vs {REFERENCE}, informational): {verdicts}"]
    return "\n".join(lines)


def machine() -> dict:
    info = {"cores": os.cpu_count(), "python": sys.version.split()[0], "uvloop": uvloop.__version__,
            "kernel": platform.release(), "machine": platform.machine()}
    for path, key, field in (("/proc/cpuinfo", "cpu", "model name"), ("/proc/meminfo", "memory", "MemTotal")):
        try:
            with open(path) as fh:
                info[key] = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith(field)), "")
        except OSError:
            pass
    return info


def document(params: dict, runs: dict[str, PathRun], meds: dict, rats: dict, checks: list[dict], text: str) -> dict:
    """Everything for ``--json``."""
    return {
        "machine": machine(), "parameters": params,
        "methods": {"idle_memory": MEMORY_METRIC, "cpu": CPU_METRIC,
                    "verification": "backend counters (flows, bytes) read directly around every workload"},
        "paths": {name: {**run.to_json(), "median": meds[name]} for name, run in runs.items()},
        "ratios": rats, "targets": checks, "table": text,
    }
