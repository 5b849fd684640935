"""Sampling profiles of a router process with py-spy, summarised as the functions that hold the CPU.

py-spy's raw output is one line per distinct stack, `frame;frame;...;frame count`, root first. Each
frame reads `function (file:line)`; the summary counts, per function, the samples where it is on the
stack (inclusive) and where it is the leaf (self), idle samples (a loop waiting in epoll) left out.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.servers import PYTHON

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")
# py-spy leaves idle samples out (it checks what each thread is doing); a plain asyncio loop's wait in
# select() can still slip through. uvloop's own C work shows as `Runner.run` and is real work.
_IDLE_LEAVES = ("select (selectors.py",)


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
    return found if Path(found).exists() else None


async def record(pid: int, seconds: float, output: Path, rate: int = 250) -> Path | None:
    """Sample `pid` for `seconds`; None when py-spy is not installed.

    py-spy pauses the process for each sample (so it can tell idle from busy): never run it during a
    measured round."""
    exe = py_spy()
    if exe is None:
        return None
    proc = await asyncio.create_subprocess_exec(
        exe,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--threads",
        "--output",
        str(output),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await proc.wait()
    return output if await asyncio.to_thread(os.path.exists, output) else None


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if m is None:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "src/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({path})"


@dataclass
class Summary:
    samples: int
    busy: int
    inclusive: list[tuple[str, float]]  # function, % of busy samples
    leaves: list[tuple[str, float]]


def summarise(path: Path, top: int = 15, include: tuple[str, ...] = ()) -> Summary:
    """Top functions by inclusive and self share of busy samples; `include` keeps only stacks with one
    of these substrings (a hot path), when given."""
    inclusive: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    samples = busy = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = stack.split(";")
        if frames[0].startswith("thread ("):
            if "MainThread" not in frames[0]:
                continue  # the router's work is on its event loop; worker threads wait on SQLite
            frames = frames[1:]
        if not frames:
            continue
        if any(marker in frames[-1] for marker in _IDLE_LEAVES):
            continue
        if include and not any(marker in stack for marker in include):
            continue
        busy += count
        names = [_short(f) for f in frames]
        for name in set(names):
            inclusive[name] += count
        leaves[names[-1]] += count
    share = 100 / busy if busy else 0.0
    # Frames on (nearly) every stack (the process's entry point, the event loop) say nothing.
    telling = [(name, n * share) for name, n in inclusive.most_common() if n < 0.97 * busy]
    return Summary(samples, busy, telling[:top], [(name, n * share) for name, n in leaves.most_common(top)])
