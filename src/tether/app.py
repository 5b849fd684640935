"""The ASGI application: routes, error handling and the node's lifecycle."""

from __future__ import annotations

import importlib.util
import logging
import os
import shlex
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from tether import __version__
from tether.api import device_socket, environments, errors, health, metrics, relay_socket
from tether.api.console import router as console_router
from tether.api.fleet import router as fleet_router
from tether.api.limits import BodyLimit
from tether.bus.base import Bus
from tether.bus.history import HistoryStore, MemoryHistoryStore
from tether.bus.memory import MemoryBus
from tether.clock import now_ms
from tether.config import Settings
from tether.livestate.base import LiveState
from tether.livestate.memory import MemoryLiveState
from tether.node import Node
from tether.store.sql import SqlStore

log = logging.getLogger("tether")


def build_node(settings: Settings) -> Node:
    store = SqlStore(settings.resolved_database_url)
    live: LiveState
    bus: Bus
    history: HistoryStore
    if settings.redis_url:
        from tether.bus.history import RedisHistoryStore
        from tether.bus.redis import RedisBus
        from tether.livestate.redis import RedisLiveState

        live = RedisLiveState(settings)
        bus = RedisBus(settings)
        history = RedisHistoryStore(settings)
    else:
        live = MemoryLiveState(settings.pod_id, settings.dedupe_seconds * 1000)
        bus = MemoryBus()
        history = MemoryHistoryStore(settings)
    return Node(settings, store, live, bus, history)


async def bootstrap_key(node: Node) -> str | None:
    """First start with no key: create a development key and keep it where `make run` users look."""
    if not node.settings.bootstrap_key:
        return None
    secret = await node.store.create_first_key("default", "developer", "development key", now_ms())
    if secret is None:
        return None
    path = Path(node.settings.data_dir) / "dev-key"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    os.chmod(path, 0o600)
    return secret


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        node = build_node(settings)
        metrics.instrument(node)

        async def first_start() -> None:
            secret = await bootstrap_key(node)
            banner(settings, secret)

        node.on_connected = first_start
        app.state.node = node
        # Returns at once: the node connects to the database and Redis in the background, and the
        # pod listens meanwhile (/healthz 200, /readyz 503 naming what it waits for, work refused
        # retryably by api/startup.py until it is connected).
        await node.start()
        try:
            yield
        finally:
            if node.connected:
                await node.drain(settings.shutdown_drain_seconds)
            else:
                waiting = " and ".join(node.waiting_for)
                log.warning("start-up interrupted by a signal: stopping before %s answered", waiting)
            await node.stop()

    app = FastAPI(
        title="Tether",
        version=__version__,
        description="Self-hostable router for the Letta Environments API.",
        lifespan=lifespan,
    )
    errors.install(app)

    @app.get("/", include_in_schema=False)
    async def index() -> dict[str, Any]:
        """What a browser or curl pointed at the router's address finds: where to go next."""
        return {
            "name": "Tether",
            "version": __version__,
            "docs": "/docs",
            "openapi": "/openapi.json",
            "health": "/healthz",
            "ready": "/readyz",
            "environments": "/v1/environments",
            "console": "/ui",
        }

    app.include_router(health.router)
    app.include_router(device_socket.router)
    app.include_router(relay_socket.router)
    app.include_router(environments.router)
    app.include_router(fleet_router)
    app.include_router(console_router)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    metrics.install(app)  # last: its timing middleware is the outermost
    return app


def banner(settings: Settings, new_key: str | None) -> None:
    base = settings.public_url or f"http://{_display_host(settings.host)}:{settings.port}"
    lines = [f"Tether {__version__} listening on {base} (pod {settings.pod_id}); API docs: {base}/docs"]
    lines.append(f"Console: {base}/ui (sign in with an API key)")
    if settings.letta_url:
        keys = "Tether keys" if settings.auth == "tether" else "the Letta server's own keys"
        lines.append(f"Gateway: the agent API goes to the Letta server at {settings.letta_url} ({keys})")
    # Absolute paths throughout: the examples work pasted into a shell in any folder.
    key_file = Path(settings.data_dir).resolve() / "dev-key"
    if new_key is not None:
        lines += [
            "",
            f"Created a development API key (shown once; also saved to {key_file}):",
            f"  {new_key}",
        ]
    if key_file.exists():
        key_ref = f"$(cat {shlex.quote(str(key_file))})"
    else:
        key_ref = "<key from: tether keys create --org ORG --user USER>"
    python = shlex.quote(sys.executable)  # this environment's Python, the one with Tether
    env = f"LETTA_BASE_URL={base} LETTA_API_KEY={key_ref}"
    lines += [
        "",
        "Connect a device (Letta Code: npm install -g @letta-ai/letta-code@0.32.18, or pip install letta):",
        f"  {env} IGNORE_SELF_HOSTED_LISTENER_ERROR=1 LETTA_CODE_TELEM=0 \\",
        "    letta server --computer-name my-laptop",
        "or the reference device that ships with Tether:",
        f"  {env} \\",
        f"    {python} -m tether device --name demo",
        "Connect a client (Python SDK, letta-client):",
        f"  {env} \\",
        f"    {python} -c 'from letta_client import Letta; print(Letta().environments.list())'",
    ]
    if importlib.util.find_spec("letta_client") is None:
        lines.append(f"  (that Python lacks letta-client: {python} -m pip install letta-client==1.12.1)")
    lines.append("")
    print("\n".join(lines), flush=True)


def _display_host(host: str) -> str:
    """A host a client can dial: a wildcard bind address is reachable on loopback."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
