"""Counters the router keeps about itself, exposed at `/metrics` in the Prometheus text format.

Plain integers bumped on the hot paths (an attribute increment costs nanoseconds); gauges are read
from the hub when scraped.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class Counters:
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


_HELP = {
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
    "registrations": "Device registrations.",
}


def exposition(counters: Counters, gauges: dict[str, tuple[str, float]], pod_id: str) -> str:
    lines: list[str] = []
    label = f'{{pod="{pod_id}"}}'
    for f in fields(counters):
        name = f"tether_{f.name}_total"
        lines += [
            f"# HELP {name} {_HELP[f.name]}",
            f"# TYPE {name} counter",
            f"{name}{label} {getattr(counters, f.name)}",
        ]
    for name, (help_text, value) in gauges.items():
        metric = f"tether_{name}"
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} gauge", f"{metric}{label} {value}"]
    return "\n".join(lines) + "\n"
