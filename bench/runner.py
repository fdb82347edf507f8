"""Runs the benchmark: backend process, paths, and every workload on every path in interleaved rounds.

Round r runs all workloads on the first path, then all on the next, and so on, so slow
drift of the machine hits every path alike. Around each workload the backend's counters
are read directly (not through the path) and must show the flows and bytes the load
generator counted: a path only gets a number for traffic that really reached the backend.
"""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import uvloop

from . import workloads
from .backend import ECHO, SINK, SOURCE, query_stats
from .paths import Path, PathError
from .procfs import cpu_seconds, memory_kib

MB = 1e6
GIB = 1 << 30
SETTLE_TIMEOUT = 30.0
# Metrics each workload produces (CPU per GiB needs both bulk transfers).
METRICS_OF = {
    "bulk-up": ("bulk_up_mbps", "cpu_s_per_gib"),
    "bulk-down": ("bulk_down_mbps", "cpu_s_per_gib"),
    "rr1": ("rr1_p50_us", "rr1_p99_us"),
    "rr64": ("rr64_req_s",),
    "connect": ("connect_flows_s",),
    "idle": ("idle_kib_per_flow",),
}
IDLE_HEADROOM = 50  # flows below a path's own cap, for sockets still closing from earlier workloads


@dataclass
class Parameters:
    rounds: int = 3
    bulk_bytes: int = 256 << 20
    rr1_round_trips: int = 5000
    rr1_warmup: int = 500
    rr64_flows: int = 64
    duration: float = 5.0
    connect_concurrency: int = 32
    idle_flows: int = 10_000

    @classmethod
    def quick(cls) -> Parameters:
        return cls(rounds=1, bulk_bytes=8 << 20, rr1_round_trips=1000, rr1_warmup=100, duration=1.0, idle_flows=500)


@dataclass
class RoundResult:
    """One path's numbers in one round: ``metrics`` by metric key, ``errors`` and ``details`` by workload."""

    metrics: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    details: dict[str, dict] = field(default_factory=dict)


@dataclass
class PathRun:
    """Everything known about one path over the run."""

    name: str
    status: str = "ok"  # ok | unavailable | failed
    reason: str = ""
    version: str = ""
    rounds: list[RoundResult] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"status": self.status, "reason": self.reason, "version": self.version,
                "rounds": [asdict(r) for r in self.rounds]}


def progress(text: str, end: str = "\n") -> None:
    print(text, end=end, file=sys.stderr, flush=True)


