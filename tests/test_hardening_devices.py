"""The fast subset of RELIABILITY.md's half-open, duplicate-listener and duplicate-send rows.

Real processes throughout: `tether serve` pods, `tether device` processes, the SDK. Presence bounds
are shortened in the pod settings (hardening/halfopen.py SETTINGS: offline after 6 s, grace 3 s, ready
timeout 5 s) and judged against the bounds those settings document, nothing tighter.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import uuid
from pathlib import Path

import pytest
from hardening import duplicates, dupsends, halfopen
from hardening.cluster import pod, reference_device


async def test_a_frozen_device_reads_offline_then_comes_back_on_the_same_row(tmp_path: Path) -> None:
    async with pod(tmp_path, "frozen", settings=halfopen.SETTINGS) as server:
        api = halfopen.Api(server, server.key)
        device, conn = await reference_device(
            tmp_path, server, server.key, "frozen", args=halfopen.DEVICE_ARGS
        )

        async def freeze() -> None:
            os.kill(device.proc.pid, signal.SIGSTOP)

        async def thaw() -> None:
            os.kill(device.proc.pid, signal.SIGCONT)

        try:
            trial = await halfopen.freeze_trial(api, device, conn, freeze, thaw)
        finally:
            device.stop()
            await api.close()
    assert trial.problems == []  # null, then offline, then back: same lease, one row, no terminal close
    assert trial.to_null is not None and trial.to_null <= halfopen.NULL_BOUND
    assert trial.to_offline is not None and trial.to_offline <= halfopen.OFFLINE_BOUND
    assert [state for _, state in trial.states][-1] == "offline"


@pytest.mark.slow  # the reaping rule itself is unit-tested in tests/protocol/test_lease_reaping.py
async def test_a_control_socket_that_never_completes_its_pair_reads_connecting_and_is_reaped(
    tmp_path: Path,
) -> None:
    async with pod(tmp_path, "never-ready", settings=halfopen.SETTINGS) as server:
        api = halfopen.Api(server, server.key)
        try:
            trial = await halfopen.never_ready_trial(api, server.key, split=True)
        finally:
            await api.close()
    assert trial.state_while_open == "connecting"
    assert trial.close_code == 4006
    assert trial.to_close is not None and trial.to_close <= halfopen.REAP_BOUND
    assert trial.problems == []


@pytest.mark.slow  # `make hardening`'s duplicate_listeners row watches three such pairs for 5 minutes
async def test_two_listeners_on_one_slot_end_with_one_owner(tmp_path: Path) -> None:
    async with pod(tmp_path, "dup") as server:
        api = halfopen.Api(server, server.key)
        device_id = f"dup-{uuid.uuid4().hex[:6]}"
        first = duplicates.spawn_device(tmp_path, server.base_url, server.key, "dup", device_id, "a")
        second = duplicates.spawn_device(tmp_path, server.base_url, server.key, "dup", device_id, "b")
        watch = duplicates.Watch("one pod", device_id)
        try:
            await duplicates.watch_slot(api, watch, seconds=10, settle=6)
            alive = [d.alive() for d in (first, second)]
        finally:
            first.stop()
            second.stop()
            await api.close()
    assert alive.count(True) == 1
    assert watch.changes_after_settle == 0 and watch.events_after_settle == []
    assert watch.problems == []  # one row for the slot
    survivor = (first, second)[alive.index(True)]
    assert watch.owners[-1] in survivor.log_path.read_text()


async def test_sdk_retries_across_two_pods_are_delivered_once(
    tmp_path: Path, pg_url: str, redis_url: str
) -> None:
    async with (
        pod(tmp_path, "sends-a", database_url=pg_url, redis_url=redis_url) as a,
        pod(tmp_path, "sends-b", database_url=pg_url, redis_url=redis_url) as b,
    ):
        device, conn = await reference_device(tmp_path, a, a.key, "dupsends")
        try:
            # Each send loses its first one or two answers; the retries go to the other pod.
            tally, tokens = await dupsends.send_with_retries(
                [a, b], a.key, conn, (1, 0), 12, random.Random(1)
            )
            await asyncio.sleep(1.0)
            counts = dupsends.delivered(device.log_path.read_text(errors="replace"), tokens)
        finally:
            device.stop()
    assert tally.failed == [] and tally.success == 12
    assert tally.attempts > tally.sends  # the SDK did retry
    assert {t: counts[t] for t in tokens} == dict.fromkeys(tokens, 1)
