"""Every Redis key Tether writes, in one place (all under the prefix, `tether:` by default).

Live state (`tether.livestate.redis`):

    pod:{pod}              string, PX pod_ttl   this pod's last refresh (epoch ms): the pod is alive
    pods                   set                  index of pod ids, pruned lazily when their key is gone
    lease:{connectionId}   hash, PX lease ttl   pod, connected_at, last_heartbeat of a connected lease
    revoked:{connectionId} string, PX lease ttl the lease was replaced or deleted on some pod
    claim:{key}            string, PX dedupe    first claimant of a client_message_id
    runtime:{org}:{agent}:{conv}  string        the connection that last ran a conversation

Bus (`tether.bus.redis`); the bus reads `lease:` only for its `pod` field, to tell a device's
owner that this pod now watches it:

    pod:{pod}:inbox        stream               requests to this pod and replies to its requests
    pod:{pod}:events       stream               events of the devices this pod watches
    conn:{id}:watchers     sorted set           pods watching a connection, scored by expiry
    conn:{id}:log          stream, ids <epoch>-<n>  a watched connection's events (`bus.publishing`)

Resume history (`tether.bus.history`), per relay socket, PX history_seconds:

    relay:{socket}         hash                 connection, key id, last seq written
    relay:{socket}:history stream, ids <seq>-1  the socket's frames, trimmed like its own history
"""

from __future__ import annotations

KEY_PREFIX = "tether:"


class RedisKeys:
    """Key names under one prefix (tests give each run its own)."""

    def __init__(self, prefix: str = KEY_PREFIX) -> None:
        self.prefix = prefix

    # Per pod.
    def pod(self, pod_id: str) -> str:
        return f"{self.prefix}pod:{pod_id}"

    def inbox(self, pod_id: str) -> str:
        return f"{self.prefix}pod:{pod_id}:inbox"

    @property
    def pods(self) -> str:
        return f"{self.prefix}pods"

    def pod_events(self, pod_id: str) -> str:
        return f"{self.prefix}pod:{pod_id}:events"

    # Per connection.
    def lease(self, connection_id: str) -> str:
        return f"{self.prefix}lease:{connection_id}"

    def revoked(self, connection_id: str) -> str:
        return f"{self.prefix}revoked:{connection_id}"

    def runtime(self, org_id: str, agent_id: str, conversation_id: str) -> str:
        return f"{self.prefix}runtime:{org_id}:{agent_id}:{conversation_id}"

    def watchers(self, connection_id: str) -> str:
        return f"{self.prefix}conn:{connection_id}:watchers"

    def connection_log(self, connection_id: str) -> str:
        return f"{self.prefix}conn:{connection_id}:log"

    def claim(self, key: str) -> str:
        return f"{self.prefix}claim:{key}"

    # Per relay socket.
    def relay(self, socket_id: str) -> str:
        return f"{self.prefix}relay:{socket_id}"

    def relay_history(self, socket_id: str) -> str:
        return f"{self.prefix}relay:{socket_id}:history"
