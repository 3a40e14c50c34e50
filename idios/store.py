"""The write actor's tool and the read side: one Milvus collection per model, through AsyncMilvusClient."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from pymilvus import AsyncMilvusClient, DataType, MilvusClient

from idios import errors
from idios.filters import url_after, url_in
from idios.models import ModelSpec
from idios.settings import Settings

log = logging.getLogger(__name__)

URL_MAX = 2083
QUERY_WINDOW = 16384  # Milvus caps offset + limit of one query
ROWS_PER_QUERY = 500  # rows fetched by primary key per query when a page carries vectors
PARALLEL_QUERIES = 4  # of those queries at once
PARALLEL_WRITES = 4  # writes to a Milvus Lite file at once (its engine inserts ~6k rows/s for one caller, ~10k for 2-4)


@dataclass(frozen=True)
class Row:
    url: str
    embedding: np.ndarray
    metadata: dict[str, Any] | None


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


def similarity(cosine: float) -> float:
    """Cosine → 0..100 (100 = identical); equal to the original's 100·(1 − d/2) on squared L2 of unit vectors."""
    return float(min(100.0, max(0.0, 100.0 * cosine)))


# Every stored vector has unit length (models' outputs are L2-normalised; restore scales rows to length 1), so
# the inner product is the cosine. New collections compare by IP: Milvus's COSINE FLAT search also computes the
# norm of every stored vector for each query (measured on Milvus Lite at 100k x 512: p50 31 ms COSINE, 21 ms IP,
# same hits, same scores). Collections made as COSINE by earlier versions keep working: the stored index's
# metric is read at start-up and used for searching.
METRIC = "IP"


def index_args(kind: str, metric: str = METRIC) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if kind == "HNSW":
        params = {"M": 16, "efConstruction": 200}
    elif kind == "IVF_FLAT":
        params = {"nlist": 1024}
    return {"index_type": kind, "metric_type": metric, "params": params}


def create_collection(client: MilvusClient, name: str, dim: int, index_kind: str, metric: str = METRIC) -> None:
    """A collection as Idios stores a model: url primary key, unit vectors (compared by IP), metadata JSON."""
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("url", DataType.VARCHAR, is_primary=True, max_length=URL_MAX)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("metadata", DataType.JSON)
    index = client.prepare_index_params()
    index.add_index("embedding", **index_args(index_kind, metric))
    client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")


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


