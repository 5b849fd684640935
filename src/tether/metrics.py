"""What the router measures about itself, exposed at `/metrics` by `prometheus_client` (api/metrics.py).

Recording is plain Python on purpose: an attribute increment, a dict increment, or one bisect into a
list of bucket counts. `prometheus_client`'s own Counter and Histogram take a lock per call; measured
on this project's machine (bench/metrics_cost.py, figures in README "Metrics and Grafana") that is
several times the cost of these, once per relayed frame. The library still does the exposition
(format, label escaping) at scrape time, from these values, through a custom collector.

Everything here is bounded: label sets are capped (`MAX_LABELS`, overflow counted under "other"), and a
histogram is a fixed list of buckets.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

# A labelled tally or histogram family keeps at most this many label values; later ones are folded
# into OTHER, so a misbehaving peer (close codes) or an odd route cannot grow the scrape without end.
MAX_LABELS = 200
OTHER = "other"

# Seconds. Frame latency within a pod is loop turns (tens of µs) up to a backpressured socket (seconds).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Seconds. REST calls: cached reads in a millisecond, database writes in tens, a send up to its timeout.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Seconds. Cross-pod event lag: a Redis round trip and a stream read (ms), more under load.
BUS_LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    """Counts per bucket (`le` upper bounds, plus +Inf) and the sum; observing is one bisect."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: (le, observations <= le), ending with +Inf."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*map(_le, self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


def _le(bound: float) -> str:
    return repr(float(bound))


class Tally:
    """A counter per label value, at most MAX_LABELS of them."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def inc(self, label: str) -> None:
        counts = self.counts
        if label in counts:
            counts[label] += 1
        elif len(counts) < MAX_LABELS:
            counts[label] = 1
        else:
            counts[OTHER] = counts.get(OTHER, 0) + 1


class Histograms:
    """A histogram per label tuple (a REST route, method and status), at most MAX_LABELS of them."""

    __slots__ = ("bounds", "by_labels")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.by_labels: dict[tuple[str, ...], Histogram] = {}

    def of(self, labels: tuple[str, ...]) -> Histogram:
        found = self.by_labels.get(labels)
        if found is None:
            if len(self.by_labels) >= MAX_LABELS:
                labels = tuple(OTHER for _ in labels)
                found = self.by_labels.get(labels)
            if found is None:
                found = self.by_labels[labels] = Histogram(self.bounds)
        return found


@dataclass(slots=True)
class Counters:
    """This pod's counters since start. The int fields keep their historical names
    (`tether_<name>_total`); the rest are the labelled families and histograms."""

    device_connects: int = 0
    device_frames: int = 0
    device_malformed_frames: int = 0
    device_heartbeats: int = 0
    relay_commands: int = 0
    relay_commands_refused: int = 0
    relay_malformed_frames: int = 0
    relay_slow_consumer_closes: int = 0
    messages_delivered: int = 0
    messages_offline: int = 0
    messages_deduplicated: int = 0
    registrations: int = 0
    registrations_failed: int = 0
    registrations_replacing: int = 0
    resume_hits: int = 0
    resume_history_gone: int = 0
    resume_misses: int = 0
    resume_log_frames: int = 0
    database_errors: int = 0
    # Device socket closes by close code ("1000", "1006", ...).
    device_disconnects: Tally = field(default_factory=Tally)
    # From a device frame's hand-off to a relay socket (the loop turn it arrived in, from the device
    # or from the bus) to the write that carried it to the kernel; one observation per write.
    frame_latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))


# Help text of the plain counters, by field name (each becomes tether_<name>_total).
COUNTER_HELP = {
    "device_connects": "Device pairs that became ready on this pod.",
    "device_frames": "Frames received from devices (pings excluded).",
    "device_malformed_frames": "Device frames dropped because they were not JSON objects with a type.",
    "device_heartbeats": "Device pings answered.",
    "relay_commands": "Client commands forwarded to devices.",
    "relay_commands_refused": "Client commands refused because the device was away or unreachable.",
    "relay_malformed_frames": "Relay frames answered with an error because they were malformed.",
    "relay_slow_consumer_closes": "Relay sockets closed because their outbound queue overflowed.",
    "messages_delivered": "POST .../messages written to a device.",
    "messages_offline": "POST .../messages answered success:false (device offline).",
    "messages_deduplicated": "POST .../messages not re-sent (repeated client_message_id).",
    "registrations": "Device registrations (attempts that passed validation).",
    "resume_log_frames": "Frames resumes across pods replayed from the connection's event log.",
    "database_errors": "Database calls that failed (SQLAlchemy handle_error: connects and statements).",
}
