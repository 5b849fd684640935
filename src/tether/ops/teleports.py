"""Runs teleports: the pure machine in `protocol.teleport`, fed by both devices' frames.

The pod that accepted the POST orchestrates: it watches the source and target connections through
the hub (and so through the bus when they sit on other pods) and records each status change.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from tether.clock import now_ms
from tether.hub import Hub
from tether.livestate.base import LiveState
from tether.ops.environments import Environments
from tether.protocol.events import DeviceState
from tether.protocol.frames import Frame, encode
from tether.protocol.teleport import (
    DESTINATION_WAIT_MS,
    FAILED,
    SOURCE_WAIT_MS,
    Command,
    Endpoint,
    Side,
    Teleport,
)
from tether.store.base import EnvironmentRow, Principal, Store, TeleportRow
from tether.tasks import TaskSet

log = logging.getLogger("tether.teleports")

# A teleport still open this long after its last change lost its orchestrator (its pod died).
ORPHAN_AFTER_MS = SOURCE_WAIT_MS + DESTINATION_WAIT_MS


class TeleportError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def teleport_json(row: TeleportRow, now: int) -> dict[str, Any]:
    status, error = row.status, row.error
    if status not in ("completed", FAILED) and now - row.updated_at > ORPHAN_AFTER_MS:
        status, error = FAILED, "the router pod orchestrating this teleport went away"
    return {
        "id": row.id,
        "agentId": row.agent_id,
        "conversationId": row.conversation_id,
        "sourceConnectionId": row.source_connection_id,
        "targetConnectionId": row.target_connection_id,
        "targetDeviceId": row.target_device_id,
        "targetConnectionName": row.target_connection_name,
        "status": status,
        "error": error,
        "createdAt": row.created_at,
        "updatedAt": row.updated_at,
    }


class Teleports:
    def __init__(
        self, store: Store, live: LiveState, hub: Hub, environments: Environments, tasks: TaskSet
    ) -> None:
        self.store = store
        self.live = live
        self.hub = hub
        self.environments = environments
        self.tasks = tasks
        self.active: dict[str, Teleport] = {}
        self._by_connection: dict[str, set[str]] = {}
        self._write_locks: dict[str, asyncio.Lock] = {}

    async def create(
        self,
        principal: Principal,
        agent_id: str,
        conversation_id: str,
        target_connection_id: str,
        idempotency_key: str | None,
        source_connection_id: str | None,
    ) -> TeleportRow:
        if idempotency_key is not None:
            existing = await self.store.find_teleport_by_key(principal.org_id, idempotency_key)
            if existing is not None:
                return existing
        source, target = await self._endpoints(
            principal, agent_id, conversation_id, source_connection_id, target_connection_id
        )
        now = now_ms()
        row = TeleportRow(
            id=f"teleport-{uuid.uuid4().hex}",
            org_id=principal.org_id,
            agent_id=agent_id,
            conversation_id=conversation_id,
            source_connection_id=_endpoint(source).connection_id,
            target_connection_id=target_connection_id,
            target_device_id=target.device_id,
            target_connection_name=target.connection_name,
            status="waiting_for_source",
            error=None,
            idempotency_key=idempotency_key,
            created_at=now,
            updated_at=now,
        )
        stored = await self.store.create_teleport(row)
        if stored.id != row.id:
            return stored  # a concurrent request with the same idempotency key won
        machine = Teleport(row.id, agent_id, conversation_id, _endpoint(source), _endpoint(target))
        self.active[row.id] = machine
        for conn in (row.source_connection_id, target_connection_id):
            await self.hub.listen(conn, self)
            self._by_connection.setdefault(conn, set()).add(row.id)
        await self._run(machine, machine.start(now))
        return stored

    async def _endpoints(
        self,
        principal: Principal,
        agent_id: str,
        conversation_id: str,
        source_connection_id: str | None,
        target_connection_id: str,
    ) -> tuple[EnvironmentRow, EnvironmentRow]:
        """Both ends, online and in the caller's organization, or the TeleportError saying which is not."""
        target = await self.environments.in_org(principal, target_connection_id)
        if target is None or await self.hub.owner_of(target_connection_id) is None:
            raise TeleportError(
                409, "INVALID_TARGET", "the target environment is not online in this organization"
            )
        if source_connection_id is None:
            source_connection_id = await self.live.runtime_location(
                principal.org_id, agent_id, conversation_id
            )
        if source_connection_id is None:
            raise TeleportError(
                404,
                "RUNTIME_NOT_FOUND",
                "no environment is known to run this conversation; pass sourceConnectionId",
            )
        source = await self.environments.in_org(principal, source_connection_id)
        if source is None or await self.hub.owner_of(source_connection_id) is None:
            raise TeleportError(409, "SOURCE_OFFLINE", "the environment running this conversation is offline")
        if source_connection_id == target_connection_id:
            raise TeleportError(
                409, "INVALID_TARGET", "the conversation already runs on the target environment"
            )
        for other in self.active.values():
            if (other.agent_id, other.conversation_id) == (agent_id, conversation_id) and not other.finished:
                raise TeleportError(
                    409, "TELEPORT_CONFLICT", f"teleport {other.id} for this conversation is in progress"
                )
        return source, target

    # FrameListener
    def on_device_frame(self, connection_id: str, frame: Frame) -> None:
        for teleport_id in list(self._by_connection.get(connection_id, ())):
            machine = self.active.get(teleport_id)
            if machine is None:
                continue
            for side in _sides(machine, connection_id):
                before = machine.status
                commands = machine.on_frame(side, frame, now_ms())
                if commands or machine.status != before:
                    self.tasks.spawn(self._run(machine, commands))

    def on_device_state(self, connection_id: str, state: DeviceState) -> None:
        if state is not DeviceState.OFFLINE:
            return
        for teleport_id in list(self._by_connection.get(connection_id, ())):
            machine = self.active.get(teleport_id)
            if machine is None:
                continue
            for side in _sides(machine, connection_id):
                self.tasks.spawn(self._run(machine, machine.on_device_gone(side)))

    def tick(self, now: int) -> None:
        for machine in list(self.active.values()):
            deadline = machine.deadline()
            if deadline is not None and now >= deadline:
                self.tasks.spawn(self._run(machine, machine.on_timeout(now)))

    async def _run(self, machine: Teleport, commands: list[Command]) -> None:
        for command in commands:
            conn = machine.source.connection_id if command.to == "source" else machine.target.connection_id
            if not await self.hub.send_to_device(conn, encode(command.frame)) and command.to == "target":
                commands_after = machine.on_device_gone("target")
                for after in commands_after:
                    await self.hub.send_to_device(machine.source.connection_id, encode(after.frame))
        # Several steps may be in flight at once (a fast target answers before the previous step's
        # write lands); writing under one lock, with the status as it is then, keeps the last write last.
        async with self._write_locks.setdefault(machine.id, asyncio.Lock()):
            await self.store.update_teleport(machine.id, machine.status, machine.error, now_ms())
        if machine.finished:
            self._forget(machine)

    def _forget(self, machine: Teleport) -> None:
        self.active.pop(machine.id, None)
        self._write_locks.pop(machine.id, None)
        for conn in (machine.source.connection_id, machine.target.connection_id):
            ids = self._by_connection.get(conn)
            if ids is None:
                continue
            ids.discard(machine.id)
            if not ids:
                del self._by_connection[conn]
                self.tasks.spawn(self.hub.unlisten(conn, self))


def _endpoint(row: EnvironmentRow) -> Endpoint:
    assert row.connection_id is not None
    return Endpoint(row.connection_id, row.device_id, row.connection_name)


def _sides(machine: Teleport, connection_id: str) -> list[Side]:
    sides: list[Side] = []
    if machine.source.connection_id == connection_id:
        sides.append("source")
    if machine.target.connection_id == connection_id:
        sides.append("target")
    return sides
