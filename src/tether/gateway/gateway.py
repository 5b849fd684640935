"""The gateway's parts for one pod, built from the settings."""

from __future__ import annotations

from tether.config import Settings
from tether.gateway.actors import Actors
from tether.gateway.credentials import UpstreamKeys
from tether.gateway.upstream import Upstream
from tether.store.base import Store

# /readyz waits at most this long for the upstream's health route.
HEALTH_TIMEOUT_S = 2.0


class Gateway:
    def __init__(self, settings: Settings, store: Store) -> None:
        assert settings.letta_url is not None
        self.upstream = Upstream(
            settings.letta_url,
            connect_timeout_s=settings.letta_connect_timeout_seconds,
            read_timeout_s=settings.letta_read_timeout_seconds,
            max_connections=settings.letta_max_connections,
        )
        self.max_body_bytes = settings.letta_max_body_bytes
        self.tether_keys = settings.auth == "tether"
        # Tether keys: the upstream acts for each Tether user's own Letta user. Upstream keys: the
        # client's credential goes through unchanged and the upstream decides whom it acts for.
        self.actors = Actors(self.upstream, store, settings.letta_api_key) if self.tether_keys else None
        self.keys = None if self.tether_keys else UpstreamKeys(self.upstream, store)

    async def ready(self) -> tuple[bool, str]:
        return await self.upstream.health(HEALTH_TIMEOUT_S)

    async def close(self) -> None:
        await self.upstream.close()
