"""`tether envs` and `tether pods` against a real `tether serve`, with a real reference device process."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TETHER, Router, free_port
from tether.fleetcli.views import LETTA_FIELDS

DEVICE_NAME = "cli-demo"


def tether(
    srv: Router | None,
    *args: str,
    key: str | None = None,
    url: str | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run `tether ARGS` as a user would: LETTA_BASE_URL and LETTA_API_KEY in the environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TETHER_", "LETTA_"))}
    if srv is not None:
        clean["LETTA_BASE_URL"] = url or srv.base_url
        clean["LETTA_API_KEY"] = key or srv.key
    clean.update(env or {})
    return subprocess.run(
        [*TETHER, *args],
        env=clean,
        cwd=cwd or (srv.data_dir.parent if srv else None),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def rows(srv: Router, key: str | None = None, **params: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    after = None
    while True:
        query = {"limit": 500, **params, **({"after": after} if after else {})}
        page = httpx.get(f"{srv.base_url}/v1/environments", params=query, headers=srv.headers(key)).json()
        found += page["connections"]
        if not page["hasNextPage"]:
            return found
        after = page["connections"][-1]["id"]


def register(srv: Router, name: str, key: str | None = None, **metadata: str) -> dict[str, Any]:
    """A registered row that no device holds: offline."""
    body = {"deviceId": f"dev-{uuid.uuid4().hex[:8]}", "connectionName": name, "metadata": metadata}
    answer = httpx.post(f"{srv.base_url}/v1/environments/register", json=body, headers=srv.headers(key))
    answer.raise_for_status()
    row = httpx.get(f"{srv.base_url}/v1/environments/{body['deviceId']}", headers=srv.headers(key))
    return {**body, **answer.json(), "id": row.json()["id"]}


def wait_for(check: Any, within: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within}s")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def device(srv: Router) -> Iterator[dict[str, Any]]:
    """The reference device (`tether device`) online on the module's router; yields its row."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env.update(LETTA_BASE_URL=srv.base_url, LETTA_API_KEY=srv.key, LETTA_CODE_TELEM="0")
    log = (srv.data_dir.parent / "device.log").open("wb")
    proc = subprocess.Popen(
        [*TETHER, "device", "--name", DEVICE_NAME], env=env, cwd=srv.data_dir.parent, stdout=log, stderr=log
    )
    try:
        yield wait_for(lambda: _online(srv, DEVICE_NAME), what="the reference device online")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def _online(srv: Router, name: str) -> dict[str, Any] | None:
    return next((r for r in rows(srv, onlineOnly="true") if r["connectionName"] == name), None)


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tether: "), done.stderr
    return lines[0]


# ---- list -----------------------------------------------------------------------------------------


def test_list_json_prints_the_fields_of_letta_environments_list(srv: Router, device: dict[str, Any]) -> None:
    offline = register(srv, "cli-offline", lettaCodeVersion="0.1.2")
    done = tether(srv, "envs", "list", "-o", "json")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert all(tuple(row) == LETTA_FIELDS for row in printed)
    by_device = {row["deviceId"]: row for row in printed}
    expected = {r["deviceId"]: r for r in rows(srv)}
    assert set(by_device) == set(expected)
    assert by_device[device["deviceId"]]["isOnline"] is True
    assert by_device[device["deviceId"]]["connectionId"] == device["connectionId"]
    assert by_device[device["deviceId"]]["lettaCodeVersion"] == device["metadata"]["lettaCodeVersion"]
    assert by_device[offline["deviceId"]] == {
        "deviceId": offline["deviceId"],
        "connectionName": "cli-offline",
        "connectionId": None,
        "lettaCodeVersion": "0.1.2",
        "isOnline": False,
    }

    online = tether(srv, "envs", "list", "-o", "ndjson", "--online")
    assert online.returncode == 0, online.stderr
    lines = [json.loads(line) for line in online.stdout.splitlines()]
    assert lines and all(row["isOnline"] for row in lines)
    assert device["deviceId"] in {row["deviceId"] for row in lines}
    assert offline["deviceId"] not in {row["deviceId"] for row in lines}


