"""Isolation matrix: every route of the app and both socket kinds x six credentials, against a real pod.

The routes come from the application's own route table (`iter_route_contexts`), so a route added
later without an expected cell here fails the matrix instead of going untested. For each cell the
outcome must be the documented one (an HTTP status; for a device socket `ready` or its close code;
for a relay socket `open`, `read-only` or the refused upgrade's status), and no body may carry the
other organization's data: its ids, names, keys, users. What a request itself named (an id in its
path) may be echoed back; nothing else.

Credentials: alpha's member key ("own"), beta's member key ("other org"), an alpha key revoked before
first use, no Authorization header, a malformed one (alpha's valid key under the `Token` scheme), and
an alpha readonly key. Used by the hardening row and by tests/test_hardening_api.py alike.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi.routing import iter_route_contexts
from starlette.routing import WebSocketRoute
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from hardening.cluster import PYTHON, Device, Server, online_connection, pod, reference_device
from hardening.core import Row, Run

OWN, OTHER, REVOKED, NO_KEY, MALFORMED, READONLY = (
    "own key", "other org", "revoked", "no key", "malformed", "readonly",
)  # fmt: skip
CREDENTIALS = (OWN, OTHER, REVOKED, NO_KEY, MALFORMED, READONLY)
# The order cells of one route run in: the refusals first, so an own key's action (a delete, a
# disconnect) never hides whether the others would have been refused.
RUN_ORDER = (OTHER, REVOKED, NO_KEY, MALFORMED, READONLY, OWN)
WS = "WS"  # the method column of a socket route
RELAY_COMMAND_WAIT = 2.0  # seconds a relay socket is given to answer a command with an error frame


def make_key(server: Server, org: str, user: str, role: str = "member", name: str = "hardening") -> str:
    """A new key (`tether keys create`) against the pod's database."""
    argv = ["keys", "create", "--org", org, "--user", user, "--role", role, "--name", name]
    return _cli(server, *argv).strip().splitlines()[-1]


def _cli(server: Server, *args: str) -> str:
    argv = [PYTHON, "-m", "tether", *args]
    return subprocess.run(argv, env=server.env, capture_output=True, text=True, check=True).stdout


def revoked_key(server: Server, org: str, user: str) -> str:
    """A key revoked before the pod ever saw it (so no cache of the pod holds it as valid)."""
    name = f"revoked-{uuid.uuid4().hex[:8]}"
    secret = make_key(server, org, user, name=name)
    rows = [line.split() for line in _cli(server, "keys", "list").splitlines()]
    key_id = next(cols[0] for cols in rows if name in cols)
    _cli(server, "keys", "revoke", key_id)
    return secret


def route_table() -> list[tuple[str, str]]:
    """(method, path) of every route the application serves; sockets with the method `WS`."""
    from tether.app import create_app
    from tether.config import Settings

    app = create_app(Settings())  # only its route table is read: nothing starts
    found: set[tuple[str, str]] = set()
    for route in iter_route_contexts(app.routes):
        path = str(route.path)
        if isinstance(route.original_route, WebSocketRoute) or route.methods is None:
            found.add((WS, path))
        else:
            found |= {(method, path) for method in route.methods}
    return sorted(found)


# ---- the world the matrix runs in ------------------------------------------------------------


@dataclass
class World:
    """Two organizations' keys, alpha's online devices and rows, and what each org must never see."""

    server: Server
    keys: dict[str, str | None]  # credential -> the key it sends (None: no header)
    device: dict[str, str]  # alpha's main device: deviceId, connectionId, envId
    target: dict[str, str]  # alpha's second device (a teleport target)
    spare: dict[str, dict[str, str]]  # alpha rows with no device: "delete", "socket", "shared"
    teleport: dict[str, str]  # an alpha teleport: id, agentId, conversationId
    markers: dict[str, set[str]]  # org -> strings of its that no other credential may read
    devices: list[Device] = field(default_factory=list)

    def headers(self, credential: str) -> dict[str, str]:
        key = self.keys[credential]
        if key is None:
            return {}
        return {"Authorization": f"{'Token' if credential == MALFORMED else 'Bearer'} {key}"}

    def foreign(self, credential: str) -> set[str]:
        """What a response to `credential` must not contain."""
        if credential in (OWN, READONLY):
            return self.markers["beta"]
        if credential == OTHER:
            return self.markers["alpha"]
        return self.markers["alpha"] | self.markers["beta"]  # refused keys see no organization's data

    def stop(self) -> None:
        for device in self.devices:
            device.stop()


