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
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LETTA_CODE_VERSION = "0.32.18"
# The same CLI published on PyPI as `letta` (0.32.13 on); its wheel bundles Node.js and the app.
PYPI_CLI_VERSION = "0.34.12"
VENV_INSTALL_TIMEOUT_SECONDS = 1800
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


def ensure_venv(
    venv: Path,
    requirements: Sequence[str],
    *,
    constraints: Path | None = None,
    pip: str | None = None,
    check: str = "",
) -> Path:
    """A venv at `venv` holding `requirements`, built on first use; returns `venv`.

    A venv is not relocatable (its scripts name its path), so unlike `ensure_cli` it is built in place,
    under an exclusive lock on a file beside it, and a marker written last says it is complete and what
    it was built from. Another process that finds the lock taken waits, then finds the marker; a folder
    without the right marker (an interrupted build, changed pins) is removed and built again.
    `pip` upgrades pip first (a spec such as "pip==26.0.1"); `check` is Python code that must run in it.
    """
    digest = hashlib.sha256("\n".join((pip or "", check, *requirements)).encode())
    if constraints is not None:
        digest.update(constraints.read_bytes())
    fingerprint = f"{digest.hexdigest()}\n"
    marker = venv / INSTALL_MARKER
    if _marked(marker, fingerprint):
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    with (venv.parent / f".{venv.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _marked(marker, fingerprint):
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        log = venv.parent / f"{venv.name}.install.log"
        python = str(venv / "bin" / "python")
        steps = [[sys.executable, "-m", "venv", str(venv)]]
        if pip:
            steps.append([python, "-m", "pip", "install", "-q", pip])
        with_constraints = ["-c", str(constraints)] if constraints is not None else []
        steps.append([python, "-m", "pip", "install", "-q", *with_constraints, *requirements])
        if check:
            steps.append([python, "-c", check])
        # The tests' own venv must not steer the other venv's pip or python.
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
        with log.open("w") as out:
            for argv in steps:
                out.write(f"$ {' '.join(argv)}\n")
                out.flush()
                what = f"`{' '.join(argv[:5])} …` (log: {log})"
                try:
                    done = subprocess.run(
                        argv, stdout=out, stderr=subprocess.STDOUT, env=env, check=False,
                        timeout=VENV_INSTALL_TIMEOUT_SECONDS,
                    )  # fmt: skip
                except subprocess.TimeoutExpired:
                    raise CliUnavailableError(f"{what} timed out") from None
                if done.returncode != 0:
                    tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
                    raise CliUnavailableError(f"{what} failed ({done.returncode}):\n{tail}")
        partial = marker.with_name(f"{INSTALL_MARKER}.tmp")
        partial.write_text(fingerprint)
        os.replace(partial, marker)
    return venv


def _marked(marker: Path, fingerprint: str) -> bool:
    try:
        return marker.read_text() == fingerprint
    except OSError:
        return False


def ensure_pypi_cli(version: str = PYPI_CLI_VERSION) -> Path:
    """The `letta` console script of PyPI's `letta==version` (Letta Code), installed into the cache once."""
    venv = ensure_venv(cache_root() / f"letta-code-pypi-{version}", [f"letta=={version}"])
    script = venv / "bin" / "letta"
    if not script.is_file():
        raise CliUnavailableError(f"letta=={version} from PyPI installed no `letta` script in {venv}")
    return script


def cli_command(distribution: str = "npm") -> list[str]:
    """The argv prefix that runs the Letta Code CLI: the npm build (`node letta.js`) or PyPI's `letta`."""
    if distribution == "pypi":
        return [str(ensure_pypi_cli())]
    if distribution != "npm":
        raise ValueError(f"unknown Letta Code distribution {distribution!r} (npm or pypi)")
    letta_js = ensure_cli()
    node = shutil.which("node")
    if node is None:
        raise CliUnavailableError("`node` is not on PATH")
    return [node, str(letta_js)]


def cli_env(
    home: Path, base_url: str, api_key: str | None, extra_env: dict[str, str] | None = None
) -> dict[str, str]:
    """The CLI's environment: the caller's own Letta settings removed, telemetry and cron off."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("LETTA_")}
    env.update(
        {
            "HOME": str(home),
            "LETTA_BASE_URL": base_url,
            "IGNORE_SELF_HOSTED_LISTENER_ERROR": "1",
            "LETTA_CODE_TELEM": "0",
            "LETTA_DISABLE_CRON_SCHEDULER": "1",
        }
    )
    if api_key is not None:
        env["LETTA_API_KEY"] = api_key
    env.update(extra_env or {})
    return env


def run_prompt(
    command: Sequence[str],
    prompt: str,
    *,
    base_url: str,
    agent_id: str,
    api_key: str | None = None,
    home: Path | None = None,
    extra_args: Sequence[str] = (),
    extra_env: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """One headless turn, `letta -p PROMPT --agent AGENT_ID`, in a fresh HOME unless `home` is given."""
    with tempfile.TemporaryDirectory(prefix="letta-cli-home-") as scratch:
        cwd = Path(scratch) if home is None else home
        cwd.mkdir(parents=True, exist_ok=True)
        argv = [*command, "-p", prompt, "--agent", agent_id, *extra_args]
        try:
            return subprocess.run(
                argv, cwd=cwd, env=cli_env(cwd, base_url, api_key, extra_env), stdin=subprocess.DEVNULL,
                capture_output=True, text=True, timeout=timeout, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            output = [
                o.decode(errors="replace") if isinstance(o, bytes) else o or ""
                for o in (exc.stdout, exc.stderr)
            ]
            raise TimeoutError(
                f"`letta -p` did not finish in {timeout:.0f} s:\n" + "\n".join(output)
            ) from None


class LettaCli:
    """One `node letta.js server --computer-name NAME --debug` child process and its output."""

    def __init__(self, letta_js: Path | None = None, *, command: Sequence[str] | None = None) -> None:
        """`command`: the argv prefix of another build, e.g. `cli_command("pypi")`; else `node letta_js`."""
        self.letta_js = letta_js
        self.command = list(command) if command is not None else None
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
        if self.command is None:
            if self.letta_js is None:
                self.letta_js = await asyncio.to_thread(ensure_cli)
            node = shutil.which("node")
            if node is None:
                raise CliUnavailableError("`node` is not on PATH")
            self.command = [node, str(self.letta_js)]
        if home is None:
            self.home, self._owns_home = Path(tempfile.mkdtemp(prefix="letta-cli-home-")), True
        else:
            self.home = Path(home)
            self.home.mkdir(parents=True, exist_ok=True)
        # Settings from the caller's own Letta setup must not leak into the device under test.
        env = cli_env(self.home, base_url, api_key, extra_env)
        self._process = await asyncio.create_subprocess_exec(
            *self.command,
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
