"""The web console at `/ui`: its page and assets, with the headers that keep it from being framed or fed
foreign scripts. Everything it shows comes from the REST API with the signed-in key (tether.console)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from tether.api.errors import ApiError
from tether.console import Asset, bundle

router = APIRouter(prefix="/ui", include_in_schema=False)

# Only this origin's own files run, nothing is inline (no inline script or style can be injected into
# use), and no other site may frame the console (clickjacking of its actions).
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
# The page is revalidated on every load (a 304 when unchanged), so a new release is picked up at once;
# an asset under the current build id never changes, so it is cached for good.
PAGE_CACHE = "no-cache"
ASSET_CACHE = "public, max-age=31536000, immutable"


def _answer(request: Request, asset: Asset, cache_control: str) -> Response:
    headers = {**SECURITY_HEADERS, "Cache-Control": cache_control, "ETag": asset.etag}
    if asset.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    body = b"" if request.method == "HEAD" else asset.body
    headers["Content-Length"] = str(len(asset.body))
    return Response(body, media_type=asset.content_type, headers=headers)


@router.api_route("", methods=["GET", "HEAD"])
@router.api_route("/", methods=["GET", "HEAD"])
async def page(request: Request) -> Response:
    """The console's single page; the views are routed in the browser (`#/envs`, `#/env/<id>`, ...)."""
    return _answer(request, bundle().index, PAGE_CACHE)


@router.api_route("/assets/{build}/{name}", methods=["GET", "HEAD"])
async def asset(request: Request, build: str, name: str) -> Response:
    current = bundle()
    found = current.assets.get(name)
    if found is None:
        raise ApiError(404, "NOT_FOUND", f"no console asset {name!r}")
    # A page from an older release (or from another pod mid-upgrade) still gets the file, uncached.
    return _answer(request, found, ASSET_CACHE if build == current.build else PAGE_CACHE)
