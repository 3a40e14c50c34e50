"""The routes of the original Idios API, plus uploads, filters and `indexed` search."""

from __future__ import annotations

import asyncio
import base64
import uuid
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from idios import errors
from idios.api import near_copies
from idios.api.backend import BACKEND, REQUEST_ID, Backend
from idios.api.body import read_body, read_json_bytes
from idios.api.restore_body import Refused
from idios.api.schemas import (
    AddRequest,
    BulkParams,
    CompareRequest,
    DumpRequest,
    PageRequest,
    RemoveRequest,
    SearchAddRequest,
    item_error,
    parse,
)
from idios.engines import Tower
from idios.messages import BusJob, JobKind, JobResult
from idios.models import ModelSpec
from idios.store import Row, similarity

routes = web.RouteTableDef()


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY), status=status,
                        content_type="application/json")


def no_content() -> web.Response:
    return web.Response(status=204)


def backend(request: web.Request) -> Backend:
    return request.app[BACKEND]


def model_of(request: web.Request, reading: bool = False) -> ModelSpec:
    """The model a route is for. A refused model (idios/identity.py) answers model_refused, except to the routes
    that only read its collection (`reading`: count, urls, dump), so that its rows can still be moved out."""
    name = request.match_info["model"]
    be = backend(request)
    specs = be.specs
    if name not in specs:
        if name in be.refused:
            if reading:
                return be.refused[name]
            raise errors.ModelRefused(f"Model {name!r} is not served: {be.store.refused[name]}")
        raise errors.ModelNotFound(f"Model {name!r} not found", models=sorted(specs))
    return specs[name]


def request_id(request: web.Request) -> str:
    return request.get(REQUEST_ID) or uuid.uuid4().hex


async def run_job(request: web.Request, job: BusJob) -> JobResult:
    """Send a job over the bus and turn a failure that came back as data into the matching error. A job that
    writes holds its urls until it is answered (Writer.sending: two writes of one url never run at once)."""
    be = backend(request)
    urls = [job.url] if job.kind is JobKind.ADD else [r["url"] for r in job.rows or ()]
    if not urls:
        return _answer(await be.bus.request(job))
    async with be.writer.sending(job.model, urls):
        return _answer(await be.bus.request(job))


def _answer(result: JobResult) -> JobResult:
    if result.error is not None:
        raise errors.from_data(result.error)
    return result


async def embed(request: web.Request, spec: ModelSpec, url: str | None, image: bytes | None) -> np.ndarray:
    job = BusJob(JobKind.EMBED, spec.name, url=url or "", image=image, request_id=request_id(request))
    vector = (await run_job(request, job)).embedding
    if vector is None:
        raise errors.WorkerFailure("the worker answered without an embedding")
    return vector


@routes.get("/ping")
async def ping(request: web.Request) -> web.Response:
    if request.query.get("rpc") not in (None, "", "0", "false"):
        await run_job(request, BusJob(JobKind.PING, request_id=request_id(request)))
    return json_response("pong")


@routes.get("/models")
async def list_models(request: web.Request) -> web.Response:
    be = backend(request)
    served = [
        {"name": s.name, "dim": s.dim, "text": s.name in be.texts,
         "engines": {"visual": engine_of(be.visual.get(s.name)),
                     "text": engine_of(be.texts[s.name].encoder.tower if s.name in be.texts else None)},
         **source_and_identity(be, s)}
        for s in be.specs.values()
    ]
    refused = [{"name": s.name, "dim": s.dim, "text": False, "refused": be.store.refused[s.name],
                **source_and_identity(be, s)} for s in be.refused.values()]
    return json_response(served + refused)


def source_and_identity(be: Backend, spec: ModelSpec) -> dict[str, Any]:
    """Where a model's weights came from (its manifest's `source`) and the identity of its files as they are
    (idios/identity.py); for a refused model, the files that are not the ones its collection was filled by."""
    found = be.store.identities.get(spec.name)
    return {"source": spec.raw.get("source"),
            "identity": None if found is None else {"visual_sha256": found.visual_sha256, "dim": found.dim}}


def engine_of(tower: Tower | None) -> dict[str, str] | None:
    """What runs a tower in this process; None for one it does not run (a visual tower in the distributed API)."""
    return None if tower is None else {"engine": tower.engine, "precision": tower.precision, "device": tower.device}


@routes.post("/models/{model}/add")
async def add(request: web.Request) -> web.Response:
    return await _add(request, unless_stored=False)


@routes.post("/models/{model}/search_add")
async def search_add(request: web.Request) -> web.Response:
    return await _add(request, unless_stored=True)


