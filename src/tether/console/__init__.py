"""The web console's files (HTML, CSS, JavaScript modules), read once from the package and kept in memory.

No build step: the files under `static/` are what the browser runs. Their combined digest is the build id
that asset URLs carry (`/ui/assets/<build>/app.js`), so a browser may cache an asset for good and a new
release is fetched afresh: the modules import each other by relative path and so share that prefix.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

INDEX = "index.html"
# index.html names its assets under this token; the build id replaces it when the bundle is loaded.
BUILD_TOKEN = "%BUILD%"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


@dataclass(frozen=True, slots=True)
class Bundle:
    build: str
    index: Asset
    assets: dict[str, Asset]  # file name -> asset; the only names served (no path is ever joined)


def _asset(body: bytes, content_type: str) -> Asset:
    return Asset(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:20] + '"')


def make_bundle(files: dict[str, bytes]) -> Bundle:
    """The bundle of `files` (name -> contents), which must hold index.html; other types are refused."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name] + b"\0")
    build = digest.hexdigest()[:16]
    assets: dict[str, Asset] = {}
    for name, body in files.items():
        if name == INDEX:
            continue
        suffix = name[name.rfind(".") :] if "." in name else ""
        if suffix not in _TYPES:
            raise ValueError(f"console asset of unknown type: {name}")
        assets[name] = _asset(body, _TYPES[suffix])
    index = files[INDEX].replace(BUILD_TOKEN.encode(), build.encode())
    return Bundle(build, _asset(index, _TYPES[".html"]), assets)


@cache
def bundle() -> Bundle:
    """The installed console (read from the package once; about 60 KiB)."""
    root = resources.files(__name__).joinpath("static")
    files = {entry.name: entry.read_bytes() for entry in root.iterdir() if entry.is_file()}
    return make_bundle(files)
