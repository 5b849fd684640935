"""API fuzzing: schemathesis against a real pod's /openapi.json, once with each organization's key.

Every check schemathesis has (`--checks all`: server errors, response schema conformance, status
codes, headers and content types documented, negative data rejected, ignored auth, use after free,
resource availability, Allow headers, …) over all its phases, the stateful one included (links
between operations). Before the run each organization has registered environments, so reads find
rows of their own to read and, for the other key, rows that must stay out of sight. One key is an
admin's (it reaches the cluster view), the other a member's.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from hardening.cluster import PYTHON, Server, pod
from hardening.core import Row, Run
from hardening.isolation import make_key

PHASES = "examples,coverage,fuzzing,stateful"
SEED = 16
_GENERATED = re.compile(r"(\d+) generated")
_FAILURE = re.compile(r"❌ (ST\d+ [^:]+): (\d+)")

# The one check configured away from its default, for one operation. `after` on GET /v1/environments
# is the id of the last row of a previous page of the caller's organization: state that a schema
# cannot express, so any string is schema-valid, yet an id this organization cannot see is a 400
# INVALID_CURSOR (tests/test_rest.py: the Letta contract, and the same answer for another
# organization's id as for an unknown one). Only that operation's positive-data check accepts a 400.
CONFIG = """\
[[operations]]
include-path = "/v1/environments"
include-method = "GET"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", 400, 401, 403, 404, 409, 429, "5xx"]
"""


@dataclass
class Fuzzed:
    """One schemathesis run: cases generated, failures by check, the report."""

    cases: int
    failures: dict[str, int] = field(default_factory=dict)
    text: str = ""

    def summary(self) -> str:
        start = self.text.find("=== FAILURES")
        return self.text[start:][:6000] if start >= 0 else self.text[-3000:]


async def schemathesis(
    workdir: Path, base_url: str, key: str, name: str, examples: int, phases: str = PHASES
) -> Fuzzed:
    """`schemathesis run` with every check against `base_url` as `key`; its report is kept in `workdir`."""
    config = workdir / "schemathesis.toml"
    config.write_text(CONFIG)
    argv = [
        PYTHON, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color", "run",
        f"{base_url}/openapi.json", "--checks", "all", "--phases", phases, "--max-examples", str(examples),
        "--seed", str(SEED), "--workers", "1", "-H", f"Authorization: Bearer {key}",
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    (workdir / f"schemathesis-{name}.log").write_text(text)
    generated = _GENERATED.search(text)
    if generated is None:
        raise RuntimeError(f"schemathesis ({name}) printed no summary:\n{text[-2000:]}")
    failures = {check: int(n) for check, n in _FAILURE.findall(text)}
    if proc.returncode != 0 and not failures:
        raise RuntimeError(f"schemathesis ({name}) exited with {proc.returncode}:\n{text[-2000:]}")
    return Fuzzed(int(generated.group(1)), failures, text)


async def seed_rows(base_url: str, key: str, org: str) -> None:
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as http:
        for n in range(2):
            r = await http.post(
                f"{base_url}/v1/environments/register",
                json={"deviceId": f"{org}-device-{n}", "connectionName": f"{org}-{n}", "metadata": {}},
                timeout=10,
            )
            r.raise_for_status()


async def fuzz_keys(server: Server) -> list[tuple[str, str]]:
    """(organization, key) for both organizations, each with rows of its own."""
    keys = [
        ("alpha", await asyncio.to_thread(make_key, server, "alpha", "alice", "admin")),
        ("beta", await asyncio.to_thread(make_key, server, "beta", "bob", "member")),
    ]
    for org, key in keys:
        await seed_rows(server.base_url, key, org)
    return keys


async def measure(run: Run) -> None:
    examples = run.scaled(100, 10)
    row = Row(
        "api_fuzz",
        "API fuzzing (schemathesis, every check, stateful phase)",
        load="one pod (embedded SQLite) with two organizations, two registered environments each",
        faults=f"schemathesis phases {PHASES}, --checks all, up to {examples} examples per operation, "
        f"seed {SEED}, once with each organization's key (alpha: admin, beta: member)",
        bound="0 failures of any check (no 500, every status, header and content type documented, "
        "responses match their schema, negative data rejected, auth never ignored)",
    )
    started = time.monotonic()
    async with pod(run.workdir, "api-pod") as server:
        total = 0
        by_check: dict[str, int] = {}
        for org, key in await fuzz_keys(server):
            run.say(f"  schemathesis with {org}'s key")
            result = await schemathesis(run.workdir, server.base_url, key, org, examples)
            total += result.cases
            row.inputs[f"cases ({org}'s key)"] = result.cases
            for check, n in result.failures.items():
                by_check[check] = by_check.get(check, 0) + n
                row.fail(f"{org}: {check}: {n}")
            if result.failures:
                row.detail[f"report_{org}"] = result.summary()
        for line in server.problems()[:10]:
            row.fail(f"pod log: {line}")
        row.lost = f"{sum(by_check.values())} failures in {total:,} cases"
        row.detail["failures_by_check"] = by_check
        row.note = (
            f"{total:,} cases over {len(row.inputs)} runs; the reports are in the work directory. "
            "One check is configured for one operation: a 400 INVALID_CURSOR for an `after` that is "
            "no id of a previous page counts as accepted (the cursor is state a schema cannot express)."
        )
    row.seconds = time.monotonic() - started
    run.add(row.judge())
