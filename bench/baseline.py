"""The baseline: a bare forwarder on Tether's own server stack, the physical limit of that stack.

FastAPI WebSocket routes on uvicorn with the options `tether serve` uses (uvloop, httptools,
websockets-sansio, no per-message deflate, no WebSocket pings). One "device" socket and one "client"
socket meet by a path id and text frames pass between them unchanged: no auth, no sequencing, no
storage, no parsing. A frame for a side that is not connected is dropped.

So that the reference device runs against it unmodified, `POST /v1/environments/register` answers
with a single-socket `wsUrl` (no split channels) and stores nothing. With `--split` it answers as
Tether does (split channels, paired generations) and greets each device socket with the
`listener_ready` the device waits for: the same two handshakes and two sockets per device as Tether,
for the connect-time and heartbeat baselines (bench/idle.py).

Every client socket of a pair id receives every device frame: two client sockets make the stream
baseline that writes each frame twice, as Tether writes it to both sockets of a relay pair.

With `--rows FILE` (a JSON list of rows as Tether's list endpoint renders them) it also serves
`GET /v1/environments` from memory: the list figures' baseline (bench/listing.py).

    python -m bench.baseline --port 9000
"""

from __future__ import annotations

import argparse
import bisect
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import orjson
import uvicorn
from fastapi import FastAPI, Request, Response, WebSocket
from fastapi.responses import ORJSONResponse

from tether.cli import tune_gc
from tether.config import Settings
from tether.listen import open_listeners

MAX_FRAME_BYTES = 20 * 1024 * 1024  # Tether's default max_frame_bytes
DEFAULTS = Settings()


@dataclass
class Pair:
    device: WebSocket | None = None  # the socket client frames go to (a split device's control)
    clients: list[WebSocket] = field(default_factory=list)


def _listener_ready(ws: WebSocket) -> str | None:
    """The greeting of a split-channel device socket (what Tether sends once a socket is accepted)."""
    params = dict(parse_qsl(ws.scope["query_string"].decode("latin-1")))
    generation, attempt = params.get("connectionGeneration"), params.get("connectionAttempt")
    if generation is None or attempt is None:
        return None
    return (
        f'{{"type":"listener_ready","connection_generation":"{generation}",'
        f'"connection_attempt":{int(attempt)}}}'
    )


def add_listing(app: FastAPI, rows: list[dict[str, Any]]) -> None:
    """`GET /v1/environments` over `rows` held in memory, in their order: `limit`, `after` (an id),
    `onlineOnly=true` (rows with a connectionId) and `userId=`, each over a precomputed position list
    (what an index is to a database), the page rendered with orjson per request."""
    position = {row["id"]: i for i, row in enumerate(rows)}
    everything = list(range(len(rows)))
    online = [i for i, row in enumerate(rows) if row["connectionId"] is not None]
    by_user: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_user.setdefault(row["userId"], []).append(i)

    @app.get("/v1/environments")
    async def list_environments(request: Request) -> Response:
        query = request.query_params
        limit = int(query.get("limit") or 50)
        after = query.get("after")
        user = query.get("userId")
        if query.get("onlineOnly") == "true":
            candidates = online
        elif user:
            candidates = by_user.get(user, [])
        else:
            candidates = everything
        start = bisect.bisect_right(candidates, position[after]) if after else 0
        page = [rows[i] for i in candidates[start : start + limit + 1]]
        body = {"connections": page[:limit], "hasNextPage": len(page) > limit}
        return Response(orjson.dumps(body), media_type="application/json")


def create_app(rows: list[dict[str, Any]] | None = None, split: bool = False) -> FastAPI:
    app = FastAPI()
    pairs: dict[str, Pair] = {}
    if rows is not None:
        add_listing(app, rows)

    @app.get("/readyz")
    async def readyz() -> ORJSONResponse:
        return ORJSONResponse({"status": "ready"})

    @app.post("/v1/environments/register")
    async def register(request: Request) -> ORJSONResponse:
        connection_id = f"conn-{uuid.uuid4().hex}"
        base = "ws" + str(request.base_url).rstrip("/")[len("http") :]
        return ORJSONResponse(
            {
                "connectionId": connection_id,
                "wsUrl": f"{base}/device/{connection_id}",
                "supportsSplitStatusChannels": split,
                "supportsPairedListenerGenerations": split,
            }
        )

    async def relay(ws: WebSocket, pair_id: str, is_device: bool) -> None:
        await ws.accept()
        pair = pairs.setdefault(pair_id, Pair())
        if not is_device:
            pair.clients.append(ws)
        elif ws.query_params.get("channel") != "stream":
            pair.device = ws
        if is_device and split:
            greeting = _listener_ready(ws)
            if greeting is not None:
                await ws.send({"type": "websocket.send", "text": greeting})
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                if text is None:
                    continue
                targets = pair.clients if is_device else [pair.device] if pair.device is not None else []
                for other in targets:
                    try:
                        await other.send({"type": "websocket.send", "text": text})
                    except Exception:  # the other side went away mid-write; its own loop cleans up
                        continue
        finally:
            if pair.device is ws:
                pair.device = None
            if ws in pair.clients:
                pair.clients.remove(ws)
            if pair.device is None and not pair.clients and pairs.get(pair_id) is pair:
                del pairs[pair_id]

    @app.websocket("/device/{pair_id}")
    async def device(ws: WebSocket, pair_id: str) -> None:
        await relay(ws, pair_id, True)

    @app.websocket("/client/{pair_id}")
    async def client(ws: WebSocket, pair_id: str) -> None:
        await relay(ws, pair_id, False)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rows", type=Path, help="serve GET /v1/environments over these rows (JSON list)")
    parser.add_argument(
        "--split", action="store_true", help="register devices with split channels, as Tether does"
    )
    args = parser.parse_args()
    rows = orjson.loads(args.rows.read_bytes()) if args.rows else None
    config = uvicorn.Config(
        create_app(rows, args.split),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        ws="websockets-sansio",
        ws_max_size=MAX_FRAME_BYTES,
        ws_per_message_deflate=False,
        ws_ping_interval=None,
        # `tether serve`'s process settings too (listen backlog and sockets, garbage collector): a
        # reconnect storm meets the same accept queues and the same collector.
        backlog=DEFAULTS.listen_backlog,
        log_level="warning",
        lifespan="on",
    )
    tune_gc(DEFAULTS.gc_thresholds)
    uvicorn.Server(config).run(sockets=open_listeners(args.host, args.port, DEFAULTS.listen_backlog))


if __name__ == "__main__":
    main()
