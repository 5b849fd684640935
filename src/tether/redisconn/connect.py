"""Opening Redis clients: redis-py for the general commands, lean `resp` connections for the bus's
hot path, both from one `RedisAddress` and with one set of timeouts."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from tether.redisconn.address import RedisAddress
from tether.redisconn.resp import RespConnection

# Connect timeout, and per-command timeout (it must exceed a blocking stream read's BLOCK,
# `streams.READ_BLOCK_MS`, which redis-py's own reads never use but a pooled call may wait behind).
CONNECT_TIMEOUT_SECONDS = 2.0
COMMAND_TIMEOUT_SECONDS = 5.0
# One quick retry, so a pooled connection broken by a Redis restart is replaced without failing the call.
COMMAND_RETRIES = 1
# Connections per redis-py client (the live state and the bus each have one); a burst of calls waits
# for a free connection (up to COMMAND_TIMEOUT_SECONDS) instead of failing.
MAX_CONNECTIONS = 64


def connect_redis(address: RedisAddress) -> Redis:
    pool = BlockingConnectionPool.from_url(
        address.url,
        max_connections=MAX_CONNECTIONS,
        timeout=COMMAND_TIMEOUT_SECONDS,
        decode_responses=True,
        socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
        socket_timeout=COMMAND_TIMEOUT_SECONDS,
        retry=Retry(ExponentialWithJitterBackoff(cap=0.2, base=0.05), COMMAND_RETRIES),
    )
    return Redis.from_pool(pool)


def connect_lean(address: RedisAddress, *, waits_up_to: float = 0.0) -> RespConnection:
    """A lean connection; `waits_up_to` is the longest a command on it blocks in Redis by design
    (a blocking read's BLOCK), allowed on top of the command timeout before it counts as stalled."""
    return RespConnection(
        address,
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        stall_timeout=waits_up_to + COMMAND_TIMEOUT_SECONDS,
        waits_up_to=waits_up_to,
    )
