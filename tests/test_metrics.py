"""`/metrics` around real traffic: a device, a relay client, REST; two pods over Redis; a lost database.

Scrapes are parsed with prometheus_client's own parser, so the exposition is checked for format
(and label escaping: the pod id below has a quote and a backslash) as well as for values.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import Router, drop_pg_database, start_router
from tests.wire import RawDevice, recv, recv_type, wait_until
from tether import __version__

ROUTER_SETTINGS = {"pod_id": 'pod "metrics" \\ one'}
DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "tether.json"
SCOPE = {"agent_id": "agent-m", "conversation_id": "default"}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(base_url: str) -> Samples:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{base_url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, pod: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted({"pod": pod, **labels}.items()))), 0.0)


def buckets(samples: Samples, name: str, pod: str, **labels: str) -> dict[str, float]:
    wanted = {"pod": pod, **labels}
    return {
        dict(key)["le"]: v
        for (sample, key), v in samples.items()
        if sample == f"{name}_bucket" and {k: x for k, x in key if k != "le"} == wanted
    }


async def relay(srv: Router, connection_id: str, query: str = "") -> ClientConnection:
    url = (
        f"{srv.ws_base}/v1/environments/{connection_id}/status/ws"
        f"?agentId={SCOPE['agent_id']}&conversationId={SCOPE['conversation_id']}{query}"
    )
    return await connect(url, additional_headers=srv.headers(), compression=None, proxy=None)


async def test_metrics_move_with_device_relay_and_rest_traffic(srv: Router) -> None:
    pod = srv.pod_id
    before = await scrape(srv.base_url)
    info = [k for k in before if k[0] == "tether_build_info"]
    assert len(info) == 1
    labels = dict(info[0][1])
    assert labels["pod"] == pod and labels["version"] == __version__ and labels["python"].startswith("3.")

    dev = await RawDevice.connect(srv.base_url, srv.key, name="metrics-dev")
    online = await wait_until(lambda: _at_least(srv, "tether_devices", pod, 1, state="online"), timeout=10)
    assert value(online, "tether_sockets", pod, kind="device") == 2  # control + stream

    client = await relay(srv, dev.connection_id)
    socket_id = client.response.headers["X-Tether-Socket-Id"]
    await recv_type(dev.control, "sync")  # the scope subscription the router sends the device
    for i in range(5):
        await dev.emit("stream_delta", SCOPE, delta={"text": f"part {i}"})
    seqs = [(await recv(client))["seq"] for _ in range(5)]
    await client.send(json.dumps({"type": "input", "request_id": "r-1", "runtime": SCOPE, "payload": {}}))
    assert (await recv_type(dev.control, "input"))["request_id"] == "r-1"

    async with httpx.AsyncClient(base_url=srv.base_url, headers=srv.headers()) as http:
        message = {"role": "user", "content": "hi", "client_message_id": uuid.uuid4().hex}
        sent = await http.post(
            f"/v1/environments/{dev.connection_id}/messages",
            json={"agentId": "agent-m", "messages": [message]},
        )
        assert sent.json()["success"] is True
        assert (await http.get("/v1/no/such/route")).status_code == 404

    # Resume: a socket dropped abnormally comes back with what it missed; an unknown one does not.
    await client.close(code=4100)
    await wait_until(lambda: _at_least(srv, "tether_sockets", pod, 1, kind="relay_detached"), timeout=5)
    await dev.emit("stream_delta", SCOPE, delta={"text": "while away"})
    resumed = await relay(srv, dev.connection_id, f"&resume={socket_id}&resumeFrom={seqs[-1]}")
    assert (await recv(resumed))["seq"] == seqs[-1] + 1
    unknown = await relay(srv, dev.connection_id, "&resume=no-such-socket&resumeFrom=3")
    assert (await recv(unknown))["type"] == "resync_required"

    during = await scrape(srv.base_url)
    assert value(during, "tether_devices", pod, state="online") >= 1
    assert value(during, "tether_sockets", pod, kind="relay") >= 2

    # A forgotten environment's device is closed by the router with 1008.
    async with httpx.AsyncClient(base_url=srv.base_url, headers=srv.headers()) as http:
        row = (await http.get(f"/v1/environments/{dev.device_id}")).json()
        assert (await http.delete(f"/v1/environments/{row['id']}")).status_code == 204
    await wait_until(
        lambda: _at_least(srv, "tether_device_disconnects_total", pod, 2, code="1008"), timeout=10
    )
    for ws in (resumed, unknown):
        await ws.close()
    await dev.close()
    after = await scrape(srv.base_url)

    def moved(name: str, by: float = 1, **labels: str) -> None:
        grown = value(after, name, pod, **labels) - value(before, name, pod, **labels)
        assert grown >= by, f"{name}{labels}: +{grown}, expected at least +{by}"

    moved("tether_registrations_total")
    moved("tether_registration_outcomes_total", outcome="new_lease")
    moved("tether_device_connects_total")
    moved("tether_device_frames_total", 6)
    moved("tether_sends_total", outcome="delivered", origin="message")
    moved("tether_messages_delivered_total")
    moved("tether_sends_total", outcome="delivered", origin="command")
    moved("tether_relay_commands_total")
    moved("tether_relay_resumes_total", outcome="hit")
    moved("tether_relay_resumes_total", outcome="miss")
    moved("tether_device_disconnects_total", 2, code="1008")
    moved("tether_frame_latency_seconds_count")
    moved(
        "tether_http_request_duration_seconds_count",
        method="POST",
        route="/v1/environments/{connectionId}/messages",
        status="200",
    )
    moved("tether_http_request_duration_seconds_count", method="GET", route="unmatched", status="404")
    moved(
        "tether_http_request_duration_seconds_count",
        method="DELETE",
        route="/v1/environments/{environmentId}",
        status="204",
    )
    # Route templates, never raw paths: nothing labelled with the connection id.
    assert not any(dev.connection_id in v for (_, labels) in after for _, v in labels)

    latency = buckets(after, "tether_frame_latency_seconds", pod)
    assert latency["+Inf"] == value(after, "tether_frame_latency_seconds_count", pod)
    assert list(latency.values()) == sorted(latency.values())  # cumulative
    assert latency["1.0"] >= 1  # these writes went out within a second
    assert value(after, "tether_frame_latency_seconds_sum", pod) > 0
    assert value(after, "tether_database_errors_total", pod) == 0
    assert value(after, "tether_redis_errors_total", pod) == 0
    assert value(after, "tether_devices", pod, state="online") == value(
        before, "tether_devices", pod, state="online"
    )
    assert value(after, "process_resident_memory_bytes", pod) == 0  # process metrics carry no pod label
    assert any(name == "process_resident_memory_bytes" for name, _ in after)


async def _at_least(srv: Router, name: str, pod: str, n: float, **labels: str) -> Samples | None:
    samples = await scrape(srv.base_url)
    return samples if value(samples, name, pod, **labels) >= n else None


async def test_database_errors_are_counted_and_metrics_still_answer(tmp_path: Path, pg_url: str) -> None:
    r = start_router(tmp_path / "r", database_url=pg_url)
    try:
        async with httpx.AsyncClient(base_url=r.base_url, headers=r.headers()) as http:
            assert (await http.get("/v1/environments")).status_code == 200  # the key is cached now
        await asyncio.to_thread(drop_pg_database, pg_url)  # the database goes away under the router
        async with httpx.AsyncClient(base_url=r.base_url, headers=r.headers()) as http:
            body = {"deviceId": "d-1", "connectionName": "n"}
            answer = await http.post("/v1/environments/register", json=body)
        assert answer.status_code == 503
        samples = await scrape(r.base_url)
        assert value(samples, "tether_database_errors_total", r.pod_id) >= 1
        assert value(samples, "tether_registration_outcomes_total", r.pod_id, outcome="failed") >= 1
        assert (
            value(
                samples,
                "tether_http_request_duration_seconds_count",
                r.pod_id,
                method="POST",
                route="/v1/environments/register",
                status="503",
            )
            >= 1
        )
    finally:
        r.stop()


@pytest.mark.postgres
@pytest.mark.redis
async def test_bus_lag_and_cross_pod_frame_latency(tmp_path: Path, pg_url: str, redis_url: str) -> None:
    url = pg_url
    run = uuid.uuid4().hex[:6]
    pods: list[Router] = []
    try:
        a = start_router(tmp_path / "a", database_url=url, redis_url=redis_url, pod_id=f"lag-a-{run}")
        pods.append(a)
        b = start_router(
            tmp_path / "b", database_url=url, redis_url=redis_url, pod_id=f"lag-b-{run}", create_key=False
        )
        b.key = a.key
        pods.append(b)
        dev = await RawDevice.connect(a.base_url, a.key, name="lag-dev")
        client = await relay(b, dev.connection_id)
        await recv_type(dev.control, "sync")
        for i in range(3):
            await dev.emit("stream_delta", SCOPE, delta={"text": f"x{i}"})
        for _ in range(3):
            await recv(client)
        samples = await scrape(b.base_url)
        assert value(samples, "tether_bus_lag_seconds_count", b.pod_id) >= 3
        lag = buckets(samples, "tether_bus_lag_seconds", b.pod_id)
        assert lag["+Inf"] == value(samples, "tether_bus_lag_seconds_count", b.pod_id)
        assert lag["5.0"] >= 3  # a bus on one machine delivers within seconds
        assert value(samples, "tether_frame_latency_seconds_count", b.pod_id) >= 1
        assert value(samples, "tether_sockets", b.pod_id, kind="relay") == 1
        assert value(samples, "tether_devices", b.pod_id, state="online") == 0  # held by pod a
        on_a = await scrape(a.base_url)
        assert value(on_a, "tether_devices", a.pod_id, state="online") == 1
        assert value(on_a, "tether_bus_lag_seconds_count", a.pod_id) == 0  # a watches nothing elsewhere
        await client.close()
        await dev.close()
    finally:
        for pod in pods:
            pod.stop()


async def test_the_grafana_dashboard_uses_only_exposed_metrics(srv: Router) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b((?:tether|process)_[a-z_]+)", e)}
    exposed = {name for name, _ in await scrape(srv.base_url)}
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{srv.base_url}/metrics")).text
    exposed |= {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}  # no samples yet
    exposed.add("tether_bus_lag_seconds_bucket")  # cluster mode only (test_bus_lag_... scrapes it)
    assert used and used <= exposed, sorted(used - exposed)
    assert {"tether_devices", "tether_frame_latency_seconds_bucket", "tether_sends_total"} <= used
