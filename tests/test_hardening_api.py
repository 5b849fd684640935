"""The fast subset of hardening rows 1 and 3 (RELIABILITY.md): schemathesis with a bounded number of
examples, and the whole isolation matrix, each against a real `tether serve` with two organizations."""

from __future__ import annotations

from pathlib import Path

from hardening import api_fuzz, isolation
from hardening.cluster import pod

# Per operation and phase: enough for every check to run on every operation (coverage cases and
# negative data included) while the two runs stay within the suite's budget.
EXAMPLES = 5


async def test_schemathesis_finds_nothing_with_either_organizations_key(tmp_path: Path) -> None:
    async with pod(tmp_path, "fuzz-pod") as server:
        for org, key in await api_fuzz.fuzz_keys(server):
            result = await api_fuzz.schemathesis(tmp_path, server.base_url, key, org, EXAMPLES)
            assert result.cases > 100, result.text[-2000:]
            assert result.failures == {}, result.summary()
        assert server.problems() == []


async def test_isolation_matrix_every_cell_as_documented(tmp_path: Path) -> None:
    async with pod(tmp_path, "matrix-pod") as server:
        matrix = await isolation.isolation_matrix(server, tmp_path)
        assert server.problems() == []
    assert matrix.failures() == [], "\n".join(matrix.markdown())
    # Every route of the app and both sockets, each with every credential.
    routes = {(c.method, c.path) for c in matrix.cells}
    assert routes == set(isolation.route_table())
    assert len(matrix.cells) == len(routes) * len(isolation.CREDENTIALS)


def test_a_route_without_an_expected_cell_fails_the_matrix() -> None:
    """The matrix reads the app's route table: a route it has no cell for is a failure, not a gap."""
    table = isolation.route_table()
    assert isolation.route_problems(table) == []
    assert isolation.route_problems([*table, ("PUT", "/v1/tether/new")]) == [
        "PUT /v1/tether/new: a route with no expected cell (hardening/isolation.py)"
    ]
    assert isolation.route_problems([r for r in table if r != ("GET", "/v1/tether/pods")]) == [
        "GET /v1/tether/pods: an expected cell for a route the app no longer has"
    ]
