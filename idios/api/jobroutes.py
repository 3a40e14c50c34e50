"""The routes of long jobs: start a duplicates job, read jobs and their groups, cancel. They only start, read
and cancel; the jobs themselves are idios/jobs.py (and idios/dedup.py)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from idios import errors
from idios.api.body import read_body
from idios.api.routes import backend, json_response, model_of
from idios.api.schemas import DuplicatesRequest, GroupsRequest, parse
from idios.dedup import KIND, default_similarity
from idios.jobs import DONE, LISTED, JobRoom

routes = web.RouteTableDef()


def jobs(request: web.Request) -> JobRoom:
    return backend(request).jobs


@routes.post("/models/{model}/duplicates")
async def start_duplicates(request: web.Request) -> web.Response:
    spec = model_of(request)
    data = (await read_body(request)).data if request.can_read_body else {}
    req = parse(DuplicatesRequest, data if data is not None else {})
    await backend(request).store.where(spec.name, req.filter)  # a bad filter is a 422 now, not a failed job later
    min_similarity = default_similarity(spec) if req.min_similarity is None else req.min_similarity
    record = await jobs(request).start(KIND, spec, {"min_similarity": min_similarity, "filter": req.filter})
    return json_response({"job": record.job}, status=202)


@routes.get("/jobs")
async def list_jobs(request: web.Request) -> web.Response:
    model = request.query.get("model") or None
    records = await jobs(request).records(model)
    return json_response([r.public() for r in records[:LISTED]])


@routes.get("/jobs/{job}")
async def get_job(request: web.Request) -> web.Response:
    return json_response((await jobs(request).get(request.match_info["job"])).public())


@routes.delete("/jobs/{job}")
async def cancel_job(request: web.Request) -> web.Response:
    return json_response((await jobs(request).cancel(request.match_info["job"])).public())


@routes.get("/jobs/{job}/groups")
async def job_groups(request: web.Request) -> web.Response:
    room = jobs(request)
    record = await room.get(request.match_info["job"])
    req = parse(GroupsRequest, dict(request.query), prefix=("query",))
    if record.state != DONE:
        raise errors.JobNotDone(f"job {record.job} is {record.state}; its groups come when it is done")
    start = int(req.cursor or 0)
    end = min(start + req.limit, record.groups)
    groups: dict[str, dict[str, Any]] = {}
    if start < end:
        for row in await room.rows(record.job, "g", f"{start:09d}", f"{end:09d}"):
            rank = str(row["key"]).split("/")[2]
            part = row["data"]
            if rank in groups:
                groups[rank]["urls"].extend(part["urls"])
            else:
                groups[rank] = dict(part)
    ordered = [groups[k] for k in sorted(groups)]
    return json_response({"groups": ordered, "next": str(end) if end < record.groups else None})
