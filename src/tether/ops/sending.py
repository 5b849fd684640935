"""`POST .../messages`: one message to a device, at most once per `client_message_id`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tether.hub import Hub
from tether.livestate.base import LiveState
from tether.metrics import Counters
from tether.protocol.frames import encode
from tether.store.base import EnvironmentRow, Principal


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
        if key is not None and not await self.live.claim(key):
            self.counters.messages_deduplicated += 1
            return SendOutcome(delivered=True, duplicate=True)
        delivered = await self.hub.send_to_device(row.connection_id, encode(frame))
        if not delivered:
            if key is not None:
                await self.live.release(key)  # a retry once the device is back must go through
            self.counters.messages_offline += 1
            return SendOutcome(delivered=False, reason="Environment is offline")
        self.counters.messages_delivered += 1
        agent = body.get("agentId")
        if isinstance(agent, str):
            conversation = body.get("conversationId") or "default"
            self.live.note_runtime(principal.org_id, agent, conversation, row.connection_id)
        return SendOutcome(delivered=True)


def dedupe_key(connection_id: str, body: dict[str, Any]) -> str | None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    first = messages[0]
    if isinstance(first, dict) and isinstance(first.get("client_message_id"), str):
        return f"msg:{connection_id}:{first['client_message_id']}"
    return None
