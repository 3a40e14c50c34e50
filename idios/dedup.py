"""Duplicates across a whole collection: the groups of images at least `min_similarity` alike, exact copies told.

Comparing every pair in Python fails past ~10^5 images; the vector index answers it instead. The rows are streamed
in url order, PAGE at a time with their vectors; every QUERIES of them are one range search (many queries per
Milvus call) for the stored rows at least `min_similarity` alike (at most NEIGHBOURS each); each pair found joins
two components of a union-find. Memory holds the union-find over the images that have a duplicate, not the
collection. The pairs of each page are written to the job's rows before its cursor moves on (the checkpoint a
resumed job starts from: idios/jobs.py). On Milvus Lite, whose range search runs its queries one after another,
a collection that fits IDIOS_DEDUP_MEMORY_MB is compared in memory instead (Scan.in_memory).

After the last page, each component of at least two images is a group: its members' vectors (and perceptual
hashes) are read back, `similarity` is the lowest similarity of any two members (a chain of near pairs can join
images less alike than the threshold: this shows it), and `exact` is whether every two members' hashes are
within phash.EXACT_BITS (copies, resizes, re-encodings); a collection made before hashes were stored has no
`exact`. Groups are ranked largest first, then most alike.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson

from idios import phash
from idios.jobs import ROW_BYTES, JobRoom, Running
from idios.models import ModelSpec
from idios.store import similarity

KIND = "duplicates"
PAGE = 1000  # rows read per page, with their vectors
QUERIES = 64  # vectors per range search call
NEIGHBOURS = 64  # duplicates found per image at most (more join through the others)
IN_MEMORY_BLOCK = 1024  # rows compared with all the later ones at a time (Milvus Lite: Scan.in_memory)
IN_MEMORY_COLUMNS = 16384  # of those later ones at a time: a 1024 x 16384 float32 block is 64 MB
DESCRIBE_ROWS = 2000  # members read back at a time when groups are described
BLOCK = 2048  # members compared at a time (a k x k similarity block)
# For a model whose manifest records no measured threshold (duplicates.min_similarity, measured by
# scripts/duplicate_quality.py): CLIP-like models pulled from a hub, whose real weights are not here to measure.
FALLBACK_SIMILARITY = 95.0


def min_cosine_of(min_similarity: float) -> float:
    """The least cosine of a pair at least `min_similarity` alike: similarity clamps negative cosines to 0, so at
    0 every pair counts."""
    return min_similarity / 100 if min_similarity > 0 else -2.0


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

    def union(self, a: str, b: str) -> bool:
        """Join the sets of `a` and `b`; whether they were two."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if self._size[ra] < self._size[rb]:
            ra, rb = rb, ra
        self._parent[rb] = ra
        self._size[ra] += self._size[rb]
        return True

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


async def find_duplicates(room: JobRoom, spec: ModelSpec, run: Running, memory_bytes: int = 1 << 30) -> None:
    """The body of a duplicates job (idios/jobs.py runs it, and resumes it from its checkpoint)."""
    rec, store = run.record, room.store
    min_similarity = float(rec.params["min_similarity"])
    where = await store.where(spec.name, rec.params.get("filter"))
    if rec.cursor is None:
        await room.checkpoint(run, total=await store.count(spec.name, where))
    links = Components()
    for row in await room.rows(rec.job, "e", "", "~"):  # what an earlier run of this job found
        for a, b in row["data"]["pairs"]:
            links.union(a, b)
    scan = Scan(room, spec, run, links, where, min_similarity)
    if store.is_milvus_lite and rec.total * spec.dim * 4 <= memory_bytes:
        await scan.in_memory()
    else:
        await scan.by_range_search()
    groups = await describe(room, run, spec.name, links.groups())
    groups.sort(key=lambda g: (-g["size"], -g["similarity"], g["urls"][0]))
    rows = []
    for rank, group in enumerate(groups):
        for part, urls in enumerate(by_bytes(group["urls"])):
            rows.append((f"{rank:09d}/{part:04d}", {**group, "urls": urls}))
    await room.clear_rows(rec.job, "g")  # an earlier run's groups may have had more parts
    await room.put_rows(rec.job, "g", rows)
    await room.checkpoint(run, groups=len(groups))


