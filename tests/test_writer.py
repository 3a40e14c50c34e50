"""The Writer's ordering: writes sharing a url wait for each other, the others overlap."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from idios.models import discover
from idios.settings import Settings
from idios.store import CollectionStore, Row
from idios.writer import KeyClaims, Writer
from tests.distributed import MilvusStandalone, fresh_database


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


async def test_one_process_never_upserts_one_url_twice_at_once(
    tmp_path: Path, models_dir: Path, milvus: MilvusStandalone
) -> None:
    """Against a Milvus server (every write an upsert), concurrent writes of the same urls from one process leave
    one row per url: concurrent upserts of one primary key can otherwise keep both rows."""
    with fresh_database(milvus.uri) as db:
        settings = Settings(data_dir=tmp_path, models_dir=models_dir, milvus_uri=milvus.uri, milvus_db=db)
        specs = discover(models_dir)
        async with CollectionStore(settings, specs) as store:
            writer = Writer(settings, store)
            rng = np.random.default_rng(3)

            def rows(k: int) -> list[Row]:
                vecs = rng.standard_normal((300, 192)).astype(np.float32)
                return [Row(f"http://same.test/{i:03d}", v / np.linalg.norm(v), {"k": k}) for i, v in enumerate(vecs)]

            await asyncio.gather(*(writer.upsert("thumb_grid", rows(k)) for k in range(6)))
            assert await store.count("thumb_grid") == 300
