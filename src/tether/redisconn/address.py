"""Where Redis is: one URL parsed once, so redis-py and the lean connection (`resp`) reach the same
server the same way (host or socket, credentials, database, TLS settings) and log it the same way."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from redis.asyncio.connection import SSLConnection, parse_url

# Query parameters redis-py reads as secrets (`?password=` for unix sockets, `?ssl_password=` for a key).
_SECRET_PARAMETERS = frozenset({"password", "ssl_password"})
_HIDDEN = "***"


@dataclass(frozen=True)
class RedisAddress:
    url: str
    shown: str  # the URL with every password replaced by ***: for logs and messages
    host: str
    port: int
    path: str | None  # a unix socket, instead of host and port
    username: str | None
    password: str | None
    db: int
    tls: ssl.SSLContext | None

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        # redis-py's own parser: whatever it accepts, the lean connection reads alike.
        options: dict[str, Any] = dict(parse_url(url))
        return cls(
            url=url,
            shown=without_password(url),
            host=options.get("host", "localhost"),
            port=options.get("port", 6379),
            path=options.get("path"),
            username=options.get("username"),
            password=options.get("password"),
            db=options.get("db", 0),
            tls=_tls_context(options),
        )


def _tls_context(options: dict[str, Any]) -> ssl.SSLContext | None:
    """The TLS context redis-py's own connection builds from the URL's `ssl_*` options (its defaults
    included: certificate required, host name checked), so both clients trust the same servers."""
    if options.get("connection_class") is not SSLConnection:
        return None
    tls_options = {name: value for name, value in options.items() if name.startswith("ssl_")}
    try:
        # Built now, not at the first connect: a wrong path or option stops the pod at start-up
        # instead of making it wait for a Redis it can never reach.
        context: ssl.SSLContext = SSLConnection(**tls_options).ssl_context.get()
    except (OSError, TypeError, ValueError) as exc:
        raise ValueError(f"the TLS options of the Redis URL are not usable: {exc}") from exc
    return context


def without_password(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:{_HIDDEN}@{netloc.rpartition('@')[2]}"
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(name in _SECRET_PARAMETERS for name, _ in pairs):
        hidden = [(name, _HIDDEN if name in _SECRET_PARAMETERS else value) for name, value in pairs]
        query = urlencode(hidden, safe="*")
    # Not `urlunsplit`: it drops the `//` of `unix:///path` (an empty host), which redis-py requires.
    shown = f"{parts.scheme}://{netloc}{parts.path}"
    shown += f"?{query}" if query else ""
    return shown + (f"#{parts.fragment}" if parts.fragment else "")
