"""`python -m bench.metrics_cost`: what one metric update costs on the hot path, on this machine.

Compares the recording tether/metrics.py does (a slotted attribute increment, a dict tally, a bisect
into bucket counts) with `prometheus_client`'s own Counter and Histogram (each call takes a lock),
and times one `/metrics` exposition of a pod's families. Prints nanoseconds per call (the best of
several repeats, so other load on the machine inflates nothing but the spread).
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client import Histogram as PromHistogram

from tether.metrics import LATENCY_BUCKETS, Counters, Histogram, Tally


def _best_ns(fn: Callable[[], object], number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e9


def measure(number: int, repeat: int) -> dict[str, float]:
    counters = Counters()
    tally = Tally()
    ours = Histogram(LATENCY_BUCKETS)
    registry = CollectorRegistry()
    prom_counter = Counter("bench_frames", "frames", registry=registry)
    prom_labelled = Counter("bench_disconnects", "closes", ["code"], registry=registry)
    prom_child = prom_labelled.labels(code="1006")
    prom_hist = PromHistogram("bench_latency_seconds", "latency", buckets=LATENCY_BUCKETS, registry=registry)

    def attribute() -> None:
        counters.device_frames += 1

    def tally_inc() -> None:
        tally.inc("1006")

    def ours_observe() -> None:
        ours.observe(0.0003)

    results = {
        "baseline: empty call": _best_ns(lambda: None, number, repeat),
        "tether: attribute += 1": _best_ns(attribute, number, repeat),
        "prometheus_client: Counter.inc()": _best_ns(prom_counter.inc, number, repeat),
        "tether: Tally.inc(label)": _best_ns(tally_inc, number, repeat),
        "prometheus_client: labelled child .inc()": _best_ns(prom_child.inc, number, repeat),
        "prometheus_client: .labels(code).inc()": _best_ns(
            lambda: prom_labelled.labels(code="1006").inc(), number, repeat
        ),
        "tether: Histogram.observe()": _best_ns(ours_observe, number, repeat),
        "prometheus_client: Histogram.observe()": _best_ns(lambda: prom_hist.observe(0.0003), number, repeat),
    }
    scrape = max(1, number // 1000)
    results["prometheus_client: generate_latest (3 families)"] = _best_ns(
        lambda: generate_latest(registry), scrape, repeat
    )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_cost", description=__doc__)
    parser.add_argument("--number", type=int, default=1_000_000, help="calls per repeat")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    for name, ns in measure(args.number, args.repeat).items():
        print(f"{ns:10.1f} ns  {name}")
    print("(lambda-wrapped rows include one Python call, about the baseline)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
