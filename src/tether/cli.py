"""The `tether` command: serve, migrate, keys, device, and the fleet's envs and pods."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import logging
import signal
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

if TYPE_CHECKING:
    import uvicorn

from tether.clock import now_ms
from tether.config import (
    Settings,
    describe_settings,
    load_settings,
    parse_letta_url,
    parse_port,
    redact_url,
)
from tether.listen import open_listeners
from tether.protocol.roles import DEFAULT_ROLE, ROLES
from tether.store.base import SchemaTooNew
from tether.store.sql import SqlStore

log = logging.getLogger("tether")
# While the database does not answer at start-up, say so this often.
# `serve` migrates before listening only if the database answers within this; otherwise it listens
# at once and the node migrates in the background (a pod must never block before listening).
DATABASE_CHECK_BEFORE_LISTEN_SECONDS = 1.0


def _name(text: str) -> str:
    """An organization, user or key name: what the tables can hold."""
    value = text.strip()
    if not value or len(value) > 200 or "\x00" in value:
        raise argparse.ArgumentTypeError(f"expected 1 to 200 characters, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        return parse_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _letta_url_arg(text: str) -> str | None:
    try:
        return parse_letta_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether",
        description="Tether: a self-hostable router for the Letta Environments API.",
        epilog=describe_settings(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(show_help=parser.print_help)
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser(
        "serve",
        help="run the router (applies migrations first)",
        epilog=describe_settings(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", help="address to listen on (TETHER_HOST)")
    serve.add_argument("--port", type=_port, help="port to listen on (TETHER_PORT)")
    serve.add_argument(
        "--letta-url",
        type=_letta_url_arg,
        help="gateway mode: forward the agent API to this Letta server (TETHER_LETTA_URL)",
    )

    sub.add_parser("migrate", help="apply database migrations (TETHER_DATABASE_URL)")

    keys = sub.add_parser("keys", help="manage API keys")
    keys.set_defaults(show_help=keys.print_help)
    keys_sub = keys.add_subparsers(dest="keys_command")
    create = keys_sub.add_parser("create", help="create a key; prints the secret alone on the last line")
    create.add_argument("--org", required=True, type=_name, help="organization name (created on first use)")
    create.add_argument(
        "--user", required=True, type=_name, help="user name within the organization (created on first use)"
    )
    create.add_argument("--name", default="api key", type=_name, help="a label for the key")
    create.add_argument(
        "--role",
        default=DEFAULT_ROLE,
        choices=ROLES,
        help="admin: everything in the organization, the cluster and every trace; member (default): "
        "acts on the organization's devices; readonly: sees, never acts (README: Fleet API and roles)",
    )
    keys_sub.add_parser("list", help="list keys (never shows secrets)")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument(
        "key_id",
        metavar="KEY_ID",
        help="the KEY ID column of `tether keys list` (in a key tk_<id>_<secret>, the <id>)",
    )

    from tether.device import run as device_run

    device = sub.add_parser("device", help="run the reference device (a simulated Letta Code listener)")
    device_run.add_arguments(device)

    from tether.fleetcli import commands as fleet

    fleet.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if (
        args.command is None
        or (args.command == "keys" and args.keys_command is None)
        or (args.command == "envs" and args.envs_command is None)
    ):
        args.show_help(sys.stderr)  # what there is to run, rather than "required: command"
        return 2
    if args.command in ("envs", "pods"):
        from tether.fleetcli import commands as fleet

        return fleet.run(args)  # a client of a router's API: no TETHER_* settings apply
    settings = load_settings()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        if args.command == "serve":
            return serve(
                settings.with_overrides(**_given(host=args.host, port=args.port, letta_url=args.letta_url))
            )
        if args.command == "migrate":
            return asyncio.run(_migrate(settings))
        if args.command == "keys":
            return asyncio.run(_keys(settings, args))
        if args.command == "device":
            from tether.device import run as device_run

            return asyncio.run(device_run.run(args))
    except SchemaTooNew as exc:
        print(f"tether: {exc}", file=sys.stderr)
        return 2
    except (OSError, SQLAlchemyError) as exc:
        print(
            f"tether: cannot use the database {_redact(settings.resolved_database_url)}: {exc}",
            file=sys.stderr,
        )
        return 2
    return 1


def _given(**values: object) -> dict[str, object]:
    return {k: v for k, v in values.items() if v is not None}


def tune_gc(thresholds: tuple[int, int, int]) -> None:
    """Collect less often, and never rescan what the process built to start (modules, the app)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)


