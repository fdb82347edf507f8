"""What the benchmark reports: medians over rounds, Ferryman's ratios to each other path,
the target checks against the OpenSSH chain, the text table and the JSON document.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys

import uvloop

from .runner import CPU_BY_PROCESS, METRICS_OF, UDP_WORKLOADS, PathRun

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
    ("udp64_dgram_s", "udp 64 B answers/s", "{:.0f}"),
    ("udp64_loss_pct", "udp 64 B loss %", "{:.3f}"),
    ("udp64_p50_us", "udp 64 B p50 µs", "{:.0f}"),
    ("udp64_p99_us", "udp 64 B p99 µs", "{:.0f}"),
    ("udp1200_dgram_s", "udp 1200 B answers/s", "{:.0f}"),
    ("udp1200_loss_pct", "udp 1200 B loss %", "{:.3f}"),
    ("udp1200_p50_us", "udp 1200 B p50 µs", "{:.0f}"),
    ("udp1200_p99_us", "udp 1200 B p99 µs", "{:.0f}"),
    ("udp64max_dgram_s", "udp 64 B unpaced answers/s", "{:.0f}"),
    ("udp64max_loss_pct", "udp 64 B unpaced loss %", "{:.2f}"),
]
UDP_TARGET_RATE = 50_000
# The workloads behind each metric, to show a workload's error in the metric's cell.
WORKLOADS_OF = {key: tuple(w for w, keys in METRICS_OF.items() if key in keys) for key, _, _ in METRICS}
SUBJECT, REFERENCE = "ferryman", "ssh"
FLOOR = "relay-floor"  # three plain relays: what the three-process shape costs with no work in it
# label, metric, comparison, threshold, ratio to REFERENCE (else Ferryman's own value)
# (label, metric, op, threshold, relative): relative True compares Ferryman with REFERENCE,
# a path name compares Ferryman with that path (its ratio in ``ratios``), False is absolute.
TARGETS: list[tuple[str, str, str, float, bool | str]] = [
    ("bulk up >= 1.5x", "bulk_up_mbps", ">=", 1.5, True),
    ("bulk down >= 1.5x", "bulk_down_mbps", ">=", 1.5, True),
    ("rr64 >= 3x", "rr64_req_s", ">=", 3.0, True),
    ("connect >= 3x", "connect_flows_s", ">=", 3.0, True),
    ("rr1 p50 <= 0.7x", "rr1_p50_us", "<=", 0.7, True),
    ("idle <= 16 KiB/flow", "idle_kib_per_flow", "<=", 16.0, False),
    # >= 50,000 datagrams/s of 64 B with < 0.1 % loss: at 50,000/s offered, 0.1 % less answered
    (f"udp64 >= {UDP_TARGET_RATE * 0.999:,.0f} answers/s", "udp64_dgram_s", ">=", UDP_TARGET_RATE * 0.999, False),
    ("udp64 loss < 0.1 %", "udp64_loss_pct", "<", 0.1, False),
    ("udp64 p99 <= 5 ms", "udp64_p99_us", "<=", 5000.0, False),
    # the QUIC fabric carries at least half the TLS/TCP fabric's bulk: ferryman / ferryman-quic <= 2
    ("QUIC bulk up >= 0.5x TLS (TLS/QUIC <= 2x)", "bulk_up_mbps", "<=", 2.0, "ferryman-quic"),
    ("QUIC bulk down >= 0.5x TLS (TLS/QUIC <= 2x)", "bulk_down_mbps", "<=", 2.0, "ferryman-quic"),
]
OPS = {">=": float.__ge__, "<=": float.__le__, "<": float.__lt__}
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


def targets(meds: dict[str, dict[str, float]], rats: dict[str, dict[str, float]],
            udp_rate: float | None = None) -> list[dict]:
    """The target checks; the UDP ones only count when ``udp_rate`` (offered 64 B datagrams/s) reaches the target."""
    checks = []
    for label, metric, op, threshold, relative in TARGETS:
        other = REFERENCE if relative is True else relative or None
        value = rats.get(f"{SUBJECT}/{other}", {}).get(metric) if other else meds.get(SUBJECT, {}).get(metric)
        if value is None:
            result = "n/a"
        elif metric.startswith("udp64_") and udp_rate is not None and udp_rate < UDP_TARGET_RATE:
            result = f"n/a (offered {udp_rate:,.0f}/s)"
        else:
            result = "PASS" if OPS[op](float(value), float(threshold)) else "MISS"
        checks.append({"target": label, "metric": metric, "relative_to": other,
                       "op": op, "threshold": threshold, "value": value, "result": result})
    return checks


def _shown(check: dict) -> str:
    if check["value"] is None:
        return ""
    return f" ({check['value']:.2f}x)" if check["relative_to"] else f" ({check['value']:.1f})"


def _errors(run: PathRun, metric: str) -> list[str]:
    return [f"round {i + 1}: {rnd.errors[w]}" for i, rnd in enumerate(run.rounds)
            for w in WORKLOADS_OF[metric] if w in rnd.errors]


def _udp_unsupported(run: PathRun) -> str:
    """Why ``run``'s path carries no UDP ("" if it does or never ran a UDP workload)."""
    return next((d[w]["unsupported"] for d in (r.details for r in run.rounds) for w in UDP_WORKLOADS
                 if "unsupported" in d.get(w, {})), "")


