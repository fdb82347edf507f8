"""``ferryman client status``: what the running client agent reports about itself.

The agent writes ``status.json`` (0600) next to its session every ``INTERVAL`` seconds (what
``Client.status()`` returns) and
removes it when it stops: signed-in user and device, the tunnel (edge, transport, state,
RTT, since when), active flows, the forwarding profile (version, fail mode, last sync with
the control plane and why the last one failed) and each forward's readiness. The command
reads that file; a file whose agent process is gone, or that has not been rewritten for
a while, is reported as such rather than shown as current. Names and reasons in it come from
edges and the control plane (an OPEN_FAIL reason, an edge's name): ``render`` escapes what a
terminal would act on (escape sequences, CR/LF, other control and format characters).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from typing import Any

from ..basics import statefile
from ..basics.metrics import Stats

STATUS_FILE = "status.json"
INTERVAL = 2.0
STALE = 3 * INTERVAL + 5.0  # seconds after which an unchanged file no longer describes a running agent


def write(directory: str, status: dict[str, Any]) -> None:
    """Replace the status file in ``directory`` with ``status`` (0600)."""
    statefile.make_private_directory(directory)
    statefile.write_private(os.path.join(directory, STATUS_FILE), json.dumps(status, indent=1).encode() + b"\n")


async def keep_written(directory: str, status: Callable[[], dict[str, Any]], stats: Stats, stop: asyncio.Event) -> None:
    """Rewrite the status file (``status()``, the agent's state now) every INTERVAL seconds until
    ``stop``; remove it then."""
    path = os.path.join(directory, STATUS_FILE)
    try:
        while not stop.is_set():
            try:
                write(directory, status())
            except (OSError, statefile.StateFileError):  # status is for humans: never stop the agent over it
                stats.count(stats.protocol_errors, "status_write_failed")
            try:
                await asyncio.wait_for(stop.wait(), INTERVAL)
            except TimeoutError:
                pass
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def read(directory: str, now: float | None = None) -> tuple[dict[str, Any] | None, str]:
    """(status, "") for a running agent; (None or the last status, why it is not current) otherwise."""
    path = os.path.join(directory, STATUS_FILE)
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read(1 << 20))
    except FileNotFoundError:
        return None, f"the client agent is not running (no {path})"
    except (OSError, ValueError) as exc:
        return None, f"cannot read {path}: {exc}"
    if not isinstance(data, dict) or not isinstance(data.get("pid"), int):
        return None, f"{path} is not a client agent status"
    try:
        os.kill(data["pid"], 0)
    except ProcessLookupError:
        return data, f"the client agent (pid {data['pid']}) is not running; {path} is left from it"
    except PermissionError:
        pass
    age = (time.time() if now is None else now) - float(data.get("updated", 0))
    if age > STALE:
        return data, f"the client agent (pid {data['pid']}) has not updated its status for {age:.0f}s"
    return data, ""


def printable(text: str) -> str:
    """``text`` with every character a terminal would not just print (ESC, CR, LF, other control
    and format characters such as bidi overrides) escaped as Python writes them (``\\x1b``, ``\\r``,
    ``\\u202e``)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def render(data: dict[str, Any]) -> str:
    """The status as a few lines for a terminal, each made printable (``printable``)."""
    t, p = data["tunnel"], data["profile"]
    when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p["last_sync"])) if p.get("last_sync")
            else "never")
    lines = [
        f"user      {data['user'] or '(certificate only, no sign-in)'}",
        f"device    {data['device']}",
        f"tunnel    {t['state']}" + (f" to {t['edge']} at {t['address']} over {t['transport']}"
                                      + (f", rtt {t['rtt_ms']:.1f} ms" if t.get("rtt_ms") is not None else "")
                                      if t["state"] == "up" else f" (edges {', '.join(t['edges'])})"),
        f"flows     {data['flows']} active",
        "profile   " + (f"version {p['version']}, {p['applications']} applications, fail {p['fail_mode']}, "
                         f"DNS suffixes {', '.join(p['dns_suffixes']) or '-'}, last sync {when}"
                         if p["version"] is not None else "none (everything captured is tunnelled)")
        + (f"; last sync failed: {p['error']}" if p.get("error") else ""),
    ]
    for fwd in data["forwards"]:
        lines.append(f"forward   {fwd['forward']}  " + ("ready" if fwd["ready"] else f"not ready: {fwd['reason']}"))
    return "\n".join(printable(line) for line in lines)
