"""``python -m fuzz``: run the fuzz targets (coverage-guided, atheris/libFuzzer).

    python -m fuzz list                      the targets
    python -m fuzz TARGET [--time S]         fuzz one target for S seconds (default: until stopped)
    python -m fuzz all --time S              every target in turn, S seconds each
    python -m fuzz smoke [--time S]          every target briefly in this process, not coverage-guided
    python -m fuzz TARGET --reproduce FILE   run one saved input, with the traceback of what it breaks

A finding's input is written to ``--findings`` (default ``fuzz-findings/``) as
``TARGET-crash-<sha1>`` (an exception or broken contract), ``-timeout-`` (one input ran over
``--input-timeout`` seconds) or ``-oom-`` (over ``--rss-mb`` MiB); the run then stops with a non-zero exit code.
New interesting inputs grow the working corpus ``--work/TARGET`` (default ``fuzz-work/``); the
committed seeds in ``fuzz/corpus/TARGET`` are read, never written. libFuzzer's closing statistics
say how many inputs ran (``stat::number_of_executed_units``); ``all`` prints one line per target.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from . import CORPUS, INSTRUMENT, TARGETS

_DONE = re.compile(rb"stat::number_of_executed_units:\s*(\d+)")


def _load(name: str, instrument: bool):
    module_name = TARGETS[name][0]
    if instrument:
        import atheris

        with atheris.instrument_imports(include=INSTRUMENT):
            return importlib.import_module(module_name)
    return importlib.import_module(module_name)


def fuzz_one(args: argparse.Namespace) -> int:
    """Run libFuzzer on one target in this process (libFuzzer exits the process when done)."""
    import atheris

    logging.disable(logging.CRITICAL)  # refusals are logged by design; a finding is an exception
    module = _load(args.target, instrument=True)
    work = Path(args.work) / args.target
    work.mkdir(parents=True, exist_ok=True)
    findings = Path(args.findings)
    findings.mkdir(parents=True, exist_ok=True)
    argv = [sys.argv[0], str(work), str(CORPUS / args.target),
            f"-artifact_prefix={findings}{os.sep}{args.target}-",
            f"-rss_limit_mb={args.rss_mb}", f"-timeout={args.input_timeout}",
            f"-max_len={args.max_len}", "-print_final_stats=1"]
    if args.time:
        argv.append(f"-max_total_time={args.time}")
    if args.runs:
        argv.append(f"-runs={args.runs}")
    if args.seed is not None:
        argv.append(f"-seed={args.seed}")
    argv.extend(args.libfuzzer)
    atheris.Setup(argv, module.one_input)
    atheris.Fuzz()
    return 0


def run_target(name: str, seconds: float, *, work: str, findings: str, seed: int | None = None,
               extra: list[str] | None = None, timeout: float | None = None) -> tuple[int, int, str]:
    """Fuzz ``name`` in a child process for ``seconds``: (exit code, inputs executed, output)."""
    command = [sys.executable, "-m", "fuzz", name, "--time", str(int(seconds)), "--work", work,
               "--findings", findings]
    if seed is not None:
        command += ["--seed", str(seed)]
    command += extra or []
    done = subprocess.run(command, capture_output=True, timeout=timeout or seconds + 120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])
                               + os.pathsep + os.environ.get("PYTHONPATH", "")})
    output = (done.stdout + done.stderr)
    counts = _DONE.findall(output)
    return done.returncode, int(counts[-1]) if counts else 0, output.decode("utf-8", "replace")


def smoke_all(seconds: float) -> int:
    """Every target in this process, from its seeds with random mutations (``fuzz.smoke``)."""
    import base64

    from .smoke import smoke

    for name in TARGETS:
        try:
            runs, _ = smoke(name, seconds)
        except BaseException as exc:  # noqa: BLE001 - a finding, reported with its input
            data = smoke.last_input  # type: ignore[attr-defined]
            print(f"fuzz {name}: FINDING {type(exc).__name__}: {exc}; input (base64): "
                  f"{base64.b64encode(data).decode()}", flush=True)
            return 1
        print(f"fuzz {name}: {runs} inputs, no findings", flush=True)
    return 0


def reproduce(args: argparse.Namespace) -> int:
    module = _load(args.target, instrument=False)
    data = Path(args.reproduce).read_bytes()
    module.one_input(data)
    print(f"fuzz {args.target}: {args.reproduce} passes")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description="Fuzz the parsers a peer can reach.")
    parser.add_argument("target", help="a target name, 'all', 'smoke' or 'list'")
    parser.add_argument("--time", type=float, default=0, help="seconds to fuzz (each, for 'all'); 0: until stopped")
    parser.add_argument("--runs", type=int, default=0, help="stop after this many inputs (0: no limit)")
    parser.add_argument("--seed", type=int, default=None, help="libFuzzer's random seed")
    parser.add_argument("--work", default="fuzz-work", help="working corpus directory (one folder per target)")
    parser.add_argument("--findings", default="fuzz-findings", help="where inputs that break a contract go")
    parser.add_argument("--rss-mb", type=int, default=1024, help="memory limit of the fuzzing process")
    parser.add_argument("--input-timeout", type=int, default=10, help="seconds one input may take")
    parser.add_argument("--max-len", type=int, default=8192, help="largest input libFuzzer makes")
    parser.add_argument("--reproduce", metavar="FILE", help="run this one input and report what it breaks")
    parser.add_argument("libfuzzer", nargs="*", help="further libFuzzer options (after --)")
    args = parser.parse_args(argv)
    if args.target == "list":
        for name, (_module, what) in TARGETS.items():
            print(f"{name:12} {what}")
        return 0
    if args.target == "all":
        if not args.time:
            parser.error("'all' needs --time (seconds per target)")
        total = failed = 0
        for name in TARGETS:
            started = time.monotonic()
            code, runs, output = run_target(name, args.time, work=args.work, findings=args.findings,
                                            seed=args.seed, extra=args.libfuzzer)
            total += runs
            failed += code != 0
            print(f"fuzz {name}: {runs} inputs in {time.monotonic() - started:.0f} s, "
                  f"{'a finding (see ' + args.findings + ')' if code else 'no findings'}", flush=True)
            if code:
                print(output[-4000:], flush=True)
        print(f"fuzz all: {total} inputs, {failed} targets with findings", flush=True)
        return 1 if failed else 0
    if args.target == "smoke":
        return smoke_all(args.time or 1.5)
    if args.target not in TARGETS:
        parser.error(f"unknown target {args.target!r}; 'python -m fuzz list' names them")
    if args.reproduce:
        return reproduce(args)
    return fuzz_one(args)


if __name__ == "__main__":
    sys.exit(main())