def table(runs: dict[str, PathRun], meds: dict[str, dict[str, float]], rats: dict[str, dict[str, float]],
          checks: list[dict], workloads: list[str] | None = None) -> str:
    """The text report: metrics × paths, Ferryman's ratios, notes for every error, the target line.

    ``workloads``: show only the rows of these (default: all).
    """
    names = list(runs)
    header = ["metric", *names, *rats]
    notes: list[str] = []
    rows = []
    for key, label, fmt in METRICS:
        if workloads is not None and not any(w in workloads for w in WORKLOADS_OF[key]):
            continue
        row = [label]
        for name in names:
            run = runs[name]
            if run.status == "unavailable":
                row.append("unavail.")
            elif key.startswith("udp") and _udp_unsupported(run):
                row.append("–")
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
            for w in UDP_WORKLOADS:
                udp = rnd.details.get(w, {})
                if udp.get("lost") or udp.get("duplicates") or udp.get("corrupted"):
                    notes.append(f"{name} {w} round {i + 1}: {udp['lost']:,} of {udp['sent']:,} lost "
                                 f"({udp['loss_pct']:.3f} %), {udp['duplicates']} duplicates, "
                                 f"{udp['corrupted']} corrupted; drops counted: {udp['drops']['where']}")
        if _udp_unsupported(run):
            notes.append(f"{name}: – UDP: {_udp_unsupported(run)}")
    for name in names:
        mine = sorted((k[len(CPU_BY_PROCESS):], v) for k, v in meds.get(name, {}).items()
                      if k.startswith(CPU_BY_PROCESS))
        if mine:
            notes.append(f"CPU s/GiB by process, {name}: " + ", ".join(f"{proc} {v:.2f}" for proc, v in mine))
    notes.append("idle KiB/flow: Pss (smaps_rollup) growth of the path's processes, largest round "
                 "(later rounds reuse memory freed by the first); CPU: their utime+stime "
                 "(10 ms ticks, coarse for small bulk sizes); - = not applicable (no proxy process)")
    if workloads is None or any(w in workloads for w in UDP_WORKLOADS):
        notes.append("udp: answers/s = verified echo answers (checksum, flow, sequence) to datagrams sent in the "
                     "window / window; loss = sent - answered; round trip from the send timestamp in each datagram; "
                     "drops: node counters (ferryman_datagrams_dropped_total) and kernel per-socket drops")
    notes += floor_notes(meds)
    verdicts = "; ".join(f"{c['target']} {c['result']}" + _shown(c) for c in checks)
    lines += ["", *notes, "", f"targets ({SUBJECT} vs {REFERENCE} unless one names another path; informational): {verdicts}"]
    return "\n".join(lines)