def test_list_filters_search_user_and_limit(srv: Router, device: dict[str, Any]) -> None:
    marker = uuid.uuid4().hex[:6]
    for i in range(3):
        register(srv, f"search-{marker}-{i}", gitBranch=f"branch-{marker}")
    found = json.loads(tether(srv, "envs", "list", "-o", "json", "--search", marker.upper()).stdout)
    assert sorted(r["connectionName"] for r in found) == [f"search-{marker}-{i}" for i in range(3)]
    limited = json.loads(tether(srv, "envs", "list", "-o", "json", "--search", marker, "--limit", "2").stdout)
    assert len(limited) == 2
    nobody = tether(srv, "envs", "list", "-o", "json", "--user", "user-nobody")
    assert nobody.returncode == 0 and json.loads(nobody.stdout) == []
    mine = json.loads(tether(srv, "envs", "list", "-o", "json", "--user", device["userId"]).stdout)
    assert device["deviceId"] in {r["deviceId"] for r in mine}


def test_list_json_pages_through_every_page(srv: Router) -> None:
    key = srv.create_key("bulk-org", "bulk")
    with httpx.Client(base_url=srv.base_url, headers=srv.headers(key)) as http:
        for i in range(503):  # more than one page of GET /v1/environments (500 at most)
            body = {"deviceId": f"bulk-{i}", "connectionName": f"bulk-{i}"}
            http.post("/v1/environments/register", json=body).raise_for_status()
    done = tether(srv, "envs", "list", "-o", "ndjson", key=key)
    assert done.returncode == 0, done.stderr
    ids = [json.loads(line)["deviceId"] for line in done.stdout.splitlines()]
    assert sorted(ids) == sorted(f"bulk-{i}" for i in range(503))
    table = tether(srv, "envs", "list", "--limit", "5", key=key)
    assert table.returncode == 0, table.stderr
    assert len(table.stdout.strip().splitlines()) == 1 + 5
    assert "5 of" in table.stderr and "shown" in table.stderr


def test_list_table_and_wide(srv: Router, device: dict[str, Any]) -> None:
    table = tether(srv, "envs", "list")
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.splitlines()
    assert header.split()[:3] == ["NAME", "DEVICE", "ID"]
    line = next(line for line in lines if device["deviceId"] in line)
    assert line.split()[0] == DEVICE_NAME and "online" in line.split()
    wide = tether(srv, "envs", "list", "-o", "wide", "--online")
    assert wide.returncode == 0, wide.stderr
    assert "CONNECTION ID" in wide.stdout and "DIRECTORY" in wide.stdout
    assert device["connectionId"] in wide.stdout
    now = _online(srv, DEVICE_NAME)
    assert now is not None and now["metadata"]["os"] in wide.stdout


# ---- get, send ------------------------------------------------------------------------------------


def test_get_in_every_format(srv: Router, device: dict[str, Any]) -> None:
    as_json = tether(srv, "envs", "get", device["deviceId"], "-o", "json")
    assert as_json.returncode == 0, as_json.stderr
    row = json.loads(as_json.stdout)
    assert row["id"] == device["id"] and row["connectionId"] == device["connectionId"]
    ndjson = tether(srv, "envs", "get", device["deviceId"], "-o", "ndjson")
    assert json.loads(ndjson.stdout)["id"] == device["id"] and len(ndjson.stdout.splitlines()) == 1
    for fmt in ("table", "wide"):
        shown = tether(srv, "envs", "get", device["deviceId"], "-o", fmt)
        assert shown.returncode == 0, shown.stderr
        fields = dict(
            line.split(None, 1) for line in shown.stdout.splitlines() if line.startswith(("NAME", "ID"))
        )
        assert fields == {"NAME": DEVICE_NAME, "ID": device["id"]}
        assert "online" in shown.stdout and device["connectionId"] in shown.stdout


def test_get_an_unknown_device_is_exit_5_in_one_line(srv: Router) -> None:
    done = tether(srv, "envs", "get", "no-such-device")
    assert done.returncode == 5
    assert "no-such-device" in one_line_error(done)
    assert done.stdout == ""


