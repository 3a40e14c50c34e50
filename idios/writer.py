"""Every write to the collections, and the rules they follow, in one place.

1. **Two writes of one url never run at once.** Milvus's upsert is a delete plus an insert, and concurrent
   upserts of one primary key can leave both rows (Milvus Lite's engine did: six concurrent restores of the same
   1,500 urls left 2,000-4,512 rows; reported for Milvus 2.5 servers, milvus-io/milvus#38947). Two kinds of
   claims keep them apart, both `KeyClaims` (a write waits only for writes sharing a url with it):
   - `Writer.sending`: the API holds the urls of a write it sends (an `add` job on the bus, a `restore`, a metadata
     edit, a `remove`) until it is answered, so two requests for one url through one API process run one after
     the other;
   - `Writer.upsert` holds the urls of each Milvus call, so two batches of one process never write one url at
     once. (Separate sets: in `serve` the API's claim is still held while the worker's write runs.)
   What several API processes did on a Milvus server is in the README ("Milvus").
2. **Insert or upsert.** On a Milvus Lite file (this process's alone) urls not yet stored are inserted and only
   the others upserted: Lite's upsert runs at about a third of its insert rate (100k x 512: 2.0-3.1k vs 6.7-8.6k
   rows/s), and a restore into an empty collection is all inserts. Milvus does not keep primary keys unique on
   insert, so the check and the insert happen while the write holds its urls. A Milvus server (several writers)
   always gets upserts.
3. **Side by side.** Chunks of at most 1,000 rows, up to PARALLEL_WRITES at once (Lite: one writer 6.0k rows/s
   of bare inserts, two or four 10.1-10.3k, at 40k x 512).
4. **Metadata edits** (`edit_metadata`) read the stored rows and write them back with new metadata while holding
   their urls, so they are ordered with the other writes of those urls as rule 1 orders those.
5. **Answered means searchable.** A write is answered once a search from any process finds it (`Settler`; the
   worker's batcher writes many jobs' rows at once and each job waits for that itself).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

from idios import errors
from idios.batcher import MicroBatcher
from idios.limits import METADATA_MAX, metadata_bytes
from idios.metrics import Metrics
from idios.settings import Settings
from idios.store import CollectionStore, Row

PARALLEL_WRITES = 4  # Milvus calls of one process at once
CHUNK_ROWS = 1000  # rows per Milvus call at most


@dataclass(frozen=True)
class MetadataEdit:
    url: str
    metadata: dict[str, Any] | None
    merge: bool = False


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON Merge Patch: an object patches key by key (null removes the key), anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


class KeyClaims:
    """The keys being written to a collection: a write waits only for the writes that share a key with it, so
    writes of the same url happen one after another and all others side by side. Keys are checked and claimed
    with no await in between, so on one event loop no two writes can hold the same key."""

    def __init__(self) -> None:
        self._held: dict[str, asyncio.Future[None]] = {}

    @asynccontextmanager
    async def claim(self, keys: Iterable[str]) -> AsyncIterator[None]:
        keys = set(keys)
        while busy := {self._held[k] for k in keys if k in self._held}:
            await asyncio.wait(busy)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for key in keys:
            self._held[key] = done
        try:
            yield
        finally:
            for key in keys:
                del self._held[key]
            done.set_result(None)


class Settler:
    """Makes this process's writes searchable before they are answered, one Milvus wait shared by many.

    Strong reads on a Milvus server wait for the server's clock (365 ms for a top-10 search here); Bounded
    reads take 2.4 ms. So writes pay the wait instead, once per moment rather than once per read: one Strong
    query after a write returns once the server serves everything written before it (150-400 ms measured),
    and writers that finished before that query began share it. A Session query would wait for this
    process's newest insert or upsert only: measured on Milvus 2.3.5, deletes (a remove, the old row of an
    upsert) leave no timestamp in pymilvus's session, and other processes kept seeing a deleted row for the
    5 s of Milvus's `common.gracefulTime`. A standalone server (and a cluster with one replica) serves every
    search from one delegator per shard whose serviceable time only grows, so afterwards a search from any
    process sees the write. README "Consistency" has the whole guarantee."""

    def __init__(self, probe: Callable[[], Awaitable[object]]) -> None:
        self._probe = probe
        self._written = 0
        self._settled = 0
        self._running: asyncio.Task[None] | None = None

    def wrote(self) -> None:
        self._written += 1

    async def wait(self) -> None:
        target = self._written
        while self._settled < target:
            if self._running is None:
                self._running = asyncio.create_task(self._run(self._written))
            await asyncio.shield(self._running)

    async def _run(self, upto: int) -> None:
        try:
            await self._probe()
        finally:
            self._running = None
        self._settled = max(self._settled, upto)


class Writer:
    """One per process: every write of that process to the store goes through it (see the module's rules)."""

    def __init__(self, settings: Settings, store: CollectionStore) -> None:
        self._store = store
        # A Milvus Lite file is opened by this process alone (so it may insert what is not stored yet), and it
        # answers every read with everything written (so nothing needs settling)
        self._lite = settings.is_milvus_lite
        self._chunk = max(1, min(settings.write_batch, CHUNK_ROWS))
        self._settings = settings
        self._sending: dict[str, KeyClaims] = {}
        self._claims: dict[str, KeyClaims] = {}
        self._settlers: dict[str, Settler] = {}
        self._gate = asyncio.Semaphore(PARALLEL_WRITES)
        self._batchers: dict[str, MicroBatcher[Row, None]] = {}

    def sending(self, model: str, urls: Iterable[str]) -> AbstractAsyncContextManager[None]:
        """Hold `urls` of `model` while a write of them is on its way and not yet answered."""
        return self._sending.setdefault(model, KeyClaims()).claim(urls)

    async def upsert(self, model: str, rows: Sequence[Row], settle: bool = True) -> int:
        """Write rows (insert or replace by url; the last of repeated urls wins), in chunks side by side. With
        `settle` the rows are searchable from any process on return."""
        await self._write_chunks(model, list({r.url: r for r in rows}.values()))
        if settle:
            await self.settle(model)
        return len(rows)

    async def _write_chunks(self, model: str, rows: list[Row], claimed: bool = False) -> None:
        """Rows of distinct urls in chunks side by side; `claimed`: the caller holds their urls already."""
        with errors.first_failure():  # a failed chunk cancels the others (their claims released)
            async with asyncio.TaskGroup() as group:  # chunks share no url, so they may run side by side
                for start in range(0, len(rows), self._chunk):
                    group.create_task(self._write_chunk(model, rows[start : start + self._chunk], claimed))

    async def _write_chunk(self, model: str, chunk: list[Row], claimed: bool = False) -> None:
        async with AsyncExitStack() as held:
            if not claimed:
                await held.enter_async_context(self._claims.setdefault(model, KeyClaims()).claim(r.url for r in chunk))
            await held.enter_async_context(self._gate)
            if not self._lite:
                await self._store.put(model, chunk, upsert=True)
                self._settler(model).wrote()
                return
            stored = await self._store.existing(model, [r.url for r in chunk])
            fresh = [r for r in chunk if r.url not in stored]
            if fresh:
                await self._store.put(model, fresh, upsert=False)
            if len(fresh) < len(chunk):
                await self._store.put(model, [r for r in chunk if r.url in stored], upsert=True)

    async def edit_metadata(self, model: str, edits: Sequence[MetadataEdit]) -> list[str]:
        """Replace, or merge as a JSON Merge Patch (RFC 7396: null removes a key, objects merge key by key), the
        metadata of stored rows, keeping their vectors: no image is fetched, nothing is embedded. Edits of one url
        apply in the order given. All or nothing: the urls not stored are returned and nothing is written. The
        urls are held from the read to the write, so no other write of this process comes in between."""
        urls = list(dict.fromkeys(e.url for e in edits))
        async with self._claims.setdefault(model, KeyClaims()).claim(urls):
            rows = await self._store.stored_rows(model, urls)
            missing = [u for u in urls if u not in rows]
            if missing:
                return missing
            metadata = {u: rows[u].metadata or {} for u in urls}
            for e in edits:
                metadata[e.url] = merge_patch(metadata[e.url], e.metadata) if e.merge else (e.metadata or {})
            last = {e.url: i for i, e in enumerate(edits)}
            for url, meta in metadata.items():
                if (size := metadata_bytes(meta)) > METADATA_MAX:
                    raise errors.MetadataTooLong(f"the metadata of {url} would be {size} bytes of JSON once "
                                                 f"merged, more than {METADATA_MAX}", edit=last[url])
            await self._write_chunks(model, [replace(rows[u], metadata=metadata[u]) for u in urls], claimed=True)
        await self.settle(model)
        return []

    async def remove(self, model: str, url: str) -> None:
        async with self._claims.setdefault(model, KeyClaims()).claim([url]):
            await self._store.delete(model, url)
        self._settler(model).wrote()
        await self.settle(model)

    async def settle(self, model: str) -> None:
        """Return once this process's writes to `model` so far are searchable from any process."""
        if not self._lite:
            await self._settler(model).wait()

    def _settler(self, model: str) -> Settler:
        settler = self._settlers.get(model)
        if settler is None:
            settler = self._settlers[model] = Settler(lambda: self._store.wait_for_writes(model))
        return settler

    async def start_batchers(self, models: Iterable[str], stack: AsyncExitStack, metrics: Metrics) -> None:
        """The worker's write batchers: one Milvus call for the rows of many jobs; `stack` closes them."""
        s = self._settings
        for model in models:
            async def write(rows: list[Row], model: str = model) -> list[None]:
                await self.upsert(model, rows, settle=False)  # each job settles its own write (add)
                return [None] * len(rows)

            self._batchers[model] = await stack.enter_async_context(MicroBatcher(
                f"write-{model}", write, s.write_batch, s.write_wait_ms / 1000,
                observe=metrics.batch_observer("write", model)))

    async def add(self, model: str, row: Row) -> None:
        """One embedded image, written with others' by the model's batcher; answered once searchable."""
        await self._batchers[model].submit(row)
        await self.settle(model)
