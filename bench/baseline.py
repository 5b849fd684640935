"""The baseline: a bare forwarder on Tether's own server stack, the physical limit of that stack.

FastAPI WebSocket routes on uvicorn with the options `tether serve` uses (uvloop, httptools,
websockets-sansio, no per-message deflate, no WebSocket pings). One "device" socket and one "client"
socket meet by a path id and text frames pass between them unchanged: no auth, no sequencing, no
storage, no parsing. A frame for a side that is not connected is dropped.

So that the reference device runs against it unmodified, `POST /v1/environments/register` answers
with a single-socket `wsUrl` (no split channels) and stores nothing.

    python -m bench.baseline --port 9000
"""

from __future__ import annotations

import argparse
import uuid
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import ORJSONResponse

from tether.cli import tune_gc
from tether.config import Settings
from tether.listen import open_listeners

MAX_FRAME_BYTES = 20 * 1024 * 1024  # Tether's default max_frame_bytes
DEFAULTS = Settings()


@dataclass
class Pair:
    device: WebSocket | None = None
    client: WebSocket | None = None


def create_app() -> FastAPI:
    app = FastAPI()
    pairs: dict[str, Pair] = {}

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
                "supportsSplitStatusChannels": False,
                "supportsPairedListenerGenerations": False,
            }
        )

    async def relay(ws: WebSocket, pair_id: str, side: str) -> None:
        await ws.accept()
        pair = pairs.setdefault(pair_id, Pair())
        setattr(pair, side, ws)
        other_side = "client" if side == "device" else "device"
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                other: WebSocket | None = getattr(pair, other_side)
                if text is None or other is None:
                    continue
                try:
                    await other.send({"type": "websocket.send", "text": text})
                except Exception:  # the other side went away mid-write; its own loop cleans up
                    continue
        finally:
            if getattr(pair, side) is ws:
                setattr(pair, side, None)
            if pair.device is None and pair.client is None and pairs.get(pair_id) is pair:
                del pairs[pair_id]

    @app.websocket("/device/{pair_id}")
    async def device(ws: WebSocket, pair_id: str) -> None:
        await relay(ws, pair_id, "device")

    @app.websocket("/client/{pair_id}")
    async def client(ws: WebSocket, pair_id: str) -> None:
        await relay(ws, pair_id, "client")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    config = uvicorn.Config(
        create_app(),
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
