"""Which weights filled a collection: a model's identity (name, dim, sha256 of its visual file, source).

A collection holds embeddings of one model only: vectors of two models share no space, so a search that mixes
them ranks nonsense. The identity of the files that filled each collection is recorded in the Milvus collection
`idios__models` (one row per model; `read_records`, `record`), and CollectionStore refuses, at start-up, a model
whose files differ from that record. The identity is what the vectors depend on: the visual file's bytes (sha256) and the dimension. Its
`source` (where the manifest says the weights came from) is shown and recorded, not compared: the same bytes
pulled from a mirror are the same model.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pymilvus import DataType, MilvusClient

from idios.filters import string_literal
from idios.models import ModelSpec

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes read at a time: a 1 GB visual file is hashed in constant memory
SHORT = 12  # hex digits of a sha256 in messages


@dataclass(frozen=True)
class Identity:
    model: str
    dim: int
    visual_sha256: str
    source: Any  # the manifest's `source` as it is (JSON: a dict such as {"repo", "revision", "layout"}); None for
    # a model exported or built here

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "dim": self.dim, "visual_sha256": self.visual_sha256, "source": self.source}

    @classmethod
    def from_json(cls, data: Any) -> Identity | None:
        """A stored record; None for one that is not a record of this shape (then it is written again)."""
        if not isinstance(data, dict):
            return None
        try:
            return cls(str(data["model"]), int(data["dim"]), str(data["visual_sha256"]), data.get("source"))
        except (KeyError, TypeError, ValueError):
            return None


def sha256_of(*paths: Path) -> str:
    """The sha256 of the files' bytes one after the other, read in CHUNK-sized pieces (blocking: run it in a
    thread); for one file, that file's sha256."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def identity_of(spec: ModelSpec) -> Identity:
    """The identity of a model folder's files as they are now (blocking: hashes every file of the visual tower:
    its own, an OpenVINO .bin, ONNX external data)."""
    return Identity(spec.name, spec.dim, sha256_of(*spec.visual_files), spec.raw.get("source"))


def describe_source(source: Any) -> str:
    """`repo@revision` (7 digits) for pulled weights, the manifest's words otherwise, `built locally` without one."""
    if not source:
        return "built locally"
    if not isinstance(source, dict):
        return str(source)[:120]
    repo = source.get("repo")
    if isinstance(repo, str) and repo:
        revision = source.get("revision")
        return f"{repo}@{str(revision)[:7]}" if revision else repo
    parts = [f"{source[k]}" for k in ("library", "arch", "pretrained") if source.get(k)]
    if parts:
        return " ".join(parts)
    return ", ".join(f"{k}={v}" for k, v in sorted(source.items()))[:120]


def describe(identity: Identity) -> str:
    return (f"visual sha256 {identity.visual_sha256[:SHORT]}… ({identity.dim}-d, "
            f"{describe_source(identity.source)})")


def mismatch(stored: Identity, current: Identity, folder: Path | str) -> str | None:
    """Why the files in `folder` (identity `current`) may not serve the collection `stored` describes, in one
    line; None when they may: the same visual bytes and dimension. A differing `source` alone is no reason."""
    if stored.visual_sha256 == current.visual_sha256 and stored.dim == current.dim:
        return None
    return (f"its collection idios_{current.model} was filled by {describe(stored)} but {folder} holds "
            f"{describe(current)}; pull the old weights back, or move the new ones under another name")


def dim_mismatch(stored_dim: int, current: Identity, folder: Path | str) -> str:
    """The reason for a collection made before identities were recorded whose vectors are of another length."""
    return (f"its collection idios_{current.model} holds {stored_dim}-d vectors but {folder} holds "
            f"{describe(current)}; pull the old weights back, or move the new ones under another name")


# One row per model, in a collection no model name can produce (names start with a letter, collections are
# idios_<name>). Milvus Lite 2.5.1 ignores collection properties on create and answers UNIMPLEMENTED to
# alter_collection_properties, so they cannot hold the record.
IDENTITIES = "idios__models"


def create_records(client: MilvusClient) -> None:
    """The records' collection: `model` primary key, `identity` JSON, and the vector field Milvus requires of
    every collection (2-d, always [1, 0]; FLAT, which Milvus Lite and the server both offer)."""
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("model", DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field("identity", DataType.JSON)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)
    client.create_collection(IDENTITIES, schema=schema, index_params=records_index(client),
                             consistency_level="Strong")


def records_index(client: MilvusClient) -> Any:
    index = client.prepare_index_params()
    index.add_index("vector", index_type="FLAT", metric_type="L2", params={})
    return index


def read_records(client: MilvusClient, models: list[str],
                 load: Callable[[MilvusClient, str, Callable[[], Any]], None]) -> dict[str, Identity]:
    """The stored identity of each of `models` that has one. The records' collection is made on first start
    (race-safe: another process may make it at the same moment) and loaded with `load` (store_open.load,
    which waits for another process's index). Read Strong: a record written a moment ago must be seen."""
    if not models:
        return {}
    if not client.has_collection(IDENTITIES):
        try:
            create_records(client)
            log.info("created collection %s (model identities)", IDENTITIES)
        except Exception:
            if not client.has_collection(IDENTITIES):  # another process may have won the race
                raise
    load(client, IDENTITIES, lambda: records_index(client))
    names = ", ".join(string_literal(n) for n in models)
    rows = client.query(IDENTITIES, filter=f"model in [{names}]", output_fields=["model", "identity"],
                        consistency_level="Strong")
    records = {}
    for row in rows:
        found = Identity.from_json(row.get("identity"))
        if found is not None and found.model == row.get("model"):
            records[found.model] = found
    return records


def record(client: MilvusClient, mine: Identity) -> Identity:
    """Record `mine` as the identity that fills its model's collection; returns what is recorded once the write
    is served (Strong), which is another process's record when one with other files wrote after this one.
    (Milvus has no compare-and-set: two processes with different files that record within the same moment,
    each reading its own write back before the other writes, both serve; the one whose record was replaced is
    refused at its next start.)"""
    client.upsert(IDENTITIES, [{"model": mine.model, "identity": mine.to_json(), "vector": [1.0, 0.0]}])
    log.info("recorded the identity of model %s: visual sha256 %s, dim %d", mine.model, mine.visual_sha256, mine.dim)
    rows = client.query(IDENTITIES, filter=f"model == {string_literal(mine.model)}",
                        output_fields=["model", "identity"], consistency_level="Strong")
    stored = Identity.from_json(rows[0].get("identity")) if rows else None
    return stored if stored is not None else mine
