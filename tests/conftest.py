"""Shared fixtures: real router processes, real PostgreSQL and Redis.

Every router under test is a `tether serve` subprocess on a free port, started with its own data
directory and settings, so tests exercise exactly what users run.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

PG_ADMIN_URL = os.environ.get("TETHER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TETHER_TEST_REDIS", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() == "true"
TETHER = [sys.executable, "-m", "tether"]


def service_missing(what: str) -> None:
    """Skip a test whose service is absent, except in CI, where a skip would hide a gap."""
    if IN_CI:
        pytest.fail(f"{what} is required in CI but is not reachable", pytrace=False)
    pytest.skip(f"{what} is not reachable")


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
    **settings: Any,
) -> Router:
    """Start `tether serve` and wait until /readyz answers."""
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
            if httpx.get(f"{router.base_url}/readyz", timeout=1).status_code == 200:
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


def _pg_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


def fresh_pg_database() -> str:
    """Create an empty database on the real server; returns its SQLAlchemy async URL."""
    if not _pg_reachable():
        service_missing("PostgreSQL on 127.0.0.1:5432")
    import asyncpg

    name = f"tether_t_{uuid.uuid4().hex[:10]}"

    async def create() -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    base = re.sub(r"/[^/]*$", f"/{name}", PG_ADMIN_URL)
    return base.replace("postgresql://", "postgresql+asyncpg://", 1)


def drop_pg_database(url: str) -> None:
    import asyncpg

    name = url.rsplit("/", 1)[-1]

    async def drop() -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL)
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
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1):
            pass
    except OSError:
        service_missing("Redis on 127.0.0.1:6379")
    return REDIS_URL
