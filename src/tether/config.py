"""Settings, read once from ``TETHER_*`` environment variables.

Every bound the router enforces is a setting here, so that `tether --help` documents all of them.

Why not pydantic-settings (evaluated for issue 14; 2.x installs here, and pydantic is already loaded
by FastAPI, so import time is no argument): of this file's ~330 lines, the generic part that it would
replace (reading `TETHER_*`, picking a parser, the `--help` table) is `_parser`, `load_settings` and
`describe_settings`, about 40 lines. The rest would stay: 40 documented fields (a `Field(description=)`
each instead of `metadata={"doc": }`) and the validators for ports, URLs, GC thresholds and log levels,
whose messages name the variable and the expected form (`tether: invalid TETHER_PORT: expected a port
number from 0 to 65535, got '70000'`, asserted by tests/test_cli.py). With pydantic-settings those
become a `ValidationError` report to be caught and reworded, and `tether --help` would still need its
own table. A dependency for a net saving of a few dozen lines, with worse messages by default: no.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

MiB = 1024 * 1024


def _default_pod_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"expected a boolean, got {text!r}")


def _opt_str(text: str) -> str | None:
    return text.strip() or None


def parse_port(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"expected a port number from 0 to 65535, got {text!r}")
    return value


def parse_listen_sockets(text: str) -> int:
    value = _int(text)
    if value > 64:
        raise ValueError(f"expected 0 (as many as the backlog needs) to 64 sockets, got {text!r}")
    return value


def parse_gc_thresholds(text: str) -> tuple[int, int, int]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3:
        raise ValueError(f"expected three comma-separated integers (gen0,gen1,gen2), got {text!r}")
    gen0, gen1, gen2 = (_int(p) for p in parts)
    if gen0 == 0 or gen1 == 0 or gen2 == 0:
        raise ValueError(f"expected positive thresholds (0 would turn the collector off), got {text!r}")
    return gen0, gen1, gen2


def _int(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise ValueError(f"expected a non-negative integer, got {text!r}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise ValueError(f"expected a non-negative finite number, got {text!r}")
    return value


_LOG_LEVELS = ("debug", "info", "warning", "error")


def _log_level(text: str) -> str:
    value = text.strip().lower()
    if value not in _LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(_LOG_LEVELS)}, got {text!r}")
    return value


def _public_url(text: str) -> str | None:
    value = text.strip().rstrip("/")
    if not value:
        return None
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in ("http", "https", "ws", "wss") or not rest or rest.startswith("/"):
        raise ValueError(
            f"expected an absolute http(s):// URL such as https://tether.example.com, got {text!r}"
        )
    return value


def _database_url(text: str) -> str | None:
    """Accept the URLs people paste (postgres://, postgresql://, sqlite:///) and add the async driver."""
    value = text.strip()
    if not value:
        return None
    scheme, sep, rest = value.partition("://")
    if not sep:
        raise ValueError(f"expected a database URL such as postgresql://user@host:5432/db, got {text!r}")
    drivers = {
        "postgres": "postgresql+asyncpg",
        "postgresql": "postgresql+asyncpg",
        "postgresql+asyncpg": "postgresql+asyncpg",
        "sqlite": "sqlite+aiosqlite",
        "sqlite+aiosqlite": "sqlite+aiosqlite",
    }
    driver = drivers.get(scheme.lower())
    if driver is None:
        raise ValueError(f"expected a postgresql:// or sqlite:/// URL, got {text!r}")
    return f"{driver}://{rest}"


def parse_letta_url(text: str) -> str | None:
    value = text.strip().rstrip("/")
    if not value:
        return None
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest or rest.startswith("/"):
        raise ValueError(
            f"expected the Letta server's http(s):// URL such as http://127.0.0.1:8284, got {text!r}"
        )
    return value


def _auth_mode(text: str) -> str:
    value = text.strip().lower()
    if value not in ("tether", "upstream"):
        raise ValueError(f"expected tether or upstream, got {text!r}")
    return value


@dataclass(frozen=True)
class Settings:
    host: str = field(default="127.0.0.1", metadata={"doc": "Address to listen on."})
    port: int = field(default=8283, metadata={"doc": "Port to listen on.", "parse": parse_port})
    gc_thresholds: tuple[int, int, int] = field(
        default=(50_000, 20, 10),
        metadata={
            "doc": "Python's garbage-collector thresholds gen0,gen1,gen2 (Python's default: 700,10,10). "
            "A pod holds about 200 long-lived objects per device; with the default, heartbeat "
            "flushes and reconnect storms set off full collections that rescan them all (measured at "
            "8,000 devices: idle CPU 11.8% -> 6.6% of a core, storm router CPU 13.3 s -> 8.4 s).",
            "parse": parse_gc_thresholds,
        },
    )
    listen_backlog: int = field(
        default=16384,
        metadata={
            "doc": "Connections the kernel queues before the router accepts them. When every device "
            "reconnects at once (a network blip, a pod restart), connects beyond the queue are dropped "
            "and retried a second or more later. Linux caps it at net.core.somaxconn per listening "
            "socket; see LISTEN_SOCKETS, or raise somaxconn."
        },
    )
    listen_sockets: int = field(
        default=0,
        metadata={
            "doc": "Listening sockets on the port (SO_REUSEPORT), each with a queue of its own. 0: as "
            "many as LISTEN_BACKLOG needs at net.core.somaxconn per socket, at most 8 (16,384 at the "
            "default 4,096: 4 sockets); 1 on systems other than Linux. A second router on a taken "
            "port is still refused.",
            "parse": parse_listen_sockets,
        },
    )
    data_dir: str = field(
        default=".tether",
        metadata={"doc": "Directory for the embedded SQLite database and the development key file."},
    )
    database_url: str | None = field(
        default=None,
        metadata={
            "doc": "SQLAlchemy async URL. Default: sqlite+aiosqlite:///<data_dir>/tether.db. "
            "PostgreSQL: postgresql+asyncpg://user@host:5432/db (postgresql:// is accepted too).",
            "parse": _database_url,
        },
    )
    redis_url: str | None = field(
        default=None,
        metadata={
            "doc": "redis://host:6379/0 switches routing and liveness from in-process to Redis (many pods).",
            "parse": _opt_str,
        },
    )
    public_url: str | None = field(
        default=None,
        metadata={
            "doc": "External base URL (http[s]://host[:port][/prefix]) used to build device wsUrl "
            "(http becomes ws, https becomes wss). Default: derived from each register request.",
            "parse": _public_url,
        },
    )
    pod_id: str = field(
        default_factory=_default_pod_id,
        metadata={"doc": "Name of this pod, shown as podId on rows. Default: <hostname>-<pid>."},
    )
    log_level: str = field(
        default="info", metadata={"doc": "debug, info, warning or error.", "parse": _log_level}
    )
    bootstrap_key: bool = field(
        default=True,
        metadata={
            "doc": "On start with no API key in the database, create a development key, print it once "
            "and write it to <data_dir>/dev-key (mode 0600).",
            "parse": _bool,
        },
    )
    max_frame_bytes: int = field(
        default=20 * MiB,
        metadata={"doc": "Largest WebSocket message accepted on any socket (devices send up to 16 MiB)."},
    )
    max_body_bytes: int = field(
        default=4 * MiB, metadata={"doc": "Largest REST request body; larger bodies get 413."}
    )
    offline_after_seconds: float = field(
        default=120.0,
        metadata={"doc": "A device with no ping for this long is offline (the clients' own rule is 120 s)."},
    )
    ready_timeout_seconds: float = field(
        default=35.0,
        metadata={
            "doc": "A control socket whose stream socket has not completed the pair this long after it "
            "opened is closed (4006) and the device reads away, then offline. Devices give up on a "
            "pair themselves after 30 s (LISTENER_STREAM_OPEN_TIMEOUT_MS)."
        },
    )
    reconnect_grace_seconds: float = field(
        default=10.0,
        metadata={
            "doc": "How long relay sockets stay open after a device socket drops, waiting for it to "
            "reconnect with the same lease."
        },
    )
    lease_ttl_seconds: float = field(
        default=900.0,
        metadata={
            "doc": "A lease with no device socket for this long expires; a reconnect then gets close "
            "code 1008 and the device re-registers. Devices re-register by themselves after 5 min."
        },
    )
    heartbeat_flush_seconds: float = field(
        default=15.0,
        metadata={"doc": "Interval at which in-memory heartbeats are written to the database."},
    )
    pod_ttl_seconds: float = field(
        default=15.0,
        metadata={"doc": "Cluster mode: a pod that has not refreshed its liveness for this long is dead."},
    )
    dedupe_seconds: float = field(
        default=120.0,
        metadata={"doc": "Window in which a repeated client_message_id to one connection is not re-sent."},
    )
    client_queue_frames: int = field(
        default=4096,
        metadata={"doc": "Outbound frames queued per relay socket before the slow client is closed (4008)."},
    )
    client_queue_bytes: int = field(
        default=32 * MiB,
        metadata={"doc": "Outbound bytes queued per relay socket before the slow client is closed (4008)."},
    )
    device_queue_frames: int = field(
        default=4096,
        metadata={"doc": "Writes waiting on one device socket before further commands to it are refused."},
    )
    history_frames: int = field(
        default=1000,
        metadata={"doc": "Frames each relay socket keeps for resume (?resume=&resumeFrom=)."},
    )
    history_bytes: int = field(default=2 * MiB, metadata={"doc": "Bytes each relay socket keeps for resume."})
    history_seconds: float = field(
        default=120.0,
        metadata={"doc": "How long a closed relay socket's history stays resumable."},
    )
    history_flush_ms: float = field(
        default=20.0,
        metadata={
            "doc": "Cluster: relay history is written to Redis this often, in one pipeline (what a pod"
            " killed between two writes loses, a resume elsewhere fills in from the event log)."
        },
    )
    history_buffer_frames: int = field(
        default=100_000,
        metadata={
            "doc": "Cluster: relay frames waiting for their Redis write, per pod; beyond, oldest dropped."
        },
    )
    reorder_wait_ms: float = field(
        default=50.0,
        metadata={
            "doc": "How long a device frame that arrived ahead of a lower event_seq (split sockets "
            "interleave) is held before it is released anyway."
        },
    )
    send_timeout_seconds: float = field(
        default=10.0,
        metadata={"doc": "Longest wait for a frame to be written to a device (REST send, cross-pod)."},
    )
    rate_limit_per_second: float = field(
        default=200.0,
        metadata={"doc": "Commands per second one relay socket may send (burst of twice that)."},
    )
    shutdown_drain_seconds: float = field(
        default=10.0,
        metadata={"doc": "On SIGTERM, device sockets are closed spread over this window with jitter."},
    )
    split_channels: bool = field(
        default=True,
        metadata={
            "doc": "Advertise split control/stream device sockets with paired generations.",
            "parse": _bool,
        },
    )
    auth_cache_seconds: float = field(
        default=10.0,
        metadata={"doc": "How long a verified API key is cached; a revoked key stops working within this."},
    )
    letta_url: str | None = field(
        default=None,
        metadata={
            "doc": "Gateway mode: the upstream Letta server (e.g. http://127.0.0.1:8284). Tether keeps "
            "its own routes (/v1/environments, /v1/tether, /ui, /metrics, health) and forwards every "
            "other request there, so devices and SDKs need one LETTA_BASE_URL.",
            "parse": parse_letta_url,
        },
    )
    letta_api_key: str | None = field(
        default=None,
        metadata={
            "doc": "Gateway mode with Tether keys: the credential sent to the Letta server (its "
            "LETTA_SERVER_PASSWORD, if it has one). Clients never see it.",
            "parse": _opt_str,
        },
    )
    auth: str = field(
        default="tether",
        metadata={
            "doc": "Who issues API keys. tether: Tether's own keys (tether keys create) on every route. "
            "upstream (gateway mode only): exactly the bearer credentials the Letta server accepts, "
            "each an organization of its own.",
            "parse": _auth_mode,
        },
    )
    letta_connect_timeout_seconds: float = field(
        default=5.0,
        metadata={
            "doc": "Gateway mode: longest wait to connect to the Letta server, or for a free pooled "
            "connection (then 502 or 503, both retryable)."
        },
    )
    letta_read_timeout_seconds: float = field(
        default=300.0,
        metadata={
            "doc": "Gateway mode: longest silence from the Letta server within one response (agent "
            "turns wait on the model; its event streams ping every 20 s) before the client gets 504."
        },
    )
    letta_max_connections: int = field(
        default=256,
        metadata={
            "doc": "Gateway mode: connections kept to the Letta server (requests beyond wait for one)."
        },
    )
    letta_max_body_bytes: int = field(
        default=256 * MiB,
        metadata={
            "doc": "Gateway mode: largest request body forwarded (file uploads, agent imports); streamed, "
            "never held whole. Larger gets 413."
        },
    )

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{os.path.abspath(os.path.join(self.data_dir, 'tether.db'))}"

    @property
    def env_vars(self) -> dict[str, str]:
        return {f.name: f"TETHER_{f.name.upper()}" for f in fields(self)}

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **changes)


