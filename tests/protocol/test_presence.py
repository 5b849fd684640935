"""The online rule and lease expiry (device-protocol §4.1, client-protocol §1.4).

Clients compute `Date.now() - lastHeartbeat < 120000` themselves, so the router must flip at exactly
the same millisecond or a row would show `connectionId` to a client that already counts it offline.
"""

from __future__ import annotations

from tether.protocol.presence import Liveness, is_online, is_silent, lease_expired

WINDOW = 120_000
T0 = 1_700_000_000_000


def live(last_heartbeat: int) -> Liveness:
    return Liveness(pod_id="pod-a", connected_at=T0 - 600_000, last_heartbeat=last_heartbeat)


def test_online_iff_last_heartbeat_is_younger_than_120_s() -> None:
    assert is_online(live(T0), T0, WINDOW)
    assert is_online(live(T0), T0 + WINDOW - 1, WINDOW)
    assert not is_online(live(T0), T0 + WINDOW, WINDOW)
    assert not is_online(live(T0), T0 + WINDOW + 1, WINDOW)


def test_no_liveness_or_a_dead_pod_means_offline() -> None:
    assert not is_online(None, T0, WINDOW)
    assert not is_online(live(T0), T0, WINDOW, pod_alive=False)


def test_silent_exactly_when_no_longer_online() -> None:
    """The sweep drops a socket at the same instant clients stop counting it online."""
    for age in (0, 1, WINDOW - 1, WINDOW, WINDOW + 1, 10 * WINDOW):
        assert is_silent(T0, T0 + age, WINDOW) is (not is_online(live(T0), T0 + age, WINDOW)), age


def test_lease_expires_only_after_the_full_ttl() -> None:
    ttl = 300_000
    assert not lease_expired(T0, T0, ttl)
    assert not lease_expired(T0, T0 + ttl, ttl)
    assert lease_expired(T0, T0 + ttl + 1, ttl)