def test_send_to_a_device_and_to_a_connection(srv: Router, device: dict[str, Any]) -> None:
    by_device = tether(srv, "envs", "send", device["deviceId"], "--agent", "agent-cli", "hello from the cli")
    assert by_device.returncode == 0, by_device.stderr
    assert f"sent to {device['connectionId']}" in by_device.stdout
    by_connection = tether(
        srv,
        "envs",
        "send",
        device["connectionId"],
        "--agent",
        "agent-cli",
        "--conversation",
        "c-1",
        "-o",
        "json",
        "hi",
    )
    assert by_connection.returncode == 0, by_connection.stderr
    assert json.loads(by_connection.stdout) == {
        "success": True,
        "message": "Message sent",
        "connectionId": device["connectionId"],
    }
    ndjson = tether(srv, "envs", "send", device["connectionId"], "--agent", "a", "-o", "ndjson", "x")
    assert json.loads(ndjson.stdout)["success"] is True


def test_send_to_an_offline_or_unknown_target_fails(srv: Router) -> None:
    offline = register(srv, "send-offline")
    done = tether(srv, "envs", "send", offline["deviceId"], "--agent", "a", "hello")
    assert done.returncode == 1 and "offline" in one_line_error(done)
    lease = tether(srv, "envs", "send", offline["connectionId"], "--agent", "a", "hello")
    assert lease.returncode == 1 and "not delivered" in one_line_error(lease)
    unknown = tether(srv, "envs", "send", "conn-unknown", "--agent", "a", "hello")
    assert unknown.returncode == 5 and "conn-unknown" in one_line_error(unknown)
    missing_agent = tether(srv, "envs", "send", offline["deviceId"], "hello")
    assert missing_agent.returncode == 2 and "--agent" in missing_agent.stderr


# ---- disconnect, forget ---------------------------------------------------------------------------


