"""search: by image url, uploaded image, text, a stored url (`indexed`), or a weighted mix of those (`queries`),
with filters (idios/filters.py) and paging (idios/store.py search)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from idios import errors
from idios.api.body import read_body
from idios.api.routes import backend, embed, json_response, model_of
from idios.api.schemas import QueryPart, SearchRequest, parse
from idios.models import ModelSpec
from idios.store import Hit

routes = web.RouteTableDef()

BATCH_MAX = 100  # search bodies in one search_batch
CANCELLED_NORM = 1e-6  # a weighted sum shorter than this has no direction left to search in


@routes.post("/models/{model}/search")
async def search(request: web.Request) -> web.Response:
    spec = model_of(request)
    body = await read_body(request, allow_files=True)
    req = parse(SearchRequest, body.data)
    image = body.files.get("image")
    store = backend(request).store
    expr = await store.where(spec.name, req.filter)
    if req.queries is not None:
        vector = await weighted(request, spec, req.queries, image)
    elif req.indexed:
        if not req.url:
            raise errors.FieldError("indexed search needs the url of a stored image", loc=("body", "url"))
        vector = await stored_vector(request, spec, req.url)
    elif image is not None or req.url:
        vector = await embed(request, spec, req.url, image)
    elif req.text:
        vector = await text_vector(request, spec, req.text)
    else:
        return json_response({"detail": "Either 'text' or 'url' must be provided."}, status=422)
    if req.group_by is not None:
        hits = await store.search_groups(spec.name, vector, req.limit, expr, req.group_by, req.group_size,
                                         req.min_similarity, req.offset)
    else:
        hits = await store.search(spec.name, vector, req.limit, expr, req.min_similarity, req.offset)
    return json_response(answer(hits))


def answer(hits: list[Hit]) -> list[dict[str, Any]]:
    return [{"url": h.url, "metadata": h.metadata, "similarity": h.similarity} for h in hits]


@routes.post("/models/{model}/search_batch")
async def search_batch(request: web.Request) -> web.Response:
    """Up to BATCH_MAX search bodies (JSON; no uploads) -> their hit lists, in order. The stored vectors of
    `indexed` bodies are read in one query, the others embedded side by side, and the bodies that share a
    filter and a page are searched in one Milvus call. One bad body fails the batch (a 422 naming it)."""
    spec = model_of(request)
    data = (await read_body(request)).data
    if not isinstance(data, list) or not 1 <= len(data) <= BATCH_MAX:
        raise errors.RequestInvalid(
            [{"loc": ["body"], "msg": f"a list of 1 to {BATCH_MAX} search bodies is required", "type": "list_type"}])
    reqs = [parse(SearchRequest, body, ("body", i)) for i, body in enumerate(data)]
    store = backend(request).store
    exprs: dict[bytes, str] = {}
    for i, req in enumerate(reqs):
        key = filter_key(req)
        if key not in exprs:
            with at(i):
                exprs[key] = await store.where(spec.name, req.filter)
    stored = await stored_vectors(request, spec, [r.url for r in reqs if r.indexed and r.url and r.queries is None])

    async def vector_of(i: int, req: SearchRequest) -> np.ndarray:
        if req.queries is not None:
            return await weighted(request, spec, req.queries, None, ("body", i))
        with at(i):
            if req.indexed:
                if not req.url:
                    raise errors.FieldError("indexed search needs the url of a stored image", loc=("body", "url"))
                return stored_of(stored, spec, req.url, index=i)
            if req.url:
                return await embed(request, spec, req.url, None)
            if req.text:
                return await text_vector(request, spec, req.text)
            raise errors.FieldError("either 'text', 'url' or 'queries' must be provided", loc=("body",))

    with errors.first_failure():
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(vector_of(i, r)) for i, r in enumerate(reqs)]
    vectors = [t.result() for t in tasks]
    answers: list[list[Hit]] = [[] for _ in reqs]
    groups: dict[tuple[bytes, int, int, float | None], list[int]] = {}
    for i, req in enumerate(reqs):
        if req.group_by is not None:  # grouped bodies are collapsed one by one (store.search_groups)
            answers[i] = await store.search_groups(spec.name, vectors[i], req.limit, exprs[filter_key(req)],
                                                   req.group_by, req.group_size, req.min_similarity, req.offset)
            continue
        groups.setdefault((filter_key(req), req.limit, req.offset,
                           req.min_similarity), []).append(i)
    for (key, limit, offset, min_similarity), members in groups.items():
        found = await store.search_many(spec.name, [vectors[i] for i in members], limit, exprs[key],
                                        min_similarity, offset)
        for i, hits in zip(members, found, strict=True):
            answers[i] = hits
    return json_response([answer(hits) for hits in answers])


def filter_key(req: SearchRequest) -> bytes:
    return orjson.dumps(req.filter, option=orjson.OPT_SORT_KEYS)


@contextmanager
def within(prefix: tuple[str | int, ...]) -> Iterator[None]:
    """A field error of a body's part names where that part is: ["body", "url"] becomes [*prefix, "url"]."""
    try:
        yield
    except errors.FieldError as exc:
        if exc.loc[:1] == ("body",):
            exc.loc = (*prefix, *exc.loc[1:])
        raise