async def _add(request: web.Request, unless_stored: bool) -> web.Response:
    """add, or search_add: the same, except that a url already stored is a 409 and stays as it is, and so
    (with min_similarity) is a near copy of a stored image."""
    spec = model_of(request)
    body = await read_body(request, allow_files=True)
    req = parse(SearchAddRequest if unless_stored else AddRequest, body.data)
    if unless_stored and await backend(request).store.existing(spec.name, [req.url]):
        raise errors.AlreadyInserted()
    image = body.files.get("image")
    if isinstance(req, SearchAddRequest) and req.min_similarity is not None:
        await _add_unless_near(request, spec, req, req.min_similarity, image)
        return no_content()
    job = BusJob(JobKind.ADD, spec.name, req.url, req.metadata, image, request_id=request_id(request))
    await run_job(request, job)
    return no_content()


async def _add_unless_near(request: web.Request, spec: ModelSpec, req: AddRequest, min_similarity: float,
                           image: bytes | None) -> None:
    """Embed, judge against the stored images, and write only if no near copy is stored (idios/api/near_copies.py)."""
    result = await run_job(request, BusJob(JobKind.EMBED, spec.name, req.url, image=image,
                                           request_id=request_id(request), hashed=True))
    row = row_of(req, result)
    verdict = await near_copies.judge(backend(request).store, spec.name, [req.url], row.embedding[None, :],
                                      min_similarity)
    if verdict.stored:  # added by another request in the meantime
        raise errors.AlreadyInserted()
    if verdict.duplicates:
        copy = verdict.duplicates[0]
        raise errors.NearDuplicate(f"A near copy of this image is stored: {copy['of']}", url=copy["of"],
                                   similarity=copy["similarity"])
    await write_rows(request, spec.name, [row])


def row_of(item: AddRequest, result: JobResult) -> Row:
    """The row an EMBED job's result makes (its job `hashed`), written by the API itself."""
    if result.embedding is None:
        raise errors.WorkerFailure("the worker answered without an embedding")
    return Row(item.url, result.embedding, item.metadata, result.phash)


async def write_rows(request: web.Request, model: str, rows: list[Row]) -> None:
    """Rows the API writes itself, holding their urls as every write it sends does (run_job); answered once
    searchable (Writer.upsert)."""
    writer = backend(request).writer
    async with writer.sending(model, [r.url for r in rows]):
        await writer.upsert(model, rows)


@routes.post("/models/{model}/add_bulk")
async def add_bulk(request: web.Request) -> web.Response:
    spec = model_of(request)
    params = parse(BulkParams, dict(request.query), ("query",))
    items = (await read_body(request)).data
    limit = backend(request).settings.max_bulk_items
    if not isinstance(items, list) or len(items) > limit:
        raise errors.RequestInvalid(
            [{"loc": ["body"], "msg": f"a list of at most {limit} items is required", "type": "list_type"}]
        )
    failed: list[dict[str, Any]] = []
    valid: dict[str, AddRequest] = {}
    for raw in items:
        item, reason = item_error(AddRequest, raw)
        if item is None:
            url = raw.get("url") if isinstance(raw, dict) and isinstance(raw.get("url"), str) else None
            failed.append({"url": url, "error": reason, "type": "validation_error"})
        elif item.url not in valid:
            valid[item.url] = item
    found = await backend(request).store.existing(spec.name, list(valid))
    todo = [item for url, item in valid.items() if url not in found]
    duplicates: list[dict[str, Any]] = []
    if params.min_similarity is None:
        added = [item.url for item, _ in await _each(request, spec, todo, JobKind.ADD, failed)]
    else:
        added, duplicates, stored = await _add_bulk_unless_near(request, spec, todo, params.min_similarity, failed)
        found.update(stored)
    return json_response({"added": added, "found": [u for u in valid if u in found], "failed": failed,
                          "duplicates": duplicates})


async def _add_bulk_unless_near(request: web.Request, spec: ModelSpec, items: list[AddRequest], min_similarity: float,
                                failed: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]], list[str]]:
    """Embed every item, judge them together (idios/api/near_copies.py), write the accepted ones: the urls added,
    the duplicates, and the urls found stored in the meantime."""
    rows = [row_of(item, result) for item, result in await _each(request, spec, items, JobKind.EMBED, failed)]
    vectors = np.stack([r.embedding for r in rows]) if rows else np.empty((0, spec.dim), np.float32)
    verdict = await near_copies.judge(backend(request).store, spec.name, [r.url for r in rows], vectors,
                                      min_similarity)
    accepted = [rows[i] for i in verdict.accepted]
    if accepted:
        await write_rows(request, spec.name, accepted)
    return [r.url for r in accepted], verdict.duplicates, [rows[i].url for i in verdict.stored]


