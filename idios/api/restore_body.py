"""A restore body, checked: JSON → urls, metadata, pHashes and a float32 matrix of unit rows (numbers or base64).

Parsing a large body is CPU work that holds the GIL throughout (orjson: 0.64 s for 10,000 rows of 512 floats, then
0.22 s to make the matrix), so it cannot share the event loop or a thread with anything that should stay
responsive: measured with `serve`, a `count` answered in p50 95 ms / p95 1,443 ms while two 10,000-row restores
ran, 4 / 7 ms otherwise. Bodies over INLINE_BYTES are therefore parsed in a helper process, started on first use.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from idios import errors
from idios.api.schemas import EmbeddingNumbers, RestoreRow, decode_json, item_error, parse

INLINE_BYTES = 1 << 20  # smaller bodies are parsed in place: a trip to the helper would cost more than it saves
UNIT_TOLERANCE = 1e-4  # a float32 unit vector's norm is within ~1e-6 of 1: those are stored bit for bit


@dataclass(frozen=True)
class RestoreRows:
    urls: list[str]
    metadata: list[dict[str, Any] | None]
    matrix: np.ndarray  # float32, one unit row per url
    phash: list[str]  # one per url, "" where the row gave none


def parse_restore(raw: bytes, model: str, dim: int, limit: int) -> RestoreRows:
    """Check a restore body; raise the 4xx that names the first problem. A url given twice keeps its last row."""
    items = decode_json(raw)
    if not isinstance(items, list) or len(items) > limit:
        raise errors.RequestInvalid(
            [{"loc": ["body"], "msg": f"a list of at most {limit} items is required", "type": "list_type"}]
        )
    parsed = [parse(RestoreRow, item, prefix=("body", i)) for i, item in enumerate(items)]
    matrix = embedding_matrix([row.embedding for row in parsed], model, dim)
    last = sorted({row.url: i for i, row in enumerate(parsed)}.values())
    return RestoreRows([parsed[i].url for i in last], [parsed[i].metadata for i in last], matrix[last],
                       [parsed[i].phash or "" for i in last])


def parse_restore_as_data(raw: bytes, model: str, dim: int, limit: int) -> RestoreRows | tuple[int, Any]:
    """parse_restore for the helper process: a refusal comes back as (status, body), plain data."""
    try:
        return parse_restore(raw, model, dim, limit)
    except errors.IdiosError as exc:
        return exc.status, exc.to_body()


def embedding_matrix(vectors: list[Any], model: str, dim: int) -> np.ndarray:
    """All embeddings of a restore as one float32 matrix of unit rows, checked at once; a 422 names the first bad
    row. An embedding is a list of numbers or a base64 string of `dim` little-endian float32 values (schemas:
    EncodingFormat); a body may mix both. Rows are stored with unit length (the collections compare by inner
    product, which is then the cosine): rows that are not are scaled to length 1, which leaves their cosine
    similarities as they were; a row of zeros has no direction and is refused. Dumped rows are unit vectors and
    come back unchanged."""
    try:
        matrix = np.asarray([_numbers(v, dim) for v in vectors], dtype=np.float32)
        if matrix.shape == (len(vectors), dim) and np.isfinite(matrix).all():
            return unit_rows(matrix)
    except (ValueError, TypeError, binascii.Error):
        pass
    for i, vec in enumerate(vectors):  # the slow path, only to say what is wrong where
        values = _row(vec, i)
        if len(values) != dim:
            raise errors.DimensionMismatch(
                f"embedding has {len(values)} values; model {model} stores {dim}", loc=("body", i, "embedding"))
        if not np.isfinite(values).all():
            raise errors.FieldError("embedding values must be finite", loc=("body", i, "embedding"))
    raise errors.FieldError("embeddings could not be read", loc=("body",))


def _numbers(vec: Any, dim: int) -> Any:
    """A row for the matrix: base64 decoded, numbers as they are (numpy checks them)."""
    if isinstance(vec, str):
        row = np.frombuffer(base64.b64decode(vec, validate=True), dtype="<f4")
        if row.size != dim:
            raise ValueError("wrong length")
        return row
    return vec


def _row(vec: Any, i: int) -> np.ndarray:
    """One embedding, decoded, or the 422 that says why it cannot be."""
    where = ("body", i, "embedding")
    if isinstance(vec, str):
        try:
            raw = base64.b64decode(vec, validate=True)
        except (binascii.Error, ValueError):
            raise errors.RequestInvalid([{"loc": list(where), "type": "base64_invalid",
                                          "msg": "a string embedding must be base64 of little-endian float32"}]) from None
        if len(raw) % 4:
            raise errors.RequestInvalid([{"loc": list(where), "type": "base64_invalid",
                                          "msg": f"{len(raw)} bytes are not a whole number of float32 values"}])
        return np.frombuffer(raw, dtype="<f4")
    item, reason = item_error(EmbeddingNumbers, {"embedding": vec})
    if item is None:
        raise errors.RequestInvalid([{"loc": list(where), "msg": str(reason).split(": ", 1)[-1],
                                      "type": "float_type"}])
    return np.asarray(item.embedding, dtype=np.float64)


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix.astype(np.float64), axis=1)
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise errors.FieldError("an embedding of zeros has no direction to compare",
                                loc=("body", int(zero[0]), "embedding"))
    off = np.abs(norms - 1.0) > UNIT_TOLERANCE
    if off.any():
        matrix = matrix.copy()
        matrix[off] = (matrix[off] / norms[off, None]).astype(np.float32)
    return matrix


class Refused(Exception):
    """The helper process refused a body: the answer to give, as it made it."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


class RestoreParser:
    """Parses restore bodies: small ones in place, large ones in one helper process (spawned, not forked: the
    API process runs gRPC threads, which a fork would copy mid-flight). Started on first use, stopped on close."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    async def parse(self, raw: bytes, model: str, dim: int, limit: int) -> RestoreRows:
        if len(raw) <= INLINE_BYTES:
            return parse_restore(raw, model, dim, limit)
        if self._pool is None:
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        out = await asyncio.get_running_loop().run_in_executor(self._pool, parse_restore_as_data, raw, model, dim,
                                                               limit)
        if isinstance(out, RestoreRows):
            return out
        raise Refused(*out)

    @property
    def started(self) -> bool:
        return self._pool is not None

    async def aclose(self) -> None:
        """Stop the helper; its shutdown waits for the process to exit, so it waits in a thread, not the loop."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)
