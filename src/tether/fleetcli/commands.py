"""`tether envs list|get|send|disconnect|forget|watch` and `tether pods`: arguments and what each prints."""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import orjson
from rich.console import Console
from rich.table import Table

from tether.clock import now_ms
from tether.fleetcli import views
from tether.fleetcli.client import (
    API_ERROR,
    BAD_KEY,
    NOT_FOUND,
    OK,
    UNREACHABLE,
    USAGE,
    FleetError,
    Router,
    resolve_key,
    resolve_url,
    segment,
)

FORMATS = ("table", "wide", "json", "ndjson")
# Rows a table shows unless --limit says otherwise (json and ndjson page through everything).
TABLE_LIMIT = 100
# Pages as large as each route allows: fewer round trips when paging through a whole fleet.
LETTA_PAGE = 500
FLEET_PAGE = 200
# `watch` polls this often by default, never more often than WATCH_MIN_INTERVAL, and reads at most
# WATCH_LIMIT rows per poll unless --limit says otherwise.
WATCH_INTERVAL = 2.0
WATCH_MIN_INTERVAL = 0.5
WATCH_MAX_INTERVAL = 60.0
WATCH_LIMIT = 1000
# The width tables get when stdout is not a terminal: wide enough that no cell is ever cut (scripts
# grep the lines); a terminal gets its own width.
PIPE_WIDTH = 100_000

EXIT_CODES = """exit codes:
  0  done
  1  the router answered with an error (or a message was not delivered, or nothing to disconnect)
  2  usage: bad arguments, or forget without --yes when not asked interactively / declined
  3  the router is unreachable (connection refused, DNS, timeout)
  4  no API key, or the router refused it (401) or its role may not (403)
  5  no such device, environment or connection in this organization

router: --url, else LETTA_BASE_URL, else http://127.0.0.1:8283
key:    LETTA_API_KEY, else the file .tether/dev-key in the current directory (what `make run` writes)"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not WATCH_MIN_INTERVAL <= value <= WATCH_MAX_INTERVAL:
        raise argparse.ArgumentTypeError(
            f"expected {WATCH_MIN_INTERVAL} to {WATCH_MAX_INTERVAL} seconds, got {text!r}"
        )
    return value


def add_parsers(sub: Any) -> None:
    """`envs` and `pods` under the `tether` command's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="the router's base URL (default: LETTA_BASE_URL, else %(default)s)")
    common.add_argument("-o", "--output", choices=FORMATS, default="table", help="output format")
    common.set_defaults(url=None)
    fmt = argparse.RawDescriptionHelpFormatter

    envs = sub.add_parser(
        "envs",
        help="list and act on the fleet's environments (through a router's API)",
        epilog=EXIT_CODES,
        formatter_class=fmt,
    )
    envs.set_defaults(show_help=envs.print_help)
    envs_sub = envs.add_subparsers(dest="envs_command")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = envs_sub.add_parser(
            name,
            parents=[common],
            help=help_text,
            description=help_text,
            epilog=EXIT_CODES,
            formatter_class=fmt,
        )
        return parser

    def filters(parser: argparse.ArgumentParser, limit_help: str) -> None:
        parser.add_argument("--online", action="store_true", help="only online environments")
        parser.add_argument("--user", metavar="USER_ID", help="only environments of this user")
        parser.add_argument(
            "--search",
            metavar="TEXT",
            help="case-insensitive substring of name, deviceId, directory, branch, OS or version",
        )
        parser.add_argument("--limit", type=_positive_int, help=limit_help)

    listing = command("list", "list environments (-o json: the fields of `letta environments list`)")
    filters(listing, f"at most this many rows (default: all for json/ndjson, {TABLE_LIMIT} for tables)")
    get = command("get", "one environment by its deviceId")
    get.add_argument("device_id", metavar="DEVICE_ID")
    send = command("send", "send a user message to a device (as POST .../messages)")
    send.add_argument(
        "target", metavar="CONNECTION_OR_DEVICE", help="a connectionId (conn-...) or a deviceId"
    )
    send.add_argument("--agent", required=True, help="agentId")
    send.add_argument("--conversation", help="conversationId (default: the agent's default conversation)")
    send.add_argument("text", metavar="TEXT")
    disconnect = command("disconnect", "close a device's sockets transiently: it reconnects by itself")
    disconnect.add_argument("target", metavar="DEVICE_OR_ID", help="a deviceId or an environment id")
    forget = command("forget", "delete an environment row (a connected device re-registers)")
    forget.add_argument("target", metavar="DEVICE_OR_ID", help="a deviceId or an environment id")
    forget.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    watch = command("watch", "print environments as they change, until Ctrl-C (like kubectl get -w)")
    filters(watch, f"rows read per poll (default {WATCH_LIMIT})")
    watch.add_argument(
        "--interval",
        type=_interval,
        default=WATCH_INTERVAL,
        help=f"seconds between polls, {WATCH_MIN_INTERVAL} to {WATCH_MAX_INTERVAL} (default %(default)s)",
    )

    sub.add_parser(
        "pods",
        parents=[common],
        help="the cluster's pods (admin keys; through a router's API)",
        epilog=EXIT_CODES,
        formatter_class=fmt,
    )


