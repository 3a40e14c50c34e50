"""Near copies refused on the way in: search_add and add_bulk with `min_similarity`.

The images are embedded first (EMBED jobs: nothing is written), then judged here, in the API, all at once:
against the stored images (range searches of many vectors per Milvus call) and against the request's own
earlier accepted images. The jobs of one add_bulk run side by side, so a check that each job made against the
store alone would let two new near copies of each other both in; judged together, the first in the request is
added and the later ones are its duplicates. Only the accepted rows are then written (routes.write_rows), with
the perceptual hashes their jobs computed, and answered once searchable like every write (idios/writer.py).
Two requests are judged apart: near copies of each other sent in two requests at the same time can both be added.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from idios.dedup import QUERIES, min_cosine_of  # vectors per range search call; similarity's least cosine
from idios.store import CollectionStore, similarity

BLOCK = 1024  # images of one request compared with each other at a time (a BLOCK x BLOCK similarity block)
INLINE = 64  # fewer images than this are compared on the event loop; more in a thread


@dataclass(frozen=True)
class Verdict:
    """What to do with each image of a request, by its index in it."""

    accepted: list[int]  # to be written, in request order
    duplicates: list[dict[str, Any]]  # {"url", "of", "similarity"}: not written, in request order
    stored: list[int]  # their own url was stored in the meantime (by another request): not written


async def judge(store: CollectionStore, model: str, urls: Sequence[str], vectors: np.ndarray,
                min_similarity: float) -> Verdict:
    """Each image (its url and unit vector) is refused if a stored image, or an earlier accepted one of the same
    request, is at least `min_similarity` alike (the stored one named when both are); else accepted."""
    nearest = await nearest_stored(store, model, vectors, min_similarity)
    candidates = [hit is None for hit in nearest]
    if len(urls) < INLINE:
        accepted, copies = earlier_copies(vectors, candidates, min_similarity)
    else:
        accepted, copies = await asyncio.to_thread(earlier_copies, vectors, candidates, min_similarity)
    duplicates: list[dict[str, Any]] = []
    stored: list[int] = []
    for i, url in enumerate(urls):
        hit = nearest[i]
        if hit is not None and hit[0] == url:
            stored.append(i)
        elif hit is not None:
            duplicates.append({"url": url, "of": hit[0], "similarity": hit[1]})
        elif i in copies:
            of, alike = copies[i]
            duplicates.append({"url": url, "of": urls[of], "similarity": alike})
    return Verdict(accepted, duplicates, stored)


async def nearest_stored(store: CollectionStore, model: str, vectors: np.ndarray,
                         min_similarity: float) -> list[tuple[str, float] | None]:
    """For each vector, the most similar stored url and its similarity when it is at least `min_similarity`."""
    min_cosine = min_cosine_of(min_similarity)  # at 0 every stored image counts, whatever its cosine
    found: list[tuple[str, float] | None] = []
    for start in range(0, len(vectors), QUERIES):
        for hits in await store.neighbours(model, vectors[start : start + QUERIES], min_cosine, 1):
            alike = similarity(hits[0][1]) if hits else -1.0
            found.append((hits[0][0], alike) if alike >= min_similarity else None)
    return found


def earlier_copies(vectors: np.ndarray, candidates: Sequence[bool], min_similarity: float,
                   block_rows: int = BLOCK) -> tuple[list[int], dict[int, tuple[int, float]]]:
    """Go through the candidate rows in order: a row at least `min_similarity` alike to an earlier accepted row is
    a copy of the most alike of them (index, similarity); any other is accepted. Rows that are not candidates are
    neither compared nor accepted. Compared a block at a time: memory stays BLOCK x (rows), not rows x rows."""
    accepted: list[int] = []
    copies: dict[int, tuple[int, float]] = {}
    for start in range(0, len(vectors), block_rows):
        block = vectors[start : start + block_rows]
        before = np.asarray(accepted, dtype=np.int64)
        to_before = np.clip(100 * (block @ vectors[before].T), 0, 100)
        within = np.clip(100 * (block @ block.T), 0, 100)
        # a row alike to no earlier row at all is accepted without a look at which ones were (most rows; 10,000
        # distinct ones of 512 dimensions, here: 1.4 s instead of 3.1 s)
        hot = (to_before.max(axis=1, initial=0) >= min_similarity) | (np.tril(within, -1).max(axis=1) >= min_similarity)
        taken: list[int] = []  # offsets in the block accepted so far
        for i in range(len(block)):
            if not candidates[start + i]:
                continue
            if not hot[i]:
                taken.append(i)
                continue
            best, of = -1.0, -1
            if len(before):
                j = int(np.argmax(to_before[i]))
                best, of = float(to_before[i, j]), int(before[j])
            if taken:
                k = taken[int(np.argmax(within[i, taken]))]
                if within[i, k] > best:
                    best, of = float(within[i, k]), start + k
            if of >= 0 and best >= min_similarity:
                copies[start + i] = (of, best)
            else:
                taken.append(i)
        accepted.extend(start + t for t in taken)
    return accepted, copies