async def _json(http: httpx.AsyncClient, method: str, url: str, key: str, body: Any = None) -> Any:
    r = await http.request(method, url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=10)
    r.raise_for_status()
    return r.json()


async def _register(http: httpx.AsyncClient, base: str, key: str, device_id: str) -> dict[str, str]:
    reg = await _json(
        http, "POST", f"{base}/v1/environments/register", key,
        {"deviceId": device_id, "connectionName": device_id, "listenerInstanceId": f"{device_id}-i"},
    )  # fmt: skip
    row = await _json(http, "GET", f"{base}/v1/environments/{device_id}", key)
    return {"deviceId": device_id, "connectionId": reg["connectionId"], "envId": row["id"]}


async def prepare(server: Server, workdir: Path) -> World:
    made = (("alpha", "alice", "member"), ("beta", "bob", "member"), ("alpha", "carol", "readonly"))
    own, other, readonly = [await asyncio.to_thread(make_key, server, *who) for who in made]
    revoked = await asyncio.to_thread(revoked_key, server, "alpha", "dave")
    keys: dict[str, str | None] = {
        OWN: own, OTHER: other, REVOKED: revoked, NO_KEY: None, MALFORMED: own, READONLY: readonly,
    }  # fmt: skip
    world = World(server, keys, {}, {}, {}, {}, {"alpha": set(), "beta": set()})
    base = server.base_url
    try:
        suffix = uuid.uuid4().hex[:6]
        for name, slot in (("a", "device"), ("b", "target")):
            dev, conn = await reference_device(workdir, server, own, f"iso-{name}-{suffix}")
            world.devices.append(dev)
            async with httpx.AsyncClient() as http:
                row = await _json(http, "GET", f"{base}/v1/environments/{dev.device_id}", own)
            ids = {"deviceId": dev.device_id, "connectionId": conn, "envId": row["id"]}
            setattr(world, slot, ids | {"connectionName": row["connectionName"]})
        async with httpx.AsyncClient() as http:
            for spare in ("delete", "socket", "shared"):
                world.spare[spare] = await _register(http, base, own, f"iso-{spare}-{suffix}")
            beta_row = await _register(http, base, other, f"iso-beta-{suffix}")
            conversation = f"conv-iso-{suffix}"
            tp = await _json(
                http, "POST", f"{base}/v1/environments/runtimes/agent-iso/{conversation}/teleport", own,
                {"targetConnectionId": world.target["connectionId"],
                 "sourceConnectionId": world.device["connectionId"]},
            )  # fmt: skip
            world.teleport = {"id": tp["id"], "agentId": "agent-iso", "conversationId": conversation}
            for org, key in (("alpha", own), ("beta", other)):
                me = await _json(http, "GET", f"{base}/v1/tether/whoami", key)
                world.markers[org] |= {me["keyId"], me["orgId"], me["userId"]}
        alpha_rows = [world.device, world.target, world.spare["delete"], world.spare["socket"]]
        world.markers["alpha"] |= {v for row in alpha_rows for v in row.values()} | {tp["id"], own, readonly}
        # The shared row's deviceId is the one beta registers too (each organization has its own).
        world.markers["alpha"] |= {world.spare["shared"]["connectionId"], world.spare["shared"]["envId"]}
        world.markers["alpha"] |= {conversation, revoked}
        world.markers["beta"] |= set(beta_row.values()) | {other}
        return world
    except BaseException:
        world.stop()
        raise


# ---- the expected cells ------------------------------------------------------------------------

