"""Relay round trip and stream throughput, against the baseline forwarder in the same run.

Both servers run side by side, each with 200 idle reference devices and one active lean device
(`bench.fastdevice`: the reference device's frames at a fraction of its CPU), all in one device
process. One client process holds a Tether relay pair (control + stream, scoped to one conversation)
and one baseline client socket. Measurements alternate between the servers, round by round, so drift
in the machine affects both alike. A third path, `tether-single` (one relay socket instead of a pair,
on its own device), is a diagnostic: it separates the relay's own cost from the second copy of every
frame that the client protocol asks for. A fourth, `baseline-pair`, is the forwarder writing every
device frame to two client sockets: the same work per frame as Tether's relay pair, the stream
figure's second baseline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from bench.core import Figure, Run, at_least, at_most, percentile
from bench.fleet import AgentProcess
from bench.servers import Server, start_baseline, start_tether

RUNTIME = {"agent_id": "agent-bench", "conversation_id": "conv-bench"}
IDLE_DEVICES = 200


def summary(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {
        name: {f"p{q}": percentile(s, q) for q in (50, 90, 99, 99.9)} | {"n": len(s)}
        for name, s in samples.items()
    }


def relay_urls(server: Server, connection_id: str) -> list[str]:
    """A relay pair as the Agent SDK opens it: control and stream, scoped to one conversation."""
    urls = []
    for channel in ("control", "stream"):
        query = urlencode(
            {"agentId": RUNTIME["agent_id"], "conversationId": RUNTIME["conversation_id"], "channel": channel}
        )
        urls.append(f"{server.ws_base}/v1/environments/{connection_id}/status/ws?{query}")
    return urls


@dataclass
class Side:
    """One server with its active device's connection and the client's name for it."""

    name: str
    server: Server
    client_name: str


async def attach(
    run: Run, devices: AgentProcess, client: AgentProcess, server: Server, name: str, mode: str, idle: int
) -> Side:
    """`idle` idle reference devices, one lean active device, and a client: `pair` (a Tether relay pair),
    `single` (one Tether relay socket with the pair's scope), `baseline` (the forwarder's client side)
    or `baseline-pair` (two client sockets on the forwarder, each receiving every device frame)."""
    if idle:
        await devices.call(
            "devices", group=f"idle-{name}", base_url=server.base_url, key=server.key, count=idle
        )
    connection_id = await devices.call(
        "fast_device", group=f"active-{name}", base_url=server.base_url, key=server.key
    )
    if mode == "pair":
        urls = relay_urls(server, connection_id)
    elif mode == "single":
        urls = relay_urls(server, connection_id)[:1]
        urls[0] = urls[0].replace("&channel=control", "")
    else:
        urls = [f"{server.ws_base}/client/{connection_id}"] * (2 if mode == "baseline-pair" else 1)
    key = None if mode.startswith("baseline") else server.key
    await client.call("client_open", name=name, urls=urls, key=key)
    run.say(f"  {name}: {idle} idle devices + 1 active lean device connected, {len(urls)} client socket(s)")
    return Side(name, server, name)


async def round_trips(
    run: Run, client: AgentProcess, sides: list[Side], gap_ms: float, rounds: int, per_round: int
) -> dict[str, list[float]]:
    """Round trips in alternating rounds (tether, baseline, then baseline, tether, ...)."""
    for side in sides:  # warm-up, discarded
        await client.call("round_trips", name=side.client_name, n=100, gap_ms=gap_ms)
    samples: dict[str, list[float]] = {side.name: [] for side in sides}
    for r in range(rounds):
        order = sides if r % 2 == 0 else list(reversed(sides))
        shown = []
        for side in order:
            got = await client.call("round_trips", name=side.client_name, n=per_round, gap_ms=gap_ms)
            samples[side.name].extend(got)
            shown.append(f"{side.name} p50 {percentile(got, 50):.0f}µs p99 {percentile(got, 99):.0f}µs")
        run.say(f"  round {r + 1}/{rounds}: " + ", ".join(shown))
    return samples


async def stream_runs(
    run: Run, client: AgentProcess, sides: list[Side], procs: dict[str, Any]
) -> dict[str, list[dict[str, Any]]]:
    rounds = run.scaled(3, 2)
    count = run.scaled(20_000, 2_000)
    size = 64
    results: dict[str, list[dict[str, Any]]] = {side.name: [] for side in sides}
    for side in sides:  # warm-up
        await client.call("stream", name=side.client_name, count=1000, size=size, runtime=RUNTIME)
    for r in range(rounds):
        order = sides if r % 2 == 0 else list(reversed(sides))
        shown = []
        for side in order:
            cpu_before = {k: p.cpu_seconds() for k, p in procs.items()}
            got = await client.call("stream", name=side.client_name, count=count, size=size, runtime=RUNTIME)
            cpu = {k: p.cpu_seconds() - cpu_before[k] for k, p in procs.items()}
            got["count"] = count
            if got["complete"]:
                got["frames_per_second"] = count / got["seconds"]
                got["cpu_percent"] = {k: round(100 * v / got["seconds"]) for k, v in cpu.items()}
                shown.append(f"{side.name} {got['frames_per_second']:.0f}/s")
            else:
                shown.append(f"{side.name} incomplete {got['received']} {got['closed']}")
            results[side.name].append(got)
            if not got["complete"]:
                # The relay socket was closed or the stream stalled; the pair is unusable now.
                raise RuntimeError(f"{side.name} stream incomplete: {got}")
        run.say(f"  stream round {r + 1}/{rounds} ({count} deltas of {size} B): " + ", ".join(shown))
    return results


async def profile(run: Run, client: AgentProcess, tether: Server, side: Side) -> None:
    """Sample the router with py-spy during one more stream run and one more block of round trips."""
    from bench.profile import record, summarise

    workloads: dict[str, Callable[[], Awaitable[Any]]] = {
        "profile_stream": lambda: client.call(
            "stream", name=side.client_name, count=40_000, size=64, runtime=RUNTIME
        ),
        "profile_rtt": lambda: client.call("round_trips", name=side.client_name, n=6_000, gap_ms=0.0),
    }
    for key, work in workloads.items():
        output = run.workdir / f"{key}.txt"
        recording = asyncio.create_task(record(tether.pid, 4, output))
        await asyncio.sleep(0.3)  # py-spy attaches
        await work()
        path = await recording
        if path is None:
            run.say("  py-spy is not installed (pip install py-spy): no profile")
            return
        summary = summarise(path)
        run.sections[key] = {
            "samples": summary.samples,
            "busy": summary.busy,
            "inclusive": summary.inclusive,
            "leaves": summary.leaves,
        }
        top = ", ".join(f"{name} {share:.0f}%" for name, share in summary.leaves[:4])
        run.say(f"  profile ({key}): top self time: {top}")


async def measure(run: Run) -> None:
    run.say("relay: starting Tether (SQLite), the baseline forwarder, a device process and a client process")
    tether = await start_tether(run.workdir / "relay-tether", "relay")
    baseline = await start_baseline(run.workdir / "relay-baseline")
    devices = await AgentProcess.start("relay-devices", run.workdir)
    client = await AgentProcess.start("relay-client", run.workdir)
    try:
        t_side = await attach(run, devices, client, tether, "tether", "pair", IDLE_DEVICES)
        b_side = await attach(run, devices, client, baseline, "baseline", "baseline", IDLE_DEVICES)
        # A diagnostic, not a target: the same relay with one client socket instead of a pair, on its own
        # device so that its socket does not add to the pair's work.
        s_side = await attach(run, devices, client, tether, "tether-single", "single", 0)
        # The stream's second baseline: the forwarder writing each frame to two sockets, as Tether does.
        bp_side = await attach(run, devices, client, baseline, "baseline-pair", "baseline-pair", 0)
        await asyncio.sleep(1)  # the relay pair's scope subscription and the device's snapshot settle
        sides = [t_side, b_side]

        run.say("relay round trip, back to back: app_server_info -> device -> response, alternating servers")
        samples = await round_trips(
            run, client, [t_side, b_side, s_side], 0.0, run.scaled(6, 2), run.scaled(1000, 100)
        )
        t, b = samples["tether"], samples["baseline"]
        note = (
            f"{len(t)} round trips per server, each sent when the previous answer arrived, in alternating "
            "rounds after 100 warm-up ones"
        )
        for q in (50, 99):
            value, base = percentile(t, q), percentile(b, q)
            figure = Figure(
                f"relay_rtt_p{q}",
                f"relay round trip p{q}",
                "µs",
                "≤ 1.3x baseline",
                value=value,
                baseline=base,
                ratio=value / base,
                note=note,
            )
            run.add(at_most(figure, 1.3))
        run.sections["relay_rtt"] = summary(samples)

        run.say("relay round trip, paced 2 ms apart (each command finds both ends idle, as a user's would)")
        paced = await round_trips(run, client, sides, 2.0, run.scaled(3, 2), run.scaled(400, 50))
        run.sections["relay_rtt_paced"] = summary(paced)
        run.say(
            "  paced: "
            + ", ".join(f"{k} p50 {v['p50']:.0f}µs p99 {v['p99']:.0f}µs" for k, v in summary(paced).items())
        )

        run.say("stream throughput: bench_stream -> stream_delta frames until the client pair has them all")
        procs: dict[str, Any] = {"router": tether, "baseline": baseline, "devices": devices, "client": client}
        streams = await stream_runs(run, client, [t_side, b_side, bp_side, s_side], procs)
        rate = {name: [r["frames_per_second"] for r in rs] for name, rs in streams.items()}
        value = percentile(rate["tether"], 50)
        base, base_pair = percentile(rate["baseline"], 50), percentile(rate["baseline-pair"], 50)
        figure = Figure(
            "stream_throughput",
            "stream throughput",
            "frames/s",
            "≥ 0.9x baseline",
            value=value,
            baseline=base,
            ratio=value / base,
            note=f"median of {len(rate['tether'])} alternating runs; Tether delivers each delta to both "
            "sockets of the pair, the baseline to its one socket",
            detail={"runs": streams},
        )
        run.add(at_least(figure, 0.9))
        figure = Figure(
            "stream_throughput_pair",
            "stream throughput, against a two-socket forwarder",
            "frames/s",
            "≥ 1.0x baseline",
            value=value,
            baseline=base_pair,
            ratio=value / base_pair,
            note=f"median of {len(rate['tether'])} alternating runs; both deliver each delta to two "
            "client sockets (Tether's relay pair; the forwarder's two sockets on one pair id)",
        )
        run.add(at_least(figure, 1.0))
        if run.profile:
            await profile(run, client, tether, t_side)
        run.sections["relay_problems"] = tether.problems()
    finally:
        await client.close()
        await devices.close()
        tether.stop()
        baseline.stop()
