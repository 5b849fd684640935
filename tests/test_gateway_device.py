"""The whole loop through one URL: a real Letta Code device runs a real agent turn through Tether.

The SDK creates the agent through Tether; `letta server` (npm 0.32.18 and PyPI 0.34.12) registers
with Tether and runs the turn against the agent API through Tether; a relay socket sees the turn's
`stream_delta` events and the stop reason; the SDK reads the reply through Tether. Upstream: a real
Letta server 0.16.8 (only its model is a stand-in).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Router, service_missing, start_router
from tests.fake_model import REPLY_PREFIX
from tests.realcli import CONNECTED, CliUnavailableError, LettaCli, cli_command
from tests.wire import open_socket

pytestmark = [pytest.mark.realcli, pytest.mark.timeout(900)]


def command(distribution: str) -> list[str]:
    try:
        return cli_command(distribution)
    except CliUnavailableError as exc:
        service_missing(f"the Letta Code CLI ({distribution}: {exc})")
        raise


async def online_row(router: Router, name: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = router.sdk().environments.list(online_only=True).connections
        row = next((r for r in rows if r.connection_name == name), None)
        if row is not None:
            return row
        await asyncio.sleep(0.2)
    raise AssertionError(f"{name} never came online")


async def run_turn(
    device_pod: Router, client_pod: Router, upstream: Any, distribution: str, name: str
) -> None:
    sdk = client_pod.sdk()
    agent = sdk.agents.create(name=f"agent-{name}", model=upstream.model, agent_type="letta_v1_agent")
    cli = LettaCli(command=command(distribution))
    try:
        await cli.start(device_pod.base_url, device_pod.key, name)
        await cli.wait_for_line(CONNECTED, timeout=60)
        row = await online_row(client_pod, name)
        scope = f"agentId={agent.id}&conversationId=default"
        base = f"{client_pod.ws_base}/v1/environments/{row.connection_id}/status/ws?{scope}"
        control = await open_socket(base + "&channel=control", client_pod.key)
        stream = await open_socket(base + "&channel=stream", client_pod.key)
        text = f"hello {name}"
        sent = sdk.environments.send_message(
            row.connection_id,
            messages=[{"role": "user", "content": text, "client_message_id": f"cm-{name}"}],
            agent_id=agent.id,
            conversation_id="default",
        )
        assert sent.success is True
        deltas: list[dict[str, Any]] = []
        stop: dict[str, Any] | None = None
        deadline = asyncio.get_running_loop().time() + 90
        while stop is None:
            left = deadline - asyncio.get_running_loop().time()
            assert left > 0, f"no stop reason; deltas {deltas[-5:]}\n{cli.tail()}"
            frame = json.loads(await asyncio.wait_for(stream.recv(), left))
            if frame.get("type") != "stream_delta":
                continue
            delta = frame["delta"]
            deltas.append(delta)
            if delta.get("message_type") == "stop_reason" and delta.get("stop_reason") != "requires_approval":
                stop = delta
        assert stop["stop_reason"] == "end_turn", (stop, cli.tail())
        said = "".join(
            str(d.get("content") or "") for d in deltas if d.get("message_type") == "assistant_message"
        )
        assert said.strip() == f"{REPLY_PREFIX}{text}"
        listed = sdk.agents.messages.list(agent.id, conversation_id="default")
        assert f"{REPLY_PREFIX}{text}" in [
            getattr(m, "content", None) for m in listed.items if m.message_type == "assistant_message"
        ]
        await control.close()
        await stream.close()
    finally:
        await cli.stop()


@pytest.mark.parametrize("distribution", ["npm", "pypi"])
async def test_a_real_device_runs_a_turn_through_tether_alone(
    letta_upstream_secure: Any, tmp_path: Path, distribution: str
) -> None:
    upstream = letta_upstream_secure
    router = start_router(tmp_path, letta_url=upstream.url, letta_api_key=upstream.password)
    try:
        await run_turn(router, router, upstream, distribution, f"gw-{distribution}")
    finally:
        router.stop()


async def test_the_turn_works_across_two_pods(
    letta_upstream_secure: Any, tmp_path: Path, pg_url: str, redis_url: str
) -> None:
    upstream = letta_upstream_secure
    gateway = {"letta_url": upstream.url, "letta_api_key": upstream.password}
    pod_a = start_router(tmp_path / "a", database_url=pg_url, redis_url=redis_url, pod_id="gw-a", **gateway)
    pod_b = start_router(
        tmp_path / "b", database_url=pg_url, redis_url=redis_url, pod_id="gw-b", create_key=False, **gateway
    )
    pod_b.key = pod_a.key
    try:
        await run_turn(pod_a, pod_b, upstream, "npm", "gw-pods")
    finally:
        pod_a.stop()
        pod_b.stop()
