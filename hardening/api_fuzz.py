"""API fuzzing: schemathesis against a real pod's /openapi.json, once with each organization's key.

Every check schemathesis has (`--checks all`: server errors, response schema conformance, status
codes and content types documented, negative data rejected, ignored auth, use after free, resource
availability, …) over all its phases, the stateful one included (links between operations). Before
the run each organization has a registered environment, so reads find rows of their own to read
and, for the other key, rows that must stay out of sight.
"""

from __future__ import annotations

import asyncio
import re
import time

import httpx

from hardening.cluster import PYTHON, Server, pod
from hardening.core import Row, Run

PHASES = "examples,coverage,fuzzing,stateful"
SEED = 16
_GENERATED = re.compile(r"(\d+) generated")
_FAILURE = re.compile(r"❌ (ST\d+ [^:]+): (\d+)")


async def _seed_rows(server: Server, key: str, org: str) -> None:
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as http:
        for n in range(2):
            r = await http.post(
                f"{server.base_url}/v1/environments/register",
                json={"deviceId": f"{org}-device-{n}", "connectionName": f"{org}-{n}", "metadata": {}},
                timeout=10,
            )
            r.raise_for_status()


async def _schemathesis(
    run: Run, server: Server, key: str, name: str, examples: int
) -> tuple[int, dict[str, int], str]:
    """One schemathesis run: (cases generated, failures by check, the report's tail)."""
    log = run.workdir / f"schemathesis-{name}.log"
    argv = [
        PYTHON, "-m", "schemathesis.cli", "run", f"{server.base_url}/openapi.json",
        "--checks", "all", "--phases", PHASES, "--max-examples", str(examples), "--seed", str(SEED),
        "--workers", "1", "--no-color", "-H", f"Authorization: Bearer {key}",
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    log.write_text(text)
    generated = _GENERATED.search(text)
    if generated is None:
        raise RuntimeError(f"schemathesis ({name}) printed no summary:\n{text[-2000:]}")
    failures = {check: int(n) for check, n in _FAILURE.findall(text)}
    return int(generated.group(1)), failures, text


async def measure(run: Run) -> None:
    examples = run.scaled(100, 10)
    row = Row(
        "api_fuzz",
        "API fuzzing (schemathesis, every check, stateful phase)",
        load="one pod (embedded SQLite) with two organizations, two registered environments each",
        faults=f"schemathesis phases {PHASES}, --checks all, up to {examples} examples per operation, "
        f"seed {SEED}, once with each organization's key",
        bound="0 failures of any check (no 500, every status and content type documented, responses "
        "match their schema, negative data rejected, auth never ignored)",
    )
    started = time.monotonic()
    async with pod(run.workdir, "api-pod") as server:
        beta = await asyncio.to_thread(server.create_key, "beta", "bob")
        await _seed_rows(server, server.key, "alpha")
        await _seed_rows(server, beta, "beta")
        total = 0
        by_check: dict[str, int] = {}
        for org, key in (("alpha", server.key), ("beta", beta)):
            run.say(f"  schemathesis with {org}'s key")
            cases, failures, text = await _schemathesis(run, server, key, org, examples)
            total += cases
            row.inputs[f"cases ({org}'s key)"] = cases
            for check, n in failures.items():
                by_check[check] = by_check.get(check, 0) + n
                row.fail(f"{org}: {check}: {n}")
            if failures:
                summary = text[text.find("=== FAILURES") :][:6000] if "FAILURES" in text else text[-3000:]
                row.detail[f"report_{org}"] = summary
        for line in server.problems()[:10]:
            row.fail(f"pod log: {line}")
        row.lost = f"{sum(by_check.values())} failures in {total:,} cases"
        row.detail["failures_by_check"] = by_check
        row.note = f"{total:,} cases over {len(row.inputs)} runs; the reports are in the work directory"
    row.seconds = time.monotonic() - started
    run.add(row.judge())
