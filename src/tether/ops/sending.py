"""`POST .../messages`: one message to a device, at most once per `client_message_id`.

A retry (the SDK retries timeouts, resets and 5xx with the same body) that meets the first attempt
still in flight waits for its outcome, polling live state every `CLAIM_POLL_SECONDS` for at most
`send_timeout_seconds` + `CLAIM_WAIT_MARGIN_SECONDS` (the first attempt's own write gives up by then):
delivered -> "already delivered"; failed -> this attempt delivers; still undecided -> not delivered
(`success: false`), never delivered twice.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import Enum
from typing import Any

from tether.hub import Hub
from tether.livestate.base import LiveState
from tether.metrics import Counters
from tether.protocol.frames import encode
from tether.store.base import EnvironmentRow, Principal

CLAIM_POLL_SECONDS = 0.02
CLAIM_WAIT_MARGIN_SECONDS = 1.0


class Claim(Enum):
    FIRST = "this attempt delivers"
    DUPLICATE = "an earlier attempt delivered it"
    UNDECIDED = "an earlier attempt is still delivering it"


@dataclass(frozen=True, slots=True)
class SendOutcome:
    delivered: bool
    duplicate: bool = False
    reason: str = ""


class Sending:
    def __init__(self, live: LiveState, hub: Hub, counters: Counters) -> None:
        self.live = live
        self.hub = hub
        self.counters = counters

    async def send_message(
        self, principal: Principal, row: EnvironmentRow, body: dict[str, Any]
    ) -> SendOutcome:
        assert row.connection_id is not None
        frame: dict[str, Any] = {"type": "message", **body}
        key = dedupe_key(row.connection_id, body)
        claim = Claim.FIRST if key is None else await self._claim(key)
        if claim is Claim.DUPLICATE:
            self.counters.messages_deduplicated += 1
            return SendOutcome(delivered=True, duplicate=True)
        if claim is Claim.UNDECIDED:
            return SendOutcome(delivered=False, reason="An earlier attempt of this message is still pending")
        delivered = await self.hub.send_to_device(row.connection_id, encode(frame))
        if not delivered:
            if key is not None:
                await self.live.release(key)  # a retry once the device is back must go through
            self.counters.messages_offline += 1
            return SendOutcome(delivered=False, reason="Environment is offline")
        if key is not None:
            await self.live.confirm(key)
        self.counters.messages_delivered += 1
        agent = body.get("agentId")
        if isinstance(agent, str):
            conversation = body.get("conversationId") or "default"
            self.live.note_runtime(principal.org_id, agent, conversation, row.connection_id)
        return SendOutcome(delivered=True)

    async def _claim(self, key: str) -> Claim:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.hub.send_timeout_seconds + CLAIM_WAIT_MARGIN_SECONDS
        while True:
            if await self.live.claim(key):
                return Claim.FIRST
            state = await self.live.claim_state(key)
            if state is True:
                return Claim.DUPLICATE
            if state is None and loop.time() < deadline:
                continue  # released (its delivery failed) or expired meanwhile: claim it again
            if loop.time() >= deadline:
                return Claim.UNDECIDED
            await asyncio.sleep(CLAIM_POLL_SECONDS)


def dedupe_key(connection_id: str, body: dict[str, Any]) -> str | None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    first = messages[0]
    if isinstance(first, dict) and isinstance(first.get("client_message_id"), str):
        return f"msg:{connection_id}:{first['client_message_id']}"
    return None
