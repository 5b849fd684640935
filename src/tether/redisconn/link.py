"""One pod's link to Redis, as the bus and the live state each hold one: which pod it speaks for,
the key names, where Redis is, and a redis-py client. The parts of each take the link, not its
pieces."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from tether.redisconn.address import RedisAddress
from tether.redisconn.connect import connect_redis
from tether.redisconn.keys import RedisKeys
from tether.redisconn.waiting import wait_for_redis


@dataclass(frozen=True)
class PodLink:
    pod_id: str
    keys: RedisKeys
    address: RedisAddress
    redis: Redis

    @classmethod
    def open(cls, url: str | None, pod_id: str, prefix: str, user: str) -> PodLink:
        """A link for `user` ("RedisBus"), which cannot run without a Redis URL."""
        assert url, f"{user} needs TETHER_REDIS_URL"
        address = RedisAddress.parse(url)
        return cls(pod_id, RedisKeys(prefix), address, connect_redis(address))

    async def wait(self, what: str) -> None:
        """Start-up: until Redis answers (see `waiting`)."""
        await wait_for_redis(self.redis.ping, self.address.shown, f"{what} of pod {self.pod_id}")
