"""Opening the vector store: the one-off start-up work, done with pymilvus's synchronous client (its
create/has/load calls are the ones Milvus Lite documents). Connect, waiting for a server still starting; the
deployment's database; each model's collection created, or checked against the identity of the files that filled
it, then loaded, with its metric and fields read. CollectionStore (idios/store.py) calls these once, in
__aenter__; everything after start-up goes through its asynchronous client."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pymilvus import MilvusClient

from idios import errors, identity
from idios.identity import Identity, dim_mismatch, mismatch
from idios.models import ModelSpec
from idios.schema import METRIC, PHASH, create_collection, embedding_index
from idios.settings import Settings

log = logging.getLogger(__name__)

INDEX_WAIT = 10.0  # seconds a starting process waits for another one's new index (load)
_UNAVAILABLE = ("unavailable", "fail connecting", "not ready", "deadline_exceeded", "deadline exceeded",
                "connection refused", "not healthy", "channel closed", "stopping", "not loaded")


def unavailable(exc: BaseException) -> bool:
    """A failure that waiting mends: the server cannot be reached, is not ready, or (after a restart, for
    20-30 s here) has not loaded the collection again yet; it loads it by itself."""
    text = f"{exc!r} {getattr(exc, 'message', '')}".lower()
    return isinstance(exc, (TimeoutError, ConnectionError)) or any(m in text for m in _UNAVAILABLE)


def connect(settings: Settings, **db: str) -> MilvusClient:
    """The synchronous client, trying again for up to milvus_timeout while the server does not answer yet: a
    server still starting (compose starts everything at once), or Milvus Lite's own server process, which
    makes its socket after the 0.5 s its launcher waits (on a busy machine the first connect came first)."""
    s = settings
    deadline = time.monotonic() + s.milvus_timeout
    while True:
        try:
            return MilvusClient(s.milvus_target, token=s.milvus_token or "", timeout=s.milvus_timeout, **db)
        except Exception as exc:
            if not unavailable(exc) or time.monotonic() > deadline:
                raise
            log.warning("Milvus at %s does not answer yet (%s); trying again", s.milvus_target, errors.brief(exc))
            time.sleep(0.5)


def ensure_database(client: MilvusClient, name: str) -> str:
    """The server's database this deployment keeps its collections in, created on first use."""
    if name and name != "default" and name not in client.list_databases():
        try:
            client.create_database(name)
            log.info("created Milvus database %s", name)
        except Exception:
            if name not in client.list_databases():  # another process may have won the race
                raise
    return name or "default"


def load(client: MilvusClient, name: str, index: Callable[[], Any] | None = None, *, index_kind: str = "") -> None:
    """Load a collection. Processes started together race to create it, and the winner makes its index a
    moment after the collection (pymilvus creates, then indexes): a loser that finds the collection without
    an index yet ("index not found", seen on the Milvus 2.3.5 server with an API and two workers starting
    at once) waits for it, and after INDEX_WAIT seconds makes the index itself (`index`, else the embedding
    index of `index_kind`)."""
    deadline, rounds = time.monotonic() + INDEX_WAIT, 0
    while True:
        try:
            client.load_collection(name)
            return
        except Exception as exc:
            if "index not found" not in str(exc).lower() or rounds == 3:
                raise
            if time.monotonic() > deadline:
                rounds += 1
                try:
                    client.create_index(name, index() if index else embedding_index(client, index_kind))
                except Exception as again:  # the creator got there in between: load again
                    log.info("index of %s: %s", name, errors.brief(again))
                deadline = time.monotonic() + INDEX_WAIT
            time.sleep(0.2)


@dataclass(frozen=True)
class Opened:
    """What start-up learnt of one model's collection."""

    metric: str  # the metric its index was built with
    has_phash: bool  # whether it has the phash field (collections made before it existed keep working without)
    refused: str | None = None  # why the model is not served (its files did not fill it); None: served


def open_collection(client: MilvusClient, spec: ModelSpec, record: Identity | None, mine: Identity,
                    index_kind: str) -> Opened:
    """Create or check a model's collection and load it; with the reason when the model's files are not the
    ones that filled it (the collection is then left as it is, loaded for reading only).

    `record` is the identity stored for the model, `mine` that of its files now. A collection without a record
    (made before identities were recorded, or by a process that stopped between creating it and recording) gets
    the identity of the files found now, if its vectors have their dimension: which weights filled it cannot be
    known any better. A record of a collection that no longer exists (dropped by hand) is replaced."""
    name, folder = spec.collection, spec.visual.parent
    exists = client.has_collection(name)
    reason = None
    if exists and record is not None:
        reason = mismatch(record, mine, folder)
    elif exists:
        dim = stored_dim(client, name)
        if dim is not None and dim != spec.dim:
            reason = dim_mismatch(dim, mine, folder)
    else:
        try:
            create_collection(client, name, spec.dim, index_kind)
            log.info("created collection %s (%s, dim %d)", name, index_kind, spec.dim)
        except Exception:
            if not client.has_collection(name):  # another process may have won the race
                raise
    if reason is None and (record is None or not exists):
        record = identity.record(client, mine)
        # another process, with other files, may have recorded its own in between
        reason = mismatch(record, mine, folder)
    # a refused model's collection is still loaded for reading (count, urls, dump): its rows can be moved to a
    # model of their own (bulk_ingest --from-model) even when the weights that filled it are gone
    load(client, name, index_kind=index_kind)
    return Opened(stored_metric(client, name), has_phash_field(client, name), reason)


def stored_metric(client: MilvusClient, name: str) -> str:
    for index in client.list_indexes(name, field_name="embedding"):
        metric = client.describe_index(name, index).get("metric_type")
        if metric:
            return str(metric).upper()
    return METRIC


def has_phash_field(client: MilvusClient, name: str) -> bool:
    return any(f.get("name") == PHASH for f in client.describe_collection(name).get("fields", []))


def stored_dim(client: MilvusClient, name: str) -> int | None:
    for field in client.describe_collection(name).get("fields", []):
        if field.get("name") == "embedding":
            return int(field.get("params", {}).get("dim", 0)) or None
    return None
