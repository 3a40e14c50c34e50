"""What the API talks to: the models it serves, the vector store (reads), and the job bus (image work)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from aiohttp import web

from idios.bus import JobBus, LocalBus
from idios.models import ModelSpec, discover
from idios.settings import Settings
from idios.store import CollectionStore
from idios.worker import JobHandler


@dataclass(frozen=True)
class Backend:
    settings: Settings
    specs: dict[str, ModelSpec]
    store: CollectionStore
    bus: JobBus


BACKEND = web.AppKey("backend", Backend)
REQUEST_ID = web.RequestKey("request_id", str)


@asynccontextmanager
async def embedded_backend(settings: Settings) -> AsyncIterator[Backend]:
    """API and worker in one process: Milvus Lite (or a server), the worker's actors and an in-process bus."""
    specs = discover(settings.models_dir)
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(CollectionStore(settings, specs))
        handler = await JobHandler.open(settings, specs, store, stack)
        yield Backend(settings, specs, store, LocalBus(handler, settings.max_in_flight, settings.job_timeout))
