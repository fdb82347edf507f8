"""``ferryman bench`` (also ``python -m bench``): Ferryman against the direct path, OpenSSH, stunnel and haproxy.

Starts the backends (``bench.backend``: TCP, and a UDP echo, each its own process) and every
selected path, runs bulk, rr1, rr64, connect, idle and UDP (udp64, udp1200, udp64-max)
workloads on each path in interleaved rounds, prints progress on stderr, then a table of
medians with Ferryman's ratios and the target checks on stdout, and writes everything to
a JSON file. Exit status 0 unless a path failed. The ``http`` workload (``bench.web_fabric``)
publishes a web app through the local fabric and compares it with nginx with ``wrk``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
from dataclasses import asdict

from . import report
from .paths import PATHS, Path, PathError
from .procfs import raise_nofile_limit
from .runner import UDP_WORKLOADS, WORKLOADS, Backend, Bench, Parameters, PathRun, progress

PEER_PACKAGES = ["openssh-server", "openssh-client", "stunnel4", "haproxy"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    about = __doc__.split("\n\n")[1].replace("``", "").replace("\n", " ")
    parser = argparse.ArgumentParser(prog="ferryman bench", description=about)
    parser.add_argument("--paths", default=None, metavar="NAME,...",
                        help=f"paths to run, from {','.join(PATHS)} (default: every available one)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds; medians are reported (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 round, 8 MiB bulk, 1 s timed workloads, 500 idle flows")
    parser.add_argument("--bulk-mib", type=int, default=None, help="bytes per bulk transfer, MiB (default 256)")
    parser.add_argument("--workloads", default=None, metavar="NAME,...",
                        help=f"workloads to run, from {','.join(WORKLOADS)},http (default: all but http)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds of rr64, connect and each UDP workload (default 5)")
    parser.add_argument("--udp-rate", type=float, default=None,
                        help="datagrams/s offered in udp64 and udp1200, over all UDP flows (default 50000)")
    parser.add_argument("--udp-flows", type=int, default=None,
                        help="UDP flows (sender sockets) per UDP workload (default 4)")
    parser.add_argument("--idle-flows", type=int, default=None, help="concurrent idle flows (default 10000)")
    parser.add_argument("--json", default="bench-results.json", metavar="PATH",
                        help="results file (default %(default)s)")
    parser.add_argument("--compare", default=None, metavar="BASELINE.json",
                        help="an earlier run's results file: print each metric's change against it")
    parser.add_argument("--install-peers", action="store_true",
                        help=f"first run apt-get update && apt-get install -y {' '.join(PEER_PACKAGES)}")
    args = parser.parse_args(argv)
    if args.paths is not None:
        args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
        unknown = [p for p in args.paths if p not in PATHS]
        if unknown:
            parser.error(f"unknown path(s) {', '.join(unknown)}; known: {', '.join(PATHS)}")
    if args.workloads is not None:
        args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
        unknown = [w for w in args.workloads if w not in WORKLOADS and w != "http"]
        if unknown or not args.workloads:
            parser.error(f"unknown workload(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(WORKLOADS)}")
    for name in ("rounds", "bulk_mib", "idle_flows", "udp_flows"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.duration is not None and args.duration <= 0:
        parser.error("--duration must be positive")
    if args.udp_rate is not None and args.udp_rate <= 0:
        parser.error("--udp-rate must be positive")
    args.baseline = None
    if args.compare is not None:
        try:
            args.baseline = report.load_baseline(args.compare)
        except report.BaselineError as exc:
            parser.error(f"--compare: {exc}")
    return args


def parameters(args: argparse.Namespace) -> Parameters:
    params = Parameters.quick() if args.quick else Parameters()
    if args.rounds is not None:
        params.rounds = args.rounds
    if args.bulk_mib is not None:
        params.bulk_bytes = args.bulk_mib << 20
    if args.duration is not None:
        params.duration = args.duration
    if args.idle_flows is not None:
        params.idle_flows = args.idle_flows
    if args.workloads is not None:
        params.workloads = [w for w in WORKLOADS if w in args.workloads]
    if args.udp_rate is not None:
        params.udp_rate = args.udp_rate
    if args.udp_flows is not None:
        params.udp_flows = args.udp_flows
    return params


def install_peers() -> None:
    progress(f"installing {' '.join(PEER_PACKAGES)} with apt-get ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", *PEER_PACKAGES]):
        if subprocess.run(argv, env=env).returncode != 0:
            progress(f"warning: `{' '.join(argv)}` failed; continuing with what is installed")
            return


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM ends the bench like Ctrl-C does, so that every started process is stopped."""
    raise KeyboardInterrupt


