"""Run the real Letta Code CLI (`letta server --debug`) as a device, for end-to-end tests against Tether.

The published package's full dependency tree does not install here, but its bundled `letta.js` needs only
`ws` at run time. `ensure_cli` therefore unpacks the npm tarball and puts `ws@8` beside `letta.js`, once,
under `~/.cache/tether/letta-code-<version>/`.

With `--debug` the CLI prints plain lines such as::

    [14:07:31.020] Registering with http://127.0.0.1:8283/v1/environments/register
    [14:07:31.101] Registered successfully
    [14:07:31.101]   connectionId: conn-…
    [14:07:31.101]   wsUrl: ws://…
    [14:07:31.230] Connected. Awaiting instructions.
    [14:07:32.002] ← recv  {"type":"sync",…}                 (a command, label "client")
    [14:07:31.990] ← recv (lifecycle)  {"type":"pong"}
    [14:07:32.010] → send (protocol)  {"type":"update_device_status",…,"event_seq":1,…}

Only enveloped events are logged as sent; raw replies (`*_response`, `input_accepted`) and pings are not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

LETTA_CODE_VERSION = "0.32.18"
WS_SPEC = "ws@8"
INSTALL_MARKER = ".tether-install-complete"
# Frames can be large (memory dumps, base64 files); a debug line holds one whole frame.
LINE_LIMIT = 64 * 1024 * 1024

REGISTERED = r"Registered successfully"
CONNECTED = r"Connected\. Awaiting instructions\."
_FRAME_LINE = re.compile(
    r"^\[[\d:.]+\] (?P<arrow>→ send|← recv)(?: \((?P<label>[^)]*)\))?  (?P<json>\{.*\})$"
)


class CliUnavailableError(RuntimeError):
    """node or npm is missing, or the package could not be fetched."""


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tether"


def ensure_cli(version: str = LETTA_CODE_VERSION) -> Path:
    """Path to a runnable `letta.js` for `version`, installing it into the cache on first use.

    Safe when several processes race: each builds in its own temporary directory and moves it into place
    with `os.replace`, which fails for all but the first because the target is then a non-empty directory.
    """
    target = cache_root() / f"letta-code-{version}"
    letta_js = target / "letta.js"
    if (target / INSTALL_MARKER).exists():
        return letta_js
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise CliUnavailableError(
            "running the real Letta Code CLI needs `node` and `npm` on PATH "
            f"(found node={node!r}, npm={npm!r})"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".letta-code-{version}-") as scratch:
        work = Path(scratch)
        tarball = _npm(
            npm, ["pack", f"@letta-ai/letta-code@{version}", "--pack-destination", str(work)], work
        )
        with tarfile.open(work / tarball.strip().splitlines()[-1]) as archive:
            archive.extractall(work, filter="data")
        package = work / "package"
        # Installing inside the package fails on its package.json, so install `ws` in an empty project and
        # move its node_modules next to letta.js.
        deps = work / "deps"
        deps.mkdir()
        (deps / "package.json").write_text("{}\n")
        _npm(npm, ["install", WS_SPEC, "--no-audit", "--no-fund", "--no-package-lock"], deps)
        shutil.move(str(deps / "node_modules"), str(package / "node_modules"))
        if not (package / "letta.js").exists():
            raise CliUnavailableError(f"@letta-ai/letta-code@{version} has no letta.js")
        (package / INSTALL_MARKER).write_text(f"{version}\n")
        try:
            os.replace(package, target)
        except OSError:
            if not (target / INSTALL_MARKER).exists():
                # A half-made target from an interrupted run without the marker: replace it.
                shutil.rmtree(target, ignore_errors=True)
                os.replace(package, target)
    return letta_js


def _npm(npm: str, args: list[str], cwd: Path) -> str:
    try:
        done = subprocess.run([npm, *args], cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired as exc:
        raise CliUnavailableError(f"npm {' '.join(args)} timed out") from exc
    if done.returncode != 0:
        raise CliUnavailableError(f"npm {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done.stdout


class LettaCli:
    """One `node letta.js server --computer-name NAME --debug` child process and its output."""

    def __init__(self, letta_js: Path | None = None) -> None:
        self.letta_js = letta_js
        self.lines: list[str] = []
        self.home: Path | None = None
        self._owns_home = False
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        return self._process.returncode if self._process is not None else None

    async def start(
        self,
        base_url: str,
        api_key: str,
        name: str,
        home: Path | str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        if self._process is not None:
            raise RuntimeError("this LettaCli has already been started")
        if self.letta_js is None:
            self.letta_js = await asyncio.to_thread(ensure_cli)
        node = shutil.which("node")
        if node is None:
            raise CliUnavailableError("`node` is not on PATH")
        if home is None:
            self.home, self._owns_home = Path(tempfile.mkdtemp(prefix="letta-cli-home-")), True
        else:
            self.home = Path(home)
            self.home.mkdir(parents=True, exist_ok=True)
        # Settings from the caller's own Letta setup must not leak into the device under test.
        env = {key: value for key, value in os.environ.items() if not key.startswith("LETTA_")}
        env.update(
            {
                "HOME": str(self.home),
                "LETTA_BASE_URL": base_url,
                "LETTA_API_KEY": api_key,
                "IGNORE_SELF_HOSTED_LISTENER_ERROR": "1",
                "LETTA_CODE_TELEM": "0",
                "LETTA_DISABLE_CRON_SCHEDULER": "1",
            }
        )
        env.update(extra_env or {})
        self._process = await asyncio.create_subprocess_exec(
            node,
            str(self.letta_js),
            "server",
            "--computer-name",
            name,
            "--debug",
            cwd=self.home,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            limit=LINE_LIMIT,
        )
        self._reader = asyncio.create_task(self._read(self._process))

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while True:
            try:
                raw = await process.stdout.readline()
            except ValueError:  # a line over LINE_LIMIT; keep going rather than lose the rest
                continue
            if not raw:
                break
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
            async with self._changed:
                self._changed.notify_all()
        await process.wait()
        async with self._changed:
            self._changed.notify_all()

    async def wait_for_line(self, pattern: str, timeout: float = 30.0, *, since: int = 0) -> str:
        """The first output line from index `since` on that matches `pattern` (`re.search`)."""
        regex = re.compile(pattern)
        checked = since
        try:
            async with asyncio.timeout(timeout), self._changed:
                while True:
                    for line in self.lines[checked:]:
                        if regex.search(line):
                            return line
                    checked = max(checked, len(self.lines))
                    if self._reader is None or self._reader.done():
                        raise RuntimeError(
                            f"letta exited ({self.returncode}) without printing /{pattern}/:\n{self.tail()}"
                        )
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(f"no line matching /{pattern}/ within {timeout}s:\n{self.tail()}") from None

    async def wait_exit(self, timeout: float = 30.0) -> int:
        if self._process is None:
            raise RuntimeError("not started")
        async with asyncio.timeout(timeout):
            code = await self._process.wait()
        if self._reader is not None:
            await self._reader
        return code

    def count(self, pattern: str) -> int:
        regex = re.compile(pattern)
        return sum(1 for line in self.lines if regex.search(line))

    def frames(self, direction: str = "recv", label: str | None = None) -> list[dict[str, Any]]:
        """Frames from the `→ send` / `← recv` debug lines; `label` is e.g. "protocol" or "lifecycle"."""
        found: list[dict[str, Any]] = []
        for line in self.lines:
            match = _FRAME_LINE.match(line)
            if match is None or not match["arrow"].endswith(direction):
                continue
            if label is not None and (match["label"] or "client") != label:
                continue
            with contextlib.suppress(json.JSONDecodeError):
                found.append(json.loads(match["json"]))
        return found

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    async def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; signals only this process. Returns the exit status."""
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout):
                    await process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._owns_home and self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)
            self._owns_home = False
        return process.returncode if process is not None else None

    async def __aenter__(self) -> LettaCli:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