def floor_notes(meds: dict[str, dict[str, float]]) -> list[str]:
    """What the ``relay-floor`` path (three plain relays, no work) says about the round-trip target:
    its p50 against the ssh chain's, next to the target's own bound."""
    floor, chain = meds.get(FLOOR, {}).get("rr1_p50_us"), meds.get(REFERENCE, {}).get("rr1_p50_us")
    if not floor or not chain:
        return []
    bound = next(t[3] for t in TARGETS if t[1] == "rr1_p50_us")
    return [f"rr1 floor: three plain relays (no TLS, no framing) answer in {floor:.0f} µs = {floor / chain:.2f}x "
            f"the {REFERENCE} chain's {chain:.0f} µs; the target {bound}x is {chain * bound:.0f} µs, "
            f"{chain * bound - floor:+.0f} µs from that floor for a three-process path's own work"]


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
                    "verification": "backend counters (flows, bytes) read directly around every workload",
                    "udp": "every datagram carries flow, size, sequence number, send time and a crc32 of it all; "
                           "the generator verifies each answer (corrupted fails the workload) and counts "
                           "unique answers, duplicates and loss; the UDP echo backend's counters must cover the "
                           "answers; drops: node metrics (by node and reason) and /proc/net/udp drops by socket "
                           "owner, around each run"},
        "paths": {name: {**run.to_json(), "median": meds[name]} for name, run in runs.items()},
        "ratios": rats, "targets": checks, "table": text,
    }


# ------------------------------------------------------------------ --compare: this run against an earlier one
HIGHER_IS_BETTER = ("_mbps", "_req_s", "_flows_s", "_dgram_s")
NOISE_PCT = 5.0  # changes smaller than this are shown as "~" (runs on one machine differ by more)


class BaselineError(ValueError):
    """The ``--compare`` file is not a results file of ``ferryman bench``."""


def load_baseline(path: str) -> dict:
    """An earlier run's JSON document; ``BaselineError`` saying why it cannot be used."""
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except OSError as exc:
        raise BaselineError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BaselineError(f"{path} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("paths"), dict) or not all(
            isinstance(e, dict) and isinstance(e.get("median", {}), dict) for e in doc["paths"].values()):
        raise BaselineError(f"{path} is not a `ferryman bench` results file (no \"paths\" with medians)")
    return doc


def _metric_order(metric: str) -> tuple[int, str]:
    keys = [k for k, _, _ in METRICS]
    return (keys.index(metric), "") if metric in keys else (len(keys), metric)


def _verdict(metric: str, old: float, new: float) -> tuple[float | None, str]:
    if old == 0:
        return None, "same" if new == 0 else "new"
    change = (new - old) / abs(old) * 100
    if abs(change) < NOISE_PCT:
        return change, "~"
    higher = metric.endswith(HIGHER_IS_BETTER)
    improved = (change > 0) == higher
    return change, "better" if improved else "worse"


def compare(baseline: dict, current: dict) -> list[dict]:
    """Every metric (path medians, then Ferryman's ratios) that both runs have: its value in each
    run, the change in percent and whether that is ``better``, ``worse`` or within ``NOISE_PCT`` (``~``).

    A ratio's direction is its metric's: for a rate, a higher ratio is better; for a latency,
    memory or CPU figure, a lower one."""
    rows = []
    for path, entry in current.get("paths", {}).items():
        old_medians = baseline.get("paths", {}).get(path, {}).get("median", {})
        for metric in sorted(entry.get("median", {}), key=_metric_order):
            if metric in old_medians:
                old, new = float(old_medians[metric]), float(entry["median"][metric])
                change, verdict = _verdict(metric, old, new)
                rows.append({"what": path, "metric": metric, "baseline": old, "current": new,
                             "change_pct": change, "verdict": verdict})
    for pair, values in current.get("ratios", {}).items():
        old_values = baseline.get("ratios", {}).get(pair, {})
        for metric in sorted(values, key=_metric_order):
            if metric in old_values:
                old, new = float(old_values[metric]), float(values[metric])
                change, verdict = _verdict(metric, old, new)
                rows.append({"what": pair, "metric": metric, "baseline": old, "current": new,
                             "change_pct": change, "verdict": verdict})
    return rows


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def compare_table(rows: list[dict], baseline_name: str) -> str:
    """The text of ``compare``'s rows (one line each), headed by the baseline's name."""
    if not rows:
        return f"compared with {baseline_name}: no metric in common"
    header = ["", "metric", "baseline", "now", "change", ""]
    lines = [header]
    for r in rows:
        change = "n/a" if r["change_pct"] is None else f"{r['change_pct']:+.1f} %"
        lines.append([r["what"], r["metric"], _number(r["baseline"]), _number(r["current"]), change, r["verdict"]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) if i < 2 or i == 5 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
            .rstrip() for line in lines]
    worse = sum(r["verdict"] == "worse" for r in rows)
    better = sum(r["verdict"] == "better" for r in rows)
    return "\n".join([f"compared with {baseline_name} ({better} better, {worse} worse, "
                      f"changes under {NOISE_PCT:g} % shown as ~):", *text])
