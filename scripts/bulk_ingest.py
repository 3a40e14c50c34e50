#!/usr/bin/env python3
"""Add many images (10^5-10^6) to an Idios service through POST /models/{model}/add_bulk, resumably; or move what
one model holds to another (--from-model)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from iiif_documents import canonical
from iiif_walk import iiif_records
from ingest_args import input_spec, parse_args, source_name, walk_options
from ingest_input import Record, model_records, open_text, read_records
from ingest_input import count_records as count_input
from ingest_state import IIIF_DONE, Done, StateLog, load_state
from service_client import (
    EXIT_USAGE,
    ScriptError,
    ServiceClient,
    ServiceError,
    backoff,
    dumps,
    progress,
    run,
    say,
)

TRANSIENT_TYPES = frozenset(
    {"image_timeout", "image_unreachable", "job_timeout", "worker_error", "internal_error", "unavailable"}
)
URL_PAGE = 16384


@dataclass
class Totals:
    """This run's counts, printed at the end."""

    records: int = 0
    already_done: int = 0
    sent: int = 0
    added: int = 0
    found: int = 0
    failed: int = 0
    duplicates: int = 0
    started: float = field(default_factory=time.monotonic)

    def summary(self) -> dict[str, Any]:
        seconds = time.monotonic() - self.started
        handled = self.records - self.already_done
        out = {k: v for k, v in vars(self).items() if k != "started"}
        return {**out, "seconds": round(seconds, 3), "records_per_s": round(handled / seconds, 1) if seconds else 0}


def count_records(args: argparse.Namespace) -> int | None:
    """How many records the input holds (None for stdin, which can be read once only, and for IIIF, which would
    mean fetching every document twice; the bar then shows the count and rate without an ETA, or --limit)."""
    limit: int | None = args.limit
    if args.input == "-" or args.format == "iiif":
        return limit
    with open_text(args.input) as f:
        n = count_input(input_spec(args), f)
    return n if limit is None else min(n, limit)


async def count_model(client: ServiceClient, args: argparse.Namespace) -> int:
    """How many records --from-model holds (GET /models/OLD/count), at most --limit."""
    n = int(await client.request("GET", client.model_path("count", args.from_model)))
    return n if args.limit is None else min(n, args.limit)


async def each(records: Iterator[Record]) -> AsyncGenerator[Record, None]:
    """A file's records as an async iterator, as the records of --from-model come."""
    for rec in records:
        yield rec


@asynccontextmanager
async def open_records(args: argparse.Namespace, client: ServiceClient) -> AsyncIterator[AsyncIterator[Record]]:
    """The records of this run: the input file's, those of a IIIF walk, or those of --from-model, streamed page
    by page."""
    if args.from_model is not None:
        async with aclosing(model_records(client, args.from_model, args.page_size)) as rows:
            yield rows
        return
    if args.format == "iiif":  # a file by its full path: each record's key starts with it (resuming)
        async with iiif_records(source_name(args), walk_options(args)) as walked:
            yield walked
        return
    with open_text(args.input) as stream:
        async with aclosing(each(read_records(input_spec(args), stream))) as recs:
            yield recs


async def batches(records: AsyncIterator[Record], args: argparse.Namespace, done: Done,
                  totals: Totals) -> AsyncGenerator[list[Record], None]:
    """Records not yet done, grouped `--batch` at a time; stops at --limit."""
    batch: list[Record] = []
    async for rec in records:
        if args.limit is not None and rec.position >= args.limit:
            break
        totals.records += 1
        if done.has(rec):
            totals.already_done += 1
            continue
        batch.append(rec)
        if len(batch) >= args.batch:
            yield batch
            batch = []
    if batch:
        yield batch


def failure(rec: Record, error: str, kind: str) -> dict[str, Any]:
    """A line of the failed file (with a IIIF record's key, which says it is done)."""
    entry: dict[str, Any] = {"position": rec.position, "url": rec.url, "error": error, "type": kind}
    if rec.metadata is not None:
        entry["metadata"] = rec.metadata
    if rec.key is not None:
        entry["iiif_document"], entry["iiif_index"] = rec.key
    return entry


