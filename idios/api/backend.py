"""What the API talks to: the models it serves, the vector store (reads), the job bus (image work) and the text
towers, which the API runs itself."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import web

from idios.amqp import AmqpBus
from idios.api.restore_body import RestoreParser
from idios.bus import JobBus, LocalBus
from idios.consumer import JobConsumer
from idios.embed import TextRuntime, load_text_runtimes
from idios.engines import Tower
from idios.metrics import Metrics
from idios.models import ModelSpec, discover
from idios.settings import Settings
from idios.store import CollectionStore, KeyClaims
from idios.worker import JobHandler


@dataclass(frozen=True)
class Backend:
    settings: Settings
    specs: dict[str, ModelSpec]
    store: CollectionStore
    bus: JobBus
    metrics: Metrics
    texts: dict[str, TextRuntime]
    # the urls this API is writing, per model: see routes.run_job
    writing: dict[str, KeyClaims] = field(default_factory=dict)
    restore_bodies: RestoreParser = field(default_factory=RestoreParser)
    # the visual towers this process runs itself (embedded); empty in the distributed API, whose workers run them
    visual: dict[str, Tower] = field(default_factory=dict)


BACKEND = web.AppKey("backend", Backend)
REQUEST_ID = web.RequestKey("request_id", str)


@asynccontextmanager
async def embedded_backend(settings: Settings, metrics: Metrics) -> AsyncIterator[Backend]:
    """API and worker in one process. Without IDIOS_AMQP_URL the bus is in-process; with it, jobs go through
    RabbitMQ, so workers on other machines can share the load with this one."""
    specs = discover(settings.models_dir)
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(CollectionStore(settings, specs))
        texts = await load_text_runtimes(specs, settings, stack, metrics)
        handler = await JobHandler.open(settings, specs, store, stack, metrics)
        bus: JobBus
        if settings.amqp_url:
            await stack.enter_async_context(JobConsumer(settings, handler))
            bus = await stack.enter_async_context(AmqpBus(settings))
        else:
            bus = LocalBus(handler, settings.max_in_flight, settings.job_timeout)
        visual = {name: runtime.visual for name, runtime in handler.runtimes.items()}
        backend = Backend(settings, specs, store, bus, metrics, texts, visual=visual)
        stack.callback(backend.restore_bodies.close)
        yield backend


def require_distributed(settings: Settings) -> None:
    """The split deployment needs a broker and a Milvus that every process can reach."""
    if not settings.amqp_url:
        raise SystemExit("idios api/worker need IDIOS_AMQP_URL (RabbitMQ); use `python -m idios serve` for one process")
    if settings.is_milvus_lite:
        raise SystemExit("idios api/worker need IDIOS_MILVUS_URI (a Milvus server shared by every process); "
                         "a Milvus Lite file can only be opened by one process")


@asynccontextmanager
async def distributed_backend(settings: Settings, metrics: Metrics) -> AsyncIterator[Backend]:
    """The stateless API of the distributed deployment: the text towers (no visual tower), Milvus for reads,
    RabbitMQ for image work."""
    require_distributed(settings)
    specs = discover(settings.models_dir)
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(CollectionStore(settings, specs))
        texts = await load_text_runtimes(specs, settings, stack, metrics)
        bus = await stack.enter_async_context(AmqpBus(settings))
        backend = Backend(settings, specs, store, bus, metrics, texts)
        stack.callback(backend.restore_bodies.close)
        yield backend
