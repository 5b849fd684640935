"""Moving a conversation's runtime from one device to another (device-protocol §6.2).

status               | on                                | next                 | router sends
(created)            | start                             | waiting_for_source   | teleport_request -> source
waiting_for_source   | source teleport_ready success     | starting_destination | runtime_start -> target
waiting_for_source   | source teleport_ready failure     | failed               | -
starting_destination | target runtime_start_response ok  | (same)               | input teleport_continue
starting_destination | target input_accepted accepted    | completed            | -
starting_destination | target refuses / errors           | failed               | teleport_failed -> source
any open status      | deadline passes, a device is gone | failed               | teleport_failed -> source
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from tether.protocol.frames import Frame

WAITING_FOR_SOURCE = "waiting_for_source"
STARTING_DESTINATION = "starting_destination"
COMPLETED = "completed"
FAILED = "failed"
STATUSES = (WAITING_FOR_SOURCE, STARTING_DESTINATION, COMPLETED, FAILED)

# The source answers at its next turn or tool boundary, so it may take a while; the device
# remembers readiness for 5 min. The target expects the continuation within 60 s of runtime_start.
SOURCE_WAIT_MS = 10 * 60 * 1000
DESTINATION_WAIT_MS = 60 * 1000

Side = Literal["source", "target"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    connection_id: str
    device_id: str
    connection_name: str


@dataclass(frozen=True, slots=True)
class Command:
    to: Side
    frame: dict[str, Any]


class Teleport:
    def __init__(
        self, teleport_id: str, agent_id: str, conversation_id: str, source: Endpoint, target: Endpoint
    ) -> None:
        self.id = teleport_id
        self.agent_id = agent_id
        self.conversation_id = conversation_id
        self.source = source
        self.target = target
        self.status = WAITING_FOR_SOURCE
        self.error: str | None = None
        self.mode: str | None = None
        self.continuation: Any = None
        self._deadline: float | None = None
        self._continued = False

    @property
    def runtime(self) -> dict[str, str]:
        return {"agent_id": self.agent_id, "conversation_id": self.conversation_id}

    @property
    def finished(self) -> bool:
        return self.status in (COMPLETED, FAILED)

    def request_id(self, step: str) -> str:
        return f"teleport-{self.id}-{step}"

    def deadline(self) -> float | None:
        return None if self.finished else self._deadline

    def start(self, now_ms: float) -> list[Command]:
        self._deadline = now_ms + SOURCE_WAIT_MS
        target = {
            "connection_id": self.target.connection_id,
            "device_id": self.target.device_id,
            "connection_name": self.target.connection_name,
        }
        return [
            Command(
                "source",
                {
                    "type": "teleport_request",
                    "request_id": self.request_id("request"),
                    "teleport_id": self.id,
                    "runtime": self.runtime,
                    "target": target,
                },
            )
        ]

    def on_frame(self, side: Side, frame: Frame, now_ms: float) -> list[Command]:
        if self.finished:
            return []
        body = frame.body
        if side == "source" and frame.type == "teleport_ready" and body.get("teleport_id") == self.id:
            return self._source_ready(body, now_ms)
        if side != "target" or self.status != STARTING_DESTINATION:
            return []
        if frame.type == "runtime_start_response" and frame.request_id == self.request_id("start"):
            if body.get("success") is not True:
                return self._fail(
                    f"destination could not start the runtime: {body.get('error') or 'unknown'}"
                )
            return self._continue()
        if frame.type == "input_accepted" and frame.request_id == self.request_id("continue"):
            if body.get("accepted") is not True:
                return self._fail(f"destination refused the continuation: {body.get('error') or 'unknown'}")
            self.status = COMPLETED
            return []
        return []

    def on_timeout(self, now_ms: float) -> list[Command]:
        if self.finished or self._deadline is None or now_ms < self._deadline:
            return []
        waiting_for = "source" if self.status == WAITING_FOR_SOURCE else "destination"
        return self._fail(f"timed out waiting for the {waiting_for}")

    def on_device_gone(self, side: Side) -> list[Command]:
        if self.finished:
            return []
        return self._fail(f"the {side} environment went offline")

    def _source_ready(self, body: dict[str, Any], now_ms: float) -> list[Command]:
        if self.status != WAITING_FOR_SOURCE:
            return []  # a repeated ready for an idempotent request
        if body.get("success") is not True:
            self.status = FAILED
            self.error = str(body.get("error") or "source refused the teleport")
            return []
        self.status = STARTING_DESTINATION
        self.mode = body.get("mode") if isinstance(body.get("mode"), str) else None
        self.continuation = body.get("continuation")
        self._deadline = now_ms + DESTINATION_WAIT_MS
        start: dict[str, Any] = {
            "type": "runtime_start",
            "request_id": self.request_id("start"),
            "agent_id": self.agent_id,
            "conversation_id": self.conversation_id,
            "teleport_id": self.id,
        }
        if self.mode is not None:
            start["mode"] = self.mode
        return [Command("target", start)]

    def _continue(self) -> list[Command]:
        if self._continued:
            return []
        self._continued = True
        payload: dict[str, Any] = {
            "kind": "teleport_continue",
            "teleport_id": self.id,
            "source": {"device_id": self.source.device_id, "connection_name": self.source.connection_name},
        }
        if self.continuation is not None:
            payload["continuation"] = self.continuation
        return [
            Command(
                "target",
                {
                    "type": "input",
                    "request_id": self.request_id("continue"),
                    "runtime": self.runtime,
                    "payload": payload,
                },
            )
        ]

    def _fail(self, error: str) -> list[Command]:
        notify_source = self.status == STARTING_DESTINATION or self.status == WAITING_FOR_SOURCE
        self.status = FAILED
        self.error = error
        if not notify_source:
            return []
        return [
            Command(
                "source",
                {"type": "teleport_failed", "teleport_id": self.id, "runtime": self.runtime, "error": error},
            )
        ]
