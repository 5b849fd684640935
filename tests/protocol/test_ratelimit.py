"""Commands one relay socket may send: a burst, then a steady rate."""

from __future__ import annotations

from tether.protocol.ratelimit import TokenBucket


def allowed(bucket: TokenBucket, times: list[float]) -> int:
    return sum(bucket.allow(t) for t in times)


def test_a_full_burst_then_refusal() -> None:
    bucket = TokenBucket(rate_per_s=10, burst=20)
    assert allowed(bucket, [0.0] * 20) == 20
    assert not bucket.allow(0)


def test_steady_rate_after_the_burst() -> None:
    bucket = TokenBucket(rate_per_s=10, burst=20)
    allowed(bucket, [0.0] * 20)
    # One token every 100 ms: asking every 10 ms for 10 s gets 100 through (99 when float
    # rounding leaves the hundredth token a hair short at the last instant).
    got = allowed(bucket, [10.0 * i for i in range(1, 1001)])
    assert 99 <= got <= 100


def test_idle_time_refills_only_up_to_the_burst() -> None:
    bucket = TokenBucket(rate_per_s=10, burst=5)
    allowed(bucket, [0.0] * 5)
    assert allowed(bucket, [3_600_000.0] * 10) == 5


def test_a_clock_step_backwards_does_not_drain_the_bucket() -> None:
    """Regression: time comes from the wall clock, which NTP may step back."""
    bucket = TokenBucket(rate_per_s=10, burst=5)
    assert bucket.allow(1_000_000)
    assert allowed(bucket, [400_000.0] * 4) == 4
    assert not bucket.allow(400_000)
    assert bucket.allow(400_100), "refilling resumes from the new clock reading"
