"""A micro-batching actor: items queue up, and a batch is flushed at `max_batch` items or `max_wait`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)

BatchFn = Callable[[list[T]], Awaitable[Sequence[R]]]


class MicroBatcher(Generic[T, R]):
    """Collects items from many callers into batches for one `process` coroutine.

    `submit` waits for the item's own result; a failing batch fails every caller in it with the same error.
    The queue is bounded, so callers feel back-pressure when the batch function falls behind.
    Waiting for company has to be worth it: an item that finds the queue empty runs at once unless company is
    expected, because the previous batch had some (more than one item) or because `coming()` says items are on
    their way (say, images still being fetched and decoded for other jobs). One client at a time never waits;
    under load batches fill within `max_wait`; when load stops, at most one lone item waits.
    """

    def __init__(
        self,
        name: str,
        process: BatchFn[T, R],
        max_batch: int,
        max_wait: float,
        queue_size: int = 0,
        observe: Callable[[int, float], None] | None = None,
        coming: Callable[[], int] | None = None,
    ):
        self.name = name
        self._process = process
        self.max_batch = max(1, max_batch)
        self.max_wait = max(0.0, max_wait)
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] = asyncio.Queue(queue_size or 4 * self.max_batch)
        self._waits = False  # whether the last batch had company, so that waiting for more is worth it
        self.coming = coming  # how many items are on their way to this batcher
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.items = 0
        self._observe = observe

    async def __aenter__(self) -> MicroBatcher[T, R]:
        self._task = asyncio.create_task(self._run(), name=f"batcher-{self.name}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the actor; callers still waiting get a CancelledError-free RuntimeError."""
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
        while not self._queue.empty():
            _, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(RuntimeError(f"{self.name} is shutting down"))

    async def submit(self, item: T) -> R:
        """Queue one item and wait for its result."""
        if self._task is None:
            raise RuntimeError(f"{self.name} is not running")
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, fut))
        return await fut

    async def _collect(self) -> list[tuple[T, asyncio.Future[R]]]:
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        expected = self._waits or (self.coming is not None and self.coming() > 0)
        deadline = loop.time() + (self.max_wait if expected else 0.0)
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        self._waits = len(batch) > 1
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            live = [(item, fut) for item, fut in batch if not fut.cancelled()]
            if not live:
                continue
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                results = await self._process([item for item, _ in live])
            except asyncio.CancelledError:
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(RuntimeError(f"{self.name} is shutting down"))
                raise
            except Exception as exc:  # one failure answers the whole batch
                log.exception("%s: batch of %d failed", self.name, len(live))
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.batches += 1
            self.items += len(live)
            if self._observe is not None:
                self._observe(len(live), loop.time() - started)
            for (_, fut), result in zip(live, results, strict=True):
                if not fut.done():
                    fut.set_result(result)
