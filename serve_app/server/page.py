"""The web page (SPEC §12): ``GET /`` and its files under ``/ui/``, from ``serve_app/web``.

It is static: every job, hive and model it shows comes through the API, with the token the
user gives it, so the page itself needs no token.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

WEB = Path(__file__).resolve().parent.parent / "web"

# The page runs only its own files and talks only to its own server; what a job holds (a
# model's output, a hub's file name) is shown as text and can never run as script.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def index(request: Request) -> Response:
    return FileResponse(WEB / "index.html", headers=HEADERS)


async def service_worker(request: Request) -> Response:
    """Served from the root: a service worker looks after the paths under its own."""
    return FileResponse(WEB / "sw.js", headers=HEADERS)


class _Files(StaticFiles):
    """The page's files, with the page's headers (always checked for changes: the page and
    the server it talks to must be of one version)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


def page_routes() -> list[BaseRoute]:
    return [
        Route("/", index, methods=["GET", "HEAD"]),
        Route("/sw.js", service_worker, methods=["GET", "HEAD"]),
        Mount("/ui", app=_Files(directory=WEB), name="ui"),
    ]
