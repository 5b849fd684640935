"""This pod's stats for the cluster page, published through live state every `POD_STATS_SECONDS`.

Besides the figures, a pod publishes what only it knows of the leases it holds (connecting or away,
a waiting approval) and of the relay sockets it serves, so that any pod can show every device's
state (`ops/fleet.py`). Each of those maps is bounded (`MAX_PUBLISHED`); beyond it, devices of this
pod read as offline or without the flag on other pods (this pod itself always answers exactly).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from tether import __version__
from tether.clock import now_ms
from tether.config import Settings
from tether.hub import Hub
from tether.livestate.base import LiveState
from tether.metrics import Counters
from tether.protocol.fleetstate import AWAY, link_hint
from tether.protocol.presence import is_silent
from tether.store.base import Store

log = logging.getLogger("tether.podstats")

POD_STATS_SECONDS = 2.0
MAX_PUBLISHED = 5_000  # leases and relay-watched connections described per pod
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(slots=True)
class Held:
    """What the pod holding a lease says of it: its hint (connecting or away), approval flag, pod."""

    hint: str | None
    pending_approval: bool
    pod_id: str


@dataclass(slots=True)
class Sampler:
    """Rates since the previous sample: frames in and out per second and CPU percent."""

    at: float = field(default_factory=time.monotonic)
    cpu: float = field(default_factory=time.process_time)
    frames_in: int = 0
    frames_out: int = 0

    def sample(self, frames_in: int, frames_out: int) -> tuple[float, float, float]:
        now, cpu = time.monotonic(), time.process_time()
        elapsed = max(now - self.at, 1e-6)
        rates = (
            (frames_in - self.frames_in) / elapsed,
            (frames_out - self.frames_out) / elapsed,
            100.0 * (cpu - self.cpu) / elapsed,
        )
        self.at, self.cpu, self.frames_in, self.frames_out = now, cpu, frames_in, frames_out
        return rates


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PodStats:
    def __init__(
        self, settings: Settings, store: Store, live: LiveState, hub: Hub, counters: Counters
    ) -> None:
        self.settings = settings
        self.pod_id = settings.pod_id
        self.store = store
        self.live = live
        self.hub = hub
        self.counters = counters
        self.started_at = now_ms()
        self.sampler = Sampler()
        self.last: dict[str, Any] = {}

    def held(self) -> dict[str, Held]:
        """The leases of this pod whose state live state alone does not tell, or that wait for an
        approval: connection id -> what this pod knows."""
        out: dict[str, Held] = {}
        now, offline_after_ms = now_ms(), int(self.settings.offline_after_seconds * 1000)
        for link in self.hub.links():
            if link.ready:
                # Pings stopped: once the last one is OFFLINE_AFTER old the next sweep drops the pair,
                # which then reads away for the grace window. Away already, so that the state never
                # reads offline, then away. The hint counts only once live state stops saying online;
                # from half the window on, so that a reader's clock (or this pod's last published
                # stats, for other pods) a little later than this one still finds it.
                silent = is_silent(link.lease.last_heartbeat, now, offline_after_ms // 2)
                hint = AWAY if silent else None
            else:
                hint = link_hint(False, bool(link.lease.sockets()))
            if hint is not None or link.pending_approval:
                out[link.connection_id] = Held(hint, link.pending_approval, self.pod_id)
        return out

    def relays(self) -> dict[str, int]:
        return {w.connection_id: len(w.sockets) for w in self.hub.watches() if w.sockets}

    def frames(self) -> tuple[int, int]:
        """Frames in: device frames and pings; out: commands and messages written to devices."""
        c = self.counters
        return c.device_frames + c.device_heartbeats, c.relay_commands + c.messages_delivered

    async def collect(self) -> dict[str, Any]:
        frames_in, frames_out = self.frames()
        rate_in, rate_out, cpu = self.sampler.sample(frames_in, frames_out)
        try:
            await asyncio.wait_for(self.store.ping(), 2.0)
            database = "ok"
        except Exception as exc:
            database = f"{exc.__class__.__name__}: {exc}"[:200]
        redis = "ok" if self.live.healthy else "unavailable"
        if not self.settings.redis_url:
            redis = "none"
        now = now_ms()
        links = self.hub.links()
        held = self.held()
        relays = self.relays()
        return {
            "podId": self.pod_id,
            "version": __version__,
            "startedAt": self.started_at,
            "devices": sum(1 for k in links if k.ready),
            "relaySockets": sum(relays.values()),
            "framesInPerSecond": round(rate_in, 2),
            "framesOutPerSecond": round(rate_out, 2),
            "cpuPercent": round(cpu, 1),
            "rssBytes": rss_bytes(),
            "database": database,
            "redis": redis,
            "at": now,
            "held": {c: [h.hint, h.pending_approval] for c, h in list(held.items())[:MAX_PUBLISHED]},
            "relays": dict(list(relays.items())[:MAX_PUBLISHED]),
        }

    async def publish(self) -> None:
        self.last = await self.collect()
        self.live.fleet.publish_stats(self.last)

    async def run(self) -> None:
        while True:
            try:
                await self.publish()
            except Exception as exc:
                log.warning("pod stats not published: %r", exc)
            await asyncio.sleep(POD_STATS_SECONDS)
