"""The worker's job handler: fetch → decode → batch → embed → write → reply, one job at a time per task.

Many jobs run concurrently; the embed and write batchers are where they meet, so one model run and one
Milvus upsert serve many requests.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from typing import Any

import numpy as np

from idios import errors
from idios.batcher import MicroBatcher
from idios.decode import DecodeLimits, preprocess
from idios.embed import ModelRuntime, load_runtimes
from idios.fetch import ImageFetcher
from idios.messages import ImageJob, JobKind, JobResult
from idios.metrics import Metrics
from idios.models import ModelSpec
from idios.settings import Settings
from idios.store import CollectionStore, Row

log = logging.getLogger(__name__)


class JobHandler:
    """Runs jobs against the loaded models and the store. Build it with `JobHandler.open`."""

    def __init__(self, settings: Settings, store: CollectionStore, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store = store
        self.limits = DecodeLimits(settings.min_image_side, settings.max_image_pixels)
        self.runtimes: dict[str, ModelRuntime] = {}
        self.writers: dict[str, MicroBatcher[Row, None]] = {}
        self._fetcher: ImageFetcher | None = None
        self._decode_pool: ThreadPoolExecutor | None = None

    @classmethod
    async def open(
        cls,
        settings: Settings,
        specs: dict[str, ModelSpec],
        store: CollectionStore,
        stack: AsyncExitStack,
        metrics: Metrics,
    ) -> JobHandler:
        """Start every actor this handler needs; `stack` closes them in reverse order."""
        self = cls(settings, store, metrics)
        self._decode_pool = stack.enter_context(
            ThreadPoolExecutor(max(1, settings.decode_threads), thread_name_prefix="idios-decode")
        )
        model_pool = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="idios-onnx"))
        self.runtimes = await load_runtimes(specs, settings, model_pool, stack, metrics)
        for name in specs:
            self.writers[name] = await stack.enter_async_context(
                MicroBatcher(
                    f"write-{name}", self._writer_for(name), settings.write_batch, settings.write_wait_ms / 1000,
                    observe=metrics.batch_observer("write", name),
                )
            )
        self._fetcher = await stack.enter_async_context(ImageFetcher(settings, metrics))
        return self

    def _writer_for(self, model: str) -> Any:
        async def write(rows: list[Row]) -> list[None]:
            await self.store.upsert(model, rows, settle=False)  # each job settles its own write, below
            return [None] * len(rows)

        return write

    async def handle(self, job: ImageJob) -> JobResult:
        """Run one job; every failure comes back as data, never as a raised exception."""
        self.metrics.jobs_in_flight.inc()
        try:
            result = await self._dispatch(job)
        except asyncio.CancelledError:
            raise
        except errors.IdiosError as exc:
            result = JobResult(error=exc.to_data())
        except Exception as exc:
            log.exception("%s job failed", job.kind.value, extra={"request_id": job.request_id})
            failure = errors.WorkerFailure(f"{job.kind.value} failed: {exc.__class__.__name__}: {exc}")
            result = JobResult(error=failure.to_data())
        finally:
            self.metrics.jobs_in_flight.dec()
        outcome = "ok" if result.error is None else str(result.error.get("type"))
        self.metrics.jobs.labels(job.kind.value, outcome).inc()
        return result

    async def _dispatch(self, job: ImageJob) -> JobResult:
        if job.kind is JobKind.PING:
            return JobResult()
        runtime = self.runtimes.get(job.model)
        if runtime is None:
            raise errors.ModelNotFound(f"Model {job.model!r} is not loaded by this worker")
        if job.kind is JobKind.EMBED:
            return JobResult(embedding=await self._embed_image(runtime, job))
        if job.kind is JobKind.ADD:
            vector = await self._embed_image(runtime, job)
            await self.writers[job.model].submit(Row(job.url, vector, job.metadata))
            await self.store.settle(job.model)  # answered = searchable from any API process
            return JobResult(written=1)
        if job.kind is JobKind.RESTORE:
            return JobResult(written=await self._restore(runtime, job.rows))
        raise errors.WorkerFailure(f"unknown job kind {job.kind}")

    async def _embed_image(self, runtime: ModelRuntime, job: ImageJob) -> np.ndarray:
        assert self._fetcher is not None and self._decode_pool is not None
        runtime.preparing += 1
        try:
            data = job.image if job.image is not None else await self._fetcher.fetch(job.url)
            loop = asyncio.get_running_loop()
            tensor = await loop.run_in_executor(self._decode_pool, preprocess, data, runtime.spec, self.limits)
        finally:
            runtime.preparing -= 1
        return await runtime.embed_image(tensor)

    async def _restore(self, runtime: ModelRuntime, rows: list[dict[str, Any]]) -> int:
        dim = runtime.spec.dim
        parsed = []
        for i, row in enumerate(rows):
            vec = np.asarray(row["embedding"], dtype=np.float32)
            if vec.shape != (dim,):
                raise errors.DimensionMismatch(
                    f"embedding has {vec.size} values; model {runtime.spec.name} stores {dim}",
                    loc=("body", i, "embedding"),
                )
            parsed.append(Row(row["url"], vec, row.get("metadata")))
        return await self.store.upsert(runtime.spec.name, parsed)