class Backend:
    """The ``python -m bench.backend`` process on a free port."""

    def __init__(self) -> None:
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.backend", "--port", "0"], env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True)
        line = self.proc.stdout.readline().decode()
        if not line.startswith("listening "):
            self.stop()
            raise RuntimeError(f"bench.backend did not start (said {line!r})")
        self.port = int(line.split()[1])

    def stats(self) -> dict:
        return query_stats(self.port)

    def settle(self) -> bool:
        """Wait until no counted flow is open at the backend; False if some still are after the timeout."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while self.stats()["active"]:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def _delta(before: dict, after: dict) -> dict:
    return {"flows": {m: after["flows"][m] - before["flows"][m] for m in after["flows"]},
            "bytes_in": after["bytes_in"] - before["bytes_in"], "bytes_out": after["bytes_out"] - before["bytes_out"]}


class Bench:
    def __init__(self, params: Parameters, backend: Backend, paths: list[Path], runs: dict[str, PathRun]) -> None:
        self.params = params
        self.backend = backend
        self.paths = paths
        self.runs = runs
        self.nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)

    def run(self) -> None:
        try:
            for r in range(self.params.rounds):
                for path in self.paths:
                    if self.runs[path.name].status == "ok":
                        self._round(r, path)
        finally:
            self.runner.close()

    # ------------------------------------------------------------------ one path, one round
    def _round(self, r: int, path: Path) -> None:
        p = self.params
        result = RoundResult()
        self.runs[path.name].rounds.append(result)
        tag = f"[round {r + 1}/{p.rounds}] {path.name}"
        proxied = bool(path.pids())
        steps = [
            ("bulk-up", f"{p.bulk_bytes >> 20} MiB", self._bulk_up),
            ("bulk-down", f"{p.bulk_bytes >> 20} MiB", self._bulk_down),
            ("rr1", f"{p.rr1_round_trips} x 64 B", self._rr1),
            ("rr64", f"{p.rr64_flows} flows {p.duration:g} s", self._rr64),
            ("connect", f"concurrency {p.connect_concurrency} {p.duration:g} s", self._connect),
            ("idle", f"{p.idle_flows} flows", self._idle),
        ]
        for workload, what, step in steps:
            progress(f"{tag} {workload} {what} ... ", end="")
            if workload == "idle" and not proxied:
                progress("n/a (no proxy processes)")
                continue
            before = self.backend.stats()
            try:
                summary = step(path, result, before)
            except Exception as exc:  # noqa: BLE001 - whatever breaks one workload is reported, the run goes on
                result.errors[workload] = workloads.describe(exc)
                progress(f"ERROR {result.errors[workload]}")
            else:
                progress(summary)
            if not self.backend.settle():
                progress(f"{tag} warning: flows still open at the backend {SETTLE_TIMEOUT:g} s after {workload}")
            try:
                path.check()
            except PathError as exc:
                for key in METRICS_OF[workload]:  # numbers taken while the path was dying are not kept
                    result.metrics.pop(key, None)
                result.errors.setdefault(workload, f"the path failed during {workload}")
                self.runs[path.name].status = "failed"
                self.runs[path.name].reason = f"round {r + 1}, during {workload}: {exc}"
                progress(f"{tag} FAILED: {exc}")
                return

    def _checked(self, workload: str, result: RoundResult, before: dict, detail: dict, *, mode: bytes,
                 flows: int, bytes_in: int = 0, bytes_out: int = 0) -> None:
        """Record ``detail`` with the backend's view; raise if the backend saw less than was measured."""
        seen = _delta(before, self.backend.stats())
        detail["backend"] = seen
        result.details[workload] = detail
        opened = seen["flows"][mode.decode()]
        if opened < flows or seen["bytes_in"] < bytes_in or seen["bytes_out"] < bytes_out:
            raise workloads.WorkloadError(
                f"backend saw {opened} flows / {seen['bytes_in']} B in / {seen['bytes_out']} B out; "
                f"the load generator counted {flows} / {bytes_in} / {bytes_out}")

    def _bulk(self, path: Path, result: RoundResult, before: dict, workload: str, metric: str) -> str:
        nbytes = self.params.bulk_bytes
        pids = path.pids()
        cpu_before = cpu_seconds(pids)
        if workload == "bulk-up":
            seconds = self.runner.run(workloads.bulk_upload(path.address, nbytes))
            expect = {"mode": SINK, "bytes_in": nbytes}
        else:
            seconds = self.runner.run(workloads.bulk_download(path.address, nbytes))
            expect = {"mode": SOURCE, "bytes_out": nbytes}
        detail: dict = {"bytes": nbytes, "seconds": seconds}
        if pids:
            detail["cpu_s"] = cpu_seconds(path.pids()) - cpu_before
        self._checked(workload, result, before, detail, flows=1, **expect)
        result.metrics[metric] = nbytes / seconds / MB
        return f"{result.metrics[metric]:.0f} MB/s"

    def _bulk_up(self, path: Path, result: RoundResult, before: dict) -> str:
        return self._bulk(path, result, before, "bulk-up", "bulk_up_mbps")

    def _bulk_down(self, path: Path, result: RoundResult, before: dict) -> str:
        summary = self._bulk(path, result, before, "bulk-down", "bulk_down_mbps")
        up, down = result.details.get("bulk-up", {}), result.details["bulk-down"]
        if "bulk_up_mbps" in result.metrics and "cpu_s" in up:
            result.metrics["cpu_s_per_gib"] = (up["cpu_s"] + down["cpu_s"]) / (2 * self.params.bulk_bytes / GIB)
            summary += f"; {result.metrics['cpu_s_per_gib']:.2f} CPU s/GiB over both bulk transfers"
        return summary

    def _rr1(self, path: Path, result: RoundResult, before: dict) -> str:
        p = self.params
        detail = self.runner.run(workloads.rr1(path.address, p.rr1_round_trips, p.rr1_warmup))
        trips = p.rr1_round_trips + p.rr1_warmup + 1
        self._checked("rr1", result, before, detail, mode=ECHO, flows=1, bytes_in=64 * trips)
        result.metrics["rr1_p50_us"] = detail["p50_us"]
        result.metrics["rr1_p99_us"] = detail["p99_us"]
        return f"p50 {detail['p50_us']:.0f} µs, p99 {detail['p99_us']:.0f} µs"

    def _rr64(self, path: Path, result: RoundResult, before: dict) -> str:
        p = self.params
        detail = self.runner.run(workloads.rr_concurrent(path.address, p.rr64_flows, p.duration))
        self._checked("rr64", result, before, detail, mode=ECHO, flows=p.rr64_flows,
                      bytes_in=64 * detail["round_trips"])
        result.metrics["rr64_req_s"] = detail["req_per_s"]
        return f"{detail['req_per_s']:,.0f} req/s"

    def _connect(self, path: Path, result: RoundResult, before: dict) -> str:
        p = self.params
        detail = self.runner.run(workloads.connect_rate(path.address, p.connect_concurrency, p.duration))
        self._checked("connect", result, before, detail, mode=ECHO, flows=detail["completed"],
                      bytes_in=64 * detail["completed"])
        result.metrics["connect_flows_s"] = detail["flows_per_s"]
        errors = f", {detail['errors']} errors (first: {detail['first_error']})" if detail["errors"] else ", 0 errors"
        return f"{detail['flows_per_s']:,.0f} flows/s{errors}"

    def _idle(self, path: Path, result: RoundResult, before: dict) -> str:
        n = self.params.idle_flows
        cap = path.max_flows(self.nofile)
        capped = ""
        if cap is not None and n > cap - IDLE_HEADROOM:
            n = cap - IDLE_HEADROOM
            capped = f"{n} flows, not {self.params.idle_flows}: {path.name} admits {cap} with {self.nofile} open files"
            progress(f"({capped}) ", end="")
        detail = self.runner.run(workloads.idle_flows(path.address, n, lambda: memory_kib(path.pids())))
        if capped:
            detail["capped"] = capped
        self._checked("idle", result, before, detail, mode=ECHO, flows=n, bytes_in=64 * n)
        result.metrics["idle_kib_per_flow"] = detail["kib_per_flow"]
        return f"{detail['kib_per_flow']:.1f} KiB/flow (Pss; Rss {detail['rss_kib_per_flow']:.1f})"
