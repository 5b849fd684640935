"""The router as the fleet command line reaches it: where it is, which key, and what its answers mean.

Every failure becomes a `FleetError` carrying the process exit code and one line for the terminal.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://127.0.0.1:8283"
# Where `make run` (tether serve's bootstrap key) leaves the development key, from the checkout's root.
DEV_KEY_FILE = Path(".tether") / "dev-key"
# One request waits at most this long for the router (a send waits for the device: TETHER_SEND_TIMEOUT
# is 10 s by default, so a little more).
REQUEST_TIMEOUT_SECONDS = 15.0

# Exit codes (README "Fleet command line").
OK = 0
API_ERROR = 1  # the router answered with an error not listed below (4xx/5xx), or a send not delivered
USAGE = 2  # bad arguments (argparse), or a confirmation refused
UNREACHABLE = 3  # no answer from the router (connection refused, DNS, timeout)
BAD_KEY = 4  # no key, or the router refused it (401) or its role may not (403)
NOT_FOUND = 5  # no such device, environment or connection in this organization


class FleetError(Exception):
    def __init__(self, exit_code: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message
        self.code = code  # the router's errorCode, when it answered


def resolve_url(given: str | None, environ: Mapping[str, str]) -> str:
    url = (given or environ.get("LETTA_BASE_URL") or DEFAULT_URL).strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise FleetError(USAGE, f"the router URL must start with http:// or https://, got {url!r}")
    return url


def resolve_key(environ: Mapping[str, str], cwd: Path) -> str:
    key = environ.get("LETTA_API_KEY", "").strip()
    if key:
        return key
    path = cwd / DEV_KEY_FILE
    try:
        key = path.read_text().strip()
    except OSError:
        key = ""
    if not key:
        raise FleetError(BAD_KEY, f"no API key: set LETTA_API_KEY, or run where {DEV_KEY_FILE} is")
    return key


def segment(value: str) -> str:
    """One path segment, percent-encoded (device ids may hold spaces and slashes)."""
    return quote(value, safe="")


class Router:
    """A running router's REST API with one key."""

    def __init__(self, url: str, key: str, transport: httpx.BaseTransport | None = None) -> None:
        self.url = url
        self._http = httpx.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {key}", "User-Agent": "tether-cli"},
            timeout=REQUEST_TIMEOUT_SECONDS,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def get(self, path: str, params: Mapping[str, str | int] | None = None) -> Any:
        return self._call("GET", path, params=params)

    def post(self, path: str, body: Any = None) -> Any:
        return self._call("POST", path, body=body)

    def delete(self, path: str) -> Any:
        return self._call("DELETE", path)

    def _call(
        self, method: str, path: str, params: Mapping[str, str | int] | None = None, body: Any = None
    ) -> Any:
        try:
            response = self._http.request(method, path, params=params, json=body)
        except httpx.TimeoutException:
            raise FleetError(UNREACHABLE, f"the router at {self.url} did not answer in time") from None
        except httpx.TransportError as exc:
            reason = str(exc) or type(exc).__name__
            raise FleetError(UNREACHABLE, f"cannot reach the router at {self.url}: {reason}") from None
        if response.status_code >= 400:
            raise _error(response)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise FleetError(API_ERROR, f"{method} {path}: the router answered something not JSON") from None


def _error(response: httpx.Response) -> FleetError:
    code, message = "HTTP_ERROR", response.reason_phrase
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        code = str(body.get("errorCode") or code)
        message = str(body.get("message") or message)
    status = response.status_code
    if status == 401:
        return FleetError(BAD_KEY, f"the router refused the API key ({code}): {message}", code)
    if status == 403:
        return FleetError(BAD_KEY, f"this key may not do that ({code}): {message}", code)
    if status == 404:
        return FleetError(NOT_FOUND, message, code)
    return FleetError(API_ERROR, f"{status} {code}: {message}", code)
