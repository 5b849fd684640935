"""The servers under test as subprocesses: `tether serve` pods and the baseline forwarder.

Both run exactly as users run them (a fresh process with its own settings), and expose their pid so
the harness can read memory and CPU from /proc.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

PYTHON = sys.executable
REPO = Path(__file__).resolve().parent.parent
# Settings every benchmark pod shares. The relay socket's command rate limit guards a router against a
# runaway client; the throughput and round-trip figures measure the relay, not that guard.
BENCH_SETTINGS = {
    "log_level": "warning",
    "bootstrap_key": "false",
    "shutdown_drain_seconds": "1",
    "rate_limit_per_second": "1000000",
}


def _blank_ids(text: str) -> str:
    return re.sub(r"[0-9a-f]{32}", "…", text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clock_ticks() -> int:
    return int(os.sysconf("SC_CLK_TCK"))


def rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far, in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces and parentheses: fields are counted after the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / clock_ticks()


class Measured:
    """Resource readings of a child process, for anything holding it as `proc`."""

    proc: Any

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)


@dataclass
class Server(Measured):
    name: str
    base_url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    key: str = ""

    @property
    def ws_base(self) -> str:
        return "ws" + self.base_url[len("http") :]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def problems(self) -> list[str]:
        """What went wrong, most frequent first: "count x message" for each distinct error log line
        (ids blanked) and for the exception that ends each traceback."""
        counts: Counter[str] = Counter()
        in_traceback = False
        for line in self.log_text().splitlines():
            if line.startswith("Traceback"):
                in_traceback = True
                continue
            if in_traceback:
                if line.startswith((" ", "\t")) or not line.strip():
                    continue
                if line.startswith(("During handling", "The above exception")):
                    continue
                in_traceback = False
                counts[_blank_ids(line)] += 1
                continue
            if line.startswith(("ERROR:", "CRITICAL:")) and "Exception in ASGI application" in line:
                continue  # the traceback that follows names the error
            if " ERROR " in line or " CRITICAL " in line or line.startswith(("ERROR:", "CRITICAL:")):
                counts[_blank_ids(line.split(" ", 2)[-1] if line[:4].isdigit() else line)] += 1
        return [f"{n} x {message[:200]}" for message, n in counts.most_common()]

    def create_key(self, org: str, user: str) -> str:
        out = subprocess.run(
            [PYTHON, "-m", "tether", "keys", "create", "--org", org, "--user", user, "--name", "bench"],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip().splitlines()[-1]

    def kill(self) -> None:
        """End the process at once (after a figure whose graceful shutdown would only cost time)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


async def _wait_ready(server: Server, timeout: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with httpx.AsyncClient() as http:
        while True:
            if server.proc.poll() is not None:
                raise RuntimeError(
                    f"{server.name} exited with {server.proc.returncode}:\n{server.log_text()}"
                )
            try:
                if (await http.get(f"{server.base_url}/readyz", timeout=1)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if loop.time() > deadline:
                server.stop()
                raise RuntimeError(f"{server.name} did not become ready:\n{server.log_text()}")
            await asyncio.sleep(0.1)


def _spawn(
    name: str, args: list[str], env: dict[str, str], cwd: Path, log_path: Path, base_url: str
) -> Server:
    cwd.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen([PYTHON, *args], env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    return Server(name, base_url, proc, log_path, env)


async def start_tether(
    workdir: Path,
    name: str,
    *,
    database_url: str | None = None,
    redis_url: str | None = None,
    org: str = "bench",
    user: str = "bench",
    create_key: bool = True,
    **settings: str,
) -> Server:
    """`tether serve` on a free port with its own data directory; waits for /readyz, then makes a key."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    values = {
        **BENCH_SETTINGS,
        "host": "127.0.0.1",
        "port": str(port),
        "data_dir": str(workdir / ".tether"),
        "pod_id": f"{name}-{uuid.uuid4().hex[:6]}",
        **settings,
    }
    if database_url:
        values["database_url"] = database_url
    if redis_url:
        values["redis_url"] = redis_url
    env.update({f"TETHER_{k.upper()}": v for k, v in values.items()})
    base_url = f"http://127.0.0.1:{port}"
    server = _spawn(name, ["-m", "tether", "serve"], env, workdir, workdir / f"{name}.log", base_url)
    await _wait_ready(server)
    if create_key:
        server.key = await asyncio.to_thread(server.create_key, org, user)
    return server


async def start_baseline(workdir: Path, rows: Path | None = None, split: bool = False) -> Server:
    """The forwarder; with `rows`, it also serves the list endpoint over them; `split`: devices
    register with split channels, as on Tether (bench/baseline.py)."""
    port = free_port()
    args = ["-m", "bench.baseline", "--port", str(port), *(["--rows", str(rows)] if rows else [])]
    args += ["--split"] if split else []
    server = _spawn(
        "baseline", args, dict(os.environ), REPO, workdir / "baseline.log", f"http://127.0.0.1:{port}"
    )
    server.key = "none"
    await _wait_ready(server)
    return server