def test_disconnect_makes_the_device_reconnect(srv: Router, device: dict[str, Any]) -> None:
    before = _online(srv, DEVICE_NAME)
    assert before is not None
    done = tether(srv, "envs", "disconnect", device["deviceId"])
    assert done.returncode == 0, done.stderr
    assert "reconnects" in done.stdout

    def back() -> bool:
        row = _online(srv, DEVICE_NAME)
        return row is not None and row["id"] == before["id"] and row["connectedAt"] != before["connectedAt"]

    wait_for(back, what="the device back online on the same row")
    as_json = tether(srv, "envs", "disconnect", device["deviceId"], "-o", "json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["disconnected"] is True
    wait_for(lambda: _online(srv, DEVICE_NAME), what="online again")


def test_disconnect_of_an_offline_or_unknown_environment(srv: Router) -> None:
    offline = register(srv, "disc-offline")
    done = tether(srv, "envs", "disconnect", offline["deviceId"])
    assert done.returncode == 1 and "NOT_CONNECTED" in one_line_error(done)
    unknown = tether(srv, "envs", "disconnect", "no-such-device")
    assert unknown.returncode == 5 and "no-such-device" in one_line_error(unknown)


def test_forget_needs_yes_without_a_terminal(srv: Router) -> None:
    row = register(srv, "forget-me")
    refused = tether(srv, "envs", "forget", row["deviceId"])
    assert refused.returncode == 2 and "--yes" in one_line_error(refused)
    assert row["deviceId"] in {r["deviceId"] for r in rows(srv)}
    done = tether(srv, "envs", "forget", row["deviceId"], "--yes")
    assert done.returncode == 0, done.stderr
    assert "forgot" in done.stdout
    assert row["deviceId"] not in {r["deviceId"] for r in rows(srv)}
    again = tether(srv, "envs", "forget", row["deviceId"], "--yes")
    assert again.returncode == 5
    by_id = register(srv, "forget-by-id")
    as_json = tether(srv, "envs", "forget", by_id["deviceId"], "--yes", "-o", "json")
    assert json.loads(as_json.stdout)["forgotten"] is True


def _interactive(srv: Router, answer: str, *args: str) -> tuple[int, str]:
    """Run with a terminal on stdin (a pty) and type `answer` at the prompt."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TETHER_", "LETTA_"))}
    env.update(LETTA_BASE_URL=srv.base_url, LETTA_API_KEY=srv.key)
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [*TETHER, *args], env=env, stdin=follower, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    os.close(follower)
    try:
        assert proc.stderr is not None
        prompt = ""
        deadline = time.monotonic() + 30
        while "[y/N]" not in prompt and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stderr], [], [], 1)
            if ready:
                prompt += os.read(proc.stderr.fileno(), 4096).decode()
        assert "[y/N]" in prompt, prompt
        os.write(leader, f"{answer}\n".encode())
        out, _ = proc.communicate(timeout=30)
        return proc.returncode, out
    finally:
        os.close(leader)


def test_forget_asks_on_a_terminal(srv: Router) -> None:
    row = register(srv, "forget-asked")
    code, _ = _interactive(srv, "n", "envs", "forget", row["deviceId"])
    assert code == 2
    assert row["deviceId"] in {r["deviceId"] for r in rows(srv)}
    code, out = _interactive(srv, "y", "envs", "forget", row["deviceId"])
    assert code == 0 and "forgot" in out
    assert row["deviceId"] not in {r["deviceId"] for r in rows(srv)}


# ---- watch ----------------------------------------------------------------------------------------


class Lines:
    """A running command's stdout, line by line, with a deadline per wait."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.buffer = ""
        self.lines: list[str] = []

    def wait(self, predicate: Any, within: float = 15.0) -> str:
        deadline = time.monotonic() + within
        while True:
            for line in self.lines:
                if predicate(line):
                    self.lines.remove(line)
                    return line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no such line in {within}s; got {self.lines}")
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                chunk = os.read(self.fd, 65536).decode()
                if not chunk:
                    raise AssertionError(f"the command ended: {self.lines}")
                self.buffer += chunk
                *complete, self.buffer = self.buffer.split("\n")
                self.lines += complete

    def read_for(self, seconds: float) -> list[str]:
        """The lines that arrive within `seconds`."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                chunk = os.read(self.fd, 65536).decode()
                if not chunk:
                    break
                self.buffer += chunk
                *complete, self.buffer = self.buffer.split("\n")
                self.lines += complete
        return [line for line in self.lines if line.strip()]


def _watch(srv: Router, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TETHER_", "LETTA_"))}
    env.update(LETTA_BASE_URL=srv.base_url, LETTA_API_KEY=srv.key)
    return subprocess.Popen(
        [*TETHER, "envs", "watch", "--interval", "0.5", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _interrupt(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    _, err = proc.communicate(timeout=15)
    return proc.returncode, err


def test_watch_ndjson_prints_added_modified_and_deleted_then_stops_on_ctrl_c(
    srv: Router, device: dict[str, Any]
) -> None:
    proc = _watch(srv, "-o", "ndjson")
    try:
        out = Lines(proc)
        first = json.loads(out.wait(lambda line: device["deviceId"] in line))
        assert first["type"] == "ADDED" and first["object"]["state"] == "online"
        row = register(srv, "watch-new")
        added = json.loads(out.wait(lambda line: row["deviceId"] in line))
        assert added["type"] == "ADDED" and added["object"]["state"] == "offline"
        httpx.delete(f"{srv.base_url}/v1/environments/{row['id']}", headers=srv.headers()).raise_for_status()
        deleted = json.loads(out.wait(lambda line: row["deviceId"] in line))
        assert deleted["type"] == "DELETED"
        out.lines.clear()  # what the first poll printed of earlier tests' rows
        assert out.read_for(1.2) == []  # two polls with nothing changed print nothing
    finally:
        code, err = _interrupt(proc)
    assert code == 0, err
    assert "Traceback" not in err


def test_watch_table_prints_only_changed_rows(srv: Router, device: dict[str, Any]) -> None:
    proc = _watch(srv, "--search", "watch-table")
    try:
        out = Lines(proc)
        header = out.wait(lambda line: line.startswith("NAME"))
        assert "STATE" in header
        row = register(srv, "watch-table-row")
        line = out.wait(lambda line: row["deviceId"] in line)
        assert line.split()[0] == "watch-table-row" and "offline" in line.split()
        httpx.delete(f"{srv.base_url}/v1/environments/{row['id']}", headers=srv.headers()).raise_for_status()
        gone = out.wait(lambda line: row["deviceId"] in line)
        assert "deleted" in gone.split()
        assert device["deviceId"] not in "".join(out.lines)  # filtered out by --search
    finally:
        code, err = _interrupt(proc)
    assert code == 0, err


# ---- pods -----------------------------------------------------------------------------------------


def _admin_key(srv: Router) -> str:
    out = srv.cli("keys", "create", "--org", "acme", "--user", "root", "--role", "admin")
    return out.stdout.strip().splitlines()[-1]


def test_pods_in_every_format(srv: Router) -> None:
    admin = _admin_key(srv)
    as_json = tether(srv, "pods", "-o", "json", key=admin)
    assert as_json.returncode == 0, as_json.stderr
    pods = json.loads(as_json.stdout)["pods"]
    assert [p["podId"] for p in pods] == [srv.pod_id] and pods[0]["self"] is True
    ndjson = tether(srv, "pods", "-o", "ndjson", key=admin)
    assert json.loads(ndjson.stdout)["podId"] == srv.pod_id
    for fmt in ("table", "wide"):
        table = tether(srv, "pods", "-o", fmt, key=admin)
        assert table.returncode == 0, table.stderr
        header, line = table.stdout.strip().splitlines()
        assert header.split()[:3] == ["POD", "VERSION", "UPTIME"]
        assert line.split()[0] == srv.pod_id and "(this)" in line


def test_pods_with_a_member_key_is_exit_4(srv: Router) -> None:
    done = tether(srv, "pods")
    assert done.returncode == 4 and "admin" in one_line_error(done)


# ---- where the router and the key come from, and the error paths ----------------------------------


def test_an_unreachable_router_is_exit_3_in_one_line(srv: Router) -> None:
    port = free_port()
    for args in (("envs", "list"), ("envs", "get", "x"), ("pods",), ("envs", "watch")):
        done = tether(srv, *args, "--url", f"http://127.0.0.1:{port}")
        assert done.returncode == 3, (args, done.stderr)
        assert f"127.0.0.1:{port}" in one_line_error(done)
    from_env = tether(srv, "envs", "list", url=f"http://127.0.0.1:{port}")
    assert from_env.returncode == 3 and f"127.0.0.1:{port}" in one_line_error(from_env)


def test_a_bad_key_is_exit_4_in_one_line(srv: Router) -> None:
    for args in (("envs", "list"), ("envs", "list", "-o", "json"), ("envs", "get", "x"), ("pods",)):
        done = tether(srv, *args, key="tk_bad_key")
        assert done.returncode == 4, (args, done.stderr)
        assert "API key" in one_line_error(done)


def test_the_key_comes_from_the_dev_key_file_else_it_is_missing(srv: Router, tmp_path: Path) -> None:
    no_key = tether(None, "envs", "list", "--url", srv.base_url, cwd=tmp_path)
    assert no_key.returncode == 4 and "LETTA_API_KEY" in one_line_error(no_key)
    (tmp_path / ".tether").mkdir()
    (tmp_path / ".tether" / "dev-key").write_text(srv.key + "\n")
    done = tether(None, "envs", "list", "-o", "json", cwd=tmp_path, env={"LETTA_BASE_URL": srv.base_url})
    assert done.returncode == 0, done.stderr
    assert isinstance(json.loads(done.stdout), list)


def test_the_default_router_address_is_named_when_nothing_answers(tmp_path: Path) -> None:
    done = tether(None, "envs", "list", cwd=tmp_path, env={"LETTA_API_KEY": "tk_x_y"})
    if _listening(8283):
        assert done.returncode in (1, 3, 4)  # someone's router (or something else) is there
    else:
        assert done.returncode == 3 and "http://127.0.0.1:8283" in one_line_error(done)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_usage_errors_are_exit_2(srv: Router) -> None:
    assert tether(srv, "envs").returncode == 2
    assert tether(srv, "envs", "list", "--limit", "0").returncode == 2
    assert tether(srv, "envs", "list", "-o", "yaml").returncode == 2
    assert tether(srv, "envs", "watch", "--interval", "0.01").returncode == 2
    bad_url = tether(srv, "envs", "list", "--url", "ftp://x")
    assert bad_url.returncode == 2 and "http://" in one_line_error(bad_url)
    helped = tether(srv, "envs", "list", "--help")
    assert helped.returncode == 0 and "exit codes" in helped.stdout
