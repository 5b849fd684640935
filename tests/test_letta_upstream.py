"""The real Letta server 0.16.8 harness (tests/letta_upstream.py), proved against the server directly.

The gateway's end-to-end tests put Tether between these clients and this server; here nothing sits
between them, so a failure here is the harness's, not the gateway's. One server serves the session.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Router, skip_or_fail
from tests.fake_model import REPLY_PREFIX
from tests.letta_upstream import LETTA_SERVER_VERSION, LettaServer, LettaServerUnavailable
from tests.realcli import (
    CONNECTED,
    PYPI_CLI_VERSION,
    REGISTERED,
    CliUnavailableError,
    LettaCli,
    cli_command,
    run_prompt,
)

# The first test may pay for the install (about 2 minutes cold) and the start (about 20 s).
pytestmark = pytest.mark.timeout(900)


def _assistant_texts(messages: Any) -> list[str]:
    return [m.content for m in messages if m.message_type == "assistant_message"]


def test_agent_message_round_trip_through_the_fake_model(letta_upstream: LettaServer) -> None:
    health = httpx.get(f"{letta_upstream.url}/v1/health/", timeout=10).json()
    assert health == {"version": LETTA_SERVER_VERSION, "status": "ok"}
    client = letta_upstream.sdk()
    agent = client.agents.create(name="upstream-sync", model=letta_upstream.model)
    assert agent.llm_config.model == "gpt-4o-mini"
    before = len(letta_upstream.fake_model.chat_requests())

    response = client.agents.messages.create(
        agent.id, messages=[{"role": "user", "content": "hello upstream"}]
    )

    assert _assistant_texts(response.messages) == [f"{REPLY_PREFIX}hello upstream"]
    assert response.stop_reason.stop_reason == "end_turn"
    sent = letta_upstream.fake_model.chat_requests()[before:]
    assert len(sent) == 1
    assert sent[0]["model"] == "gpt-4o-mini" and not sent[0].get("stream")
    assert sent[0]["messages"][-1] == {"role": "user", "content": "hello upstream"}
    assert sent[0]["tools"], "the server offers the agent's tools to the model"
    # The turn is stored: the agent's history has the user's message and the reply.
    history = client.agents.messages.list(agent.id, order="asc").items
    assert [m.content for m in history if m.message_type == "user_message"][-1] == "hello upstream"
    assert _assistant_texts(history)[-1] == f"{REPLY_PREFIX}hello upstream"


def test_token_stream_yields_several_deltas(letta_upstream: LettaServer) -> None:
    client = letta_upstream.sdk()
    agent_id = letta_upstream.create_agent("upstream-stream")
    before = len(letta_upstream.fake_model.chat_requests())

    chunks = list(
        client.agents.messages.create(
            agent_id,
            messages=[{"role": "user", "content": "stream this please"}],
            streaming=True,
            stream_tokens=True,
        )
    )

    deltas = [c for c in chunks if c.message_type == "assistant_message"]
    assert len(deltas) >= 3, [c.message_type for c in chunks]
    assert "".join(d.content for d in deltas) == f"{REPLY_PREFIX}stream this please"
    assert len({d.id for d in deltas}) == 1, "the deltas are pieces of one assistant message"
    assert [c.message_type for c in chunks][-2:] == ["stop_reason", "usage_statistics"]
    sent = letta_upstream.fake_model.chat_requests()[before:]
    assert len(sent) == 1
    assert sent[0]["stream"] is True and sent[0]["stream_options"] == {"include_usage": True}


def test_conversation_turn_with_background_streaming(letta_upstream: LettaServer) -> None:
    """What the Letta Code CLI does: a conversation, a turn streamed in the background (needs Redis)."""
    client = letta_upstream.sdk()
    agent_id = letta_upstream.create_agent("upstream-conversation")
    conversation = client.conversations.create(agent_id=agent_id)
    assert conversation.agent_id == agent_id

    chunks = list(
        client.conversations.messages.create(
            conversation.id,
            messages=[{"role": "user", "content": "in a conversation"}],
            streaming=True,
            stream_tokens=True,
            background=True,
        )
    )

    reply = "".join(c.content for c in chunks if c.message_type == "assistant_message")
    assert reply == f"{REPLY_PREFIX}in a conversation"
    stored = client.conversations.messages.list(conversation.id, order="asc").items
    assert _assistant_texts(stored) == [f"{REPLY_PREFIX}in a conversation"]


@pytest.mark.realcli
@pytest.mark.parametrize("distribution", ["npm", "pypi"])
def test_headless_cli_turn_against_the_server(letta_upstream: LettaServer, distribution: str) -> None:
    """`letta -p "…" --agent A` (npm 0.32.18, PyPI 0.34.12), LETTA_BASE_URL at the server, fresh HOME."""
    try:
        command = cli_command(distribution)
    except CliUnavailableError as exc:
        skip_or_fail(f"the Letta Code CLI ({distribution}): {exc}")
    agent_id = letta_upstream.create_agent(f"upstream-cli-{distribution}")
    before = len(letta_upstream.fake_model.chat_requests())

    done = run_prompt(
        command, f"hello from the {distribution} CLI", base_url=letta_upstream.url, agent_id=agent_id
    )

    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert done.stdout.strip() == f"{REPLY_PREFIX}hello from the {distribution} CLI"
    sent = letta_upstream.fake_model.chat_requests()[before:]
    assert len(sent) == 1 and sent[0]["stream"] is True


@pytest.mark.realcli
async def test_pypi_cli_runs_as_a_tether_device(srv: Router) -> None:
    """`LettaCli(command=cli_command("pypi"))`: PyPI's build as the device, in npm's runner."""
    try:
        command = await asyncio.to_thread(cli_command, "pypi")
    except CliUnavailableError as exc:
        skip_or_fail(f"the Letta Code CLI (pypi): {exc}")
    async with LettaCli(command=command) as cli:
        await cli.start(srv.base_url, srv.key, "cli-pypi")
        await cli.wait_for_line(REGISTERED)
        await cli.wait_for_line(CONNECTED)
        rows = srv.sdk().environments.list(online_only=True).connections
        row = next(r for r in rows if r.connection_name == "cli-pypi")
        assert row.metadata.letta_code_version == PYPI_CLI_VERSION


def _process_tree(roots: list[int]) -> set[int]:
    """`roots` and every live descendant of theirs (PostgreSQL's backends, say), from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended while we looked
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    tree = {pid for pid in roots if pid in parents}
    while True:
        grown = tree | {pid for pid, parent in parents.items() if parent in tree}
        if grown == tree:
            return tree
        tree = grown


def test_password_is_enforced_and_stop_leaves_nothing_behind() -> None:
    """`LETTA_SERVER_SECURE`: Bearer <password> or 401 (health exempt); stop ends every process it began."""
    server = LettaServer(password="upstream-secret")
    try:
        server.start()
    except LettaServerUnavailable as exc:
        skip_or_fail(f"the real Letta server: {str(exc).splitlines()[0]}")
    try:
        root = server.log_path.parent
        started_pids = server.pids()
        assert len(started_pids) == 3, "PostgreSQL, Redis and the Letta server run"
        tree = _process_tree(started_pids)
        agents = f"{server.url}/v1/agents/"
        assert httpx.get(agents, timeout=10).status_code == 401
        assert httpx.get(agents, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
        assert httpx.get(agents, headers=server.headers(), timeout=10).status_code == 200
        assert httpx.get(f"{server.url}/v1/health/", timeout=10).status_code == 200
        agent_id = server.create_agent("upstream-secure")
        assert server.sdk().agents.retrieve(agent_id).id == agent_id
    finally:
        started = time.monotonic()
        server.stop()
    assert time.monotonic() - started < 30
    assert not root.exists()
    assert tree and _process_tree(list(tree)) == set()