def _parser(f: Any) -> Callable[[str], Any]:
    parse = f.metadata.get("parse")
    if parse is not None:
        return parse  # type: ignore[no-any-return]
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    if kind == "int":
        return _int
    if kind == "float":
        return _float
    return str


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build settings from the environment; a malformed value is a clear error naming the variable."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(Settings):
        name = f"TETHER_{f.name.upper()}"
        if name in env:
            try:
                values[f.name] = _parser(f)(env[name])
            except ValueError as exc:
                raise SystemExit(f"tether: invalid {name}: {exc}") from None
    settings = Settings(**values)
    if settings.auth == "upstream" and settings.letta_url is None:
        raise SystemExit(
            "tether: TETHER_AUTH=upstream needs TETHER_LETTA_URL (the Letta server that checks the keys)"
        )
    return settings


def describe_settings() -> str:
    """The environment-variable table printed by ``tether --help``."""
    lines = ["environment variables:"]
    defaults = Settings(pod_id="<hostname>-<pid>")
    for f in fields(Settings):
        default = getattr(defaults, f.name)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else repr(default)
        lines.append(f"  TETHER_{f.name.upper()}  (default: {shown})")
        lines.append(f"      {f.metadata.get('doc', '')}")
    return "\n".join(lines)


def redact_url(url: str) -> str:
    """`url` without its password, for messages and logs."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else url
    return url