def serve(settings: Settings) -> int:
    import uvicorn

    from tether.api.fastpath import SocketsFirst
    from tether.api.wsprotocol import TetherWebSocketProtocol
    from tether.app import create_app

    url = _redact(settings.resolved_database_url)
    try:
        asyncio.run(_migrate_before_listening(settings))
    except KeyboardInterrupt:
        # (SIGTERM's default action ends the process as promptly; uvicorn takes both over below.)
        print(f"tether: interrupted while migrating the database {url}", file=sys.stderr)
        return 128 + signal.SIGINT
    except SchemaTooNew as exc:
        print(f"tether: refusing to start: {exc}", file=sys.stderr)
        return 2
    except (OSError, SQLAlchemyError, TimeoutError) as exc:
        # Listen anyway: /healthz answers, /readyz says what it waits for, work is refused retryably,
        # and the node migrates once the database answers (Node.start).
        reason = str(exc) or exc.__class__.__name__
        print(
            f"tether: the database {url} does not answer yet ({reason}): serving; ready once it does",
            file=sys.stderr,
        )
    try:
        listeners = open_listeners(
            settings.host, settings.port, settings.listen_backlog, settings.listen_sockets
        )
    except OSError as exc:
        print(
            f"tether: refusing to start: cannot listen on {settings.host}:{settings.port}: {exc}",
            file=sys.stderr,
        )
        return 2
    app = create_app(settings)
    config = uvicorn.Config(
        SocketsFirst(app, gateway=settings.letta_url is not None),
        host=settings.host,
        port=settings.port,
        backlog=settings.listen_backlog,
        loop="uvloop",
        http="httptools",
        ws=TetherWebSocketProtocol,  # websockets-sansio, reading only while writes drain
        ws_max_size=settings.max_frame_bytes,
        ws_per_message_deflate=False,
        ws_ping_interval=None,  # devices ping in-band; WebSocket pings would only add traffic
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_drain_seconds) + 5,
        lifespan="on",
    )
    server = _draining_server(config, settings.shutdown_drain_seconds)
    tune_gc(settings.gc_thresholds)
    # uvicorn handles SIGINT/SIGTERM itself, drains (below), then re-raises the signal.
    try:
        server.run(sockets=listeners)
    except KeyboardInterrupt:
        return 128 + signal.SIGINT  # Ctrl-C after a clean shutdown: the shell's convention, no traceback
    return 0


def _draining_server(config: uvicorn.Config, drain_s: float) -> uvicorn.Server:
    """A uvicorn server that drains device sockets before uvicorn's own shutdown.

    On SIGTERM uvicorn closes every open WebSocket at once with 1012 and only then runs the app's
    lifespan shutdown, so `Node.drain` would find nothing left to spread: every device would
    reconnect to the other pods in the same instant. Stop listening, drain, then let uvicorn go on.
    """
    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            for server in self.servers:
                server.close()
            node = getattr(getattr(self.config.app, "state", None), "node", None)
            if node is not None and not self.force_exit:
                await node.drain(drain_s)
            await super().shutdown(sockets)

    return DrainingServer(config)


async def _migrate_before_listening(settings: Settings) -> None:
    """Migrate before serving if the database answers at once (so a schema from a newer Tether is
    refused before listening); a database that does not answer within the bound is left to the node."""
    await asyncio.wait_for(_migrate(settings, quiet=True), DATABASE_CHECK_BEFORE_LISTEN_SECONDS)


async def _migrate(settings: Settings, quiet: bool = False) -> int:
    store = SqlStore(settings.resolved_database_url)
    try:
        await store.start()
    finally:
        await store.close()
    if not quiet:
        print(f"migrated {_redact(settings.resolved_database_url)} to the latest schema")
    return 0


def _redact(url: str) -> str:
    return redact_url(url)


async def _keys(settings: Settings, args: argparse.Namespace) -> int:
    store = SqlStore(settings.resolved_database_url)
    await store.start()
    try:
        if args.keys_command == "create":
            secret = await store.create_key(args.org, args.user, args.name, now_ms(), args.role)
            print(
                f"created {args.role} key for user {args.user!r} in organization {args.org!r}; "
                "store it now, it is not shown again:"
            )
            print(secret)
            return 0
        if args.keys_command == "list":
            rows = await store.list_keys()
            header = ("KEY ID", "ORG", "USER", "USER ID", "NAME", "ROLE", "CREATED (UTC)", "STATUS")
            table = [header]
            for k in rows:
                created = dt.datetime.fromtimestamp(k.created_at / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
                status = "revoked" if k.revoked_at else "active"
                table.append((k.key_id, k.org_name, k.user_name, k.user_id, k.name, k.role, created, status))
            widths = [max(len(row[i]) for row in table) for i in range(len(header))]
            for row in table:
                print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
            return 0
        if args.keys_command == "revoke":
            if await store.revoke_key(args.key_id, now_ms()):
                print(f"revoked {args.key_id}")
                return 0
            print(f"tether: no active key {args.key_id!r}", file=sys.stderr)
            return 1
    finally:
        await store.close()
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
