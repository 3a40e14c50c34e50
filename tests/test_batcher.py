"""The micro-batcher flushes on size or on time, answers each caller, and fails a broken batch clearly."""

from __future__ import annotations

import asyncio

import pytest

from idios.batcher import MicroBatcher


async def test_flushes_full_batches_then_the_rest_after_max_wait() -> None:
    seen: list[list[int]] = []

    async def double(items: list[int]) -> list[int]:
        seen.append(list(items))
        return [2 * i for i in items]

    async with MicroBatcher("t", double, max_batch=4, max_wait=0.05) as b:
        out = await asyncio.gather(*(b.submit(i) for i in range(10)))
    assert out == [2 * i for i in range(10)]
    assert [len(s) for s in seen] == [4, 4, 2]


async def test_a_lone_item_waits_at_most_max_wait() -> None:
    async def ident(items: list[int]) -> list[int]:
        return items

    async with MicroBatcher("t", ident, max_batch=64, max_wait=0.02) as b:
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await b.submit(1) == 1
        assert loop.time() - start < 1.0


async def test_a_lone_item_runs_at_once_and_waiting_starts_once_batches_have_company() -> None:
    seen: list[list[int]] = []
    release = asyncio.Event()

    async def record(items: list[int]) -> list[int]:
        seen.append(list(items))
        if items == [1]:
            await release.wait()
        return items

    async with MicroBatcher("t", record, max_batch=8, max_wait=2.0) as b:
        first = asyncio.create_task(b.submit(1))
        for _ in range(100):  # the lone item reaches the batch function without waiting 2 s for company
            if seen:
                break
            await asyncio.sleep(0.01)
        assert seen == [[1]]
        # while it runs, two more queue up: they go together, with no wait needed
        rest = asyncio.gather(b.submit(2), b.submit(3))
        await asyncio.sleep(0.05)
        release.set()
        assert await first == 1 and await rest == [2, 3]
        # that batch had company, so the next item waits for more: one arriving 50 ms later joins it
        later = asyncio.create_task(b.submit(4))
        await asyncio.sleep(0.05)
        assert await asyncio.gather(later, b.submit(5)) == [4, 5]
    assert seen == [[1], [2, 3], [4, 5]]


async def test_a_lone_item_waits_when_more_are_on_their_way() -> None:
    seen: list[list[int]] = []
    on_the_way = [1]

    async def record(items: list[int]) -> list[int]:
        seen.append(list(items))
        return items

    async with MicroBatcher("t", record, max_batch=8, max_wait=0.5, coming=lambda: on_the_way[0]) as b:
        first = asyncio.create_task(b.submit(1))
        await asyncio.sleep(0.1)
        assert seen == []  # another item is being prepared: worth waiting for
        on_the_way[0] = 0
        assert await asyncio.gather(first, b.submit(2)) == [1, 2]
        assert seen == [[1, 2]]
        assert await b.submit(3) == 3  # nothing on the way, but the last batch had company: it waits once
        assert await b.submit(4) == 4  # lone, nothing coming: at once
    assert seen == [[1, 2], [3], [4]]


async def test_a_failing_batch_fails_each_of_its_callers() -> None:
    async def boom(items: list[int]) -> list[int]:
        raise ValueError("model exploded")

    async with MicroBatcher("t", boom, max_batch=8, max_wait=0.01) as b:
        results = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
        assert all(isinstance(r, ValueError) for r in results)
        # the actor survives a failed batch
        with pytest.raises(ValueError):
            await b.submit(4)


async def test_close_fails_waiting_callers_instead_of_hanging() -> None:
    release = asyncio.Event()

    async def slow(items: list[int]) -> list[int]:
        await release.wait()
        return items

    b = MicroBatcher("t", slow, max_batch=1, max_wait=0)
    await b.__aenter__()
    first = asyncio.create_task(b.submit(1))
    await asyncio.sleep(0.01)
    await b.close()
    with pytest.raises(RuntimeError):
        await first


async def test_close_fails_a_batch_still_being_collected() -> None:
    """Items the loop has taken off the queue but not processed yet (it waits for company) are failed by close,
    not left waiting: they are in no queue any more."""
    calls: list[list[int]] = []

    async def record(items: list[int]) -> list[int]:
        calls.append(items)
        return items

    b = MicroBatcher("t", record, max_batch=8, max_wait=30, coming=lambda: 1)  # company expected: it waits
    await b.__aenter__()
    waiting = [asyncio.create_task(b.submit(i)) for i in range(3)]
    await asyncio.sleep(0.05)
    assert b._queue.empty() and not calls  # all three collected, none processed
    await asyncio.wait_for(b.close(), 1)
    results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 1)
    assert [type(r) for r in results] == [RuntimeError] * 3 and not calls


async def test_a_dead_loop_fails_its_callers_at_once_and_refuses_new_items() -> None:
    """A batch function that breaks the loop's contract (here: too few results) stops the loop; its callers and
    everyone queued behind them get the error instead of hanging, and later submits are refused at once."""
    release = asyncio.Event()

    async def short(items: list[int]) -> list[int]:
        await release.wait()
        return items[:-1]

    async with MicroBatcher("t", short, max_batch=2, max_wait=0.01) as b:
        callers = [asyncio.create_task(b.submit(i)) for i in range(5)]
        await asyncio.sleep(0.02)
        release.set()
        results = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), 1)
        assert all(isinstance(r, RuntimeError) and "results for a batch of 2" in str(r) for r in results), results
        with pytest.raises(RuntimeError, match="not running"):
            await asyncio.wait_for(b.submit(9), 1)
