"""The pages for people: the search page at /, the API docs at /docs, and /openapi.json.

The pages are static files under idios/web/static and talk to the service only through its public API.
"""

from __future__ import annotations

from pathlib import Path

import orjson
from aiohttp import web

from idios import errors
from idios.api import openapi
from idios.models import discover
from idios.settings import Settings

STATIC = Path(__file__).resolve().parent.parent / "web" / "static"

# The search page shows thumbnails from wherever the stored urls point; everything else comes from this service.
PAGE_CSP = ("default-src 'self'; img-src http: https: data: blob:; connect-src 'self'; "
            "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
# Swagger UI sets style attributes from its scripts.
DOCS_CSP = ("default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
            "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def html_file(name: str, csp: str) -> web.FileResponse:
    return web.FileResponse(STATIC / name, headers={
        "Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-cache",
        "Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
    })


async def index(request: web.Request) -> web.FileResponse:
    return html_file("index.html", PAGE_CSP)


async def docs(request: web.Request) -> web.FileResponse:
    return html_file("docs.html", DOCS_CSP)


async def static_file(request: web.Request) -> web.FileResponse:
    """A file under STATIC; anything else (a missing file, a path that leaves the folder) is a JSON 404, which
    aiohttp's own static route does not give (its 404 is an empty application/octet-stream)."""
    name = request.match_info["path"]
    path = (STATIC / name).resolve()
    if not path.is_relative_to(STATIC) or not path.is_file():
        raise errors.NotFound(f"no such file: /static/{name}")
    return web.FileResponse(path, headers={"X-Content-Type-Options": "nosniff"})


def add_pages(app: web.Application, settings: Settings) -> None:
    """Register /, /docs, /openapi.json and /static/ on the API application."""
    document = orjson.dumps(openapi.build(settings, sorted(discover(settings.models_dir))))

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(body=document, content_type="application/json")

    app.router.add_get("/", index)
    app.router.add_get("/docs", docs)
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/static/{path:.+}", static_file)
