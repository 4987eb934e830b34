"""CPU time of a server process from /proc, shared by bench/run.py and bench/pyload.py."""

from __future__ import annotations

import glob


def cpu_ticks(pid: int) -> int:
    """utime+stime (all threads, clock ticks) of a process and of its descendants (the
    workers of a ``--workers`` supervisor); 0 for no process."""
    if pid <= 0:
        return 0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        total = int(fields[11]) + int(fields[12])
    except OSError:
        return 0
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(path) as f:
                total += sum(cpu_ticks(int(child)) for child in f.read().split())
        except OSError:
            pass
    return total
