"""Duplicates across a whole collection: the groups of images at least `min_similarity` alike, exact copies told.

Comparing every pair fails past ~10^5 images; the vector index answers it instead. The rows are streamed in url
order, PAGE at a time with their vectors; every QUERIES of them are one range search (many queries per Milvus
call) for the stored rows at least `min_similarity` alike (at most NEIGHBOURS each); each pair found joins two
components of a union-find. Memory holds the union-find over the images that have a duplicate, not the
collection. The pairs of each page are written to the job's rows before its cursor moves on (the checkpoint a
resumed job starts from: idios/jobs.py).

After the last page, each component of at least two images is a group: its members' vectors (and perceptual
hashes) are read back, `similarity` is the lowest similarity of any two members (a chain of near pairs can join
images less alike than the threshold: this shows it), and `exact` is whether every two members' hashes are
within phash.EXACT_BITS (copies, resizes, re-encodings); a collection made before hashes were stored has no
`exact`. Groups are ranked largest first, then most alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson

from idios import phash
from idios.filters import metadata_filter
from idios.jobs import ROW_BYTES, JobRoom, Running
from idios.models import ModelSpec
from idios.store import CollectionStore, similarity

KIND = "duplicates"
PAGE = 1000  # rows read per page, with their vectors
QUERIES = 64  # vectors per range search call
NEIGHBOURS = 64  # duplicates found per image at most (more join through the others)
DESCRIBE_ROWS = 2000  # members read back at a time when groups are described
BLOCK = 2048  # members compared at a time (a k x k similarity block)
# For a model whose manifest records no measured threshold (duplicates.min_similarity, measured by
# scripts/duplicate_quality.py): CLIP-like models pulled from a hub, whose real weights are not here to measure.
FALLBACK_SIMILARITY = 95.0


def default_similarity(spec: ModelSpec) -> float:
    measured = spec.duplicate_similarity
    return FALLBACK_SIMILARITY if measured is None else measured


class Components:
    """Union-find over urls (path halving, union by size): only urls that have a duplicate are in it."""

    def __init__(self) -> None:
        self._parent: dict[str, str] = {}
        self._size: dict[str, int] = {}

    def find(self, url: str) -> str:
        parent = self._parent
        if url not in parent:
            parent[url] = url
            self._size[url] = 1
            return url
        while parent[url] != url:
            parent[url] = parent[parent[url]]
            url = parent[url]
        return url

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self._size[ra] < self._size[rb]:
            ra, rb = rb, ra
        self._parent[rb] = ra
        self._size[ra] += self._size[rb]

    def groups(self) -> list[list[str]]:
        members: dict[str, list[str]] = {}
        for url in self._parent:
            members.setdefault(self.find(url), []).append(url)
        return [sorted(m) for m in members.values() if len(m) > 1]


def by_bytes(items: list[Any], limit: int = ROW_BYTES) -> Iterator[list[Any]]:
    """`items` in consecutive runs whose JSON stays under `limit` bytes (one job row each)."""
    run: list[Any] = []
    size = 0
    for item in items:
        n = len(orjson.dumps(item)) + 1
        if run and size + n > limit:
            yield run
            run, size = [], 0
        run.append(item)
        size += n
    if run:
        yield run


async def find_duplicates(room: JobRoom, spec: ModelSpec, run: Running) -> None:
    """The body of a duplicates job (idios/jobs.py runs it, and resumes it from its checkpoint)."""
    rec, store = run.record, room.store
    min_similarity = float(rec.params["min_similarity"])
    where = metadata_filter(rec.params["filter"]) if rec.params.get("filter") else ""
    if rec.cursor is None:
        await room.checkpoint(run, total=await store.count(spec.name, where))
    links = Components()
    for row in await room.rows(rec.job, "e", "", "~"):  # what an earlier run of this job found
        for a, b in row["data"]["pairs"]:
            links.union(a, b)
    cursor = rec.cursor
    while page := await store.page(spec.name, cursor, PAGE, with_data=True, where=where):
        pairs: set[tuple[str, str]] = set()
        for start in range(0, len(page), QUERIES):
            batch = page[start : start + QUERIES]
            found = await store.neighbours(spec.name, np.stack([r["embedding"] for r in batch]),
                                           min_similarity / 100, NEIGHBOURS, where)
            for row, hits in zip(batch, found, strict=True):
                url = row["url"]
                pairs.update((min(url, other), max(url, other)) for other, cosine in hits
                             if other != url and similarity(cosine) >= min_similarity)
        for a, b in pairs:
            links.union(a, b)
        if pairs:  # keyed by the rows examined before the page: a resumed job writes the same keys again
            parts = by_bytes([list(p) for p in sorted(pairs)])
            await room.put_rows(rec.job, "e", [(f"{rec.done:012d}/{i:04d}", {"pairs": part})
                                               for i, part in enumerate(parts)])
        cursor = page[-1]["url"]
        await room.checkpoint(run, cursor=cursor, done=rec.done + len(page))
    groups = await describe(store, spec.name, links.groups())
    groups.sort(key=lambda g: (-g["size"], -g["similarity"], g["urls"][0]))
    rows = []
    for rank, group in enumerate(groups):
        for part, urls in enumerate(by_bytes(group["urls"])):
            rows.append((f"{rank:09d}/{part:04d}", {**group, "urls": urls}))
    await room.put_rows(rec.job, "g", rows)
    await room.checkpoint(run, groups=len(groups))


async def describe(store: CollectionStore, model: str, groups: list[list[str]]) -> list[dict[str, Any]]:
    """Each group with its size, the lowest similarity of two members and (where hashes are stored) `exact`.
    Members removed since they were found are left out; a group left with one member is dropped."""
    hashes = store.has_phash(model)
    fields = ["embedding", "phash"] if hashes else ["embedding"]
    described: list[dict[str, Any]] = []
    start = 0
    while start < len(groups):
        batch: list[list[str]] = []
        count = 0
        while start < len(groups) and (not batch or count + len(groups[start]) <= DESCRIBE_ROWS):
            batch.append(groups[start])
            count += len(groups[start])
            start += 1
        rows = await store.rows_of(model, [u for g in batch for u in g], fields)
        for group in batch:
            members = [u for u in group if u in rows]
            if len(members) < 2:
                continue
            vectors = np.stack([np.asarray(rows[u]["embedding"], dtype=np.float32) for u in members])
            entry: dict[str, Any] = {"urls": members, "size": len(members),
                                     "similarity": round(similarity(lowest_cosine(vectors)), 4)}
            if hashes:
                entry["exact"] = all_within([str(rows[u].get("phash") or "") for u in members], phash.EXACT_BITS)
            described.append(entry)
    return described


def lowest_cosine(vectors: np.ndarray) -> float:
    """The least inner product of two different rows, BLOCK rows at a time (a 10^4-member group fits)."""
    lowest = 1.0
    n = len(vectors)
    for i in range(0, n, BLOCK):
        block = vectors[i : i + BLOCK] @ vectors.T
        for r in range(len(block)):
            block[r, i + r] = np.inf  # a row with itself
        lowest = min(lowest, float(block.min()))
    return lowest


def all_within(hashes: list[str], bits: int) -> bool:
    """Whether every two of the 64-bit hex hashes differ in at most `bits` bits; False if any is unknown."""
    if not all(hashes):
        return False
    values = np.array([int(h, 16) for h in hashes], dtype=np.uint64)
    for i in range(0, len(values), BLOCK):
        if int(np.bitwise_count(values[i : i + BLOCK, None] ^ values[None, :]).max()) > bits:
            return False
    return True
