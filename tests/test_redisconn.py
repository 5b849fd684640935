"""The shared Redis module's pure parts, with no Redis: address parsing, back-off, the failure
guard, and the start-up wait (its messages and its cancellation)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from tether.redisconn.address import RedisAddress, without_password
from tether.redisconn.backoff import Backoff
from tether.redisconn.connect import connect_redis
from tether.redisconn.health import RedisHealth
from tether.redisconn.waiting import wait_for_redis


class Unavailable(Exception):
    pass


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://user:s3cret@redis.internal:6380/2", "redis://user:***@redis.internal:6380/2"),
        ("rediss://:s3cret@redis.internal", "rediss://:***@redis.internal"),
        ("unix:///run/redis.sock?db=3&password=s3cret", "unix:///run/redis.sock?db=3&password=***"),
        ("rediss://h?ssl_keyfile=k.pem&ssl_password=s3cret", "rediss://h?ssl_keyfile=k.pem&ssl_password=***"),
    ],
)
def test_a_shown_url_never_holds_a_password(url: str, shown: str) -> None:
    assert without_password(url) == shown


def test_an_address_shows_its_url_without_password() -> None:
    assert RedisAddress.parse("redis://u:s3cret@h:1/0").shown == "redis://u:***@h:1/0"


def test_an_address_reads_host_credentials_database_and_socket_as_redis_py_does() -> None:
    tcp = RedisAddress.parse("redis://user:p%40ss@redis.internal:6380/2")
    assert (tcp.host, tcp.port, tcp.path, tcp.username, tcp.password, tcp.db, tcp.tls) == (
        "redis.internal",
        6380,
        None,
        "user",
        "p@ss",
        2,
        None,
    )
    unix = RedisAddress.parse("unix:///run/redis.sock?db=3&password=x")
    assert (unix.path, unix.db, unix.password) == ("/run/redis.sock", 3, "x")
    bare = RedisAddress.parse("redis://h")
    assert (bare.port, bare.db, bare.password) == (6379, 0, None)


def test_tls_follows_the_url_options_with_redis_py_defaults() -> None:
    strict = RedisAddress.parse("rediss://redis.internal:6380/0").tls
    assert strict is not None
    assert (strict.verify_mode, strict.check_hostname) == (ssl.CERT_REQUIRED, True)
    lax = RedisAddress.parse("rediss://redis.internal/0?ssl_cert_reqs=none").tls
    assert lax is not None
    assert (lax.verify_mode, lax.check_hostname) == (ssl.CERT_NONE, False)
    with pytest.raises(ValueError, match="TLS options"):
        RedisAddress.parse("rediss://redis.internal/0?ssl_certfile=/no/such/cert.pem")


def test_the_back_off_doubles_up_to_its_cap_and_starts_over_after_a_success() -> None:
    backoff = Backoff(first=0.1, cap=1.0)
    assert [backoff.next() for _ in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    backoff.reset()
    assert backoff.next() == pytest.approx(0.1)


def test_the_guard_raises_or_keeps_going_and_logs_once_per_outage(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    events: list[str] = []
    health = RedisHealth(
        "pod a",
        logging.getLogger("test.health"),
        on_back=lambda: events.append("back"),
        on_failure=lambda: events.append("failure"),
        clock=lambda: now[0],
    )
    with health.guard("start"):
        pass
    assert health.up and health.fresh(3.0)
    with caplog.at_level(logging.WARNING, "test.health"):
        with pytest.raises(Unavailable), health.guard("lookup", lambda exc: Unavailable(repr(exc))):
            raise RedisConnectionError("refused")
        with health.guard("release"):  # no `unavailable`: the block ends quietly
            raise OSError("unreachable")
    assert not health.up and not health.fresh(3.0)
    assert [r.getMessage() for r in caplog.records] == [
        "pod a: Redis unavailable during lookup: ConnectionError: refused"
    ]
    now[0] += 10
    with health.guard("claim", lambda exc: Unavailable()):
        pass
    assert events == ["back", "failure", "failure", "back"]
    assert health.fresh(3.0) and health.ok_at == 110.0
    with pytest.raises(ValueError), health.guard("claim"):
        raise ValueError("a bug, not Redis")  # passes through untouched
    assert health.up


async def test_the_start_up_wait_names_the_redis_without_password_and_how_long(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ticks = itertools.count(step=3.0)  # every look at the clock is 3 s later
    attempts = 0

    async def ping() -> bool:
        nonlocal attempts
        attempts += 1
        if attempts < 5:
            raise RedisConnectionError("Connection refused")
        return True

    with caplog.at_level(logging.INFO, "tether.redisconn"):
        await wait_for_redis(
            ping, "redis://:***@redis.internal:6379/0", "bus of pod a", clock=lambda: next(ticks)
        )
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "bus of pod a: waiting for Redis at redis://:***@redis.internal:6379/0 for 3.0s so far"
        " (ConnectionError: Connection refused)",
        "bus of pod a: waiting for Redis at redis://:***@redis.internal:6379/0 for 9.0s so far"
        " (ConnectionError: Connection refused)",
        "bus of pod a: Redis at redis://:***@redis.internal:6379/0 answers after 15.0s",
    ]


async def test_cancelling_the_wait_for_an_unreachable_redis_ends_it_at_once() -> None:
    address = RedisAddress.parse("redis://:s3cret@127.0.0.1:1/0")
    client = connect_redis(address)
    try:
        task = asyncio.create_task(wait_for_redis(client.ping, address.shown, "live state of pod a"))
        await asyncio.sleep(0.3)  # a few attempts in
        started = asyncio.get_running_loop().time()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert asyncio.get_running_loop().time() - started < 0.2
    finally:
        await client.aclose()


async def test_a_cancel_swallowed_inside_the_ping_still_ends_the_wait() -> None:
    async def ping() -> bool:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            # What Python 3.11's `wait_for` in redis-py's connect does when the connection completes
            # just as the cancel arrives: the cancel is dropped and the call returns.
            return True
        return True

    task = asyncio.create_task(wait_for_redis(ping, "redis://h", "bus of pod a"))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1.0)