class CollectionStore:
    """Reads and writes the per-model collections. Upserts by url make repeated writes safe."""

    def __init__(self, settings: Settings, specs: dict[str, ModelSpec]) -> None:
        self._settings = settings
        self._specs = specs
        self._client: AsyncMilvusClient | None = None
        self._swap_quotes = settings.is_milvus_lite
        self.index_kind = settings.vector_index
        # A Milvus Lite file is opened by this process alone, so its writes can be ordered here (see upsert).
        self._sole_writer = settings.is_milvus_lite
        self._claims: dict[str, KeyClaims] = {}
        self._write_gate = asyncio.Semaphore(PARALLEL_WRITES)
        self._metrics: dict[str, str] = {}  # collection -> the metric its index was built with

    def _key(self, url: str) -> str:
        return url.replace(_QUOTE, _STANDIN) if self._swap_quotes else url

    def _url(self, key: str) -> str:
        return key.replace(_STANDIN, _QUOTE) if self._swap_quotes else key

    async def __aenter__(self) -> CollectionStore:
        s = self._settings
        if s.is_milvus_lite:
            s.data_dir.mkdir(parents=True, exist_ok=True)
        # Collections are created with the synchronous client: it is a one-off at start-up, and its
        # create/has/load calls are the ones Milvus Lite documents.
        # The sync client stays open until close: with Milvus Lite it owns the embedded server process.
        self._sync = MilvusClient(s.milvus_target, token=s.milvus_token or "", timeout=s.milvus_timeout)
        if not s.is_milvus_lite and self._serves_lite_engine(self._sync):
            log.warning("%s is a Milvus Lite server: FLAT index and quote-safe keys", s.milvus_target)
            self._swap_quotes = True
            self.index_kind = s.index_type.upper() or "FLAT"
        for spec in self._specs.values():
            self._ensure_collection(self._sync, spec)
        self._client = AsyncMilvusClient(s.milvus_target, token=s.milvus_token or "", timeout=s.milvus_timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        self._sync.close()

    def _ensure_collection(self, client: MilvusClient, spec: ModelSpec) -> None:
        name = spec.collection
        if client.has_collection(name):
            dim = self._stored_dim(client, name)
            if dim is not None and dim != spec.dim:
                raise RuntimeError(f"collection {name} holds {dim}-d vectors but model {spec.name} makes {spec.dim}-d")
        else:
            try:
                create_collection(client, name, spec.dim, self.index_kind)
                log.info("created collection %s (%s, dim %d)", name, self.index_kind, spec.dim)
            except Exception:
                if not client.has_collection(name):  # another process may have won the race
                    raise
        client.load_collection(name)
        self._metrics[name] = self._stored_metric(client, name)

    @staticmethod
    def _stored_metric(client: MilvusClient, name: str) -> str:
        for index in client.list_indexes(name, field_name="embedding"):
            metric = client.describe_index(name, index).get("metric_type")
            if metric:
                return str(metric).upper()
        return METRIC

    @staticmethod
    def _serves_lite_engine(client: MilvusClient) -> bool:
        """Milvus Lite's own gRPC server (milvus_lite.server.Server with an address) lacks GetVersion."""
        quiet = logging.getLogger("pymilvus.decorators")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)  # the expected failure would be logged with a traceback
        try:
            client.get_server_version()
        except Exception as exc:  # pymilvus wraps the gRPC status in several ways
            return "UNIMPLEMENTED" in repr(exc) or "UNIMPLEMENTED" in str(getattr(exc, "message", ""))
        finally:
            quiet.setLevel(level)
        return False

    @staticmethod
    def _stored_dim(client: MilvusClient, name: str) -> int | None:
        for field in client.describe_collection(name).get("fields", []):
            if field.get("name") == "embedding":
                return int(field.get("params", {}).get("dim", 0)) or None
        return None

    @property
    def client(self) -> AsyncMilvusClient:
        if self._client is None:
            raise errors.Unavailable("the vector store is not open")
        return self._client

    def _collection(self, model: str) -> str:
        return self._specs[model].collection

    async def upsert(self, model: str, rows: Sequence[Row]) -> int:
        """Write rows (insert or replace by url; the last of repeated urls wins), in chunks Milvus handles well.

        On a Milvus Lite file, urls not yet stored are inserted and only the others upserted: Milvus Lite's upsert
        runs at about a third of its insert rate (measured here at 100k x 512: 2.0-3.1k vs 6.7-8.6k rows/s), and
        a restore into an empty collection is all inserts. Milvus does not keep primary keys unique on insert, so
        the check and the insert happen while this write holds its keys (KeyClaims; the file is this process's
        alone): writes sharing a url wait for each other, the others run side by side, up to PARALLEL_WRITES at
        once (one writer at a time measured 6.0k rows/s of bare inserts, two or four 10.1-10.3k, at 40k x 512).
        A Milvus server (several writers) always gets upserts; this process still never upserts one url twice at
        once (concurrent upserts of one primary key can leave both rows, see routes.run_job)."""
        name = self._collection(model)
        claims = self._claims.setdefault(name, KeyClaims())
        step = max(1, min(self._settings.write_batch, 1000))
        for start in range(0, len(rows), step):
            latest = {self._key(r.url): r for r in rows[start : start + step]}
            data = [
                {"url": key, "embedding": np.asarray(r.embedding, dtype=np.float32), "metadata": r.metadata or {}}
                for key, r in latest.items()
            ]
            if not self._sole_writer:
                async with claims.claim(latest):
                    await self.client.upsert(name, data)
                continue
            async with claims.claim(latest), self._write_gate:
                stored = await self._stored_keys(name, list(latest))
                fresh = [d for d in data if d["url"] not in stored]
                if fresh:
                    await self.client.insert(name, fresh)
                if len(fresh) < len(data):
                    await self.client.upsert(name, [d for d in data if d["url"] in stored])
        return len(rows)

    async def _stored_keys(self, name: str, keys: list[str]) -> set[str]:
        res = await self.client.query(name, filter=url_in(keys), output_fields=["url"])
        return {r["url"] for r in res}

    async def existing(self, model: str, urls: Sequence[str]) -> set[str]:
        """Which of `urls` are stored."""
        found: set[str] = set()
        for start in range(0, len(urls), 1000):
            chunk = urls[start : start + 1000]
            keys = await self._stored_keys(self._collection(model), [self._key(u) for u in chunk])
            found.update(self._url(k) for k in keys)
        return found

    async def embedding_of(self, model: str, url: str) -> np.ndarray | None:
        expr = url_in([self._key(url)])
        res = await self.client.query(self._collection(model), filter=expr, output_fields=["embedding"],
                                      strict_float32=True)
        return np.asarray(res[0]["embedding"], dtype=np.float32) if res else None

    async def search(
        self, model: str, vector: np.ndarray, limit: int, expr: str = "", min_similarity: float | None = None
    ) -> list[Hit]:
        res = await self.client.search(
            self._collection(model),
            data=[np.asarray(vector, dtype=np.float32).tolist()],
            limit=limit,
            filter=expr,
            output_fields=["url", "metadata"],
            search_params={"metric_type": self._metrics.get(self._collection(model), METRIC)},
        )
        hits = [Hit(self._url(h["entity"]["url"]), h["entity"].get("metadata"), similarity(h["distance"])) for h in res[0]]
        if min_similarity is not None:
            hits = [h for h in hits if h.similarity >= min_similarity]
        return hits

    async def count(self, model: str) -> int:
        res = await self.client.query(self._collection(model), filter="", output_fields=["count(*)"])
        return int(res[0]["count(*)"])

    async def page(self, model: str, cursor: str | None, limit: int, with_data: bool) -> list[dict[str, Any]]:
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
        keys = await self.client.query(name, filter=expr, output_fields=["url"], limit=min(limit, QUERY_WINDOW))
        ordered = sorted(r["url"] for r in keys)
        if not with_data:
            return [{"url": self._url(k)} for k in ordered]
        gate = asyncio.Semaphore(PARALLEL_QUERIES)

        async def rows_of(chunk: list[str]) -> Any:
            async with gate:
                return await self.client.query(name, filter=url_in(chunk), output_fields=["url", "embedding", "metadata"],
                                               strict_float32=True)

        by_key: dict[str, dict[str, Any]] = {}
        chunks = [ordered[i : i + ROWS_PER_QUERY] for i in range(0, len(ordered), ROWS_PER_QUERY)]
        for result in await asyncio.gather(*(rows_of(c) for c in chunks)):
            for row in result:
                by_key[row["url"]] = row
        rows = []
        for key in ordered:
            row = by_key.get(key)
            if row is not None:  # removed between the two queries
                rows.append({"url": self._url(key), "embedding": row["embedding"], "metadata": row["metadata"]})
        return rows

    async def remove(self, model: str, url: str) -> None:
        await self.client.delete(self._collection(model), filter=url_in([self._key(url)]))
