"""What the benchmark reads from /proc: process trees, CPU seconds, memory, listening sockets.

CPU is utime+stime+cutime+cstime from /proc/PID/stat (so children that already exited
and were reaped still count); memory is Pss and Rss from /proc/PID/smaps_rollup. Pss is
the one reported: it splits pages shared between processes (an sshd and its forked
sessions) so that summing it over a process tree counts each page once.
"""

from __future__ import annotations

import os
import resource

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def listening(port: int) -> bool:
    """Whether some socket listens on 127.0.0.1:``port`` (read from /proc/net/tcp, so nothing connects)."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as fh:
        return any(f[1] == local and f[3] == "0A" for f in (line.split() for line in fh) if len(f) > 3)


def raise_nofile_limit() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to its hard limit; children inherit it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name, so index 0 is field 3 (state)."""
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rpartition(")")[2].split()


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        return _stat_fields(pid)[0] not in ("Z", "X")
    except OSError:
        return False


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (empty if ``root`` is gone)."""
    if not os.path.exists(f"/proc/{root}"):
        return []
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids``, including their reaped children."""
    ticks = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        ticks += sum(int(v) for v in fields[11:15])
    return ticks / CLOCK_TICKS


def memory_kib(pids: list[int]) -> dict[str, int]:
    """Summed ``{"pss": KiB, "rss": KiB}`` of ``pids`` from smaps_rollup."""
    total = {"pss": 0, "rss": 0}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for line in fh:
                    key, _, rest = line.partition(":")
                    if key in ("Pss", "Rss"):
                        total[key.lower()] += int(rest.split()[0])
        except OSError:
            continue
    return total


def udp_sockets() -> dict[int, tuple[int, int]]:
    """Every IPv4 UDP socket: ``{inode: (local port, drops)}`` from /proc/net/udp.

    ``drops`` is the kernel's count of datagrams it threw away for that socket (receive
    buffer full): losses that no process sees, so no node can count them itself.
    """
    sockets = {}
    with open("/proc/net/udp") as fh:
        next(fh)
        for line in fh:
            f = line.split()
            if len(f) >= 13:
                sockets[int(f[9])] = (int(f[1].rsplit(":", 1)[1], 16), int(f[12]))
    return sockets


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process ``pid`` holds open."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        pass
    return inodes


def udp_drops_by_owner(owners: dict[str, list[int]]) -> dict[str, dict[int, int]]:
    """``{owner: {inode: drops}}`` of the UDP sockets each owner's processes hold (read it before
    and after a run: a socket's count starts at 0 when it is created and vanishes when closed)."""
    sockets = udp_sockets()
    out: dict[str, dict[int, int]] = {}
    for owner, pids in owners.items():
        held = set().union(*(socket_inodes(pid) for pid in pids)) if pids else set()
        out[owner] = {inode: sockets[inode][1] for inode in held if inode in sockets}
    return out


def udp_snmp() -> dict[str, int]:
    """The host's UDP counters from /proc/net/snmp (InErrors, RcvbufErrors, SndbufErrors, ...)."""
    with open("/proc/net/snmp") as fh:
        rows = [line.split()[1:] for line in fh if line.startswith("Udp:")]
    return {key: int(value) for key, value in zip(rows[0], rows[1])} if len(rows) >= 2 else {}


def runqueue_wait_seconds(pids: list[int]) -> float:
    """Seconds ``pids`` spent runnable but waiting for a CPU (/proc/PID/schedstat, field 2)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/schedstat") as fh:
                total += int(fh.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9
