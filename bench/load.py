"""How busy the machine was apart from the benchmark: other processes share these two cores.

CPU time comes from /proc: the whole machine's from /proc/stat, the benchmark's from its own process
tree (live processes' utime+stime plus what reaped children left in cutime+cstime). The difference is
what everything else used, reported with each section so a disturbed figure can be recognised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def _machine_busy_seconds() -> float:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / TICKS


def _tree_seconds(root: int) -> float:
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        times[pid] = sum(int(x) for x in fields[11:15]) / TICKS
    total = 0.0
    for pid, seconds in times.items():
        p = pid
        while p not in (0, 1) and p != root:
            p = parents.get(p, 0)
        if p == root:
            total += seconds
    return total


@dataclass
class Sample:
    machine: float
    ours: float


def sample() -> Sample:
    return Sample(_machine_busy_seconds(), _tree_seconds(os.getpid()))


def others_percent(start: Sample, end: Sample, wall_seconds: float) -> float:
    """CPU used by processes outside the benchmark, as % of one core, over the interval."""
    other = (end.machine - start.machine) - (end.ours - start.ours)
    return max(0.0, 100 * other / max(wall_seconds, 1e-9))
