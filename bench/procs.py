"""Processes on Linux, from /proc: a process tree, the CPU time its processes have used, and
binding them to cores (every thread of each, as the kernel binds threads, not processes)."""

import contextlib
import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (which may hold spaces)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_tree(root: int) -> list[int]:
    """`root` and every live process below it."""
    parents = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                parents[int(proc.name)] = int(_stat(int(proc.name))[1])
    tree, grew = {root}, True
    while grew:
        below = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= below
        grew = bool(below)
    return sorted(tree)


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User + system CPU seconds each process has used so far (0 for one that has gone)."""
    used = {}
    for pid in pids:
        try:
            fields = _stat(pid)
            used[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        except (OSError, ValueError, IndexError):
            used[pid] = 0.0
    return used


def bind(pid: int, cores: set[int]) -> None:
    """Run every thread of the process only on `cores` (threads it starts later inherit)."""
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(task.name), cores)
