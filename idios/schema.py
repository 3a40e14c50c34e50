"""What Idios's Milvus collections look like: one per model (url primary key, unit vectors, metadata JSON,
pHash), and their vector index. (The model identities' collection is idios/identity.py's.)"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pymilvus import AsyncMilvusClient, DataType, MilvusClient

from idios.limits import URL_MAX
from idios.phash import HEX_CHARS

# The image's perceptual hash (idios/phash.py), "" when unknown. Collections made before it have no such field
# and keep working without it (CollectionStore.has_phash).
PHASH = "phash"

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


def create_collection(client: MilvusClient, name: str, dim: int, index_kind: str, metric: str = METRIC,
                      phash: bool = True) -> None:
    """A collection as Idios stores a model: url primary key, unit vectors (compared by IP), metadata JSON, pHash
    (`phash=False`: as versions before it made them)."""
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("url", DataType.VARCHAR, is_primary=True, max_length=URL_MAX)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("metadata", DataType.JSON)
    if phash:  # neither Milvus Lite 2.5.1 nor the 2.3.5 server has nullable fields: "" stands for unknown
        schema.add_field(PHASH, DataType.VARCHAR, max_length=HEX_CHARS)
    client.create_collection(name, schema=schema, index_params=embedding_index(client, index_kind, metric),
                             consistency_level="Strong")


def embedding_index(client: MilvusClient, kind: str, metric: str = METRIC) -> Any:
    """The index parameters of a collection's embedding field (create_collection, store_open.load)."""
    index = client.prepare_index_params()
    index.add_index("embedding", **index_args(kind, metric))
    return index


async def ensure_keyed_collection(client: AsyncMilvusClient, name: str, key: str, json_field: str,
                                  key_max: int) -> None:
    """A collection of JSON values by key (`key` VARCHAR primary key, `json_field` JSON, and the 2-d vector
    Milvus requires of every collection: always [1, 0], FLAT), made on first use and loaded; race-safe like
    every collection (another process may create it, and index it a moment later, at the same time)."""
    if not await client.has_collection(name):
        schema = AsyncMilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(key, DataType.VARCHAR, is_primary=True, max_length=key_max)
        schema.add_field(json_field, DataType.JSON)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)
        index = AsyncMilvusClient.prepare_index_params()
        index.add_index("vector", index_type="FLAT", metric_type="L2", params={})
        try:
            await client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")
            logging.getLogger(__name__).info("created collection %s", name)
        except Exception:
            if not await client.has_collection(name):  # another process may have won the race
                raise
    for attempt in range(50):  # a racing creator makes the index a moment after the collection
        try:
            await client.load_collection(name)
            return
        except Exception as exc:
            if "index not found" not in str(exc).lower() or attempt == 49:
                raise
            await asyncio.sleep(0.2)
