"""The aiohttp application: middlewares that turn errors into JSON, and the backend's lifecycle."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager

import orjson
from aiohttp import web

from idios import errors
from idios.api.auth import ApiKeys, auth_middleware
from idios.api.backend import BACKEND, REQUEST_ID, Backend
from idios.api.pages import add_pages
from idios.api.routes import routes
from idios.metrics import CONTENT_TYPE, Metrics
from idios.settings import Settings

log = logging.getLogger("idios.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BackendFactory = Callable[[Settings, Metrics], AbstractAsyncContextManager[Backend]]
METRICS = web.AppKey("metrics", Metrics)


class InFlight:
    """The requests being answered, so that a stopping server can wait for them before it closes anything."""

    def __init__(self) -> None:
        self.count = 0
        self.stopping = False  # answers then say Connection: close, so clients take their next request elsewhere
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def idle(self) -> None:
        await self._idle.wait()


IN_FLIGHT = web.AppKey("in_flight", InFlight)


def _error(status: int, body: object) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes a JSON answer with a status and a machine-readable type; no tracebacks leak."""
    rid = request.headers.get("X-Request-ID", "")[:64] or uuid.uuid4().hex
    request[REQUEST_ID] = rid
    start = time.perf_counter()
    in_flight = request.app[IN_FLIGHT]
    in_flight.enter()
    try:
        response = await handler(request)
    except errors.IdiosError as exc:
        response = _error(exc.status, exc.to_body())
    except web.HTTPRequestEntityTooLarge as exc:
        response = _error(413, {"detail": exc.text or "Request body too large", "type": "payload_too_large"})
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        response = _error(exc.status, {"detail": exc.reason, "type": kind})
    except Exception:
        log.exception("request %s %s failed (request id %s)", request.method, request.path, rid)
        response = _error(500, {"detail": "Internal server error", "type": "internal_error", "request_id": rid})
    finally:
        in_flight.leave()
    if in_flight.stopping:
        response.force_close()
    response.headers["X-Request-ID"] = rid
    elapsed = time.perf_counter() - start
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    metrics = request.app[METRICS]
    metrics.requests.labels(route, request.method, str(response.status)).inc()
    metrics.request_seconds.labels(route).observe(elapsed)
    log.info("%s %s %d %.1f ms", request.method, request.path, response.status, 1000 * elapsed,
             extra={"request_id": rid})
    return response


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
    middlewares: list[Callable[..., Awaitable[web.StreamResponse]]] = [error_middleware]
    keys = ApiKeys.from_settings(settings)
    if keys is not None:
        middlewares.append(auth_middleware(keys))
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_request_bytes)
    metrics = Metrics()
    app[METRICS] = metrics
    app[IN_FLIGHT] = InFlight()

    async def backend_ctx(app: web.Application) -> AsyncIterator[None]:
        async with backend_factory(settings, metrics) as backend:
            app[BACKEND] = backend
            yield

    app.cleanup_ctx.append(backend_ctx)
    app.add_routes(routes)
    app.router.add_get("/metrics", metrics_view)
    add_pages(app, settings)
    return app


async def serve_http(app: web.Application, settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT, then stop listening, let the requests being answered finish (their request
    bodies included) within drain_timeout, and only then close the backend.

    aiohttp's own shutdown (web.run_app) closes every connection first and drops what arrives on it afterwards,
    so a request whose body was still uploading never completed: measured, a 10,000-row restore sent just before
    SIGTERM held `serve` for its whole 60 s shutdown timeout and was then cut off unanswered."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=settings.drain_timeout)
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
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped")
