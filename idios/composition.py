"""The composition root of `serve` and `api`: what each one opens, in which order, closed in reverse. (The
worker's is idios/workerproc.py, which imports nothing of the API.)"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from idios.amqp import AmqpBus
from idios.api.backend import Backend
from idios.bus import JobBus, LocalBus
from idios.consumer import JobConsumer
from idios.dedup import KIND, find_duplicates
from idios.embed import load_text_runtimes
from idios.jobs import JobRoom
from idios.metrics import Metrics
from idios.models import discover
from idios.settings import Settings, require_distributed
from idios.store import CollectionStore
from idios.worker import JobHandler
from idios.writer import Writer


def job_room(settings: Settings, store: CollectionStore) -> JobRoom:
    """The long jobs this process runs (and adopts from processes that stopped): duplicates, for the models it
    serves. They only read Milvus, so they run in the API process of either deployment."""
    duplicates = functools.partial(find_duplicates, memory_bytes=settings.dedup_memory_mb << 20)
    return JobRoom(store, store.served(), {KIND: duplicates})


@asynccontextmanager
async def embedded_backend(settings: Settings, metrics: Metrics) -> AsyncIterator[Backend]:
    """API and worker in one process. Without IDIOS_AMQP_URL the bus is in-process; with it, jobs go through
    RabbitMQ, so workers on other machines can share the load with this one."""
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(CollectionStore(settings, discover(settings.models_dir)))
        specs = store.served()  # a refused model (idios/identity.py) gets no runtime, text tower or batcher
        texts = await load_text_runtimes(specs, settings, stack, metrics)
        writer = Writer(settings, store)  # one per process: the API's writes and the worker's share its claims
        # jobs for a refused model from other API processes (IDIOS_AMQP_URL) answer model_refused
        handler = await JobHandler.open(settings, specs, writer, stack, metrics, store.refused)
        bus: JobBus
        if settings.amqp_url:
            await stack.enter_async_context(JobConsumer(settings, handler))
            bus = await stack.enter_async_context(AmqpBus(settings))
        else:
            bus = LocalBus(handler, settings.max_in_flight, settings.job_timeout)
        visual = {name: runtime.visual for name, runtime in handler.runtimes.items()}
        jobs = await stack.enter_async_context(job_room(settings, store))
        backend = Backend(settings, specs, store, writer, bus, metrics, texts, jobs, visual=visual)
        stack.push_async_callback(backend.restore_bodies.aclose)
        yield backend


@asynccontextmanager
async def distributed_backend(settings: Settings, metrics: Metrics) -> AsyncIterator[Backend]:
    """The stateless API of the distributed deployment: the text towers (no visual tower), Milvus for reads,
    RabbitMQ for image work."""
    require_distributed(settings)
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(CollectionStore(settings, discover(settings.models_dir)))
        specs = store.served()
        texts = await load_text_runtimes(specs, settings, stack, metrics)
        bus = await stack.enter_async_context(AmqpBus(settings))
        jobs = await stack.enter_async_context(job_room(settings, store))
        backend = Backend(settings, specs, store, Writer(settings, store), bus, metrics, texts, jobs)
        stack.push_async_callback(backend.restore_bodies.aclose)
        yield backend
