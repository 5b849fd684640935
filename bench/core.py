"""What every figure shares: the run's context, progress output, statistics and the result record."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Figure:
    """One row of BENCHMARKS.md."""

    key: str
    name: str
    unit: str
    target: str
    value: float | None = None
    baseline: float | None = None
    ratio: float | None = None  # value / baseline, or None when the target is absolute
    passed: bool | None = None  # None: not measured
    miss: str = ""  # by how much, when missed
    note: str = ""  # how it was measured, or why it was not
    detail: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Run:
    workdir: Path
    scale: float = 1.0  # below 1: a shorter run for development; the report says so
    profile: bool = True
    budget_seconds: float = 600.0  # the whole run; the idle window and the storm wait shrink to fit it
    started: float = field(default_factory=time.monotonic)
    figures: list[Figure] = field(default_factory=list)
    sections: dict[str, Any] = field(default_factory=dict)

    def remaining(self) -> float:
        return self.budget_seconds - (time.monotonic() - self.started)

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {text}", flush=True)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        shown = "not measured" if figure.value is None else f"{figure.value:.4g} {figure.unit}"
        verdict = {True: "pass", False: "MISS", None: "n/a"}[figure.passed]
        extra = (
            f" (baseline {figure.baseline:.4g}, ratio {figure.ratio:.3g})" if figure.ratio is not None else ""
        )
        self.say(f"  -> {figure.name}: {shown}{extra} [{verdict}] {figure.miss}")
        return figure

    def scaled(self, n: int, minimum: int = 1) -> int:
        return max(minimum, int(n * self.scale))


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def at_most(figure: Figure, limit: float) -> Figure:
    """Pass when the compared quantity (ratio if any, else value) is at most `limit`."""
    got = figure.ratio if figure.ratio is not None else figure.value
    if got is None:
        return figure
    figure.passed = got <= limit
    if not figure.passed:
        figure.miss = f"{got / limit:.2f}x the limit ({got:.3g} vs {limit:.3g})"
    return figure


def at_least(figure: Figure, floor: float) -> Figure:
    got = figure.ratio if figure.ratio is not None else figure.value
    if got is None:
        return figure
    figure.passed = got >= floor
    if not figure.passed:
        figure.miss = f"{got / floor:.2f}x the floor ({got:.3g} vs {floor:.3g})"
    return figure
