"""Frames a device wrote to a pod that died unpublished: an announced hole wherever the device
reappears, against the real Redis (two or three "pods" in one process, as in test_redis_state)."""

from __future__ import annotations

import pytest

from tests.test_redis_state import Cluster, Pod, cluster, eventually
from tether.clock import now_ms
from tether.protocol.events import DeviceEvent, DeviceState
from tether.protocol.frames import decode

pytestmark = pytest.mark.redis
__all__ = ["cluster"]  # the fixture, shared


def delta(event_seq: int) -> DeviceEvent:
    return DeviceEvent(frame=decode(f'{{"type":"stream_delta","event_seq":{event_seq},"delta":"x"}}'))


async def device_on(pod: Pod, name: str, event_seqs: list[int]) -> list[DeviceEvent]:
    """The device (re)connects to `pod` and writes these frames there; the events as published."""
    await pod.live.device_connected("conn-1", name, now_ms())
    events = [DeviceEvent(state=DeviceState.ONLINE), *(delta(n) for n in event_seqs)]
    for event in events:
        pod.bus.publish("conn-1", event)
    return events[1:]


async def frames_at(watcher: Pod, count: int) -> list[DeviceEvent]:
    async def arrived() -> bool:
        return len([e for _, e in watcher.devices.events if e.frame is not None]) >= count

    await eventually(arrived, 5, f"{count} frames at the watching pod")
    return [e for _, e in watcher.devices.events if e.frame is not None]


async def test_frames_lost_with_a_dead_pod_are_a_hole_on_a_pod_watching_from_elsewhere(
    cluster: Cluster,
) -> None:
    a, b, c = await cluster.pod("a"), await cluster.pod("b"), await cluster.pod("c")
    await b.bus.watch("conn-1")
    await device_on(a, "a", [1, 2, 3])
    await frames_at(b, 3)
    # 4 and 5 went to pod a, which died before publishing them; the device went on at pod c.
    await cluster.stop(a)
    await device_on(c, "c", [6, 7])
    frames = await frames_at(b, 5)
    assert [e.gap_before for e in frames] == [False, False, False, True, False]


async def test_frames_lost_with_a_dead_pod_are_a_hole_where_the_device_reconnects(cluster: Cluster) -> None:
    a, b = await cluster.pod("a"), await cluster.pod("b")
    await b.bus.watch("conn-1")
    await device_on(a, "a", [1, 2, 3])
    await frames_at(b, 3)
    await cluster.stop(a)
    here = await device_on(b, "b", [6, 7])  # this pod's own watchers see these first
    assert [e.gap_before for e in here] == [True, False]


async def test_a_device_that_moves_without_losing_frames_flags_nothing(cluster: Cluster) -> None:
    a, b = await cluster.pod("a"), await cluster.pod("b")
    await b.bus.watch("conn-1")
    await device_on(a, "a", [1, 2, 3])
    await frames_at(b, 3)
    here = await device_on(b, "b", [4, 5])
    assert [e.gap_before for e in here] == [False, False]
