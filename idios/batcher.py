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
        self._collected: list[tuple[T, asyncio.Future[R]]] = []  # the batch being collected or processed
        self._died: BaseException | None = None  # why the loop stopped, if it stopped by itself

    async def __aenter__(self) -> MicroBatcher[T, R]:
        self._task = asyncio.create_task(self._supervised(), name=f"batcher-{self.name}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the actor; every caller still waiting (queued, or in a batch already collected) gets a
        RuntimeError rather than waiting forever."""
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
        self._fail_waiting(RuntimeError(f"{self.name} is shutting down"))

    def _fail_waiting(self, exc: BaseException) -> None:
        waiting = [*self._collected]
        self._collected = []
        while not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        for _, fut in waiting:
            if not fut.done():
                fut.set_exception(exc)

    async def _supervised(self) -> None:
        """The loop, watched: if it dies of anything but cancellation, every waiting caller gets the error at
        once and later submits are refused with it, instead of hanging on a batcher that no longer runs."""
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            log.exception("%s: the batching loop died", self.name)
            self._died = exc
            self._fail_waiting(RuntimeError(f"{self.name} stopped: {exc.__class__.__name__}: {exc}"))

    async def submit(self, item: T) -> R:
        """Queue one item and wait for its result."""
        if self._task is None or self._died is not None:
            raise RuntimeError(f"{self.name} is not running" + (f": {self._died!r}" if self._died else ""))
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, fut))
        return await fut

    async def _collect(self) -> list[tuple[T, asyncio.Future[R]]]:
        batch = self._collected = [await self._queue.get()]
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
            except Exception as exc:  # one failure answers the whole batch
                log.exception("%s: batch of %d failed", self.name, len(live))
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                self._collected = []
                continue
            if len(results) != len(live):
                raise RuntimeError(f"{self.name}: {len(results)} results for a batch of {len(live)}")
            self.batches += 1
            self.items += len(live)
            for (_, fut), result in zip(live, results, strict=True):
                if not fut.done():
                    fut.set_result(result)
            self._collected = []
            if self._observe is not None:
                self._observe(len(live), loop.time() - started)
