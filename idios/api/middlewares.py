"""The middlewares, one job each, outermost first: request id, requests in flight, metrics and access log,
errors as JSON. (API keys, when set, come last: api/auth.py.)"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from idios import errors
from idios.api.backend import REQUEST_ID
from idios.metrics import Metrics

log = logging.getLogger("idios.api")

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


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The caller's X-Request-ID (or a new one) follows the request into logs and jobs, and comes back."""
    rid = request.headers.get("X-Request-ID", "")[:64] or uuid.uuid4().hex
    request[REQUEST_ID] = rid
    response = await handler(request)
    response.headers["X-Request-ID"] = rid
    return response


@web.middleware
async def in_flight_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts the requests being answered (app.serve_http waits for them when stopping)."""
    in_flight = request.app[IN_FLIGHT]
    in_flight.enter()
    try:
        response = await handler(request)
    finally:
        in_flight.leave()
    if in_flight.stopping:
        response.force_close()
    return response


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Prometheus counters and latency per route, and one access-log line per request."""
    start = time.perf_counter()
    response = await handler(request)
    elapsed = time.perf_counter() - start
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    metrics = request.app[METRICS]
    metrics.requests.labels(route, request.method, str(response.status)).inc()
    metrics.request_seconds.labels(route).observe(elapsed)
    log.info("%s %s %d %.1f ms", request.method, request.path, response.status, 1000 * elapsed,
             extra={"request_id": request.get(REQUEST_ID)})
    return response


def error_response(status: int, body: object) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes a JSON answer with a status and a machine-readable type; no tracebacks leak."""
    try:
        return await handler(request)
    except errors.IdiosError as exc:
        return error_response(exc.status, exc.to_body())
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(413, {"detail": exc.text or "Request body too large", "type": "payload_too_large"})
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        response = error_response(exc.status, {"detail": exc.reason, "type": kind})
        if isinstance(exc, web.HTTPMethodNotAllowed):  # RFC 9110: a 405 lists what the resource takes
            response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        return response
    except Exception:
        rid = request.get(REQUEST_ID)
        log.exception("request %s %s failed (request id %s)", request.method, request.path, rid)
        return error_response(500, {"detail": "Internal server error", "type": "internal_error", "request_id": rid})


MIDDLEWARES: list[Middleware] = [request_id_middleware, in_flight_middleware, access_middleware, error_middleware]