class Scan:
    """The pairs at least `min_similarity` alike among the rows passing `where`, found into `links` in url
    order, checkpointed as it goes. Only pairs that join two sets are written (a spanning forest: fewer pairs
    than rows, whatever the collection holds), keyed by the rows examined before them, so a resumed job that
    goes over rows again writes the same keys again."""

    def __init__(self, room: JobRoom, spec: ModelSpec, run: Running, links: Components, where: str,
                 min_similarity: float) -> None:
        self.room, self.model, self.dim, self.run, self.links = room, spec.name, spec.dim, run, links
        self.where, self.min_similarity = where, min_similarity

    async def _found(self, pairs: list[tuple[str, str]], done: int, cursor: str) -> None:
        joining = sorted({(min(a, b), max(a, b)) for a, b in pairs if self.links.union(a, b)})
        if joining:
            rec = self.run.record
            parts = by_bytes([list(p) for p in joining])
            await self.room.put_rows(rec.job, "e", [(f"{rec.done:012d}/{i:04d}", {"pairs": part})
                                                    for i, part in enumerate(parts)])
        await self.room.checkpoint(self.run, cursor=cursor, done=done)

    async def by_range_search(self) -> None:
        """A page of rows at a time, QUERIES of them per range search: what a server's index answers fast."""
        store, rec = self.room.store, self.run.record
        cursor = rec.cursor
        while page := await store.page(self.model, cursor, PAGE, with_data=True, where=self.where):
            pairs: list[tuple[str, str]] = []
            for start in range(0, len(page), QUERIES):
                batch = page[start : start + QUERIES]
                found = await store.neighbours(self.model, np.stack([r["embedding"] for r in batch]),
                                               min_cosine_of(self.min_similarity), NEIGHBOURS, self.where)
                for row, hits in zip(batch, found, strict=True):
                    pairs += [(row["url"], other) for other, cosine in hits
                              if other != row["url"] and similarity(cosine) >= self.min_similarity]
            cursor = page[-1]["url"]
            await self._found(pairs, rec.done + len(page), cursor)

    async def in_memory(self) -> None:
        """Milvus Lite's range search runs one query after another (100k x 512: 86 rows/s, 19 min for the
        collection); it is this process's own file, so its vectors are read once into memory (4 bytes x dim per
        row, bounded by IDIOS_DEDUP_MEMORY_MB) and compared here, IN_MEMORY_BLOCK rows against all the later
        ones at a time, in a thread (numpy's matrix product runs without the GIL)."""
        store, rec = self.room.store, self.run.record
        urls: list[str] = []
        matrix = np.empty((max(rec.total, 1), self.dim), dtype=np.float32)  # filled in place: no second copy
        cursor: str | None = None
        while page := await store.page(self.model, cursor, PAGE, with_data=True, where=self.where):
            if len(urls) + len(page) > len(matrix):  # rows added since the count
                matrix = np.concatenate([matrix, np.empty((len(matrix) // 4 + len(page), self.dim), np.float32)])
            for i, row in enumerate(page, len(urls)):
                matrix[i] = row["embedding"]
            urls += [r["url"] for r in page]
            cursor = page[-1]["url"]
            await self.room.checkpoint(self.run)  # a cancel is seen while the vectors load, too
        if not urls:
            return
        matrix = matrix[: len(urls)]
        # resumed: after the last row examined (urls are in order; that row may have been removed since)
        start = bisect.bisect_right(urls, rec.cursor) if rec.cursor is not None else 0
        taken = np.zeros(len(urls), dtype=np.int32)  # pairs kept per row, both ends counted (pairs_from)
        for first in range(start, len(urls), IN_MEMORY_BLOCK):
            last = min(first + IN_MEMORY_BLOCK, len(urls))
            found = await asyncio.to_thread(pairs_from, matrix, first, last, min_cosine_of(self.min_similarity),
                                            taken)
            await self._found([(urls[a], urls[b]) for a, b in found], last, urls[last - 1])


def pairs_from(matrix: np.ndarray, first: int, last: int, min_cosine: float,
               taken: np.ndarray) -> list[tuple[int, int]]:
    """The pairs (a, b), first <= a < last, a < b, whose rows' inner product is at least `min_cosine`. A pair is
    kept while either of its rows has fewer than NEIGHBOURS kept (`taken` counts them, over the whole scan): as
    with the range search, where each row asks for its own NEIGHBOURS, an image with hundreds of near copies
    bounds the pairs kept but still joins every one of them."""
    block = matrix[first:last]
    here = np.arange(first, last)[:, None]
    found: list[tuple[int, int]] = []
    for col in range(first, len(matrix), IN_MEMORY_COLUMNS):
        scores = block @ matrix[col : col + IN_MEMORY_COLUMNS].T
        if col < last:  # columns that are rows of the block: each pair once, never a row with itself
            scores[np.arange(col, col + scores.shape[1])[None, :] <= here] = -np.inf
        rows, cols = np.nonzero(scores >= min_cosine - 1e-6)
        for r, c in zip((rows + first).tolist(), (cols + col).tolist(), strict=True):
            if taken[r] < NEIGHBOURS or taken[c] < NEIGHBOURS:
                taken[r] += 1
                taken[c] += 1
                found.append((r, c))
    return found


async def describe(room: JobRoom, run: Running, model: str, groups: list[list[str]]) -> list[dict[str, Any]]:
    """Each group with its size, the lowest similarity of two members and (where hashes are stored) `exact`,
    computed in a thread (a group of 10^4 similar images takes seconds). Members removed since they were found
    are left out; a group left with one member is dropped."""
    store = room.store
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
        described += await asyncio.to_thread(_describe_batch, batch, rows, hashes)
        await room.checkpoint(run)  # a cancel is seen here too
    return described


def _describe_batch(batch: list[list[str]], rows: dict[str, dict[str, Any]], hashes: bool) -> list[dict[str, Any]]:
    described = []
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
    """The least inner product of two different rows, in BLOCK x BLOCK tiles (memory stays 16 MB)."""
    lowest = 1.0
    n = len(vectors)
    for i in range(0, n, BLOCK):
        for j in range(i, n, BLOCK):
            tile = vectors[i : i + BLOCK] @ vectors[j : j + BLOCK].T
            if i == j:
                np.fill_diagonal(tile, np.inf)  # a row with itself
            lowest = min(lowest, float(tile.min()))
    return lowest


def all_within(hashes: list[str], bits: int) -> bool:
    """Whether every two of the 64-bit hex hashes differ in at most `bits` bits; False if any is unknown."""
    if not all(hashes):
        return False
    values = np.array([int(h, 16) for h in hashes], dtype=np.uint64)
    for i in range(0, len(values), BLOCK):
        for j in range(i, len(values), BLOCK):
            if int(np.bitwise_count(values[i : i + BLOCK, None] ^ values[None, j : j + BLOCK]).max()) > bits:
                return False
    return True