Request = tuple[str, Any]  # (path and query, JSON body or None)
Build = Callable[[World, str], Request]


@dataclass(frozen=True)
class Route:
    build: Build
    expect: dict[str, str]  # credential -> documented outcome
    after: Callable[[World], Any] | None = None  # restores the world once the own key acted


def public(build: Build) -> Route:
    """Served to anyone: the same answer whatever the credential, and no organization's data."""
    return Route(build, dict.fromkeys(CREDENTIALS, "200"))


def private(build: Build, own: str, other: str, readonly: str, after: Any = None) -> Route:
    """Behind a key: any refused credential is a 401; `own`, `other` and `readonly` as documented."""
    refused = dict.fromkeys((REVOKED, NO_KEY, MALFORMED), "401")
    return Route(build, {OWN: own, OTHER: other, READONLY: readonly, **refused}, after)


def _fixed(path: str) -> Build:
    return lambda _w, _c: (path, None)


def _message(w: World, _c: str) -> Request:
    body = {
        "agentId": "agent-iso",
        "conversationId": "default",
        "messages": [{"role": "user", "content": "isolation", "client_message_id": uuid.uuid4().hex}],
    }
    return f"/v1/environments/{w.device['connectionId']}/messages", body


def _register_cell(w: World, credential: str) -> Request:
    # Another organization registering alpha's deviceId gets a row of its own; alpha's stays.
    device = w.spare["shared"]["deviceId"] if credential == OTHER else f"iso-reg-{uuid.uuid4().hex[:6]}"
    return "/v1/environments/register", {"deviceId": device, "connectionName": "isolation"}


def _teleport_cell(w: World, _c: str) -> Request:
    conversation = f"conv-cell-{uuid.uuid4().hex[:6]}"
    body = {"targetConnectionId": w.target["connectionId"], "sourceConnectionId": w.device["connectionId"]}
    return f"/v1/environments/runtimes/agent-iso/{conversation}/teleport", body


def _teleport_get(w: World, _c: str) -> Request:
    t = w.teleport
    return f"/v1/environments/runtimes/{t['agentId']}/{t['conversationId']}/teleports/{t['id']}", None


def _env(suffix: str = "", slot: str = "device") -> Build:
    def build(w: World, _c: str) -> Request:
        row = w.device if slot == "device" else w.spare[slot]
        return f"/v1/tether/environments/{row['envId']}{suffix}", None

    return build


def _asset(_w: World, _c: str) -> Request:
    from tether.console import bundle

    current = bundle()
    return f"/ui/assets/{current.build}/{sorted(current.assets)[0]}", None


async def _back_online(w: World) -> None:
    """After an operator disconnect the device reconnects to the same lease."""
    conn = await online_connection(w.server, str(w.keys[OWN]), w.device["deviceId"])
    assert conn == w.device["connectionId"], "the device came back on another lease"


