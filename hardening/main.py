"""`python -m hardening`: run every row, print progress, write RELIABILITY.md and hardening/results.json.

Rows plug in through ROWS (name -> coroutine taking the Run). A full-size run of some entries
(`--only`) replaces those entries' rows in hardening/results.json and RELIABILITY.md, leaving the others
as last measured (each row says when); a scaled run (`--scale` below 1) writes its report into its work
directory instead, so RELIABILITY.md only ever shows full-size figures.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import shutil
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

from hardening import (
    api_fuzz,
    duplicates,
    dupsends,
    faults,
    halfopen,
    isolation,
    report,
    resume,
    slow_clients,
    socket_fuzz,
    startup,
)
from hardening.core import Row, Run

REPO = Path(__file__).resolve().parent.parent
ROWS: dict[str, Callable[[Run], Awaitable[None]]] = {
    "api_fuzz": api_fuzz.measure,
    "isolation": isolation.measure,
    "socket_fuzz": socket_fuzz.measure,
    "slow_clients": slow_clients.measure,
    "half_open": halfopen.measure,
    "duplicate_listeners": duplicates.measure,
    "duplicate_sends": dupsends.measure,
    "faults": faults.measure,
    "resume": resume.measure,
    "cold_start": startup.measure,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hardening", description=__doc__)
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--scale", type=float, default=1.0, help="scale the workloads (below 1: a quick run)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument(
        "--render", action="store_true", help="only rewrite RELIABILITY.md from hardening/results.json"
    )
    return parser


async def _run(run: Run, names: list[str]) -> None:
    for name in names:
        started = time.monotonic()
        first = len(run.rows)
        run.say(f"{name}: starting")
        try:
            await ROWS[name](run)
        except Exception as exc:
            traceback.print_exc()
            row = Row(name, f"{name} (harness failure)", note=f"not measured: {exc!r}"[:400])
            row.fail(f"harness failure: {exc!r}"[:400])
            row.passed = False
            run.add(row)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        for row in run.rows[first:]:
            row.group, row.measured_at = name, stamp
        run.say(f"{name}: done in {time.monotonic() - started:.0f} s")


def main() -> int:
    args = _parser().parse_args()
    if args.render:
        report.rerender(REPO / "hardening" / "results.json", REPO / "RELIABILITY.md")
        return 0
    names = [n.strip() for n in args.only.split(",")] if args.only else list(ROWS)
    unknown = set(names) - set(ROWS)
    if unknown:
        raise SystemExit(f"unknown rows: {', '.join(sorted(unknown))} (known: {', '.join(ROWS)})")
    partial = args.scale != 1.0
    workdir = Path(tempfile.mkdtemp(prefix="tether-hardening-"))
    run = Run(workdir, scale=args.scale)
    started_at = dt.datetime.now(dt.UTC)
    run.say(f"tether hardening: {', '.join(names)}; work directory {workdir}")
    try:
        asyncio.run(_run(run, names))
    finally:
        seconds = time.monotonic() - run.started
        markdown = workdir / "RELIABILITY.md" if partial else REPO / "RELIABILITY.md"
        results = workdir / "results.json" if partial else REPO / "hardening" / "results.json"
        kept = [] if partial else report.kept_rows(results, set(names), list(ROWS))
        report.write(run, kept, started_at, seconds, markdown, results, order=list(ROWS))
        print("\n".join(report.table(run.rows)))
        run.say(f"wrote {markdown} and {results} in {seconds / 60:.1f} min")
        if not args.keep and not partial:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(r.passed for r in run.rows) else 1
