"""`python -m idios worker`: the worker process of the distributed deployment, with a health endpoint."""

from __future__ import annotations

import asyncio
import errno
import logging
from contextlib import AsyncExitStack

import orjson
from aiohttp import web

from idios.consumer import JobConsumer
from idios.metrics import CONTENT_TYPE, Metrics
from idios.models import discover
from idios.lifecycle import stop_signal
from idios.settings import Settings, require_distributed
from idios.store import CollectionStore
from idios.worker import JobHandler
from idios.writer import Writer

log = logging.getLogger(__name__)
HEALTH_PORTS = 64  # the most workers of one host with health endpoints


def health_app(consumer: JobConsumer, handler: JobHandler, store: CollectionStore) -> web.Application:
    """GET /health (200 when the broker connection is up and Milvus answers, else 503) and GET /metrics."""

    async def health(request: web.Request) -> web.Response:
        milvus = True
        try:
            await asyncio.wait_for(store.client.list_collections(), 5)
        except Exception:
            milvus = False
        body = {"status": "ok" if consumer.connected and milvus else "degraded", "broker": consumer.connected,
                "milvus": milvus, "handled": consumer.handled, "holding": consumer.holding,
                "embed": {name: {"batches": rt.images.batches, "images": rt.images.items,
                                 "engine": rt.visual.engine, "precision": rt.visual.precision}
                          for name, rt in handler.runtimes.items()}}
        return web.Response(body=orjson.dumps(body), status=200 if body["status"] == "ok" else 503,
                            content_type="application/json")

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=handler.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


async def listen(runner: web.AppRunner, host: str, first: int) -> int:
    """Serve on the first free port from `first` up: the workers of one host take 4214, 4215, ... in the
    order they start, each logging its own (`worker ready: ... health URL`)."""
    for port in range(first, first + HEALTH_PORTS):
        try:
            await web.TCPSite(runner, host, port).start()
            return port
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
    raise SystemExit(f"no free health port in {first}-{first + HEALTH_PORTS - 1} (IDIOS_HEALTH_PORT; 0 = off)")


async def run_worker(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then stop consuming, drain within drain_timeout and exit."""
    require_distributed(settings)
    async with stop_signal() as stop, AsyncExitStack() as stack:
        store = await stack.enter_async_context(CollectionStore(settings, discover(settings.models_dir)))
        specs = store.served()  # a refused model (idios/identity.py) is not loaded: its jobs answer model_refused
        handler = await JobHandler.open(settings, specs, Writer(settings, store), stack, Metrics(), store.refused)
        consumer = await stack.enter_async_context(JobConsumer(settings, handler))
        health = "off"
        if settings.health_port:
            runner = web.AppRunner(health_app(consumer, handler, store), access_log=None)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            health = f"http://{settings.host}:{await listen(runner, settings.host, settings.health_port)}/health"
        log.info("worker ready: models %s; health %s", ", ".join(specs) or "(none)", health)
        await stop.wait()
        log.info("stopping: no new jobs, draining")
    log.info("worker stopped")