def at(i: int) -> AbstractContextManager[None]:
    """A field error of the i-th body of a batch names that body: ["body", i, ...]."""
    return within(("body", i))


async def weighted(request: web.Request, spec: ModelSpec, parts: list[QueryPart], image: bytes | None,
                   loc: tuple[str | int, ...] = ("body",)) -> np.ndarray:
    """The normalised weighted sum of the parts' unit vectors. Stored parts are read in one query and the others
    embedded at once, so their fetches and their rows in the worker's batch overlap (scripts/bench_search.py
    measured three stored parts at 1.18x one, three image urls at 1.45x)."""
    for i, part in enumerate(parts):
        if part.image and image is None:
            raise errors.FieldError("an image part needs the image uploaded in the form's `image` field",
                                    loc=(*loc, "queries", i, "image"))
    stored = await stored_vectors(request, spec, [p.url for p in parts if p.indexed and p.url])

    async def vector_of(i: int, part: QueryPart) -> np.ndarray:
        if part.indexed and part.url:  # read above, all in one query
            # in a batch (loc ["body", i]) the 404 names its body, as an indexed body's does
            return stored_of(stored, spec, part.url, **({"index": loc[1]} if len(loc) > 1 else {}))
        with within((*loc, "queries", i)):  # an image's or a text's error names its part
            return await part_vector(request, spec, part, image)

    with errors.first_failure():
        async with asyncio.TaskGroup() as group:  # one failing part cancels the others
            tasks = [group.create_task(vector_of(i, p)) for i, p in enumerate(parts)]
    vectors = [t.result() for t in tasks]
    total = sum(p.weight * v / max(float(np.linalg.norm(v)), 1e-12) for p, v in zip(parts, vectors, strict=True))
    norm = float(np.linalg.norm(total))
    if norm < CANCELLED_NORM:
        raise errors.FieldError("the weighted parts cancel out: their sum has no direction to search in",
                                loc=(*loc, "queries"))
    return np.asarray(total / norm, dtype=np.float32)


async def part_vector(request: web.Request, spec: ModelSpec, part: QueryPart, image: bytes | None) -> np.ndarray:
    """One part's vector: a stored one (`indexed`), an image's (url or upload), or a text's."""
    if part.url is not None:
        return await (stored_vector(request, spec, part.url) if part.indexed else embed(request, spec, part.url, None))
    if part.image:
        return await embed(request, spec, None, image)
    assert part.text is not None  # QueryPart's validator: exactly one source
    return await text_vector(request, spec, part.text)


async def stored_vector(request: web.Request, spec: ModelSpec, url: str) -> np.ndarray:
    return stored_of(await stored_vectors(request, spec, [url]), spec, url)


async def stored_vectors(request: web.Request, spec: ModelSpec, urls: list[str]) -> dict[str, np.ndarray]:
    """The stored vectors of `urls` (those stored), read in one query (idios/store.py rows_of)."""
    if not urls:
        return {}
    rows = await backend(request).store.rows_of(spec.name, urls, ["embedding"])
    return {url: np.asarray(row["embedding"], dtype=np.float32) for url, row in rows.items()}


def stored_of(stored: dict[str, np.ndarray], spec: ModelSpec, url: str, **extra: Any) -> np.ndarray:
    if url not in stored:
        raise errors.NotFound(f"{url} is not indexed in model {spec.name}", **extra)
    return stored[url]


async def text_vector(request: web.Request, spec: ModelSpec, text: str) -> np.ndarray:
    texts = backend(request).texts
    if spec.name not in texts:
        why = "has no text tower" if not spec.has_text else "has its text search turned off (IDIOS_TEXT_SEARCH)"
        raise errors.TextNotSupported(f"Model {spec.name} {why}; search by image instead", loc=("body", "text"))
    return await texts[spec.name].embed(text)