def run(args: argparse.Namespace, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    out = Output(stdout or sys.stdout, args.output)
    err = stderr or sys.stderr
    try:
        url = resolve_url(args.url, os.environ)
        key = resolve_key(os.environ, Path.cwd())
        with Router(url, key) as router:
            if args.command == "pods":
                return _pods(router, out)
            return _COMMANDS[args.envs_command](router, args, out, err)
    except FleetError as exc:
        print(f"tether: {exc.message}", file=err)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130  # Ctrl-C during a one-shot command (watch ends cleanly by itself)


class Output:
    """Where rows go, in the format asked for."""

    def __init__(self, stream: TextIO, fmt: str) -> None:
        self.stream = stream
        self.format = fmt
        width = None if stream.isatty() else PIPE_WIDTH
        self.console = Console(file=stream, width=width, soft_wrap=False)

    def json(self, value: Any) -> None:
        option = orjson.OPT_INDENT_2 if self.format == "json" else 0
        self.stream.write(orjson.dumps(value, option=option).decode() + "\n")

    def table(self, columns: list[views.Column], rows: Sequence[views.Row], now: int) -> None:
        table = Table(box=None, header_style="bold", pad_edge=False, show_edge=False)
        for header, _ in columns:
            table.add_column(header, no_wrap=True, overflow="ellipsis")
        for row in rows:
            table.add_row(*views.cells(columns, row, now))
        self.console.print(table)

    def line(self, text: str) -> None:
        self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


# ---- reading the fleet ------------------------------------------------------------------------


def _letta_connections(
    router: Router, online: bool, user: str | None, search: str | None, limit: int | None
) -> Iterator[dict[str, Any]]:
    """`GET /v1/environments`, page after page, filtered by --search on this side."""
    after: str | None = None
    given = 0
    while True:
        size = LETTA_PAGE if search or limit is None else min(LETTA_PAGE, limit - given)
        params: dict[str, str | int] = {"limit": size}
        if online:
            params["onlineOnly"] = "true"
        if user:
            params["userId"] = user
        if after:
            params["after"] = after
        page = router.get("/v1/environments", params)
        connections: list[dict[str, Any]] = page.get("connections") or []
        for connection in connections:
            if search and not views.matches(connection, search):
                continue
            yield connection
            given += 1
            if limit is not None and given >= limit:
                return
        if not page.get("hasNextPage") or not connections:
            return
        after = str(connections[-1]["id"])


def _fleet_rows(
    router: Router, online: bool, user: str | None, search: str | None, limit: int
) -> tuple[list[dict[str, Any]], int] | None:
    """`GET /v1/tether/environments` rows and the total that match; None when the router lacks it."""
    rows: list[dict[str, Any]] = []
    total = 0
    while len(rows) < limit:
        params: dict[str, str | int] = {"limit": min(FLEET_PAGE, limit - len(rows)), "offset": len(rows)}
        if online:
            params["state"] = "online"
        if user:
            params["userId"] = user
        if search:
            params["q"] = search
        try:
            page = router.get("/v1/tether/environments", params)
        except FleetError as exc:
            if exc.exit_code == NOT_FOUND and exc.code == "NOT_FOUND" and not rows:
                return None  # no such route: a router without the fleet API
            raise
        items: list[dict[str, Any]] = page.get("items") or []
        rows += items
        total = int(page.get("total") or len(rows))
        if not page.get("hasNextPage") or not items:
            break
    return rows, total


def _table_rows(
    router: Router, online: bool, user: str | None, search: str | None, limit: int
) -> tuple[list[dict[str, Any]], int | None]:
    """Rows for a table: the fleet API's (state, heartbeat age, pod), else the Letta rows as far as
    they go. The total is None when unknown (the Letta route does not count)."""
    fleet = _fleet_rows(router, online, user, search, limit)
    if fleet is not None:
        return fleet
    now = now_ms()
    connections = list(_letta_connections(router, online, user, search, limit + 1))
    rows = [views.from_connection(c, now) for c in connections[:limit]]
    return rows, (len(rows) if len(connections) <= limit else None)


def _environment(router: Router, target: str) -> dict[str, Any]:
    """An environment by deviceId, else by its row id (the fleet API's detail)."""
    try:
        row: dict[str, Any] = router.get(f"/v1/environments/{segment(target)}")
        return row
    except FleetError as exc:
        if exc.exit_code != NOT_FOUND:
            raise
    try:
        detail: dict[str, Any] = router.get(f"/v1/tether/environments/{segment(target)}")
        return detail
    except FleetError as exc:
        if exc.exit_code != NOT_FOUND:
            raise
    raise FleetError(NOT_FOUND, f"no environment {target!r} in this organization (as deviceId or id)")


def _fleet_detail(router: Router, row_id: str) -> dict[str, Any] | None:
    try:
        detail: dict[str, Any] = router.get(f"/v1/tether/environments/{segment(row_id)}")
        return detail
    except FleetError as exc:
        if exc.exit_code == NOT_FOUND:
            return None
        raise


# ---- the commands -----------------------------------------------------------------------------


def _list(router: Router, args: argparse.Namespace, out: Output, err: TextIO) -> int:
    if out.format in ("json", "ndjson"):
        rows = (
            views.letta_row(c)
            for c in _letta_connections(router, args.online, args.user, args.search, args.limit)
        )
        if out.format == "json":
            out.json(list(rows))
        else:
            for row in rows:
                out.json(row)
        return OK
    limit = args.limit or TABLE_LIMIT
    rows_shown, total = _table_rows(router, args.online, args.user, args.search, limit)
    out.table(views.ENV_WIDE_COLUMNS if out.format == "wide" else views.ENV_COLUMNS, rows_shown, now_ms())
    if total is None or total > len(rows_shown):
        of = "more" if total is None else str(total)
        print(f"({len(rows_shown)} of {of} shown; --limit for more, -o json for all)", file=err)
    return OK


def _get(router: Router, args: argparse.Namespace, out: Output, err: TextIO) -> int:
    row: dict[str, Any] = router.get(f"/v1/environments/{segment(args.device_id)}")
    if out.format in ("json", "ndjson"):
        out.json(row)
        return OK
    now = now_ms()
    detail = _fleet_detail(router, str(row["id"])) or views.from_connection(row, now)
    columns = [*views.ENV_WIDE_COLUMNS, ("ID", lambda r, _n: views.text(r.get("id")))]
    width = max(len(header) for header, _ in columns)
    for header, render in columns:
        out.line(f"{header.ljust(width)}  {render(detail, now)}")
    history = detail.get("history") or []
    if history:
        out.line("")
        out.table(_HISTORY_COLUMNS, history[:10] if out.format == "table" else history, now)
    return OK


_HISTORY_COLUMNS: list[views.Column] = [
    ("WHEN", lambda r, now: views.since(r.get("at"), now) + " ago"),
    ("EVENT", lambda r, _n: views.text(r.get("event"))),
    ("CODE", lambda r, _n: views.text(r.get("code"))),
    ("REASON", lambda r, _n: views.text(r.get("reason"))),
    ("POD", lambda r, _n: views.text(r.get("podId"))),
]


def _send(router: Router, args: argparse.Namespace, out: Output, err: TextIO) -> int:
    target: str = args.target
    if target.startswith("conn-"):
        connection_id = target
    else:
        row: dict[str, Any] = router.get(f"/v1/environments/{segment(target)}")
        connection_id = row.get("connectionId") or ""
        if not connection_id:
            raise FleetError(API_ERROR, f"{row.get('connectionName')!r} ({target}) is offline: nothing sent")
    message = {"role": "user", "content": args.text, "client_message_id": f"cli-{uuid.uuid4().hex}"}
    body: dict[str, Any] = {"agentId": args.agent, "messages": [message]}
    if args.conversation:
        body["conversationId"] = args.conversation
    answer: dict[str, Any] = router.post(f"/v1/environments/{segment(connection_id)}/messages", body)
    if out.format in ("json", "ndjson"):
        out.json({**answer, "connectionId": connection_id})
    if not answer.get("success"):
        raise FleetError(API_ERROR, f"not delivered to {connection_id}: {answer.get('message')}")
    if out.format not in ("json", "ndjson"):
        out.line(f"sent to {connection_id}: {answer.get('message')}")
    return OK


def _disconnect(router: Router, args: argparse.Namespace, out: Output, err: TextIO) -> int:
    env = _environment(router, args.target)
    try:
        answer = router.post(f"/v1/tether/environments/{segment(str(env['id']))}/disconnect")
    except FleetError as exc:
        if exc.code == "NOT_FOUND":
            raise FleetError(API_ERROR, "this router has no /v1/tether routes (an older Tether?)") from None
        raise
    if out.format in ("json", "ndjson"):
        out.json({**(answer or {}), "id": env["id"], "deviceId": env.get("deviceId")})
    else:
        out.line(f"disconnected {env.get('connectionName')!r} ({env['id']}); it reconnects by itself")
    return OK


def _forget(router: Router, args: argparse.Namespace, out: Output, err: TextIO) -> int:
    env = _environment(router, args.target)
    what = f"{env.get('connectionName')!r} (deviceId {env.get('deviceId')}, id {env['id']})"
    if not args.yes:
        if not sys.stdin.isatty():
            raise FleetError(USAGE, f"not forgetting {what}: pass --yes (no terminal to ask)")
        err.write(f"Forget {what}? A connected device re-registers as a new row. [y/N] ")
        err.flush()
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            raise FleetError(USAGE, "not forgotten")
    router.delete(f"/v1/environments/{segment(str(env['id']))}")
    if out.format in ("json", "ndjson"):
        out.json({"forgotten": True, "id": env["id"], "deviceId": env.get("deviceId")})
    else:
        out.line(f"forgot {what}")
    return OK


def _watch(router: Router, args: argparse.Namespace, out: Output, err: TextIO) -> int:
    columns = views.ENV_WIDE_COLUMNS if out.format == "wide" else views.ENV_COLUMNS
    limit = args.limit or WATCH_LIMIT
    seen: dict[str, tuple[tuple[Any, ...], views.Row]] = {}
    widths: list[int] | None = None
    polled = False
    unreachable = False
    try:
        while True:
            try:
                rows, _ = _table_rows(router, args.online, args.user, args.search, limit)
            except FleetError as exc:
                if exc.exit_code != UNREACHABLE or not polled:
                    raise
                if not unreachable:  # one line per outage, then keep polling
                    print(f"tether: {exc.message}; still trying", file=err)
                    unreachable = True
                time.sleep(args.interval)
                continue
            polled, unreachable = True, False
            changed, gone = views.changes(seen, rows)
            now = now_ms()
            events = [*changed, *(("DELETED", row) for row in gone)]
            if out.format in ("json", "ndjson"):
                for kind, row in events:
                    out.json({"type": kind, "object": row})
            else:
                if widths is None:
                    widths = _widths(columns, [row for _, row in events], now)
                    out.line(_aligned([header for header, _ in columns], widths))
                for kind, row in events:
                    cells = views.cells(columns, row, now)
                    if kind == "DELETED":
                        cells[2] = "deleted"  # STATE
                    out.line(_aligned(cells, widths))
            out.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        out.flush()
        return OK


def _widths(columns: list[views.Column], rows: Sequence[views.Row], now: int) -> list[int]:
    """Column widths from the first poll, kept for the rest of the watch (lines stay aligned)."""
    widths = [len(header) for header, _ in columns]
    for row in rows:
        for i, cell in enumerate(views.cells(columns, row, now)):
            widths[i] = max(widths[i], len(cell))
    return widths


def _aligned(cells: list[str], widths: list[int]) -> str:
    return "   ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()


def _pods(router: Router, out: Output) -> int:
    try:
        answer: dict[str, Any] = router.get("/v1/tether/pods")
    except FleetError as exc:
        if exc.code == "NOT_FOUND":
            raise FleetError(API_ERROR, "this router has no /v1/tether routes (an older Tether?)") from None
        if exc.exit_code == BAD_KEY and exc.code == "FORBIDDEN":
            raise FleetError(
                BAD_KEY, f"{exc.message} (the cluster view needs an admin key)", exc.code
            ) from None
        raise
    pods: list[dict[str, Any]] = answer.get("pods") or []
    if out.format == "json":
        out.json(answer)
    elif out.format == "ndjson":
        for pod in pods:
            out.json(pod)
    else:
        out.table(views.POD_COLUMNS, pods, now_ms())
    return OK


_COMMANDS: dict[str, Callable[[Router, argparse.Namespace, Output, TextIO], int]] = {
    "list": _list,
    "get": _get,
    "send": _send,
    "disconnect": _disconnect,
    "forget": _forget,
    "watch": _watch,
}