def _http(args: argparse.Namespace) -> int:
    """The ``http`` workload: a web app through edge → connector, nginx and direct (``bench.web_fabric``)."""
    from . import web_fabric

    seconds = 2 if args.quick else int(args.duration or 8)
    progress(f"http: web app through the fabric vs nginx, wrk {seconds} s per path and size ...")
    try:
        rows = web_fabric.run(seconds)
    except (RuntimeError, OSError) as exc:
        progress(f"http: FAILED: {exc}")
        return 1
    print(web_fabric.table(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workloads is not None and "http" in args.workloads:
        status = _http(args)
        args.workloads = [w for w in args.workloads if w != "http"]
        if not args.workloads:
            return status
    params = parameters(args)
    signal.signal(signal.SIGTERM, _terminate)
    nofile = raise_nofile_limit()
    if args.install_peers:
        install_peers()
    names = args.paths or list(PATHS)
    runs = {name: PathRun(name) for name in names}
    backend = Backend()
    udp_backend: Backend | None = None
    started: list[Path] = []
    try:
        if any(w in UDP_WORKLOADS for w in params.workloads):
            udp_backend = Backend(udp=True)
            progress(f"UDP echo backend on 127.0.0.1:{udp_backend.udp_port} (udp)")
        progress(f"backend on 127.0.0.1:{backend.port}; open-file limit {nofile}")
        for name in names:
            path, run = PATHS[name](backend.port, udp_backend.udp_port if udp_backend else 0), runs[name]
            reason = path.available()
            if reason:
                run.status, run.reason = "unavailable", reason
                progress(f"{name}: unavailable: {reason}")
                continue
            run.version = path.version()
            progress(f"starting {name} {run.version} ... ", end="")
            try:
                path.start()
            except (OSError, PathError, RuntimeError) as exc:
                run.status, run.reason = "failed", f"start: {exc}"
                progress(f"FAILED: {exc}")
                continue
            started.append(path)
            udp = f", UDP {path.udp_address[1]}" if udp_backend and not path.udp_unsupported else ""
            progress(f"{path.address[0]}:{path.address[1]}{udp}, {len(path.pids())} proxy processes")
        Bench(params, backend, started, runs, udp_backend).run()
    finally:
        for path in started:
            path.stop()
        backend.stop()
        if udp_backend is not None:
            udp_backend.stop()

    meds = {name: report.medians(run) for name, run in runs.items() if run.status != "unavailable"}
    rats = report.ratios(meds)
    checks = report.targets(meds, rats, params.udp_rate)
    text = report.table(runs, meds, rats, checks, params.workloads)
    print(text)
    doc = report.document({**asdict(params), "nofile_limit": nofile, "paths": names}, runs, meds, rats, checks, text)
    if args.baseline is not None:
        rows = report.compare(args.baseline, doc)
        print("\n" + report.compare_table(rows, args.compare))
        doc["comparison"] = {"baseline": os.path.abspath(args.compare), "rows": rows}
    with open(args.json, "w") as fh:
        json.dump(doc, fh, indent=2)
    progress(f"results written to {os.path.abspath(args.json)}")
    failed = [name for name, run in runs.items()
              if run.status == "failed" or any(rnd.errors for rnd in run.rounds)
              or (run.status == "unavailable" and args.paths)]
    if failed:
        progress(f"paths with failures: {', '.join(failed)}")
    return 1 if failed else 0
