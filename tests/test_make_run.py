"""`make run` from a clean copy of the repository: install, migrate, first start with a development key.

The copy gets a fresh `.venv` whose third-party packages come from the interpreter running this suite
(through a `.pth` file) instead of from the network; everything else is the Makefile's own recipe:
`make` installs the copy into that venv, stamps it, and runs `tether serve` with the embedded defaults.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from letta_client import Letta

from tests.conftest import IN_CI, free_port

REPO = Path(__file__).resolve().parents[1]
KEY = re.compile(r"^\s+(tk_[0-9a-f]{16}_[A-Za-z0-9_-]+)\s*$", re.MULTILINE)


class MakeRun:
    """One `make run` process group and everything it printed."""

    def __init__(self, checkout: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            ["make", "run"],
            cwd=checkout,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, like a terminal's foreground job
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, base_url: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._reader.join(5)
                pytest.fail(f"make run exited with {self.proc.returncode}:\n{self.output}")
            try:
                if httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.interrupt(signal.SIGKILL)
        pytest.fail(f"make run did not become ready within {timeout}s:\n{self.output}")

    def interrupt(self, sig: int) -> int:
        """Signal the whole group, as Ctrl-C in a terminal does, and wait for it to end."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait(10)
        self._reader.join(10)
        return code


def _tracked_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and (REPO / name).is_file()]


@pytest.fixture
def checkout(tmp_path: Path) -> Iterator[Path]:
    for tool in ("make", "git"):
        if shutil.which(tool) is None:
            if IN_CI:
                pytest.fail(f"`{tool}` is required in CI", pytrace=False)
            pytest.skip(f"`{tool}` is not installed")
    copy = tmp_path / "tether"
    for name in _tracked_files():
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    assert not (copy / ".tether").exists() and not (copy / ".venv").exists()

    venv = copy / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    [site] = list(venv.glob("lib/python*/site-packages"))
    shared = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_shared_dependencies.pth").write_text("".join(f"{path}\n" for path in sorted(shared)))
    yield copy


def _env(port: int) -> dict[str, str]:
    drop = ("TETHER_", "LETTA_", "MAKE", "MFLAGS", "VIRTUAL_ENV", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["TETHER_PORT"] = str(port)
    env["TETHER_SHUTDOWN_DRAIN_SECONDS"] = "1"
    return env


def _example(banner: str, heading: str) -> str:
    """The shell command printed under `heading`, with its continuation lines."""
    lines = banner.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading)) + 1
    command = [lines[start]]
    while command[-1].endswith("\\"):
        command.append(lines[start + len(command)])
    return "\n".join(command)


def test_make_run_from_a_clean_copy_prints_a_working_development_key_once(
    checkout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"

    first = MakeRun(checkout, _env(port))
    try:
        first.wait_ready(base_url)
        time.sleep(0.2)  # the banner is printed just before the socket opens; let the reader catch up
        banner = first.output
        assert "-m pip install --quiet" in banner  # the Makefile's install step ran in the copy
        assert f"listening on {base_url}" in banner
        assert "Created a development API key" in banner
        [key] = KEY.findall(banner)
        assert "letta server" in banner and f"LETTA_BASE_URL={base_url}" in banner
        assert "LETTA_CODE_TELEM=0" in banner and "@letta-ai/letta-code@0.32.18" in banner
        assert f"API docs: {base_url}/docs" in banner
        assert httpx.get(f"{base_url}/").json()["docs"] == "/docs"  # not a bare 404
        # Absolute paths: the key file, and the checkout's own Python (it has letta-client).
        dev_key = checkout / ".tether" / "dev-key"
        assert f"LETTA_API_KEY=$(cat {dev_key.resolve()})" in banner
        python = checkout / ".venv" / "bin" / "python"
        assert f"    {python} -c 'from letta_client import Letta;" in banner
        assert f"    {python} -m tether device --name demo" in banner
        # The client example works pasted into a shell in another folder, with nothing else set.
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        example = _example(banner, "Connect a client")
        pasted = subprocess.run(
            ["bash", "-c", example], cwd=elsewhere, env=_env(port), capture_output=True, text=True, timeout=60
        )
        assert pasted.returncode == 0, (example, pasted.stderr)
        assert "connections=[]" in pasted.stdout, pasted.stdout

        assert stat.S_IMODE(dev_key.stat().st_mode) == 0o600
        assert dev_key.read_text().strip() == key
        assert (checkout / ".tether" / "tether.db").is_file()
        imported = subprocess.run(
            [str(checkout / ".venv" / "bin" / "python"), "-c", "import tether; print(tether.__file__)"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert Path(imported).is_relative_to(checkout / "src")  # the copy's code, not this checkout's

        # What the banner tells a client to do works as printed.
        monkeypatch.setenv("LETTA_BASE_URL", base_url)
        monkeypatch.setenv("LETTA_API_KEY", dev_key.read_text().strip())
        client = Letta(_strict_response_validation=True)
        page = client.environments.list()
        assert page.connections == [] and page.has_next_page is False
    finally:
        first.interrupt(signal.SIGINT)
    assert "Application shutdown complete" in first.output
    assert "Traceback" not in first.output
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base_url}/healthz")

    second = MakeRun(checkout, _env(port))
    try:
        second.wait_ready(base_url, timeout=60)
        time.sleep(0.2)
        again = second.output
        assert "-m pip install --quiet" not in again  # installed once; the stamp holds
        assert "Created a development API key" not in again and not KEY.findall(again)
        assert f"LETTA_API_KEY=$(cat {(checkout / '.tether' / 'dev-key').resolve()})" in again
        assert (checkout / ".tether" / "dev-key").read_text().strip() == key
        assert Letta(_strict_response_validation=True).environments.list().connections == []
        keys = subprocess.run(
            [str(checkout / ".venv" / "bin" / "tether"), "keys", "list"],
            cwd=checkout,
            env=_env(port),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        assert len(keys) == 2 and "development key" in keys[1]  # header + the one key
    finally:
        second.interrupt(signal.SIGTERM)
    assert "Application shutdown complete" in second.output
    assert "Traceback" not in second.output
