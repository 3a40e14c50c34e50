"""The job bus: how the API hands jobs to workers. In-process here; RabbitMQ in the distributed deployment."""

from __future__ import annotations

import asyncio
from typing import Protocol

from idios import errors
from idios.messages import BusJob, JobResult
from idios.worker import JobHandler


class JobBus(Protocol):
    async def request(self, job: BusJob) -> JobResult:
        """Send a job, wait for its result (or raise JobTimeout)."""
        ...


class LocalBus:
    """Calls the in-process worker directly, with the same bounds a queue would give: a cap on jobs in
    flight (callers wait for a slot) and a per-job timeout."""

    def __init__(self, handler: JobHandler, max_in_flight: int, timeout: float) -> None:
        self.handler = handler
        self._slots = asyncio.Semaphore(max(1, max_in_flight))
        self._timeout = timeout

    async def request(self, job: BusJob) -> JobResult:
        try:
            async with asyncio.timeout(self._timeout):
                async with self._slots:
                    return await self.handler.handle(job)
        except TimeoutError:
            raise errors.JobTimeout(f"The job did not finish within {self._timeout:g} s") from None
