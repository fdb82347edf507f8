"""Runs the benchmark: backend process, paths, and every workload on every path in interleaved rounds.

Round r runs all workloads on the first path, then all on the next, and so on, so slow
drift of the machine hits every path alike. Around each workload the backend's counters
are read directly (not through the path) and must show the flows and bytes the load
generator counted: a path only gets a number for traffic that really reached the backend.

The UDP workloads (udp64, udp1200 at an offered rate, udp64-max unpaced) go to a second
backend process, a UDP echo; each answer is verified by the generator (checksum, flow,
sequence number), the backend's datagram counters must cover the answers, and around each
run the path nodes' datagram counters (drops by reason) and the kernel's per-socket drop
counts (receive buffers that overflowed, which no process sees) are recorded, so the JSON
says where lost datagrams went. Paths that do not carry UDP get no number, with the reason.
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
from .procfs import cpu_seconds, memory_kib, runqueue_wait_seconds, udp_drops_by_owner, udp_snmp

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
# UDP workloads: name -> (datagram size, paced?); metrics "<key>_dgram_s", "_loss_pct", "_p50_us", "_p99_us".
UDP_WORKLOADS = {"udp64": (64, True), "udp1200": (1200, True), "udp64-max": (64, False)}
UDP_METRIC_SUFFIXES = ("dgram_s", "loss_pct", "p50_us", "p99_us")


def udp_key(workload: str) -> str:
    return workload.replace("-", "")


for _w in UDP_WORKLOADS:
    METRICS_OF[_w] = tuple(f"{udp_key(_w)}_{suffix}" for suffix in UDP_METRIC_SUFFIXES)
WORKLOADS = list(METRICS_OF)
# CPU seconds per GiB of one of the path's processes (its tree): metric "cpu_s_per_gib.<process name>"
CPU_BY_PROCESS = "cpu_s_per_gib."
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
    udp_rate: float = 50_000.0  # datagrams/s offered in udp64 and udp1200, over all flows
    udp_flows: int = 4
    workloads: list[str] = field(default_factory=lambda: list(WORKLOADS))

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
    """The ``python -m bench.backend`` process on a free port (``udp``: with its UDP echo on ``udp_port``)."""

    def __init__(self, udp: bool = False) -> None:
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        argv = [sys.executable, "-m", "bench.backend", "--port", "0", *(["--udp-port", "0"] if udp else [])]
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     start_new_session=True)
        line = self.proc.stdout.readline().decode()
        if not line.startswith("listening "):
            self.stop()
            raise RuntimeError(f"bench.backend did not start (said {line!r})")
        self.port = int(line.split()[1])
        self.udp_port = int(line.split()[2]) if udp else 0

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


def _udp_delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in after if k != "rcvbuf"} | {"rcvbuf": after.get("rcvbuf")}


def _socket_drops(before: dict[str, dict[int, int]], after: dict[str, dict[int, int]]) -> dict[str, int]:
    """Kernel drops per owner between two reads (sockets created in between start from 0)."""
    return {owner: sum(n - before.get(owner, {}).get(inode, 0) for inode, n in inodes.items())
            for owner, inodes in after.items()}


def _node_drops(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    out = {}
    for node, counts in after.items():
        old = before.get(node, {"rx": 0, "tx": 0, "dropped": {}})
        dropped = {r: n - old["dropped"].get(r, 0) for r, n in counts["dropped"].items()}
        out[node] = {"rx": counts.get("rx", 0) - old.get("rx", 0), "tx": counts.get("tx", 0) - old.get("tx", 0),
                     "dropped": {r: n for r, n in dropped.items() if n}}
    return out


def _cpu_by_process(path: Path) -> dict[str, float]:
    return {name: cpu_seconds(tree) for name, tree in path.processes().items()}


def _cpu_cost(path: Path, before: dict[str, float], detail: dict, operations: int) -> str:
    """Record each process's CPU seconds over the workload in ``detail`` (``cpu_s_by_process``), and
    say the CPU microseconds per operation of each (what one core's worth of it can carry)."""
    if not before or not operations:
        return ""
    spent = {name: cpu_seconds(tree) - before.get(name, 0.0) for name, tree in path.processes().items()}
    detail["cpu_s_by_process"] = spent
    return "; CPU µs/op " + ", ".join(f"{name} {1e6 * s / operations:.0f}" for name, s in sorted(spent.items()))


def where_lost(drops: dict) -> str:
    """One line: who counted which drops (the nodes by reason, the kernel by socket owner)."""
    parts = [f"{node} {reason} {n:,}" for node, counts in drops.get("nodes", {}).items()
             for reason, n in sorted(counts["dropped"].items())]
    parts += [f"kernel, {owner}'s sockets {n:,}" for owner, n in drops.get("kernel_socket_drops", {}).items() if n]
    return "; ".join(parts) or "no drop counted anywhere"


class Bench:
    def __init__(self, params: Parameters, backend: Backend, paths: list[Path], runs: dict[str, PathRun],
                 udp_backend: Backend | None = None) -> None:
        self.params = params
        self.backend = backend
        self.udp_backend = udp_backend
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
        for workload, (size, paced) in UDP_WORKLOADS.items():
            rate = f"{p.udp_rate:,.0f}/s offered" if paced else "unpaced"
            steps.append((workload, f"{size} B {rate}, {p.udp_flows} flows {p.duration:g} s",
                          lambda path, result, before, w=workload: self._udp(path, result, w)))
        for workload, what, step in steps:
            if workload not in p.workloads:
                continue
            progress(f"{tag} {workload} {what} ... ", end="")
            if workload == "idle" and not proxied:
                progress("n/a (no proxy processes)")
                continue
            if workload in UDP_WORKLOADS and (path.udp_unsupported or self.udp_backend is None):
                reason = path.udp_unsupported or "no UDP backend"
                result.details[workload] = {"unsupported": reason}
                progress(f"n/a ({reason})")
                continue
            before = self.backend.stats()
            try:
                summary = step(path, result, before)
            except Exception as exc:  # noqa: BLE001 - whatever breaks one workload is reported, the run goes on
                result.errors[workload] = workloads.describe(exc)
                if getattr(exc, "detail", None) is not None:
                    result.details.setdefault(workload, exc.detail)
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
                if "cpu_s_per_gib" in METRICS_OF[workload]:
                    for key in [k for k in result.metrics if k.startswith(CPU_BY_PROCESS)]:
                        del result.metrics[key]
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
        by_process = {name: cpu_seconds(tree) for name, tree in path.processes().items()}
        if workload == "bulk-up":
            seconds = self.runner.run(workloads.bulk_upload(path.address, nbytes))
            expect = {"mode": SINK, "bytes_in": nbytes}
        else:
            seconds = self.runner.run(workloads.bulk_download(path.address, nbytes))
            expect = {"mode": SOURCE, "bytes_out": nbytes}
        detail: dict = {"bytes": nbytes, "seconds": seconds}
        if pids:
            detail["cpu_s"] = cpu_seconds(path.pids()) - cpu_before
            detail["cpu_s_by_process"] = {name: cpu_seconds(tree) - by_process.get(name, 0.0)
                                          for name, tree in path.processes().items()}
        self._checked(workload, result, before, detail, flows=1, **expect)
        result.metrics[metric] = nbytes / seconds / MB
        return f"{result.metrics[metric]:.0f} MB/s"

    def _bulk_up(self, path: Path, result: RoundResult, before: dict) -> str:
        return self._bulk(path, result, before, "bulk-up", "bulk_up_mbps")

    def _bulk_down(self, path: Path, result: RoundResult, before: dict) -> str:
        summary = self._bulk(path, result, before, "bulk-down", "bulk_down_mbps")
        up, down = result.details.get("bulk-up", {}), result.details["bulk-down"]
        if "bulk_up_mbps" in result.metrics and "cpu_s" in up:
            gib = 2 * self.params.bulk_bytes / GIB
            result.metrics["cpu_s_per_gib"] = (up["cpu_s"] + down["cpu_s"]) / gib
            summary += f"; {result.metrics['cpu_s_per_gib']:.2f} CPU s/GiB over both bulk transfers"
            up_by, down_by = up.get("cpu_s_by_process", {}), down.get("cpu_s_by_process", {})
            for name in up_by.keys() & down_by.keys():
                result.metrics[f"{CPU_BY_PROCESS}{name}"] = (up_by[name] + down_by[name]) / gib
            if up_by:
                summary += " (" + ", ".join(f"{name} {result.metrics[CPU_BY_PROCESS + name]:.2f}"
                                            for name in up_by if CPU_BY_PROCESS + name in result.metrics) + ")"
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
        cpu = _cpu_by_process(path)
        detail = self.runner.run(workloads.rr_concurrent(path.address, p.rr64_flows, p.duration))
        cost = _cpu_cost(path, cpu, detail, detail["round_trips"])
        self._checked("rr64", result, before, detail, mode=ECHO, flows=p.rr64_flows,
                      bytes_in=64 * detail["round_trips"])
        result.metrics["rr64_req_s"] = detail["req_per_s"]
        return f"{detail['req_per_s']:,.0f} req/s{cost}"

    def _connect(self, path: Path, result: RoundResult, before: dict) -> str:
        p = self.params
        cpu = _cpu_by_process(path)
        detail = self.runner.run(workloads.connect_rate(path.address, p.connect_concurrency, p.duration))
        cost = _cpu_cost(path, cpu, detail, detail["completed"])
        self._checked("connect", result, before, detail, mode=ECHO, flows=detail["completed"],
                      bytes_in=64 * detail["completed"])
        result.metrics["connect_flows_s"] = detail["flows_per_s"]
        errors = f", {detail['errors']} errors (first: {detail['first_error']})" if detail["errors"] else ", 0 errors"
        return f"{detail['flows_per_s']:,.0f} flows/s{errors}{cost}"

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

    def _udp(self, path: Path, result: RoundResult, workload: str) -> str:
        """One UDP run: verified answers/s, loss, latency; the backend's and the nodes' counters around it."""
        p = self.params
        size, paced = UDP_WORKLOADS[workload]
        assert self.udp_backend is not None
        owners = {**path.udp_owners(), "backend": [self.udp_backend.proc.pid], "generator": [os.getpid()]}

        def measure() -> dict:
            return {"sockets": udp_drops_by_owner(owners), "snmp": udp_snmp(),
                    "cpu": {owner: cpu_seconds(pids) for owner, pids in owners.items()},
                    "runq": {owner: runqueue_wait_seconds(pids) for owner, pids in owners.items()},
                    "at": time.perf_counter()}

        nodes_before = path.udp_counters()
        backend_before = self.udp_backend.stats()["udp"]
        detail: dict = {}
        try:
            detail = self.runner.run(workloads.udp_echo(path.udp_address, size, p.udp_rate if paced else None,
                                                        p.duration, p.udp_flows, measure))
        except workloads.WorkloadError as exc:
            detail = exc.detail or {}
            raise
        finally:
            seen = _udp_delta(backend_before, self.udp_backend.stats()["udp"])
            drops: dict = {"nodes": _node_drops(nodes_before, path.udp_counters())}
            if "measure_before" in detail:
                before, after = detail.pop("measure_before"), detail.pop("measure_after")
                drops["kernel_socket_drops"] = _socket_drops(before["sockets"], after["sockets"])
                # CPU share of each process over the run (1.0 = one core busy): who is saturated
                wall = after["at"] - before["at"]
                detail["cpu_cores"] = {owner: round((after["cpu"][owner] - before["cpu"][owner]) / wall, 3)
                                       for owner in after["cpu"]}
                # ... and the share of the run each waited for a CPU (stalls that overflow socket buffers)
                detail["runqueue_wait"] = {owner: round((after["runq"][owner] - before["runq"][owner]) / wall, 3)
                                           for owner in after["runq"]}
                drops["host_udp_counters"] = {k: after["snmp"][k] - before["snmp"].get(k, 0)
                                              for k in ("RcvbufErrors", "SndbufErrors", "InErrors", "MemErrors")
                                              if k in after["snmp"]}
            drops["where"] = where_lost(drops)
            detail["drops"] = drops
            detail["backend"] = seen
            result.details[workload] = detail
        # (its "senders" is only informational: a new socket may reuse the address of an earlier run's)
        if seen["datagrams_in"] < detail["received"] or seen["datagrams_out"] < detail["received"]:
            raise workloads.WorkloadError(
                f"backend received {seen['datagrams_in']} and echoed {seen['datagrams_out']} datagrams; the load "
                f"generator had {detail['received']} verified answers", detail)
        key = udp_key(workload)
        result.metrics[f"{key}_dgram_s"] = detail["dgram_per_s"]
        result.metrics[f"{key}_loss_pct"] = detail["loss_pct"]
        result.metrics[f"{key}_p50_us"] = detail["p50_us"]
        result.metrics[f"{key}_p99_us"] = detail["p99_us"]
        dups = f", {detail['duplicates']} duplicates" if detail["duplicates"] else ""
        return (f"{detail['dgram_per_s']:,.0f} answers/s of {detail['sent_per_s']:,.0f} sent/s, "
                f"loss {detail['loss_pct']:.3f} %{dups}, p50 {detail['p50_us']:.0f} µs, p99 {detail['p99_us']:.0f} µs; "
                f"drops: {drops['where']}")
