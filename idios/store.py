"""The Milvus calls: one collection per model, through AsyncMilvusClient. Reads here; writes are sent from here
but decided by the Writer (idios/writer.py); what start-up does to open the collections is in store_open.py."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np
import orjson
from pymilvus import AsyncMilvusClient

from idios import errors, filters, identity, milvus_rows, store_open
from idios.filters import url_after, url_in
from idios.identity import Identity, identity_of
from idios.limits import PAGE_MAX
from idios.models import ModelSpec
from idios.schema import METRIC, PHASH
from idios.settings import Settings
from idios.store_open import unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

ROWS_PER_QUERY = 500  # rows fetched by primary key per query when a page carries vectors
PARALLEL_QUERIES = 4  # of those queries at once
# on Milvus Lite, a `not` over a range or contains leaves out at most this many rows (+ 1 is Milvus's query cap)
LITE_NOT_ROWS = PAGE_MAX - 1
EXACT_FILTER_ROWS = 4096  # a filtered search over at most this many rows reads and ranks them (_filtered_exactly)
# gRPC's own reconnect backoff grows to 120 s, so a client found the restarted server up to two minutes late
RECONNECT = {"grpc.initial_reconnect_backoff_ms": 250, "grpc.min_reconnect_backoff_ms": 250,
             "grpc.max_reconnect_backoff_ms": 2000}


@dataclass(frozen=True)
class Row:
    url: str
    embedding: np.ndarray
    metadata: dict[str, Any] | None
    phash: str = ""  # idios.phash of the image, "" unknown; not stored where the collection has no such field


@dataclass(frozen=True)
class Hit:
    url: str
    metadata: dict[str, Any] | None
    similarity: float


# Milvus Lite 2.5.1 deletes rows through SQLite with the primary key pasted in single quotes, unescaped, so
# a url holding ' cannot be deleted or upserted there (verified: "near c: syntax error"). On Milvus Lite the
# stored key spells ' as DEL (0x7f), a character a valid url never holds (the API refuses control characters),
# so the mapping is one-to-one. Only paging order can differ from plain string order, and only for such urls.
_QUOTE, _STANDIN = "'", "\x7f"


_ABSENT = object()
GROUP_OVERFETCH = 8  # search_groups fetches this many times the hits its groups need, to begin with


def _lookup(metadata: dict[str, Any] | None, path: list[str]) -> Any:
    value: Any = metadata
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return _ABSENT
        value = value[part]
    return value


def similarity(cosine: float) -> float:
    """Cosine → 0..100 (100 = identical); equal to the original's 100·(1 − d/2) on squared L2 of unit vectors."""
    return float(min(100.0, max(0.0, 100.0 * cosine)))


