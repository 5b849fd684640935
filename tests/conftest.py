"""Shared fixtures: real router processes, real PostgreSQL and Redis.

Every router under test is a `tether serve` subprocess on a free port, started with its own data
directory and settings, so tests exercise exactly what users run.

PostgreSQL and Redis are the user's when `TETHER_TEST_PG` / `TETHER_TEST_REDIS` point at them, else
throwaway servers the suite starts on first use and removes at the end (tests/services.py).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from tests.services import RedisServer, Services, Unavailable

IN_CI = os.environ.get("CI", "").lower() == "true"
TETHER = [sys.executable, "-m", "tether"]
SERVICES = Services(os.environ)
atexit.register(SERVICES.close)  # pytest_sessionfinish does it first, unless the run is cut short


def service_missing(what: str) -> NoReturn:
    skip_or_fail(f"{what} is not reachable")


def skip_or_fail(reason: str) -> NoReturn:
    """Skip a test whose service cannot be had, except in CI, where a skip would hide a gap."""
    if IN_CI:
        pytest.fail(f"{reason} (and CI requires it)", pytrace=False)
    pytest.skip(reason)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    SERVICES.close()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Say which servers the suite used, and why tests were skipped: one line per reason."""
    for line in SERVICES.describe():
        terminalreporter.write_line(f"services: {line}")
    reasons: Counter[str] = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    for reason, count in reasons.items():
        tests = "test" if count == 1 else "tests"
        terminalreporter.write_line(f"SKIPPED {count} {tests}: {reason}", yellow=True, bold=True)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Router:
    base_url: str
    data_dir: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    log_path: Path
    key: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ws_base(self) -> str:
        return "ws" + self.base_url[len("http") :]

    @property
    def pod_id(self) -> str:
        return self.env["TETHER_POD_ID"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*TETHER, *args],
            env=self.env,
            cwd=self.data_dir.parent,
            capture_output=True,
            text=True,
            check=check,
        )

    def create_key(self, org: str, user: str, name: str = "test") -> str:
        out = self.cli("keys", "create", "--org", org, "--user", user, "--name", name)
        return out.stdout.strip().splitlines()[-1]

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    def sdk(self, key: str | None = None, **kwargs: Any) -> Any:
        from letta_client import Letta

        return Letta(
            base_url=self.base_url, api_key=key or self.key, _strict_response_validation=True, **kwargs
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)


def start_router(
    workdir: Path,
    *,
    database_url: str | None = None,
    redis_url: str | None = None,
    pod_id: str | None = None,
    port: int | None = None,
    org: str = "acme",
    user: str = "alice",
    create_key: bool = True,
    wait_path: str = "/readyz",
    **settings: Any,
) -> Router:
    """Start `tether serve`; wait until `wait_path` answers 200 (/healthz: a router that cannot be ready)."""
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = workdir / ".tether"
    port = port or free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env.update(
        {
            "TETHER_PORT": str(port),
            "TETHER_HOST": "127.0.0.1",
            "TETHER_DATA_DIR": str(data_dir),
            "TETHER_POD_ID": pod_id or f"pod-{uuid.uuid4().hex[:6]}",
            "TETHER_BOOTSTRAP_KEY": "false",
            "TETHER_LOG_LEVEL": "info",
            "TETHER_SHUTDOWN_DRAIN_SECONDS": "1",
        }
    )
    if database_url:
        env["TETHER_DATABASE_URL"] = database_url
    if redis_url:
        env["TETHER_REDIS_URL"] = redis_url
    for name, value in settings.items():
        env[f"TETHER_{name.upper()}"] = str(value)
    log_path = workdir / f"router-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*TETHER, "serve"], env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT
        )
    router = Router(f"http://127.0.0.1:{port}", data_dir, env, proc, log_path)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"router exited with {proc.returncode}:\n{router.log()}")
        try:
            if httpx.get(f"{router.base_url}{wait_path}", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            router.stop(signal.SIGKILL)
            raise RuntimeError(f"router did not become ready:\n{router.log()}")
        time.sleep(0.1)
    if create_key:
        router.key = router.create_key(org, user)
    return router


@pytest.fixture(scope="module")
def srv(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    """One router shared by a test module, started with the module's `ROUTER_SETTINGS` (if any)."""
    settings: dict[str, Any] = getattr(request.module, "ROUTER_SETTINGS", {})
    r = start_router(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]), **settings)
    yield r
    r.stop()


@pytest.fixture
def router(tmp_path: Path) -> Iterator[Router]:
    r = start_router(tmp_path / "router")
    yield r
    r.stop()


def pg_admin_url() -> str:
    """The PostgreSQL server's admin URL (asyncpg's form); skips the test when there is none."""
    try:
        return SERVICES.postgres()
    except Unavailable as exc:
        skip_or_fail(str(exc))


def suite_redis_url() -> str:
    """The Redis every Redis test shares; skips the test when there is none."""
    try:
        return SERVICES.redis()
    except Unavailable as exc:
        skip_or_fail(str(exc))


def restartable_redis() -> RedisServer:
    """A Redis the suite started itself, which a test may stop and start (never the user's own)."""
    try:
        return SERVICES.own_redis()
    except Unavailable as exc:
        skip_or_fail(f"Redis of the suite's own (this test restarts it): {exc}")


def _database_url(admin_url: str, name: str) -> str:
    return urlunsplit(urlsplit(admin_url)._replace(scheme="postgresql+asyncpg", path=f"/{name}"))


def fresh_pg_database() -> str:
    """Create an empty database on the real server; returns its SQLAlchemy async URL."""
    admin_url = pg_admin_url()
    import asyncpg

    name = f"tether_t_{uuid.uuid4().hex[:10]}"

    async def create() -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return _database_url(admin_url, name)


def drop_pg_database(url: str) -> None:
    import asyncpg

    name = urlsplit(url).path.lstrip("/")
    assert name.startswith("tether_t_"), f"not a database the suite created: {name}"
    admin_url = pg_admin_url()

    async def drop() -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(drop())


@pytest.fixture
def pg_url() -> Iterator[str]:
    url = fresh_pg_database()
    yield url
    drop_pg_database(url)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each storage-facing test runs on the embedded SQLite and on the real PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'tether.db'}"
        return
    url = fresh_pg_database()
    yield url
    drop_pg_database(url)


@pytest.fixture
def any_router(tmp_path: Path, database_url: str) -> Iterator[Router]:
    """A router on each storage backend."""
    r = start_router(tmp_path / "router", database_url=database_url)
    yield r
    r.stop()


@pytest.fixture
def redis_url() -> str:
    return suite_redis_url()


def _letta_upstream(password: str | None) -> Iterator[Any]:
    from tests.letta_upstream import LettaServer, LettaServerUnavailable

    server = LettaServer(password=password)
    try:
        server.start()
    except LettaServerUnavailable as exc:
        # One line outside CI (the skip summary groups by reason); the whole story, logs and all, in CI.
        skip_or_fail(f"the real Letta server: {exc if IN_CI else str(exc).splitlines()[0]}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def letta_upstream() -> Iterator[Any]:
    """A real Letta server 0.16.8 without auth (tests/letta_upstream.py `LettaServer`), one per session."""
    yield from _letta_upstream(None)


@pytest.fixture(scope="session")
def letta_upstream_secure() -> Iterator[Any]:
    """A real Letta server 0.16.8 that wants `Authorization: Bearer <.password>`, one per session."""
    yield from _letta_upstream(f"upstream-{uuid.uuid4().hex[:12]}")
