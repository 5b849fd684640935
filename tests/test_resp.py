"""The bus's lean Redis connection (`tether.redisconn.resp`) against the real Redis on 127.0.0.1:6379."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tether.redisconn.address import RedisAddress
from tether.redisconn.resp import RespConnection, script_sha

pytestmark = pytest.mark.redis


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def key(admin: Redis) -> AsyncIterator[str]:
    """A key of this test's own, deleted afterwards (other tests share the server)."""
    name = f"tether-test-resp-{uuid.uuid4().hex[:8]}"
    yield name
    await admin.delete(name)


def connect(url: str, stall: float = 5.0) -> RespConnection:
    return RespConnection(RedisAddress.parse(url), connect_timeout=2.0, stall_timeout=stall)


@pytest.fixture
async def conn(redis_url: str) -> AsyncIterator[RespConnection]:
    # Async, so that it opens and closes inside the test's event loop.
    connection = connect(redis_url)
    yield connection
    connection.close()


async def test_concurrent_calls_share_one_connection_and_each_gets_its_own_reply(
    conn: RespConnection, admin: Redis, key: str
) -> None:
    replies = await asyncio.gather(*(conn.call("INCRBY", key, n) for n in range(1, 101)))
    # Written in call order on one socket: each reply is the running total after its own call.
    assert replies == [sum(range(1, n + 1)) for n in range(1, 101)]
    assert await admin.get(key) == str(sum(range(1, 101)))
    assert len({await conn.call("CLIENT", "ID") for _ in range(3)}) == 1  # one socket throughout


async def test_the_database_in_the_url_is_selected(redis_url: str, admin: Redis, key: str) -> None:
    base, db = redis_url.rsplit("/", 1)
    other_db = f"{base}/{8 if db == '7' else 7}"
    conn = connect(other_db)
    other = Redis.from_url(other_db, decode_responses=True)
    try:
        await conn.call("SET", key, "in-db-7")
        assert await other.get(key) == "in-db-7"
        assert await admin.get(key) is None
    finally:
        conn.close()
        await other.delete(key)
        await other.aclose()


async def test_a_pipeline_returns_replies_in_order_and_raises_a_command_error(
    conn: RespConnection, key: str
) -> None:
    replies = await conn.pipeline(
        [("XADD", key, "MAXLEN", "~", 100, "*", "k", "v"), ("PEXPIRE", key, 60_000), ("XLEN", key)]
    )
    assert replies[1:] == [1, 1]
    with pytest.raises(ResponseError):
        await conn.pipeline([("XLEN", key), ("INCR", key)])  # INCR on a stream: WRONGTYPE
    assert await conn.call("XLEN", key) == 1  # the connection is still in step


async def test_a_script_runs_by_sha_and_is_loaded_when_redis_does_not_know_it(
    conn: RespConnection, admin: Redis, key: str
) -> None:
    source = f"return redis.call('INCR', KEYS[1]) -- {key}"
    assert await admin.script_exists(script_sha(source)) == [False]
    assert await conn.script(script_sha(source), source, [key], []) == 1
    assert await admin.script_exists(script_sha(source)) == [True]
    assert await conn.script(script_sha(source), source, [key], []) == 2


async def test_a_killed_connection_fails_calls_in_flight_and_the_next_call_reconnects(
    redis_url: str, admin: Redis, key: str
) -> None:
    conn = connect(redis_url)
    try:
        client_id = await conn.call("CLIENT", "ID")
        blocked = asyncio.ensure_future(conn.call("BLPOP", key, 10))
        await asyncio.sleep(0.1)
        assert await admin.client_kill_filter(_id=client_id) == 1
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(blocked, 5)
        assert await conn.call("PING") == "PONG"
        assert await conn.call("CLIENT", "ID") != client_id
    finally:
        conn.close()


async def test_a_connection_that_gets_no_reply_is_dropped_after_its_stall_timeout(
    redis_url: str, admin: Redis
) -> None:
    conn = connect(redis_url, stall=0.5)
    try:
        await conn.call("PING")
        # Redis holds every other client's commands for 3 s: this call gets no reply in time.
        await admin.execute_command("CLIENT", "PAUSE", 3000, "ALL")
        try:
            started = asyncio.get_running_loop().time()
            with pytest.raises(RedisTimeoutError):
                await conn.call("PING")
            assert asyncio.get_running_loop().time() - started < 2.5
        finally:
            await admin.execute_command("CLIENT", "UNPAUSE")
        assert await conn.call("PING") == "PONG"
    finally:
        conn.close()


async def test_an_unreachable_redis_is_a_connection_error() -> None:
    conn = connect("redis://127.0.0.1:1/0")
    with pytest.raises(RedisConnectionError):
        await conn.call("PING")
