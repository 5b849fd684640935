"""The processes a row runs against: router pods (bench's launcher), reference devices, and the
throwaway PostgreSQL and Redis that the test suite starts (tests/services.py) — never the machine's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
from bench.servers import PYTHON, REPO, Server, start_tether
from tests.services import Throwaway

__all__ = ["PYTHON", "Cluster", "Device", "Server", "pod", "reference_device", "start_tether"]


@dataclass
class Device:
    """A `tether device` process (the reference device) and the connection it holds."""

    proc: subprocess.Popen[bytes]
    device_id: str
    log_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


async def online_connection(server: Server, key: str, device_id: str, timeout: float = 30) -> str:
    """The connectionId of `device_id` once it reads online."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as http:
        while time.monotonic() < deadline:
            r = await http.get(f"{server.base_url}/v1/environments/{device_id}", timeout=5)
            # connectionId is null while offline (the REST row has no isOnline field).
            if r.status_code == 200 and r.json().get("connectionId"):
                return str(r.json()["connectionId"])
            await asyncio.sleep(0.2)
    raise RuntimeError(f"device {device_id} did not come online on {server.name} in {timeout:.0f} s")


async def reference_device(
    workdir: Path,
    server: Server,
    key: str,
    name: str,
    *,
    device_id: str | None = None,
    args: tuple[str, ...] = (),
    prefix: tuple[str, ...] = (),
    base_url: str | None = None,
    label: str | None = None,
) -> tuple[Device, str]:
    """Start `tether device --name NAME` against `server`; returns it with its online connectionId.

    `device_id`: the same slot as another device's; `args`: more `tether device` options; `prefix`:
    a command it runs under (`ip netns exec NS`); `base_url`: the router as the device reaches it;
    `label`: its log's name (default: NAME)."""
    device_id = device_id or f"{name}-{uuid.uuid4().hex[:8]}"
    log_path = workdir / f"device-{label or name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TETHER_", "LETTA_"))}
    env.update({"LETTA_BASE_URL": base_url or server.base_url, "LETTA_API_KEY": key})
    with log_path.open("ab") as log:
        proc = subprocess.Popen(  # noqa: ASYNC220 - held as a Popen for its pid, like bench's pods
            [*prefix, PYTHON, "-m", "tether", "device", "--name", name, "--device-id", device_id, *args],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    device = Device(proc, device_id, log_path)
    try:
        return device, await online_connection(server, key, device_id)
    except Exception:
        device.stop()
        raise


@contextlib.asynccontextmanager
async def pod(
    workdir: Path,
    name: str,
    *,
    database_url: str | None = None,
    redis_url: str | None = None,
    settings: dict[str, str] | None = None,
) -> AsyncIterator[Server]:
    """One `tether serve` (embedded SQLite unless told otherwise), stopped on the way out."""
    server = await start_tether(
        workdir / name, name, database_url=database_url, redis_url=redis_url,
        org="alpha", user="alice", create_key=True, **(settings or {}),
    )  # fmt: skip
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


class Cluster:
    """PostgreSQL and Redis of the run's own (tests/services.py), for rows that need several pods."""

    def __init__(self) -> None:
        self.throwaway = Throwaway()
        self._pg_admin: str | None = None
        self._redis: str | None = None

    def redis_url(self) -> str:
        if self._redis is None:
            self._redis = self.throwaway.redis().url
        return self._redis

    async def database_url(self) -> str:
        """A fresh database on the run's PostgreSQL, as SQLAlchemy's async URL."""
        import asyncpg

        if self._pg_admin is None:
            self._pg_admin = await asyncio.to_thread(lambda: self.throwaway.postgres().admin_url)
        name = f"tether_h_{uuid.uuid4().hex[:10]}"
        conn = await asyncpg.connect(self._pg_admin)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        parts = urlsplit(self._pg_admin)
        return urlunsplit(parts._replace(scheme="postgresql+asyncpg", path=f"/{name}"))

    def close(self) -> None:
        self.throwaway.close()
