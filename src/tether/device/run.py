"""`tether device`: run one or more reference devices against a router until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import uuid
from typing import Any

from tether.device.client import Device

DEFAULT_BASE_URL = "http://127.0.0.1:8283"
# Names map to stable device IDs, so restarting `tether device --name x` reclaims the same environment row,
# as the real CLI does with the deviceId it keeps in ~/.letta/settings.json.
DEVICE_ID_NAMESPACE = uuid.UUID("5b0f6f1e-1b7e-4d59-9a37-3e6f1c1d7a11")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, help="connectionName; with --count N, NAME-1 … NAME-N")
    parser.add_argument(
        "--base-url",
        default=None,
        help=f"router base URL (default: $LETTA_BASE_URL, else {DEFAULT_BASE_URL})",
    )
    parser.add_argument("--api-key", default=None, help="API key (default: $LETTA_API_KEY)")
    parser.add_argument("--device-id", default=None, help="deviceId (default: derived from the name)")
    parser.add_argument("--count", type=int, default=1, help="number of devices to run (default 1)")
    parser.add_argument(
        "--heartbeat", type=float, default=30.0, help="seconds between pings (default 30, as the CLI)"
    )
    parser.add_argument(
        "--turn-delay", type=float, default=0.05, help="seconds between streamed chunks of a turn"
    )
    parser.add_argument("--debug", action="store_true", help="log every frame, like `letta server --debug`")


def _device_id(args: argparse.Namespace, name: str, index: int) -> str:
    if args.device_id:
        return args.device_id if args.count == 1 else f"{args.device_id}-{index}"
    return str(uuid.uuid5(DEVICE_ID_NAMESPACE, name))


async def run(args: argparse.Namespace) -> int:
    base_url = args.base_url or os.environ.get("LETTA_BASE_URL") or DEFAULT_BASE_URL
    api_key = args.api_key or os.environ.get("LETTA_API_KEY")
    if not api_key:
        print("error: an API key is required (--api-key or $LETTA_API_KEY)")
        return 2
    if args.count < 1:
        print("error: --count must be at least 1")
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("tether.device").setLevel(logging.DEBUG if args.debug else logging.INFO)

    names = [args.name] if args.count == 1 else [f"{args.name}-{i}" for i in range(1, args.count + 1)]
    devices = [
        Device(
            base_url,
            api_key,
            name,
            device_id=_device_id(args, name, index),
            heartbeat_interval=args.heartbeat,
            turn_delay=args.turn_delay,
            # A thousand devices' worth of frame logs would only cost memory here.
            record=False,
        )
        for index, name in enumerate(names, start=1)
    ]
    for device in devices:
        await device.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    tasks = [device.task for device in devices if device.task is not None]
    stopper = asyncio.create_task(stop.wait())
    try:
        # Run until interrupted, or until every device has ended on its own (replaced, refused, …).
        remaining: set[asyncio.Future[Any]] = set(tasks)
        while remaining and not stopper.done():
            done, _ = await asyncio.wait(remaining | {stopper}, return_when=asyncio.FIRST_COMPLETED)
            remaining -= done
    finally:
        stopper.cancel()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signum)
        await asyncio.gather(*(device.stop() for device in devices))
    codes = [task.result() for task in tasks if task.done() and not task.cancelled()]
    return max(codes, default=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tether device", description=__doc__)
    add_arguments(parser)
    return asyncio.run(run(parser.parse_args(argv)))