E = "/v1/environments"
T = "/v1/tether"
ROUTES: dict[tuple[str, str], Route] = {
    # Public: probes, metrics, the index, the API's own description and the console's files.
    ("GET", "/"): public(_fixed("/")),
    ("GET", "/healthz"): public(_fixed("/healthz")),
    ("GET", "/readyz"): public(_fixed("/readyz")),
    ("GET", "/metrics"): public(_fixed("/metrics")),
    **{(m, p): public(_fixed(p)) for m in ("GET", "HEAD") for p in ("/openapi.json", "/docs", "/redoc")},
    **{(m, "/docs/oauth2-redirect"): public(_fixed("/docs/oauth2-redirect")) for m in ("GET", "HEAD")},
    **{(m, p): public(_fixed(p)) for m in ("GET", "HEAD") for p in ("/ui", "/ui/")},
    **{(m, "/ui/assets/{build}/{name}"): public(_asset) for m in ("GET", "HEAD")},
    # The Environments API.
    ("POST", f"{E}/register"): private(_register_cell, "200", "200", "403"),
    ("GET", E): private(_fixed(E), "200", "200", "200"),
    ("GET", f"{E}/{{deviceId:rest}}"): private(
        lambda w, _c: (f"{E}/{w.device['deviceId']}", None), "200", "404", "200"
    ),
    ("POST", f"{E}/{{connectionId}}/messages"): private(_message, "200", "404", "403"),
    # Another organization's device is "not online in this organization": the unknown target's 409.
    ("POST", f"{E}/runtimes/{{agentId}}/{{conversationId}}/teleport"): private(
        _teleport_cell, "202", "409", "403"
    ),
    ("GET", f"{E}/runtimes/{{agentId}}/{{conversationId}}/teleports/{{teleportId}}"): private(
        _teleport_get, "200", "404", "200"
    ),
    # The fleet API.
    ("GET", f"{T}/whoami"): private(_fixed(f"{T}/whoami"), "200", "200", "200"),
    ("GET", f"{T}/environments"): private(_fixed(f"{T}/environments"), "200", "200", "200"),
    ("GET", f"{T}/environments/{{environmentId}}"): private(_env(), "200", "404", "200"),
    # The member whose user registered the device traces it; a readonly key never does.
    ("GET", f"{T}/environments/{{environmentId}}/trace"): private(_env("/trace"), "200", "404", "403"),
    ("POST", f"{T}/environments/{{environmentId}}/mode"): private(
        lambda w, _c: (_env("/mode")(w, _c)[0], {"mode": "acceptEdits"}), "202", "404", "403"
    ),
    ("GET", f"{T}/pods"): private(_fixed(f"{T}/pods"), "403", "403", "403"),  # admin keys only
    ("GET", f"{T}/teleports"): private(_fixed(f"{T}/teleports"), "200", "200", "200"),
    # The sockets: a device listener socket on a lease of alpha's, a relay socket to alpha's device.
    (WS, f"{E}/ws/{{connection_id}}"): Route(
        lambda w, _c: (f"{E}/ws/{w.spare['socket']['connectionId']}", None),
        {OWN: "ready", **dict.fromkeys((OTHER, REVOKED, NO_KEY, MALFORMED, READONLY), "close 1008")},
    ),
    (WS, f"{E}/{{connection_id}}/status/ws"): Route(
        lambda w, _c: (f"{E}/{w.device['connectionId']}/status/ws?agentId=agent-iso", None),
        {OWN: "open", OTHER: "refused 404", READONLY: "read-only",
         **dict.fromkeys((REVOKED, NO_KEY, MALFORMED), "refused 401")},
    ),
    # Last: what acts on alpha's rows and sockets.
    ("POST", f"{T}/environments/{{environmentId}}/disconnect"): private(
        _env("/disconnect"), "202", "404", "403", after=_back_online
    ),
    ("DELETE", f"{E}/{{environmentId}}"): private(
        lambda w, _c: (f"{E}/{w.spare['delete']['envId']}", None), "204", "404", "403"
    ),
}  # fmt: skip


# ---- running it --------------------------------------------------------------------------------


@dataclass
class Cell:
    method: str
    path: str
    credential: str
    expected: str
    got: str
    leaked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.got == self.expected and not self.leaked


@dataclass
class Matrix:
    cells: list[Cell] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # routes without a cell, broken invariants

    def failures(self) -> list[str]:
        out = list(self.problems)
        for c in self.cells:
            if c.got != c.expected:
                out.append(f"{c.method} {c.path} with {c.credential}: {c.got} (documented: {c.expected})")
            if c.leaked:
                out.append(f"{c.method} {c.path} with {c.credential}: leaked {', '.join(c.leaked)}")
        return out

    def leaks(self) -> int:
        return sum(1 for c in self.cells if c.leaked)

    def markdown(self) -> list[str]:
        """Routes down, credentials across; each cell its outcome, marked where it is not as documented."""
        lines = ["| route | " + " | ".join(CREDENTIALS) + " |", "| --- |" + " --- |" * len(CREDENTIALS)]
        by_route: dict[tuple[str, str], dict[str, Cell]] = {}
        for c in self.cells:
            by_route.setdefault((c.method, c.path), {})[c.credential] = c
        for (method, path), row in by_route.items():
            shown = []
            for credential in CREDENTIALS:
                if credential not in row:
                    shown.append("—")
                    continue
                c = row[credential]
                if c.ok:
                    shown.append(c.got)
                else:
                    shown.append(f"**{c.got}** (want {c.expected}){' LEAK' if c.leaked else ''}")
            lines.append(f"| `{method} {path}` | " + " | ".join(shown) + " |")
        return lines


