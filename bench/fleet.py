"""The harness's side of the load-generator processes (`bench.agent`)."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from bench.servers import PYTHON, Measured

REPO = Path(__file__).resolve().parent.parent


def _log_file(workdir: Path, name: str) -> BinaryIO:
    workdir.mkdir(parents=True, exist_ok=True)
    return (workdir / name).open("wb")


class AgentProcess(Measured):
    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, name: str, workdir: Path, source_ip: str | None = None) -> AgentProcess:
        args = ["--source-ip", source_ip] if source_ip else []
        with _log_file(workdir, f"agent-{name}.log") as log:
            proc = await asyncio.create_subprocess_exec(
                PYTHON,
                "-m",
                "bench.agent",
                *args,
                cwd=REPO,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                limit=64 * 1024 * 1024,
            )
        return cls(name, proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            message = orjson.loads(line)
            future = self._waiting.pop(message["id"], None)
            if future is None or future.done():
                continue
            if message["ok"]:
                future.set_result(message.get("result"))
            else:
                future.set_exception(RuntimeError(f"agent {self.name}: {message['error']}"))
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(RuntimeError(f"agent {self.name} exited"))

    async def call(self, cmd: str, **args: Any) -> Any:
        assert self.proc.stdin is not None
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        self.proc.stdin.write(orjson.dumps({"id": request_id, "cmd": cmd, **args}) + b"\n")
        await self.proc.stdin.drain()
        return await future

    async def close(self, timeout: float = 30) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()
