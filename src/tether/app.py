"""The ASGI application: routes, error handling and the node's lifecycle."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from tether import __version__
from tether.api import device_socket, environments, errors, health, metrics, relay_socket
from tether.api.limits import BodyLimit
from tether.bus.base import Bus
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
    if settings.redis_url:
        from tether.bus.redis import RedisBus
        from tether.livestate.redis import RedisLiveState

        live = RedisLiveState(settings)
        bus = RedisBus(settings)
    else:
        live = MemoryLiveState(settings.pod_id, settings.dedupe_seconds * 1000)
        bus = MemoryBus()
    return Node(settings, store, live, bus)


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
        await node.start()
        app.state.node = node
        secret = await bootstrap_key(node)
        banner(settings, secret)
        try:
            yield
        finally:
            await node.drain(settings.shutdown_drain_seconds)
            await node.stop()

    app = FastAPI(
        title="Tether",
        version=__version__,
        description="Self-hostable router for the Letta Environments API.",
        lifespan=lifespan,
    )
    errors.install(app)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(device_socket.router)
    app.include_router(relay_socket.router)
    app.include_router(environments.router)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    return app


def banner(settings: Settings, new_key: str | None) -> None:
    base = settings.public_url or f"http://{_display_host(settings.host)}:{settings.port}"
    lines = [f"Tether {__version__} listening on {base} (pod {settings.pod_id})"]
    key_file = Path(settings.data_dir) / "dev-key"
    if new_key is not None:
        lines += [
            "",
            f"Created a development API key (shown once; also saved to {key_file}):",
            f"  {new_key}",
        ]
    if key_file.exists():
        key_ref = f"$(cat {key_file})"
    else:
        key_ref = "<key from: tether keys create --org ORG --user USER>"
    lines += [
        "",
        "Connect a device (Letta Code):",
        f"  LETTA_BASE_URL={base} LETTA_API_KEY={key_ref} IGNORE_SELF_HOSTED_LISTENER_ERROR=1 \\",
        "    letta server --computer-name my-laptop",
        "Connect a client (Python SDK, letta-client):",
        f"  LETTA_BASE_URL={base} LETTA_API_KEY={key_ref} \\",
        "    python -c 'from letta_client import Letta; print(Letta().environments.list())'",
        "",
    ]
    print("\n".join(lines), flush=True)


def _display_host(host: str) -> str:
    """A host a client can dial: a wildcard bind address is reachable on loopback."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