async def settle(client: ServiceClient, args: argparse.Namespace, batch: list[Record],
                 existing: frozenset[str]) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Send one batch (re-sending transient item failures) until every record is added, found, a duplicate or
    failed. Records and answers meet by the key the service stores a url under (canonical)."""
    counts = {"sent": 0, "added": 0, "found": 0, "failed": 0, "duplicates": 0}
    failures = [failure(r, r.problem, r.problem_type) for r in batch if r.problem is not None]
    pending = to_send(batch, existing, counts)
    counts["sent"] = len(pending)
    for attempt in range(args.item_retries + 1):
        if not pending:
            break
        if attempt:
            await asyncio.sleep(backoff(attempt, client.backoff_max))
        answered = outcomes(await post_batch(client, list(pending.values())))
        retry: dict[str, Record] = {}
        for key, rec in pending.items():
            kind, entry = answered.get(key, ("failed", UNANSWERED))
            if kind != "failed":
                counts[kind] += 1
            elif entry.get("type") in TRANSIENT_TYPES and attempt < args.item_retries:
                retry[key] = rec
            else:
                failures.append(failure(rec, str(entry.get("error")), str(entry.get("type"))))
        pending = retry
    counts["failed"] = len(failures)
    return counts, failures


UNANSWERED = {"error": "the service's answer does not name this url", "type": "unanswered"}


def to_send(batch: list[Record], existing: frozenset[str], counts: dict[str, int]) -> dict[str, Record]:
    """The batch's records to send, by key: one per key (a later record of the same image counts as a duplicate),
    none whose key the service holds (--skip-existing; counted as found)."""
    pending: dict[str, Record] = {}
    for rec in batch:
        if rec.problem is not None or rec.url is None:
            continue
        key = canonical(rec.url)
        if key in existing:
            counts["found"] += 1
        elif key in pending:
            counts["duplicates"] += 1
        else:
            pending[key] = rec
    return pending


def outcomes(answer: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """add_bulk's answer by key: ("added" | "found" | "duplicates" | "failed", the entry). The service answers in
    keys, an older one (and a validation failure) in the url as sent: both give the key."""
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for kind in ("added", "found", "duplicates", "failed"):
        listed = answer.get(kind)
        for item in listed if isinstance(listed, list) else []:
            entry = item if isinstance(item, dict) else {"url": item}
            if isinstance(entry.get("url"), str):
                out.setdefault(canonical(entry["url"]), (kind, entry))
    return out


async def post_batch(client: ServiceClient, records: list[Record]) -> dict[str, Any]:
    """One add_bulk request. A batch the service keeps answering 5xx fails as a whole; no answer at all,
    or a refusal of the request itself (4xx), stops the run."""
    body = dumps([r.item() for r in records])
    try:
        answer = await client.request("POST", client.model_path("add_bulk"), body)
    except ServiceError as exc:
        if exc.status is None or not exc.transient:
            raise
        return {"failed": [{"url": r.url, "error": str(exc), "type": "request_failed"} for r in records]}
    if not isinstance(answer, dict):
        raise ServiceError(f"add_bulk answered {type(answer).__name__}, not an object")
    return answer


async def stored_urls(client: ServiceClient) -> frozenset[str]:
    """The key of every url the model holds, paged through POST /urls (rows an older version stored under a sized
    IIIF url count as their key)."""
    urls: list[str] = []
    cursor: str | None = None
    while True:
        page = await client.request("POST", client.model_path("urls"), dumps({"cursor": cursor, "limit": URL_PAGE}))
        if not page:
            return frozenset(urls)
        urls.extend(canonical(u) for u in page)
        cursor = page[-1]


async def produce(records: AsyncIterator[Record], args: argparse.Namespace, done: Done, totals: Totals,
                  queue: asyncio.Queue[list[Record] | None]) -> None:
    """Feed batches to the senders (the bounded queue holds back the reading), then one stop mark per sender."""
    try:
        async with aclosing(batches(records, args, done, totals)) as grouped:
            async for batch in grouped:
                await queue.put(batch)
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise ScriptError(f"cannot read {source_name(args)}: {exc}", EXIT_USAGE) from None
    for _ in range(args.concurrency):
        await queue.put(None)


async def consume(client: ServiceClient, args: argparse.Namespace, existing: frozenset[str], log: StateLog,
                  totals: Totals, bar: Any, queue: asyncio.Queue[list[Record] | None]) -> None:
    """Send batches until the stop mark; record each finished one."""
    while (batch := await queue.get()) is not None:
        counts, failures = await settle(client, args, batch, existing)
        log.batch_done(batch, {k: counts[k] for k in ("added", "found", "failed")}, failures)
        for key, value in counts.items():
            setattr(totals, key, getattr(totals, key) + value)
        bar.update(len(batch))
        bar.set_postfix(added=totals.added, found=totals.found, failed=totals.failed, refresh=False)


async def ingest(args: argparse.Namespace) -> int:
    """The whole run: check the service, then stream the input through `--concurrency` senders."""
    header = {"bulk_ingest": 1, "model": args.model, "input": source_name(args)}
    if args.format == "iiif":
        header["done"] = IIIF_DONE
    try:
        done = load_state(args.state, header)
        total = count_records(args) if args.from_model is None else None
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise ScriptError(str(exc), EXIT_USAGE) from None
    totals = Totals()
    async with ServiceClient(args) as client:
        await client.check_model()
        if args.from_model is not None:
            await client.check_model(args.from_model, reading=True)  # a refused OLD can still be moved out
            total = await count_model(client, args)
        existing = await stored_urls(client) if args.skip_existing else frozenset()
        if args.skip_existing:
            say(f"{args.model} holds {len(existing)} urls; those are not sent")
        log = StateLog(args.state, args.failed, header, done)
        bar = progress(args, total, "img", initial=done.below(total if total is not None else args.limit))
        queue: asyncio.Queue[list[Record] | None] = asyncio.Queue(maxsize=args.concurrency)
        try:
            async with open_records(args, client) as records:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(produce(records, args, done, totals, queue))
                    for _ in range(args.concurrency):
                        tg.create_task(consume(client, args, existing, log, totals, bar, queue))
        except BaseExceptionGroup as group:
            raise first_script_error(group) from None
        finally:
            bar.close()
            log.close()
    print(dumps(totals.summary()).decode(), flush=True)
    return 0


def first_script_error(group: BaseExceptionGroup) -> BaseException:
    """The error to report out of a task group: our own error if there is one, else the first."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            exc = first_script_error(exc)
        if isinstance(exc, ScriptError):
            return exc
    return group.exceptions[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(lambda: ingest(args))


if __name__ == "__main__":
    sys.exit(main())
