"""What every row shares: the run's context, progress output and the result record."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    """One row of RELIABILITY.md: what was held, what was thrown at it, what was lost, the verdict."""

    key: str
    name: str
    load: str = ""  # the steady work kept going while the faults ran
    faults: str = ""  # what was injected
    inputs: dict[str, int] = field(default_factory=dict)  # kind of input -> how many were tried
    lost: str = ""  # what was lost (the figure judged), in words with its number
    bound: str = ""  # the target it is judged against
    passed: bool | None = None  # None: not measured
    failures: list[str] = field(default_factory=list)  # each way the bound was missed, for the report
    note: str = ""
    detail: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    group: str = ""  # the ROWS entry that measured it: a later full-size run of that entry replaces it
    measured_at: str = ""  # when it was measured: one report may hold rows of several runs

    def fail(self, why: str) -> None:
        self.failures.append(why)

    def judge(self) -> Row:
        """PASS when nothing failed (a row that measured something and found no failure)."""
        self.passed = not self.failures
        return self

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Run:
    workdir: Path
    scale: float = 1.0  # below 1: a shorter run for development; the report says so
    started: float = field(default_factory=time.monotonic)
    rows: list[Row] = field(default_factory=list)

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {text}", flush=True)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[row.passed]
        self.say(f"  -> {row.name}: {verdict}; lost: {row.lost}")
        for why in row.failures[:10]:
            self.say(f"     {why}")
        return row

    def scaled(self, n: int, minimum: int = 1) -> int:
        return max(minimum, int(n * self.scale))
