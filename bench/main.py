"""`python -m bench`: run every figure, print progress, write BENCHMARKS.md and bench/results.json.

The run needs the PostgreSQL server on 127.0.0.1:5432 (user postgres) and Redis on 127.0.0.1:6379; a
figure whose service is missing is reported as not measured. A partial run (`--only`, `--scale`) writes
its report into its work directory instead, so BENCHMARKS.md always shows a full run.
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

from bench import cluster27k, crosspod, fanout, gateway, idle, listing, load, registration, relay, report
from bench.core import Figure, Run

REPO = Path(__file__).resolve().parent.parent
# In order of cost; the idle-device figures, the longest, come last.
FIGURES: dict[str, Callable[[Run], Awaitable[None]]] = {
    "relay": relay.measure,
    "list": listing.measure,
    "registration": registration.measure,
    "crosspod": crosspod.measure,
    "gateway": gateway.measure,
    "idle": idle.measure,
    "fanout": fanout.measure,
    "cluster": cluster27k.measure,
}
BUDGET_SECONDS = 600


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(FIGURES)}")
    parser.add_argument("--scale", type=float, default=1.0, help="scale the workloads (below 1: a quick run)")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profiles")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, profiles)")
    parser.add_argument(
        "--render",
        action="store_true",
        help="only rewrite BENCHMARKS.md from bench/results.json and analysis.md",
    )
    return parser


async def _run(run: Run, names: list[str]) -> None:
    for name in names:
        section_started = time.monotonic()
        before = load.sample()
        try:
            await FIGURES[name](run)
        except Exception as exc:
            run.say(f"{name} failed: {exc!r}")
            traceback.print_exc()
            run.add(
                Figure(
                    f"{name}_failed",
                    f"{name} (harness failure)",
                    "",
                    "—",
                    note=f"not measured: {exc!r}"[:400],
                )
            )
        seconds = time.monotonic() - section_started
        others = load.others_percent(before, load.sample(), seconds)
        run.sections.setdefault("load", {})[name] = {
            "seconds": round(seconds),
            "others_cpu_percent": round(others),
        }
        run.say(f"{name} done in {seconds:.0f}s; other processes on the machine used {others:.0f}% of a core")


def main() -> int:
    args = _parser().parse_args()
    if args.render:
        report.rerender(REPO / "bench" / "results.json", REPO / "BENCHMARKS.md")
        return 0
    names = [n.strip() for n in args.only.split(",")] if args.only else list(FIGURES)
    unknown = set(names) - set(FIGURES)
    if unknown:
        raise SystemExit(f"unknown figures: {', '.join(sorted(unknown))}")
    partial = bool(args.only) or args.scale != 1.0
    workdir = Path(tempfile.mkdtemp(prefix="tether-bench-"))
    run = Run(workdir, scale=args.scale, profile=not args.no_profile)
    started_at = dt.datetime.now(dt.UTC)
    run.say(f"tether bench: {', '.join(names)}; work directory {workdir}")
    try:
        asyncio.run(_run(run, names))
    finally:
        elapsed = time.monotonic() - run.started
        markdown = workdir / "BENCHMARKS.md" if partial else REPO / "BENCHMARKS.md"
        results = workdir / "results.json" if partial else REPO / "bench" / "results.json"
        options = {"only": args.only, "scale": args.scale, "profile": not args.no_profile}
        report.write(run, started_at, elapsed, markdown, results, options)
        print()
        print("\n".join(report.table(run.figures)))
        print()
        run.say(
            f"wrote {markdown} and {results} in {elapsed / 60:.1f} min (budget {BUDGET_SECONDS / 60:.0f} min)"
        )
        if not args.keep and not partial:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0