async def _each(request: web.Request, spec: ModelSpec, items: list[AddRequest], kind: JobKind,
                failed: list[dict[str, Any]]) -> list[tuple[AddRequest, JobResult]]:
    """One job of `kind` (ADD or EMBED) per item, all sent at once; an item whose job fails goes to `failed`."""
    rid = request_id(request)
    add = kind is JobKind.ADD  # EMBED: the API writes the rows itself, so their hashes come back too
    jobs = [run_job(request, BusJob(kind, spec.name, it.url, it.metadata if add else None, request_id=rid,
                                    hashed=not add)) for it in items]
    done = []
    for item, outcome in zip(items, await asyncio.gather(*jobs, return_exceptions=True), strict=True):
        if isinstance(outcome, errors.IdiosError):
            failed.append({"url": item.url, "error": outcome.message, "type": outcome.type})
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            done.append((item, outcome))
    return done


@routes.post("/models/{model}/restore")
async def restore(request: web.Request) -> web.Response:
    spec = model_of(request)
    be = backend(request)
    raw = await read_json_bytes(request)
    try:
        parsed = await be.restore_bodies.parse(raw, spec.name, spec.dim, be.settings.max_bulk_items)
    except Refused as refused:
        return json_response(refused.body, status=refused.status)
    # Restored rows need no model, so the API writes them itself, holding their urls as every write it sends
    # does (run_job). Sent through RabbitMQ to a worker instead, 100k rows went at 3.8k rows/s on the server.
    rows = [Row(url, vec, meta, phash)  # a phash is dropped where the collection has no such field (older ones)
            for url, meta, vec, phash in zip(parsed.urls, parsed.metadata, parsed.matrix, parsed.phash, strict=True)]
    async with be.writer.sending(spec.name, parsed.urls):
        await be.writer.upsert(spec.name, rows)
    return no_content()


@routes.post("/models/{model}/compare")
async def compare(request: web.Request) -> web.Response:
    spec = model_of(request)
    body = await read_body(request, allow_files=True)
    req = parse(CompareRequest, body.data)
    left = (req.url, body.files.get("image"))
    right = (req.other, body.files.get("other_image"))
    for name, (url, image) in (("url", left), ("other", right)):
        if not url and image is None:
            raise errors.RequestInvalid([{"loc": ["body", name], "msg": "Field required", "type": "missing"}])
    with errors.first_failure():
        async with asyncio.TaskGroup() as group:  # one failing side cancels the other
            one = group.create_task(embed(request, spec, *left))
            other = group.create_task(embed(request, spec, *right))
    a, b = one.result(), other.result()
    return json_response(similarity(float(np.dot(a, b))))


async def _page(request: web.Request, with_data: bool) -> web.Response:
    spec = model_of(request, reading=True)
    if request.method == "GET" or not request.can_read_body:
        data: dict[str, Any] = dict(request.query)
    else:
        data = (await read_body(request)).data
    req = parse(DumpRequest if with_data else PageRequest, data)
    rows = await backend(request).store.page(spec.name, req.cursor, req.limit, with_data)
    if with_data:
        if isinstance(req, DumpRequest) and req.encoding_format == "base64":
            for row in rows:
                row["embedding"] = base64.b64encode(np.asarray(row["embedding"], dtype="<f4").tobytes()).decode()
        return json_response(rows)
    return json_response([r["url"] for r in rows])


@routes.post("/models/{model}/urls")
@routes.get("/models/{model}/urls")
async def urls(request: web.Request) -> web.Response:
    return await _page(request, with_data=False)


@routes.post("/models/{model}/dump")
@routes.get("/models/{model}/dump")
async def dump(request: web.Request) -> web.Response:
    return await _page(request, with_data=True)


@routes.get("/models/{model}/count")
async def count(request: web.Request) -> web.Response:
    spec = model_of(request, reading=True)
    return json_response(await backend(request).store.count(spec.name))


@routes.post("/models/{model}/remove")
async def remove(request: web.Request) -> web.Response:
    spec = model_of(request)
    body = (await read_body(request)).data
    req = parse(RemoveRequest, body)
    writer = backend(request).writer
    given = body.get("url") if isinstance(body, dict) else None
    # a IIIF image request stored under its own size before keys were canonical (idios/iiif.py): that row too
    urls = [req.url] + ([given] if isinstance(given, str) and given != req.url else [])
    async with writer.sending(spec.name, urls):  # after an add or edit of the url in flight, as they are ordered
        for url in urls:
            await writer.remove(spec.name, url)
    return no_content()