class CollectionStore:
    """Reads and writes the per-model collections. Upserts by url make repeated writes safe."""

    def __init__(self, settings: Settings, specs: dict[str, ModelSpec]) -> None:
        self._settings = settings
        self._specs = specs
        self._client: AsyncMilvusClient | None = None
        self._swap_quotes = settings.is_milvus_lite
        self.index_kind = settings.vector_index
        self._metric_types: dict[str, str] = {}  # collection -> the metric its index was built with
        self._with_phash: set[str] = set()  # collections that have the phash field (made since it exists)
        # the identity of each model's files as they are (idios/identity.py), hashed once at start-up
        self.identities: dict[str, Identity] = {}
        # models not served, with the reason: their files differ from what filled their collection
        self.refused: dict[str, str] = {}
        # Milvus Lite answers every read with everything written; a server reads Bounded (see writer.Settler)
        self._consistency: dict[str, Any] = {} if settings.is_milvus_lite else {"consistency_level": "Bounded"}

    def refused_specs(self) -> dict[str, ModelSpec]:
        """The models this store refuses (reasons in `refused`), as found in the models folder."""
        return {name: spec for name, spec in self._specs.items() if name in self.refused}

    def served(self) -> dict[str, ModelSpec]:
        """The models this store serves: all it was opened with but the refused ones. The composition roots
        load runtimes, text towers and batchers for these only, so nothing embeds into a refused collection."""
        return {name: spec for name, spec in self._specs.items() if name not in self.refused}

    def _key(self, url: str) -> str:
        return url.replace(_QUOTE, _STANDIN) if self._swap_quotes else url

    def _url(self, key: str) -> str:
        return key.replace(_STANDIN, _QUOTE) if self._swap_quotes else key

    async def __aenter__(self) -> CollectionStore:
        s = self._settings
        if s.is_milvus_lite:
            s.data_dir.mkdir(parents=True, exist_ok=True)
        # The visual files are hashed in threads (a CLIP file is up to a GB) while the client connects.
        loop = asyncio.get_running_loop()
        hashing = [loop.run_in_executor(None, identity_of, spec) for spec in self._specs.values()]
        # Collections are created with the synchronous client: it is a one-off at start-up, and its
        # create/has/load calls are the ones Milvus Lite documents.
        # The sync client stays open until close: with Milvus Lite it owns the embedded server process.
        self._sync = store_open.connect(s)
        try:
            db = {} if s.is_milvus_lite else {"db_name": store_open.ensure_database(self._sync, s.milvus_db)}
            if db:  # a client of that database (use_database needs DescribeDatabase, which Milvus 2.3 lacks)
                self._sync.close()
                self._sync = store_open.connect(s, **db)
            self.identities = {i.model: i for i in await asyncio.gather(*hashing)}
            records = identity.read_records(self._sync, list(self._specs),
                                            partial(store_open.load, index_kind=self.index_kind))
            for spec in self._specs.values():
                opened = store_open.open_collection(self._sync, spec, records.get(spec.name),
                                                    self.identities[spec.name], self.index_kind)
                self._metric_types[spec.collection] = opened.metric
                if opened.has_phash:
                    self._with_phash.add(spec.collection)
                if opened.refused is not None:
                    self.refused[spec.name] = opened.refused
                    log.error("model %s is not served: %s", spec.name, opened.refused)
            self._client = AsyncMilvusClient(s.milvus_target, token=s.milvus_token or "",
                                             timeout=s.milvus_timeout, grpc_options=RECONNECT, **db)
        except BaseException:  # a start-up that fails halfway closes what it opened (Milvus Lite's process too)
            self._sync.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        self._sync.close()

    def has_phash(self, model: str) -> bool:
        """Whether the model's collection stores images' perceptual hashes (idios/phash.py)."""
        return self._collection(model) in self._with_phash

    @property
    def is_milvus_lite(self) -> bool:
        return self._settings.is_milvus_lite

    @property
    def retry_seconds(self) -> float:
        """How long a write is tried again while the server is unavailable (IDIOS_MILVUS_RETRY)."""
        return self._settings.milvus_retry

    @property
    def client(self) -> AsyncMilvusClient:
        if self._client is None:
            raise errors.Unavailable("the vector store is not open")
        return self._client

    def _collection(self, model: str) -> str:
        return self._specs[model].collection

    async def where(self, model: str, conditions: dict[str, Any] | None) -> str:
        """The Milvus expression of a filter object (idios/filters.py), "" for none. Milvus Lite 2.5.1 has no
        `not`: there a negated range or contains is the rows it does not match, by primary key, as long as the
        negated conditions together match at most LITE_NOT_ROWS (else a 422 `filter_unsupported`), which also
        bounds the expression's size. The server negates by itself."""
        if not conditions:
            return ""
        cond = filters.normal_form(filters.parse(conditions))
        if not self.is_milvus_lite:
            return filters.to_expr(cond)
        name, left_out, budget = self._collection(model), {}, LITE_NOT_ROWS  # rows left out, all conditions together
        for leaf in filters.negated_leaves(cond):
            if leaf not in left_out:
                # one query, one hit more than may be left out: no write comes between a count and the read
                rows = await self._read(self.client.query(name, filter=leaf.expr(), output_fields=["url"],
                                                          limit=budget + 1))
                if len(rows) > budget:
                    raise errors.FilterUnsupported(
                        f"Milvus Lite cannot negate a condition ({leaf.expr()}) that, with the filter's other "
                        f"negated ones, more than {LITE_NOT_ROWS} rows match; write its opposite (gte for lt, ...) "
                        f"or use a Milvus server")
                budget -= len(rows)
                left_out[leaf] = filters.url_not_in(r["url"] for r in rows)  # stored keys, as they are
        return filters.to_expr(cond, left_out.__getitem__)

    async def read(self, call: Awaitable[T]) -> T:
        """A read of another module's (idios/jobs.py), under the same rule as this one's (_read)."""
        return await self._read(call)

    async def write(self, call: Callable[[], Awaitable[T]]) -> T:
        """A write of another module's (idios/jobs.py), tried again as this one's are (_write)."""
        return await self._write(call)

    async def _read(self, call: Awaitable[T]) -> T:
        """A read; an unreachable or recovering server is a 503 `store_unavailable` at once, not a hang."""
        try:
            return await call
        except Exception as exc:
            if unavailable(exc):
                raise errors.StoreUnavailable(f"the Milvus server is unavailable: {errors.brief(exc)}") from exc
            raise

    async def _write(self, call: Callable[[], Awaitable[T]]) -> T:
        """A write, tried again while the server is unreachable or recovering, for up to milvus_retry seconds:
        an outage shorter than that costs no write (jobs time out at job_timeout; keep milvus_retry below it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.milvus_retry
        delay = 0.25
        while True:
            try:
                return await call()
            except Exception as exc:
                if not unavailable(exc):
                    raise
                if loop.time() + delay > deadline:
                    raise errors.StoreUnavailable(
                        f"the Milvus server did not take a write within {self._settings.milvus_retry:g} s: "
                        f"{errors.brief(exc)}") from exc
                log.warning("Milvus write failed (%s); trying again in %.2f s", errors.brief(exc), delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)

    async def put(self, model: str, rows: Sequence[Row], upsert: bool) -> None:
        """Insert or upsert rows in one Milvus call, tried again while the server is unavailable (_write). The
        rules writes follow (which rows, when, side by side with what) are the Writer's (idios/writer.py)."""
        name = self._collection(model)
        keys = [self._key(r.url) for r in rows]
        matrix = np.stack([np.asarray(r.embedding, dtype=np.float32) for r in rows])
        metadata = [r.metadata or {} for r in rows]
        phash = [r.phash for r in rows] if name in self._with_phash else None
        await self._write(lambda: milvus_rows.write(self.client, name, keys, matrix, metadata, upsert=upsert,
                                                    timeout=self._settings.milvus_timeout, phash=phash))

    async def delete(self, model: str, url: str) -> None:
        name = self._collection(model)
        await self._write(lambda: self.client.delete(name, filter=url_in([self._key(url)])))

    async def wait_for_writes(self, model: str) -> None:
        """One Strong query: returns once the server serves everything written before it (writer.Settler)."""
        name = self._collection(model)
        await self._write(lambda: self.client.query(name, filter='url == ""', output_fields=["url"], limit=1,
                                                    consistency_level="Strong"))

    async def _stored_keys(self, name: str, keys: list[str]) -> set[str]:
        res = await self._read(self.client.query(name, filter=url_in(keys), output_fields=["url"],
                                                 **self._consistency))
        return {r["url"] for r in res}

    async def existing(self, model: str, urls: Sequence[str]) -> set[str]:
        """Which of `urls` are stored."""
        found: set[str] = set()
        for start in range(0, len(urls), 1000):
            chunk = urls[start : start + 1000]
            keys = await self._stored_keys(self._collection(model), [self._key(u) for u in chunk])
            found.update(self._url(k) for k in keys)
        return found

    async def search(self, model: str, vector: np.ndarray, limit: int, expr: str = "",
                     min_similarity: float | None = None, offset: int = 0) -> list[Hit]:
        """The `limit` best hits after the first `offset`, best first, ties in similarity ordered by url: so pages
        concatenate to the unpaged answer. Milvus orders ties as it likes, so the hits tied with the last one
        wanted are all fetched (up to PAGE_MAX) before the ordering."""
        return (await self.search_many(model, [vector], limit, expr, min_similarity, offset))[0]

    async def search_many(self, model: str, vectors: Sequence[np.ndarray], limit: int, expr: str = "",
                          min_similarity: float | None = None, offset: int = 0) -> list[list[Hit]]:
        """search() for several vectors with the same filter and page: one Milvus search for all of them (or one
        read of the rows a selective filter passes); only a vector whose tie runs past what was fetched asks
        again, alone."""
        name, want = self._collection(model), offset + limit
        # one hit more than wanted tells whether a tie with the last one wanted may go on past what was fetched
        # (fetching only `want` made every search a second one: the last hit fetched always "tied" with itself)
        first = min(PAGE_MAX, want + 1)
        answers = await self._ranked(name, vectors, first, expr)
        for k, hits in enumerate(answers):
            fetch = first
            # a tie with the last hit wanted that reaches the last hit fetched may go on beyond it
            while len(hits) == fetch < PAGE_MAX and hits[-1].similarity == hits[want - 1].similarity:
                fetch = min(PAGE_MAX, 2 * fetch)
                hits = (await self._ranked(name, [vectors[k]], fetch, expr))[0]
            hits.sort(key=lambda h: (-h.similarity, h.url))
            if min_similarity is not None:
                hits = [h for h in hits if h.similarity >= min_similarity]
            answers[k] = hits[offset:want]
        return answers

    async def search_groups(self, model: str, vector: np.ndarray, limit: int, expr: str, key: str,
                            group_size: int = 1, min_similarity: float | None = None, offset: int = 0) -> list[Hit]:
        """The best `group_size` hits of each distinct value of metadata `key` (a dotted path), for the `limit`
        best groups after the first `offset`: groups ordered by their best hit, each group's hits together. A row
        without the key is a group of its own. Milvus cannot group on a JSON field (Lite 2.5.1: "unsupported data
        type JSON for group by"), so the hits are fetched GROUP_OVERFETCH times more than needed, collapsed here,
        and fetched again twice as deep while groups are missing, up to PAGE_MAX hits: past that, fewer groups
        than asked can come back (a few values holding the best 16,384 hits)."""
        name, want = self._collection(model), offset + limit
        fetch = min(PAGE_MAX, max(want * group_size * GROUP_OVERFETCH, 64))
        path = key.split(".")
        while True:
            hits = (await self._ranked(name, [vector], fetch, expr))[0]
            everything = len(hits) < fetch or fetch >= PAGE_MAX
            hits.sort(key=lambda h: (-h.similarity, h.url))
            if min_similarity is not None:
                hits = [h for h in hits if h.similarity >= min_similarity]
            groups: dict[Any, list[Hit]] = {}
            for h in hits:
                value = _lookup(h.metadata, path)
                group = ("row", h.url) if value is _ABSENT else ("is", orjson.dumps(value, option=orjson.OPT_SORT_KEYS))
                members = groups.setdefault(group, [])
                if len(members) < group_size:
                    members.append(h)
            first = list(groups.values())[:want]
            # the groups wanted are known once `want` of them are seen, their hits once each group is full
            if everything or (len(first) == want and all(len(g) == group_size for g in first)):
                break
            fetch = min(PAGE_MAX, 2 * fetch)
        return [h for g in list(groups.values())[offset:want] for h in g]

    async def _ranked(self, name: str, vectors: Sequence[np.ndarray], n: int, expr: str) -> list[list[Hit]]:
        """The best `n` rows for each vector (those passing `expr`), best first."""
        if expr and self.index_kind != "FLAT":
            exact = await self._filtered_exactly(name, vectors, n, expr)
            if exact is not None:
                return exact
        params: dict[str, Any] = {"metric_type": self._metric_types.get(name, METRIC)}
        if self.index_kind == "HNSW":
            params["params"] = {"ef": max(self._settings.search_ef, n)}  # Milvus needs ef >= limit
        res = await self._read(self.client.search(
            name, data=[np.asarray(v, dtype=np.float32).tolist() for v in vectors], limit=n, filter=expr,
            output_fields=["url", "metadata"], search_params=params, **self._consistency,
        ))
        return [[Hit(self._url(h["entity"]["url"]), h["entity"].get("metadata"), similarity(h["distance"]))
                 for h in hits] for hits in res]

    async def _filtered_exactly(self, name: str, vectors: Sequence[np.ndarray], limit: int,
                                expr: str) -> list[list[Hit]] | None:
        """A filter that few rows pass is answered exactly: those rows are read and ranked here. An index with a
        selective filter misses rows: on the Milvus 2.3.5 server, searches filtered down to 4 of ~3,000 rows
        found 1 or 2 of them (HNSW over sealed rows, the interim IVF index, nprobe 16 of 128, over fresh ones).
        None when more rows than EXACT_FILTER_ROWS pass: then the index searches, with the filter."""
        counted = await self._read(self.client.query(name, filter=expr, output_fields=["count(*)"],
                                                     **self._consistency))
        if int(counted[0]["count(*)"]) > EXACT_FILTER_ROWS:
            return None
        rows = await self._read(self.client.query(name, filter=expr, output_fields=["url", "metadata", "embedding"],
                                                  limit=EXACT_FILTER_ROWS, strict_float32=True, **self._consistency))
        if not rows:
            return [[] for _ in vectors]
        matrix = np.stack([np.asarray(r["embedding"], dtype=np.float32) for r in rows])
        answers = []
        for scores in np.stack([np.asarray(v, dtype=np.float32) for v in vectors]) @ matrix.T:  # (vectors, rows)
            best = np.argsort(-scores, kind="stable")[:limit]
            answers.append([Hit(self._url(rows[i]["url"]), rows[i].get("metadata"), similarity(float(scores[i])))
                            for i in best])
        return answers

    async def count(self, model: str, where: str = "") -> int:
        """Milvus's count of a collection's rows (those passing `where`, a metadata filter, if given)."""
        res = await self._read(self.client.query(self._collection(model), filter=where, output_fields=["count(*)"],
                                                 **self._consistency))
        return int(res[0]["count(*)"])

    async def page(self, model: str, cursor: str | None, limit: int, with_data: bool,
                   where: str = "") -> list[dict[str, Any]]:
        """Rows with url > cursor in url order. Milvus returns a limited query merged in primary-key order.

        With data, the page's urls come first and their rows second, in chunks: Milvus Lite answers a range
        query that also returns vectors in time that grows much faster than the page (measured at 20k rows:
        4,000 rows 0.8 s in one query, 0.2 s this way; 8,000 rows 29 s in one query). The chunks run a few at a
        time (Milvus Lite at 100k rows: 11k rows/s one at a time, 16k two or four at a time), and vectors come
        back as float32 arrays rather than lists of Python floats (a 10,000-row page: 0.3 s instead of 0.8-1.1 s
        to unpack, and 57 MB of JSON instead of 101 MB, the same float32 values either way).
        """
        name = self._collection(model)
        expr = url_after(self._key(cursor) if cursor else None) or 'url >= ""'
        if where:  # a metadata filter (idios/filters.py): the rows that pass it, in the same order
            expr = f"({expr}) and ({where})"
        keys = await self._read(self.client.query(name, filter=expr, output_fields=["url"],
                                                  limit=min(limit, PAGE_MAX), **self._consistency))
        ordered = sorted(r["url"] for r in keys)
        if not with_data:
            return [{"url": self._url(k)} for k in ordered]
        fields = ["embedding", "metadata", *([PHASH] if name in self._with_phash else [])]
        by_key = await self._rows_by_key(name, ordered, fields)
        rows = []
        for key in ordered:
            row = by_key.get(key)
            if row is not None:  # removed between the two queries
                rows.append({"url": self._url(key), "embedding": row["embedding"], "metadata": row["metadata"],
                             **({PHASH: row[PHASH]} if row.get(PHASH) else {})})  # no key when unknown
        return rows

    async def neighbours(self, model: str, vectors: np.ndarray, min_cosine: float, limit: int,
                         where: str = "") -> list[list[tuple[str, float]]]:
        """For each vector, the stored urls whose cosine to it is at least `min_cosine` (at most `limit` of them,
        best first), with that cosine: one range search for many vectors at once (idios/dedup.py)."""
        name = self._collection(model)
        # range search on an IP/COSINE index: radius < score <= range_filter (unit vectors score at most 1)
        params: dict[str, Any] = {"radius": min_cosine - 1e-6, "range_filter": 2.0}
        if self.index_kind == "HNSW":
            params["ef"] = max(self._settings.search_ef, limit)
        res = await self._read(self.client.search(
            name, data=[row.tolist() for row in np.asarray(vectors, dtype=np.float32)], limit=limit, filter=where,
            output_fields=["url"], anns_field="embedding",
            search_params={"metric_type": self._metric_types.get(name, METRIC), "params": params},
            **self._consistency))
        return [[(self._url(h["entity"]["url"]), float(h["distance"])) for h in hits] for hits in res]

    async def rows_of(self, model: str, urls: Sequence[str], fields: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The stored rows of `urls` (those still stored), with `fields`, by url; vectors as float32 arrays."""
        rows = await self._rows_by_key(self._collection(model), [self._key(u) for u in urls], fields)
        return {self._url(key): row for key, row in rows.items()}

    async def stored_rows(self, model: str, urls: Sequence[str]) -> dict[str, Row]:
        """The whole stored rows of `urls` (those still stored), by url: vector, metadata and phash."""
        name = self._collection(model)
        fields = ["embedding", "metadata", *([PHASH] if name in self._with_phash else [])]
        rows = await self._rows_by_key(name, [self._key(u) for u in urls], fields)
        return {self._url(key): Row(self._url(key), row["embedding"], row["metadata"], row.get(PHASH) or "")
                for key, row in rows.items()}

    async def _rows_by_key(self, name: str, keys: Sequence[str], fields: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The rows of stored `keys`, by key: ROWS_PER_QUERY a query, PARALLEL_QUERIES at once (see `page`)."""
        gate = asyncio.Semaphore(PARALLEL_QUERIES)

        async def read(chunk: Sequence[str]) -> Any:
            async with gate:
                return await self._read(self.client.query(name, filter=url_in(chunk), output_fields=["url", *fields],
                                                          strict_float32=True, **self._consistency))

        with errors.first_failure():
            async with asyncio.TaskGroup() as group:
                reads = [group.create_task(read(keys[i : i + ROWS_PER_QUERY]))
                         for i in range(0, len(keys), ROWS_PER_QUERY)]
        return {row["url"]: row for done in reads for row in done.result()}
