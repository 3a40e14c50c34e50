"""The aiohttp application: its middlewares and routes, the backend's lifecycle, and serving until stopped."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

from aiohttp import web

from idios.api.auth import ApiKeys, auth_middleware
from idios.api.backend import BACKEND, Backend
from idios.api.middlewares import IN_FLIGHT, METRICS, MIDDLEWARES, InFlight
from idios.api.pages import add_pages
from idios.api.editroutes import routes as edit_routes
from idios.api.jobroutes import routes as job_routes
from idios.api.routes import routes
from idios.api.searchroutes import routes as search_routes
from idios.lifecycle import stop_signal
from idios.metrics import CONTENT_TYPE, Metrics
from idios.settings import Settings

log = logging.getLogger("idios.api")

REQUEST_LINE_MAX = 32768
BackendFactory = Callable[[Settings, Metrics], AbstractAsyncContextManager[Backend]]


async def metrics_view(request: web.Request) -> web.Response:
    """Prometheus text format; the broker's queue depth is read at scrape time where there is one."""
    metrics = request.app[METRICS]
    depth = getattr(request.app[BACKEND].bus, "queue_depth", None)
    if depth is not None:
        try:
            value = await depth()
            if value is not None:
                metrics.queue_depth.set(value)
        except Exception as exc:  # a scrape must not fail because the broker blinked
            log.warning("queue depth unavailable: %s", exc)
    return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})


def create_app(settings: Settings, backend_factory: BackendFactory) -> web.Application:
    """The API application; `backend_factory` opens what it talks to (embedded or distributed)."""
    middlewares = list(MIDDLEWARES)
    keys = ApiKeys.from_settings(settings)
    if keys is not None:
        middlewares.append(auth_middleware(keys))
    # request lines up to 32 KiB (aiohttp's default 8 KiB cut off GET /dump with a long non-ASCII cursor)
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_request_bytes,
                          handler_args={"max_line_size": REQUEST_LINE_MAX})
    metrics = Metrics()
    app[METRICS] = metrics
    app[IN_FLIGHT] = InFlight()

    async def backend_ctx(app: web.Application) -> AsyncIterator[None]:
        async with backend_factory(settings, metrics) as backend:
            app[BACKEND] = backend
            yield

    app.cleanup_ctx.append(backend_ctx)
    app.add_routes(routes)
    app.add_routes(job_routes)
    app.add_routes(edit_routes)
    app.add_routes(search_routes)
    app.router.add_get("/metrics", metrics_view)
    add_pages(app, settings)
    return app


async def serve_http(app: web.Application, settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT, then stop listening, let the requests being answered finish (their request
    bodies included) within drain_timeout, and only then close the backend.

    aiohttp's own shutdown (web.run_app) closes every connection first and drops what arrives on it afterwards,
    so a request whose body was still uploading never completed: measured, a 10,000-row restore sent just before
    SIGTERM held `serve` for its whole 60 s shutdown timeout and was then cut off unanswered."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=settings.drain_timeout)
    async with stop_signal() as stop:
        await runner.setup()
        try:
            site = web.TCPSite(runner, settings.host, settings.port)
            await site.start()
            log.info("listening on http://%s:%d", settings.host, settings.port)
            await stop.wait()
            app[IN_FLIGHT].stopping = True
            await site.stop()  # no new connections; requests on open ones are still read and answered
            held = app[IN_FLIGHT].count
            log.info("stopping: finishing %d request(s) in flight, at most %.0f s", held, settings.drain_timeout)
            try:
                await asyncio.wait_for(app[IN_FLIGHT].idle(), settings.drain_timeout)
            except asyncio.TimeoutError:
                log.warning("stopping: %d request(s) still running after %.0f s are cut off",
                            app[IN_FLIGHT].count, settings.drain_timeout)
        finally:
            await runner.cleanup()
    log.info("stopped")
