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
from idios.decode import DecodeLimits, prepare
from idios.embed import ModelRuntime, load_runtimes
from idios.fetch import ImageFetcher
from idios.iiif import DerivativePolicy, ImageSource, InfoCache
from idios.messages import BusJob, JobKind, JobResult
from idios.metrics import Metrics
from idios.models import ModelSpec
from idios.phash import valid
from idios.settings import Settings
from idios.store import Row
from idios.writer import Writer

log = logging.getLogger(__name__)


def pool(stack: AsyncExitStack, executor: ThreadPoolExecutor) -> ThreadPoolExecutor:
    """A thread pool that `stack` shuts down in a thread: waiting for a running decode or model batch there
    keeps the event loop free to finish everything else that is closing."""
    stack.push_async_callback(asyncio.to_thread, executor.shutdown, wait=True)
    return executor


class JobHandler:
    """Runs jobs against the loaded models and the store. Build it with `JobHandler.open`."""

    def __init__(self, settings: Settings, writer: Writer, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.writer = writer
        self.limits = DecodeLimits(settings.min_image_side, settings.max_image_pixels)
        self.runtimes: dict[str, ModelRuntime] = {}
        self.refused: dict[str, str] = {}  # models this process does not serve, with why (CollectionStore.refused)
        self._source: ImageSource | None = None
        self._decode_pool: ThreadPoolExecutor | None = None

    @classmethod
    async def open(
        cls,
        settings: Settings,
        specs: dict[str, ModelSpec],
        writer: Writer,
        stack: AsyncExitStack,
        metrics: Metrics,
        refused: dict[str, str] | None = None,
    ) -> JobHandler:
        """Start every actor this handler needs; `stack` closes them in reverse order. `refused`: the models
        this process does not serve, with why (CollectionStore.refused): their jobs answer model_refused."""
        self = cls(settings, writer, metrics)
        self.refused = dict(refused or {})
        self._decode_pool = pool(stack, ThreadPoolExecutor(max(1, settings.decode_threads),
                                                           thread_name_prefix="idios-decode"))
        model_pool = pool(stack, ThreadPoolExecutor(1, thread_name_prefix="idios-onnx"))
        self.runtimes = await load_runtimes(specs, settings, model_pool, stack, metrics)
        await writer.start_batchers(specs, stack, metrics)
        fetcher = await stack.enter_async_context(ImageFetcher(settings, metrics))
        self._source = ImageSource(fetcher, InfoCache(settings.iiif_info_cache, settings.iiif_info_ttl),
                                   DerivativePolicy(settings.iiif_scale, settings.iiif_format.lower()),
                                   settings.max_image_pixels)
        return self

    async def handle(self, job: BusJob) -> JobResult:
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

    async def _dispatch(self, job: BusJob) -> JobResult:
        if job.kind is JobKind.PING:
            return JobResult()
        runtime = self.runtimes.get(job.model)
        if runtime is None:
            if job.model in self.refused:
                why = self.refused[job.model]
                raise errors.ModelRefused(f"Model {job.model!r} is not served by this worker: {why}")
            raise errors.ModelNotFound(f"Model {job.model!r} is not loaded by this worker")
        if job.kind is JobKind.EMBED:
            vector, phash = await self._embed_image(runtime, job, hashed=job.hashed)
            return JobResult(embedding=vector, phash=phash)
        if job.kind is JobKind.ADD:
            vector, phash = await self._embed_image(runtime, job, hashed=True)
            await self.writer.add(job.model, Row(job.url, vector, job.metadata, phash))  # answered once searchable
            return JobResult(written=1)
        if job.kind is JobKind.RESTORE:
            return JobResult(written=await self._restore(runtime, job.rows))
        raise errors.WorkerFailure(f"unknown job kind {job.kind}")

    async def _embed_image(self, runtime: ModelRuntime, job: BusJob, hashed: bool = False) -> tuple[np.ndarray, str]:
        """The image's embedding and, with `hashed` (an image to store), its pHash from the same decode ("")."""
        assert self._source is not None and self._decode_pool is not None
        runtime.preparing += 1
        try:
            if job.image is not None:
                data = job.image
            else:  # a IIIF image comes at the size the model needs (idios/iiif.py)
                data = await self._source.fetch(job.url, runtime.spec.image_size)
            loop = asyncio.get_running_loop()
            ready = await loop.run_in_executor(self._decode_pool, prepare, data, runtime.spec, self.limits, hashed)
        finally:
            runtime.preparing -= 1
        return await runtime.embed_image(ready.tensor), ready.phash

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
            phash = row.get("phash") or ""
            if phash and not valid(phash):
                raise errors.FieldError("phash must be 16 lowercase hex digits", loc=("body", i, "phash"))
            parsed.append(Row(row["url"], vec, row.get("metadata"), phash))
        return await self.writer.upsert(runtime.spec.name, parsed)
