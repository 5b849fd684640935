"""Live state for a single pod: plain dictionaries."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from tether.clock import now_ms
from tether.livestate.fleet import FleetNotes, MemoryFleetNotes
from tether.protocol.dedupe import DedupeWindow
from tether.protocol.presence import Liveness

MAX_RUNTIMES = 100_000  # conversations whose last device is remembered for teleport


class MemoryLiveState:
    def __init__(self, pod_id: str, dedupe_ms: float) -> None:
        self.pod_id = pod_id
        self._live: dict[str, Liveness] = {}
        self._dirty: dict[str, int] = {}
        self._claims = DedupeWindow(dedupe_ms)
        self._runtimes: OrderedDict[tuple[str, str, str], str] = OrderedDict()
        self.fleet: FleetNotes = MemoryFleetNotes(pod_id)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def device_connected(self, connection_id: str, pod_id: str, now_ms: int) -> None:
        self._live[connection_id] = Liveness(pod_id=pod_id, connected_at=now_ms, last_heartbeat=now_ms)

    def heartbeat(self, connection_id: str, now_ms: int) -> None:
        live = self._live.get(connection_id)
        if live is not None:
            self._live[connection_id] = Liveness(live.pod_id, live.connected_at, now_ms)
            self._dirty[connection_id] = now_ms

    async def device_disconnected(self, connection_id: str, pod_id: str) -> None:
        live = self._live.get(connection_id)
        if live is not None and live.pod_id == pod_id:
            del self._live[connection_id]

    async def lookup(self, connection_ids: Iterable[str]) -> dict[str, Liveness]:
        return {c: self._live[c] for c in connection_ids if c in self._live}

    async def revoke(self, connection_id: str) -> None:
        """Nothing to tell: this pod is the only one, and it marks its own links."""

    async def revoked(self, connection_id: str) -> bool:
        return False

    async def live_pods(self) -> set[str]:
        return {self.pod_id}

    async def claim(self, key: str) -> bool:
        return self._claims.claim(key, now_ms())

    async def confirm(self, key: str) -> None:
        self._claims.confirm(key)

    async def claim_state(self, key: str) -> bool | None:
        return self._claims.state(key, now_ms())

    async def release(self, key: str) -> None:
        self._claims.release(key)

    def note_runtime(self, org_id: str, agent_id: str, conversation_id: str, connection_id: str) -> None:
        key = (org_id, agent_id, conversation_id)
        self._runtimes[key] = connection_id
        self._runtimes.move_to_end(key)
        if len(self._runtimes) > MAX_RUNTIMES:
            self._runtimes.popitem(last=False)

    async def runtime_location(self, org_id: str, agent_id: str, conversation_id: str) -> str | None:
        return self._runtimes.get((org_id, agent_id, conversation_id))

    def take_dirty(self) -> dict[str, int]:
        dirty, self._dirty = self._dirty, {}
        return dirty

    def take_lost(self) -> bool:
        return False  # in-process state cannot be lost while the process runs

    @property
    def healthy(self) -> bool:
        return True