def _leaks(text: str, request: str, foreign: set[str]) -> list[str]:
    """Foreign markers in a body, except those the request itself carried (an id echoed in a 404)."""
    return sorted(m for m in foreign if m and m in text and m not in request)


Outcome = tuple[str, str]  # (what the cell got, the text it read back)


async def _http_cell(
    http: httpx.AsyncClient, w: World, method: str, credential: str, req: Request
) -> Outcome:
    path, body = req
    url = f"{w.server.base_url}{path}"
    r = await http.request(method, url, json=body, headers=w.headers(credential))
    return str(r.status_code), r.text


def _refused(exc: InvalidStatus) -> Outcome:
    body = exc.response.body.decode(errors="replace") if exc.response.body else ""
    return f"refused {exc.response.status_code}", body


async def _device_cell(w: World, credential: str, path: str) -> Outcome:
    """`ready` when the lease is served (listener_ready), else the close code (or a refused upgrade)."""
    url = f"{w.server.ws_base}{path}?channel=control&connectionGeneration={uuid.uuid4()}&connectionAttempt=1"
    try:
        async with connect(url, additional_headers=w.headers(credential), open_timeout=10) as ws:
            try:
                first = str(await asyncio.wait_for(ws.recv(), 10))
            except ConnectionClosed as exc:
                return f"close {exc.rcvd.code if exc.rcvd else None}", exc.rcvd.reason if exc.rcvd else ""
            kind = json.loads(first).get("type")
            return ("ready" if kind == "listener_ready" else f"frame {kind}"), first
    except InvalidStatus as exc:
        return _refused(exc)


async def _relay_cell(w: World, credential: str, path: str) -> Outcome:
    """`open` when the socket takes commands, `read-only` when it answers them `forbidden`."""
    try:
        async with connect(
            f"{w.server.ws_base}{path}", additional_headers=w.headers(credential), open_timeout=10
        ) as ws:
            request_id = f"iso-{uuid.uuid4().hex[:8]}"
            runtime = {"agent_id": "agent-iso", "conversation_id": "default"}
            await ws.send(json.dumps({"type": "sync", "request_id": request_id, "runtime": runtime}))
            got, read = "open", []
            deadline = time.monotonic() + RELAY_COMMAND_WAIT
            try:
                while (left := deadline - time.monotonic()) > 0:
                    read.append(str(await asyncio.wait_for(ws.recv(), left)))
                    frame = json.loads(read[-1])
                    if frame.get("request_id") == request_id and frame.get("type") == "error":
                        code = frame.get("code")
                        got = "read-only" if code == "forbidden" else f"error {code}"
                        break
            except TimeoutError:
                pass  # no error within the wait: the command went on to the device
            return got, "\n".join(read)
    except InvalidStatus as exc:
        return _refused(exc)


async def _cell(http: httpx.AsyncClient, w: World, method: str, path: str, credential: str) -> Cell:
    route = ROUTES[(method, path)]
    req = route.build(w, credential)
    if method != WS:
        got, text = await _http_cell(http, w, method, credential, req)
    elif path.endswith("/status/ws"):
        got, text = await _relay_cell(w, credential, req[0])
    else:
        got, text = await _device_cell(w, credential, req[0])
    sent = req[0] + (json.dumps(req[1]) if req[1] is not None else "")
    return Cell(
        method, path, credential, route.expect[credential], got, _leaks(text, sent, w.foreign(credential))
    )


