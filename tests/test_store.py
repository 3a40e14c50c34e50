"""The store's write ordering on a Milvus Lite file: writes sharing a url wait for each other, others overlap."""

from __future__ import annotations

import asyncio

from idios.store import KeyClaims


async def test_writes_sharing_a_key_wait_and_the_others_do_not() -> None:
    claims = KeyClaims()
    order: list[str] = []
    release_a = asyncio.Event()

    async def write(name: str, keys: set[str], hold: asyncio.Event | None = None) -> None:
        async with claims.claim(keys):
            order.append(f"{name} start")
            if hold is not None:
                await hold.wait()
            order.append(f"{name} end")

    a = asyncio.create_task(write("a", {"x", "y"}, release_a))
    await asyncio.sleep(0)
    b = asyncio.create_task(write("b", {"y", "z"}))  # shares y with a
    c = asyncio.create_task(write("c", {"w"}))  # shares nothing
    await asyncio.wait_for(c, 1)
    assert order == ["a start", "c start", "c end"]  # c ran while a held x and y; b is still waiting
    release_a.set()
    await asyncio.wait_for(asyncio.gather(a, b), 1)
    assert order[3:] == ["a end", "b start", "b end"]
    async with claims.claim(["x", "y", "z", "x"]):  # everything was released; a key given twice is one key
        pass
    async with claims.claim(["x"]):
        pass
