"""Long jobs: ids, state, progress, persistence, cancel and resume. One kind today: duplicates (idios/dedup.py).

A job runs in an API process (`serve`, or any `api` of the distributed deployment): it only reads Milvus, so
it needs no model and no worker. Everything about it lives in Milvus, beside the collections, so every API
process answers for every job and a job outlives the process that ran it:

- `idios__jobs`: each job's record (JSON; a new version per write, keyed `<id>/<microseconds>`, the older ones
  then deleted), plus a cancel marker `<id>/cancel` written by whoever cancels it;
- `idios__job_rows`: what a job found so far (`<id>/e/...`: pairs of urls; its checkpoint) and its result
  (`<id>/g/<rank>/<part>`: the groups, largest first).

The process running a job writes its record every HEARTBEAT seconds (progress, cursor, `beat`). A running job
whose record has not been written for STALE seconds (its process was killed) or that was released (its
process stopped: `beat` 0) is adopted by the next API process that looks (every ADOPT_EVERY seconds, and at
start-up), which resumes it from its checkpoint. Milvus has no compare-and-set: an adopter writes its claim,
waits CLAIM_WAIT and reads it back (Strong) before running; two processes that claim within that moment can
both run the job (the same pairs found twice, the same result written twice: harmless).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from pymilvus import AsyncMilvusClient

from idios import errors
from idios.filters import string_literal
from idios.models import ModelSpec
from idios.schema import ensure_keyed_collection
from idios.store import CollectionStore

log = logging.getLogger(__name__)

JOBS = "idios__jobs"
JOB_ROWS = "idios__job_rows"
KEY_MAX = 96  # job ids are 20 hex digits; row keys are "<id>/g/<rank>/<part>"
HEARTBEAT = 5.0  # seconds between writes of a running job's record
STALE = 30.0  # a running job whose record is older than this has lost its process
ADOPT_EVERY = 10.0  # seconds between looks for jobs to adopt
CLAIM_WAIT = 1.0  # seconds between writing a claim and reading it back
KEEP = 20  # finished jobs kept per model (older ones, with their rows, are deleted when a job starts)
LISTED = 50  # jobs in GET /jobs
ROWS_PER_READ = 1000  # a job's rows read at a time (each up to ROW_BYTES)
ROW_BYTES = 32_000  # JSON per row at most (Milvus keeps a JSON value under 64 KiB)
STRONG = {"consistency_level": "Strong"}
ID_RE = re.compile(r"^[0-9a-f]{20}$")

RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class JobRecord:
    """A job as stored; `public()` is what the API answers."""

    job: str
    kind: str
    model: str
    state: str = RUNNING
    done: int = 0
    total: int = 0
    groups: int = 0
    params: dict[str, Any] = field(default_factory=dict)  # the kind's parameters (min_similarity, filter)
    started: str = ""
    finished: str | None = None
    error: str | None = None
    cursor: str | None = None  # the last row examined: the job resumes after it
    owner: str = ""  # the process running it
    beat: float = 0.0  # when `owner` last wrote it (epoch seconds); 0: released, adopt at once

    def public(self) -> dict[str, Any]:
        out = {"job": self.job, "kind": self.kind, "model": self.model, "state": self.state, "done": self.done,
               "total": self.total, "groups": self.groups, **self.params, "started": self.started,
               "finished": self.finished}
        if self.error is not None:
            out["error"] = self.error
        return out

    @classmethod
    def from_json(cls, data: Any) -> JobRecord | None:
        if not isinstance(data, dict):
            return None
        try:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except TypeError:
            return None


def latest(rows: list[dict[str, Any]]) -> dict[str, JobRecord]:
    """The newest stored version of each job's record among `rows` of the jobs' collection (JobRoom._write)."""
    newest: dict[str, tuple[str, JobRecord]] = {}
    for row in rows:
        key = str(row["job"])
        record = JobRecord.from_json(row.get("record"))
        if record is None or not key.rsplit("/", 1)[-1].isdigit():
            continue  # a cancel marker
        if record.job not in newest or key > newest[record.job][0]:
            newest[record.job] = (key, record)
    return {job: record for job, (_, record) in newest.items()}


def marked(record: JobRecord, marker: dict[str, Any] | None) -> JobRecord:
    """A running job with a cancel marker reads as cancelled (since the marker's time), before its runner has
    seen the marker and written so."""
    if record.state == RUNNING and marker is not None:
        return replace(record, state=CANCELLED, finished=marker.get("at"))
    return record


class JobCancelled(Exception):
    """Raised inside a job that was cancelled (DELETE /jobs/ID), at its next checkpoint."""


@dataclass
class Running:
    """A job this process runs: its record as it goes, the task, and whether it was asked to stop."""

    record: JobRecord
    task: asyncio.Task[None] | None = None
    cancelled: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one write of the record at a time


# A kind of job: given the room, the model and the running job, does the work (checkpointing through the room)
JobBody = Callable[["JobRoom", ModelSpec, Running], Awaitable[None]]


class JobRoom:
    """Starts, reads, cancels, runs and adopts the long jobs. One per API process; `kinds` maps a kind to its
    body (idios/dedup.py)."""

    def __init__(self, store: CollectionStore, specs: dict[str, ModelSpec], kinds: dict[str, JobBody]) -> None:
        self._store = store
        self._specs = specs
        self._kinds = kinds
        self._owner = secrets.token_hex(8)
        self._running: dict[str, Running] = {}
        self._supervisor: asyncio.Task[None] | None = None
        self._version = 0  # of the records this process writes (_write)
        self._lost: set[asyncio.Task[None]] = set()  # tasks of jobs adopted elsewhere, stopping (_lose)

    @property
    def client(self) -> AsyncMilvusClient:
        return self._store.client

    @property
    def store(self) -> CollectionStore:
        return self._store

    async def __aenter__(self) -> JobRoom:
        await ensure_keyed_collection(self.client, JOBS, "job", "record", KEY_MAX)
        await ensure_keyed_collection(self.client, JOB_ROWS, "key", "data", KEY_MAX)
        await self._adopt()
        self._supervisor = asyncio.create_task(self._supervise())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        tasks = [r.task for r in self._running.values() if r.task is not None] + list(self._lost)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for run in list(self._running.values()):  # released: the next process to start resumes them at once
            if run.record.state == RUNNING:
                with contextlib.suppress(Exception):
                    await self._write(replace(run.record, beat=0.0, owner=""))
        self._running.clear()

    # --- the API's calls -------------------------------------------------------------------------------------

    async def start(self, kind: str, spec: ModelSpec, params: dict[str, Any]) -> JobRecord:
        """A new job of `kind` for `spec`, running in this process; JobRunning when one runs for the model."""
        running = [r for r in await self.records(spec.name) if r.state == RUNNING]
        if running:
            raise errors.JobRunning(f"job {running[0].job} is running for model {spec.name}", job=running[0].job)
        await self._forget_old(spec.name)
        job = f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(4)}"
        record = JobRecord(job, kind, spec.name, params=params, started=now_iso(), owner=self._owner,
                           beat=time.time())
        await self._write(record)
        # two processes that started a job for one model at the same moment: the older id runs
        rivals = sorted(r.job for r in await self.records(spec.name) if r.state == RUNNING)
        if rivals and rivals[0] != job:
            await self._write(replace(record, state=CANCELLED, finished=now_iso(),
                                      error=f"job {rivals[0]} started for model {spec.name} at the same moment"))
            raise errors.JobRunning(f"job {rivals[0]} is running for model {spec.name}", job=rivals[0])
        self._launch(Running(record))
        return record

    async def get(self, job: str) -> JobRecord:
        if not ID_RE.match(job):
            raise errors.JobNotFound(f"no job {job!r}")
        # looked up before the read: a job that ends while the read is under way (a Strong read on a server takes
        # ~180 ms) leaves _running with its outcome written, so the read may predate it while `run` holds it
        run = self._running.get(job)
        stored, marker = await self._stored(job)
        record = replace(run.record) if run is not None else stored
        if record is None:
            raise errors.JobNotFound(f"no job {job!r}")
        return marked(record, marker)

    async def _stored(self, job: str) -> tuple[JobRecord | None, dict[str, Any] | None]:
        """The newest stored record of `job` and its cancel marker, as stored (Strong)."""
        rows = await self._query(JOBS, f"job like {string_literal(job + '/%')}", ["job", "record"])
        marker = next((r.get("record") or {} for r in rows if r["job"] == job + "/cancel"), None)
        return latest(rows).get(job), marker

    async def _query(self, collection: str, expr: str, fields: list[str], limit: int = 16384) -> list[dict[str, Any]]:
        """A Strong read of the jobs' collections; an unreachable server is a 503 `store_unavailable` at once, as
        every read is (CollectionStore.read)."""
        return list(await self._store.read(self.client.query(collection, filter=expr, output_fields=fields,
                                                             limit=limit, **STRONG)))

    async def records(self, model: str | None = None) -> list[JobRecord]:
        """Jobs, newest first (of `model`, or of every model)."""
        # one query: cancel markers name their model too
        expr = f'record["model"] == {string_literal(model)}' if model else 'job >= ""'
        rows = await self._query(JOBS, expr, ["job", "record"])
        markers = {str(r["job"]).removesuffix("/cancel"): r.get("record") or {} for r in rows
                   if str(r["job"]).endswith("/cancel")}
        records = [marked(r, markers.get(r.job)) for r in latest(rows).values()]
        return sorted(records, key=lambda r: r.job, reverse=True)

    async def cancel(self, job: str) -> JobRecord:
        record = await self.get(job)
        if record.state != RUNNING:
            raise errors.JobFinished(f"job {job} is {record.state}; only a running job can be cancelled")
        at = now_iso()
        await self._store.write(functools.partial(self.client.upsert, JOBS, [
            {"job": job + "/cancel", "record": {"at": at, "model": record.model}, "vector": [1.0, 0.0]}]))
        run = self._running.get(job)
        if run is not None:
            run.cancelled = True  # its body stops at its next checkpoint and writes the record itself
        return replace(record, state=CANCELLED, finished=at)

    async def rows(self, job: str, part: str, start: str, end: str) -> list[dict[str, Any]]:
        """A job's rows of one `part` ("e" pairs, "g" groups) with keys in [start, end), in key order."""
        found: list[dict[str, Any]] = []
        lo, hi = f"key >= {string_literal(f'{job}/{part}/{start}')}", string_literal(f"{job}/{part}/{end}")
        while True:  # pages of ROWS_PER_READ in key order (a limited query comes back in primary-key order)
            page = sorted(await self._query(JOB_ROWS, f"{lo} and key < {hi}", ["key", "data"], ROWS_PER_READ),
                          key=lambda r: str(r["key"]))
            found += page
            if len(page) < ROWS_PER_READ:
                return found
            lo = f"key > {string_literal(str(page[-1]['key']))}"

    async def clear_rows(self, job: str, part: str) -> None:
        """Delete a job's rows of one `part` (its groups, before they are written again)."""
        await self._store.write(functools.partial(self.client.delete, JOB_ROWS,
                                               filter=f"key like {string_literal(f'{job}/{part}/%')}"))

    # --- for job bodies --------------------------------------------------------------------------------------

    async def put_rows(self, job: str, part: str, rows: list[tuple[str, Any]]) -> None:
        """Write rows of a job (`key` relative to `<job>/<part>/`, JSON data), many per call."""
        for start in range(0, len(rows), 500):
            chunk = rows[start : start + 500]
            data = [{"key": f"{job}/{part}/{k}", "data": d, "vector": [1.0, 0.0]} for k, d in chunk]
            await self._store.write(functools.partial(self.client.upsert, JOB_ROWS, data))

    async def checkpoint(self, run: Running, **progress: Any) -> None:
        """Record progress in memory (the heartbeat writes it); raise JobCancelled if the job was cancelled."""
        for key, value in progress.items():
            setattr(run.record, key, value)
        if run.cancelled:
            raise JobCancelled()

    # --- running ---------------------------------------------------------------------------------------------

    def _launch(self, run: Running) -> None:
        self._running[run.record.job] = run
        run.task = asyncio.create_task(self._run(run), name=f"job-{run.record.job}")

    async def _run(self, run: Running) -> None:
        rec = run.record
        spec = self._specs.get(rec.model)
        try:
            if spec is None:
                raise errors.ModelNotFound(f"model {rec.model} is not served by this process")
            await self._body(spec, run)
            rec.state, rec.finished = DONE, now_iso()
            log.info("job %s (%s of %s) done: %d rows, %d groups", rec.job, rec.kind, rec.model, rec.done, rec.groups)
        except JobCancelled:
            rec.state, rec.finished = CANCELLED, now_iso()
            log.info("job %s cancelled after %d of %d rows", rec.job, rec.done, rec.total)
        except asyncio.CancelledError:
            raise  # this process is stopping: the job stays running, released in __aexit__
        except Exception as exc:
            rec.state, rec.finished, rec.error = FAILED, now_iso(), errors.brief(exc)
            log.exception("job %s failed", rec.job)
        try:
            await self._write(rec, run)
        except Exception as exc:  # stored as running still: adopted and run again after STALE
            log.error("job %s: its outcome could not be written: %s", rec.job, errors.brief(exc))
        finally:
            self._running.pop(rec.job, None)

    async def _body(self, spec: ModelSpec, run: Running) -> None:
        """Run the job's body; while Milvus is unavailable, run it again from its checkpoint, for up to
        IDIOS_MILVUS_RETRY seconds of failing in a row: a blip of the server does not lose a long job."""
        loop = asyncio.get_running_loop()
        failing_since: float | None = None
        while True:
            done = run.record.done
            try:
                await self._kinds[run.record.kind](self, spec, run)
                return
            except errors.StoreUnavailable as exc:
                if run.record.done > done:
                    failing_since = None
                failing_since = failing_since if failing_since is not None else loop.time()
                if loop.time() - failing_since > self._store.retry_seconds:
                    raise
                log.warning("job %s: %s; going on from its checkpoint", run.record.job, errors.brief(exc))
                await asyncio.sleep(1.0)

    async def _supervise(self) -> None:
        """Heartbeats of this process's jobs; now and then, adopt jobs whose process is gone."""
        last_look = time.monotonic()
        while True:
            await asyncio.sleep(HEARTBEAT)
            for run in list(self._running.values()):
                try:
                    stored, marker = await self._stored(run.record.job)
                    if marker is not None:
                        run.cancelled = True
                    if stored is not None and stored.owner != self._owner:
                        self._lose(run, stored.owner)
                        continue
                    await self._write(run.record, run)
                except Exception as exc:
                    log.warning("heartbeat of job %s failed: %s", run.record.job, errors.brief(exc))
            if time.monotonic() - last_look >= ADOPT_EVERY:
                last_look = time.monotonic()
                try:
                    await self._adopt()
                except Exception as exc:
                    log.warning("looking for jobs to adopt failed: %s", errors.brief(exc))

    def _lose(self, run: Running, owner: str) -> None:
        """Another process adopted this job (this one stalled past STALE): stop it here, writing nothing more, so
        that one process writes its pairs and groups."""
        log.warning("job %s was adopted by another process (%s); stopping it here", run.record.job, owner)
        self._running.pop(run.record.job, None)
        if run.task is not None:
            run.task.cancel()
            self._lost.add(run.task)
            run.task.add_done_callback(self._lost.discard)

    async def _adopt(self) -> None:
        """Run the running jobs of models this process serves whose process is gone, from their checkpoint."""
        for record in await self.records():
            if record.state != RUNNING or record.job in self._running or record.model not in self._specs:
                continue
            if record.beat and time.time() - record.beat < STALE:
                continue
            claim = replace(record, owner=self._owner, beat=time.time())
            await self._write(claim)
            await asyncio.sleep(CLAIM_WAIT)
            again = await self.get(record.job)
            if again.owner != self._owner or again.state != RUNNING:
                continue
            log.info("resuming job %s (%s of %s) after %d of %d rows", again.job, again.kind, again.model,
                     again.done, again.total)
            self._launch(Running(again))

    async def _write(self, record: JobRecord, run: Running | None = None) -> None:
        """Store a new version of the record, then delete the older ones. Not an upsert of one key: on Milvus
        Lite a query that meets an upsert of its row misses the row (measured: 178 of 500 queries during a loop
        of upserts of one key found nothing), and a job must never read as not found, nor a running one as gone
        (a second job could then start). Versions are keyed `<id>/<microseconds>`; readers take the newest."""
        async with run.lock if run is not None else contextlib.nullcontext():
            if run is not None:
                record.beat = time.time()
            self._version = max(self._version + 1, time.time_ns() // 1000)
            key = f"{record.job}/{self._version:017d}"
            row = {"job": key, "record": asdict(record), "vector": [1.0, 0.0]}
            await self._store.write(functools.partial(self.client.insert, JOBS, [row]))
            older = f"job >= {string_literal(record.job + '/0')} and job < {string_literal(key)}"
            await self._store.write(functools.partial(self.client.delete, JOBS, filter=older))

    async def _forget_old(self, model: str) -> None:
        """Delete the finished jobs of `model` beyond the KEEP newest, with their rows."""
        finished = [r.job for r in await self.records(model) if r.state != RUNNING]
        for job in finished[KEEP:]:
            await self._store.write(functools.partial(self.client.delete, JOB_ROWS,
                                                   filter=f"key like {string_literal(job + '/%')}"))
            await self._store.write(functools.partial(self.client.delete, JOBS,
                                                   filter=f"job like {string_literal(job + '/%')}"))