def route_problems(table: list[tuple[str, str]]) -> list[str]:
    """A route of the app with no expected cell, or a cell for a route the app no longer has."""
    missing = [
        f"{m} {p}: a route with no expected cell (hardening/isolation.py)"
        for m, p in table
        if (m, p) not in ROUTES
    ]
    stale = [
        f"{m} {p}: an expected cell for a route the app no longer has"
        for m, p in ROUTES
        if (m, p) not in table
    ]
    return missing + stale


async def run_matrix(world: World) -> Matrix:
    table = route_table()
    matrix = Matrix(problems=route_problems(table))
    async with httpx.AsyncClient(timeout=15) as http:
        for (method, path), route in ROUTES.items():
            if (method, path) not in table:
                continue
            for credential in RUN_ORDER:
                cell = await _cell(http, world, method, path, credential)
                matrix.cells.append(cell)
                if credential == OWN and route.after is not None and cell.ok:
                    await route.after(world)
        # What another organization did (registering the shared row's deviceId among them) must not
        # have touched alpha's rows: the online device keeps its lease, the shared row's lease serves.
        own = {"Authorization": f"Bearer {world.keys[OWN]}"}
        r = await http.get(f"{world.server.base_url}{E}/{world.device['deviceId']}", headers=own)
        if r.status_code != 200 or r.json().get("connectionId") != world.device["connectionId"]:
            matrix.problems.append(f"alpha's online device lost its lease: {r.status_code} {r.text[:200]}")
        # The leak detector's own check: the markers it looks for do show where they belong.
        r = await http.get(f"{world.server.base_url}{E}", headers=own)
        if world.device["deviceId"] not in r.text or not _leaks(r.text, "", world.markers["alpha"]):
            matrix.problems.append(
                "alpha's own listing shows none of alpha's markers: the leak check is blind"
            )
        shared = world.spare["shared"]
        got, _ = await _device_cell(world, OWN, f"{E}/ws/{shared['connectionId']}")
        if got != "ready":
            matrix.problems.append(f"alpha's lease of the deviceId beta registered too: {got}, not ready")
    return matrix


async def isolation_matrix(server: Server, workdir: Path) -> Matrix:
    world = await prepare(server, workdir)
    try:
        return await run_matrix(world)
    finally:
        await asyncio.to_thread(world.stop)


async def measure(run: Run) -> None:
    row = Row(
        "isolation",
        "Isolation matrix (every route and both sockets x six credentials)",
        load="one pod (embedded SQLite), organizations alpha and beta; alpha with two reference devices "
        "online, spare rows and a teleport",
        faults="each route of the app's route table and the device and relay sockets, with alpha's key, "
        "beta's key, a revoked key, no key, a malformed Authorization header and a readonly key",
        bound="every cell answers its documented status (close code, refused upgrade); 0 leaks of "
        "another organization's data; every route has a cell",
    )
    started = time.monotonic()
    async with pod(run.workdir, "isolation-pod") as server:
        matrix = await isolation_matrix(server, run.workdir)
        for line in server.problems()[:10]:
            row.fail(f"pod log: {line}")
    for why in matrix.failures():
        row.fail(why)
    routes = len({(c.method, c.path) for c in matrix.cells})
    row.inputs = {"routes": routes, "credentials": len(CREDENTIALS), "cells": len(matrix.cells)}
    wrong = sum(1 for c in matrix.cells if c.got != c.expected)
    row.lost = f"{matrix.leaks()} leaks; {wrong} of {len(matrix.cells)} cells off their documented outcome"
    row.note = (
        "Outcomes: an HTTP status; for a device socket `ready` (listener_ready) or the close code; for a "
        "relay socket `open`, `read-only` (upgraded, commands answered `forbidden`) or `refused` and the "
        "upgrade's status. `malformed` sends alpha's valid key under the `Token` scheme. Gateway "
        "mode's forwarded agent API is no route of the app (api/fastpath.py hands it to the upstream "
        "after the same require_principal) and is not in this matrix."
    )
    row.detail["markdown"] = matrix.markdown()
    row.seconds = time.monotonic() - started
    run.add(row.judge())
