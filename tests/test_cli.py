"""The `tether` command line: migrate, keys, help and settings errors, and serve's schema guard."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory

from tests.conftest import TETHER, Router, free_port
from tether.cli import main
from tether.config import Settings
from tether.store.engine import _alembic_config
from tether.store.sql import SqlStore

# The newest migration: what a fresh database is brought to.
HEAD = ScriptDirectory.from_config(_alembic_config()).get_current_head()


def run_tether(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    return subprocess.run(
        [*TETHER, *args], env={**clean, **env}, capture_output=True, text=True, timeout=timeout, check=False
    )


async def _schema(url: str) -> tuple[str, set[str]]:
    store = SqlStore(url)
    try:
        async with store.engine.connect() as conn:
            version = (await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).scalar_one()
            tables = await conn.run_sync(lambda c: set(sa.inspect(c).get_table_names()))
    finally:
        await store.close()
    return str(version), tables


async def _set_version(url: str, version: str) -> None:
    store = SqlStore(url)
    try:
        async with store.engine.begin() as conn:
            await conn.execute(sa.text("UPDATE alembic_version SET version_num = :v"), {"v": version})
    finally:
        await store.close()


# ---- migrate and the schema guard -------------------------------------------------------------


def test_migrate_creates_the_schema_on_a_fresh_database(database_url: str) -> None:
    done = run_tether("migrate", TETHER_DATABASE_URL=database_url)
    assert done.returncode == 0, done.stderr
    assert "migrated" in done.stdout
    version, tables = asyncio.run(_schema(database_url))
    assert version == HEAD
    assert {"organizations", "users", "api_keys", "environments", "teleports", "alembic_version"} <= tables
    again = run_tether("migrate", TETHER_DATABASE_URL=database_url)
    assert again.returncode == 0, again.stderr


def test_the_embedded_default_is_sqlite_under_the_data_dir(tmp_path: Path) -> None:
    done = run_tether("migrate", TETHER_DATA_DIR=str(tmp_path / "data"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "data" / "tether.db").is_file()


def test_several_pods_migrating_one_postgres_database_at_once_all_succeed(pg_url: str) -> None:
    plain = pg_url.replace("postgresql+asyncpg://", "postgresql://", 1)  # the URL people paste works too
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    procs = [
        subprocess.Popen(
            [*TETHER, "migrate"],
            env={**env, "TETHER_DATABASE_URL": plain},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outcomes = [(p.wait(60), p.stderr.read() if p.stderr else "") for p in procs]
    for p in procs:
        for stream in (p.stdout, p.stderr):
            if stream is not None:
                stream.close()
    assert [code for code, _ in outcomes] == [0, 0, 0, 0], outcomes
    assert asyncio.run(_schema(pg_url))[0] == HEAD


def test_serve_refuses_a_schema_from_a_newer_tether(database_url: str, tmp_path: Path) -> None:
    assert run_tether("migrate", TETHER_DATABASE_URL=database_url).returncode == 0
    asyncio.run(_set_version(database_url, "9999_from_the_future"))
    port = free_port()
    done = run_tether(
        "serve",
        TETHER_DATABASE_URL=database_url,
        TETHER_PORT=str(port),
        TETHER_DATA_DIR=str(tmp_path / "data"),
        timeout=60,
    )
    assert done.returncode != 0
    assert "refusing to start" in done.stderr
    assert "9999_from_the_future" in done.stderr and "newer" in done.stderr
    assert "Traceback" not in done.stderr
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz")
    # The other commands refuse it too, and nothing was changed.
    keys = run_tether("keys", "list", TETHER_DATABASE_URL=database_url)
    assert keys.returncode != 0 and "9999_from_the_future" in keys.stderr
    assert asyncio.run(_schema(database_url))[0] == "9999_from_the_future"


def test_serve_explains_an_unreachable_database(tmp_path: Path) -> None:
    # It does not exit: it listens, says which database it waits for, and answers /readyz 503.
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    port = free_port()
    proc, log_path = _serve_until(
        tmp_path, lambda out: "waiting for the database" in out, TETHER_DATABASE_URL=url, port=port
    )
    try:
        output = log_path.read_text(errors="replace")
        assert "postgresql+asyncpg://postgres@127.0.0.1" in output and "/nothing" in output
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        assert ready.status_code == 503, ready.text
        assert "database" in ready.json()["waiting"], ready.json()
    finally:
        output = _stops_promptly(proc, signal.SIGTERM, log_path)
    assert "Traceback" not in output


# ---- signals while starting -------------------------------------------------------------------


def _serve_until(
    tmp_path: Path, ready: Callable[[str], bool], port: int | None = None, **env: str
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start `tether serve` and wait until its output satisfies `ready`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    port = free_port() if port is None else port
    clean.update(TETHER_PORT=str(port), TETHER_DATA_DIR=str(tmp_path / "data"), **env)
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([*TETHER, "serve"], env=clean, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not ready(log_path.read_text(errors="replace")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"serve never reached the state under test:\n{log_path.read_text()}")
        time.sleep(0.05)
    return proc, log_path


def _stops_promptly(proc: subprocess.Popen[bytes], sig: int, log_path: Path) -> str:
    signalled = time.monotonic()
    proc.send_signal(sig)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        pytest.fail(f"serve still ran 5 s after {sig!r}:\n{log_path.read_text()}")
    elapsed = time.monotonic() - signalled
    output = log_path.read_text(errors="replace")
    assert elapsed < 5, elapsed
    # SIGINT: the shell's 128 + 2 and no traceback; SIGTERM: re-raised once clean, as when serving.
    assert proc.returncode == (128 + signal.SIGINT if sig == signal.SIGINT else -signal.SIGTERM), output
    assert "Traceback" not in output
    return output


SIGNALS = pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])


@SIGNALS
def test_serve_waiting_for_redis_at_start_up_stops_promptly_on_a_signal(sig: int, tmp_path: Path) -> None:
    nothing_listens = f"redis://127.0.0.1:{free_port()}/0"
    proc, log_path = _serve_until(
        tmp_path, lambda out: "Waiting for application startup." in out, TETHER_REDIS_URL=nothing_listens
    )
    time.sleep(1)  # well into the wait for Redis
    output = _stops_promptly(proc, sig, log_path)
    assert "start-up interrupted by a signal" in output
    assert "listening on" not in output  # no banner: the router never served


@SIGNALS
def test_serve_waiting_for_the_database_stops_promptly_on_a_signal(sig: int, tmp_path: Path) -> None:
    with socket.socket() as silent:  # takes connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"postgresql://tether@127.0.0.1:{silent.getsockname()[1]}/tether"
        proc, log_path = _serve_until(
            tmp_path, lambda out: "waiting for the database" in out, TETHER_DATABASE_URL=url
        )
        output = _stops_promptly(proc, sig, log_path)
    assert f"waiting for the database {url.replace('postgresql:', 'postgresql+asyncpg:')}" in output


# ---- keys -------------------------------------------------------------------------------------


def test_keys_alone_and_tether_alone_print_their_help_instead_of_an_error() -> None:
    keys = run_tether("keys")
    assert keys.returncode == 2
    assert "required" not in keys.stderr
    for command in ("create", "list", "revoke"):
        assert command in keys.stderr
    bare = run_tether()
    assert bare.returncode == 2 and "required" not in bare.stderr
    for command in ("serve", "migrate", "keys", "device"):
        assert command in bare.stderr
    revoke = run_tether("keys", "revoke", "--help")
    assert revoke.returncode == 0
    assert "KEY_ID" in revoke.stdout and "tether keys list" in revoke.stdout


def test_keys_create_list_and_revoke(router: Router) -> None:
    created = router.cli("keys", "create", "--org", "globex", "--user", "hank", "--name", "ci runner")
    key = created.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"tk_[0-9a-f]{16}_[A-Za-z0-9_-]{40,}", key), created.stdout
    assert key not in created.stderr
    # The printed key works against the REST API through the SDK.
    client = router.sdk(key)
    assert client.environments.list().connections == []
    hank = httpx.post(
        f"{router.base_url}/v1/environments/register",
        json={"deviceId": "d1", "connectionName": "box"},
        headers=router.headers(key),
    )
    assert hank.status_code == 200
    assert [c.device_id for c in client.environments.list().connections] == ["d1"]
    assert router.sdk().environments.list().connections == []  # another organization (acme)

    listing = router.cli("keys", "list").stdout
    key_id = key.split("_")[1]
    secret_part = key.split("_", 2)[2]
    assert secret_part not in listing and key not in listing
    line = next(line for line in listing.splitlines() if key_id in line)
    assert "globex" in line and "hank" in line and "ci runner" in line and "active" in line
    assert client.environments.list().connections[0].user_id in line  # the id userId filters use

    revoked = router.cli("keys", "revoke", key_id)
    assert revoked.returncode == 0 and key_id in revoked.stdout
    after = router.cli("keys", "list").stdout
    assert "revoked" in next(line for line in after.splitlines() if key_id in line)
    again = router.cli("keys", "revoke", key_id, check=False)
    assert again.returncode != 0 and key_id in again.stderr

    bad = router.cli("keys", "create", "--org", "", "--user", "x", check=False)
    assert bad.returncode != 0 and "--org" in bad.stderr


# ---- help and settings ------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"]], ids=["tether", "serve"])
def test_help_documents_every_setting(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(Settings):
        name = f"TETHER_{f.name.upper()}"
        assert re.search(rf"^\s+{name}\s", text, re.MULTILINE), name
        assert f.metadata["doc"].split(".")[0][:40] in " ".join(text.split()), name
    for required in ("TETHER_DATABASE_URL", "TETHER_PUBLIC_URL", "TETHER_POD_ID", "TETHER_LOG_LEVEL"):
        assert required in text
    assert "(default: 8283)" in text and "(default: '127.0.0.1')" in text
    if argv[0] == "serve":
        assert "--host" in text and "--port" in text


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TETHER_PORT", "eighty"),
        ("TETHER_PORT", "70000"),
        ("TETHER_LOG_LEVEL", "chatty"),
        ("TETHER_PUBLIC_URL", "tether.example.com"),
        ("TETHER_MAX_BODY_BYTES", "-5"),
        ("TETHER_OFFLINE_AFTER_SECONDS", "soon"),
        ("TETHER_BOOTSTRAP_KEY", "maybe"),
        ("TETHER_DATABASE_URL", "mysql://db/tether"),
        ("TETHER_GC_THRESHOLDS", "700,10"),
        ("TETHER_GC_THRESHOLDS", "0,10,10"),
        ("TETHER_LISTEN_BACKLOG", "lots"),
    ],
)
def test_a_malformed_setting_is_a_clear_error_naming_the_variable(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        main(["keys", "list"])
    message = str(exited.value.code)
    assert message.startswith(f"tether: invalid {name}: expected") and message.endswith(f"got {value!r}")


def test_a_malformed_port_exits_with_a_message_and_no_traceback(tmp_path: Path) -> None:
    done = run_tether("serve", TETHER_PORT="eighty", TETHER_DATA_DIR=str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.strip() == "tether: invalid TETHER_PORT: expected an integer, got 'eighty'"
    flag = run_tether("serve", "--port", "eighty", TETHER_DATA_DIR=str(tmp_path))
    assert flag.returncode == 2 and "--port" in flag.stderr and "Traceback" not in flag.stderr


def test_database_urls_without_the_async_driver_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    from tether.config import load_settings

    for given, resolved in [
        ("postgres://u@h:5432/d", "postgresql+asyncpg://u@h:5432/d"),
        ("postgresql://u@h/d", "postgresql+asyncpg://u@h/d"),
        ("sqlite:////var/lib/tether.db", "sqlite+aiosqlite:////var/lib/tether.db"),
        ("postgresql+asyncpg://u@h/d", "postgresql+asyncpg://u@h/d"),
    ]:
        assert load_settings({"TETHER_DATABASE_URL": given}).resolved_database_url == resolved
    assert load_settings({}).resolved_database_url.endswith("/.tether/tether.db")


# ---- the reference device ---------------------------------------------------------------------


def test_the_reference_device_logs_a_line_when_a_message_arrives(router: Router, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TETHER_", "LETTA_"))}
    env.update(LETTA_BASE_URL=router.base_url, LETTA_API_KEY=router.key)
    log_path = tmp_path / "device.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*TETHER, "device", "--name", "logs-messages"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 20
        while "Connected. Awaiting instructions." not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        [row] = router.sdk().environments.list().connections
        sent = httpx.post(
            f"{router.base_url}/v1/environments/{row.connection_id}/messages",
            headers=router.headers(),
            json={"agentId": "agent-7", "conversationId": "default",
                  "messages": [{"role": "user", "content": "hello from REST", "client_message_id": "cm-1"}]},
        )  # fmt: skip
        assert sent.status_code == 200 and sent.json()["success"] is True, sent.text
        while "Message for agent-7/default: 'hello from REST'" not in log_path.read_text():
            assert time.monotonic() < deadline + 10, log_path.read_text()
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
