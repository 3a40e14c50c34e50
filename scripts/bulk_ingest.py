#!/usr/bin/env python3
"""Add many images (10^5-10^6) to an Idios service through POST /models/{model}/add_bulk, resumably."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ingest_input import FORMATS, InputSpec, Record, open_text, read_records
from ingest_input import count_records as count_input
from ingest_state import DoneRanges, StateLog, load_state
from service_client import (
    EXIT_USAGE,
    ScriptError,
    ServiceClient,
    ServiceError,
    add_service_args,
    backoff,
    dumps,
    progress,
    run,
    say,
)

DESCRIPTION = """\
Add the images listed in INPUT to an Idios service, in add_bulk batches sent with bounded concurrency.

INPUT (a file, or - for stdin) is one of:
  text   one url per line; blank lines and lines starting with # are skipped
  jsonl  one JSON object per line: {"url": "...", "metadata": {...}}; metadata is optional, other keys are
         ignored (so a --failed file can be fed back as input)
  csv    a header row, then one image per row. The url is in the column named by --url-column. Metadata is
         the JSON object in --metadata-column when that is given; otherwise every other non-empty column,
         as a string ({"title": "...", "year": "1999"})
--format auto (the default) takes csv for *.csv, jsonl for *.jsonl/*.ndjson, otherwise jsonl when the first
line starts with '{', else text. Records are numbered from 0 in input order ("positions").

Resuming: after each finished batch its positions are appended to the state file (default INPUT.MODEL.state.jsonl;
stdin needs an explicit --state). Run the same command again after a crash or Ctrl-C and it sends only what is
not done; at most the batches in flight are sent again, and the service answers those "found" without
fetching the images again. --skip-existing also lists the urls the service holds and never sends those.

Failures: every record that failed is written to the --failed file (JSON Lines: position, url, error, type,
metadata). Items failing for a reason that may pass (image_timeout, image_unreachable, job_timeout, worker
errors) are retried --item-retries times first. Requests are retried after connection errors, timeouts, 429
and 5xx (--retries, exponential backoff). To retry the failures later: bulk_ingest.py FAILED_FILE --model M.

Output: a progress bar on stderr (rate, ETA) and, at the end, one JSON line on stdout with this run's counts.
Exit status: 0 when every record was handled, failed images included; 2 for bad arguments or input;
3 when the service cannot be reached after the retries or refuses the requests (bad key, unknown model,
batch too large); 130 on Ctrl-C.
"""

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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="the list of images: a file, or - for stdin")
    add_service_args(p)
    g = p.add_argument_group("input")
    g.add_argument("--format", choices=FORMATS, default="auto", help="input format (default: %(default)s)")
    g.add_argument("--url-column", default="url", help="CSV: the column holding the url (default: %(default)s)")
    g.add_argument("--metadata-column", help="CSV: a column holding a JSON object used as the metadata")
    g.add_argument("--limit", type=int, help="handle only the records at positions below LIMIT (try a sample first)")
    g = p.add_argument_group("sending")
    g.add_argument("--batch", type=int, default=256,
                   help="records per add_bulk request, at most the server's limit of 10,000 (default: %(default)s)")
    g.add_argument("--concurrency", type=int, default=4, help="add_bulk requests in flight (default: %(default)s)")
    g.add_argument("--item-retries", type=int, default=2,
                   help="re-sends of an item that failed for a transient reason (default: %(default)s)")
    g.add_argument("--skip-existing", action="store_true",
                   help="first list the urls the service holds (POST /urls) and never send those")
    g = p.add_argument_group("files")
    g.add_argument("--state", type=Path, help="the state file (default: INPUT.MODEL.state.jsonl)")
    g.add_argument("--no-state", action="store_true", help="keep no state: a re-run starts from the beginning")
    g.add_argument("--failed", type=Path,
                   help="where failed records go, JSON Lines (default: INPUT.MODEL.failed.jsonl, "
                        "or bulk_ingest.MODEL.failed.jsonl for stdin)")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill in default paths; refuse impossible values."""
    if not 1 <= args.batch <= 10_000:
        p.error("--batch must be between 1 and 10000")
    if args.concurrency < 1:
        p.error("--concurrency must be at least 1")
    if args.limit is not None and args.limit < 0:
        p.error("--limit must not be negative")
    stdin = args.input == "-"
    if not stdin and not Path(args.input).is_file():
        p.error(f"no such file: {args.input}")
    if args.no_state:
        args.state = None
    elif args.state is None and not stdin:
        args.state = Path(f"{args.input}.{args.model}.state.jsonl")
    if args.failed is None:
        args.failed = Path(f"{args.input}.{args.model}.failed.jsonl" if not stdin else f"bulk_ingest.{args.model}.failed.jsonl")


def input_spec(args: argparse.Namespace) -> InputSpec:
    return InputSpec(args.input, args.format, args.url_column, args.metadata_column)


def count_records(args: argparse.Namespace) -> int | None:
    """How many records the input holds (None for stdin, which can be read once only)."""
    if args.input == "-":
        return args.limit
    with open_text(args.input) as f:
        n = count_input(input_spec(args), f)
    return n if args.limit is None else min(n, args.limit)


def batches(records: Iterator[Record], args: argparse.Namespace, done: DoneRanges, totals: Totals) -> Iterator[list[Record]]:
    """Records not yet done, grouped `--batch` at a time; stops at --limit."""
    batch: list[Record] = []
    for rec in records:
        if args.limit is not None and rec.position >= args.limit:
            break
        totals.records += 1
        if rec.position in done:
            totals.already_done += 1
            continue
        batch.append(rec)
        if len(batch) >= args.batch:
            yield batch
            batch = []
    if batch:
        yield batch


def failure(rec: Record, error: str, kind: str) -> dict[str, Any]:
    """A line of the failed file."""
    entry: dict[str, Any] = {"position": rec.position, "url": rec.url, "error": error, "type": kind}
    if rec.metadata is not None:
        entry["metadata"] = rec.metadata
    return entry


async def settle(client: ServiceClient, args: argparse.Namespace, batch: list[Record],
                 existing: frozenset[str]) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Send one batch (re-sending transient item failures) until every record is added, found or failed."""
    counts = {"sent": 0, "added": 0, "found": 0, "failed": 0, "duplicates": 0}
    failures = [failure(r, r.problem, "input_error") for r in batch if r.problem is not None]
    pending: dict[str, Record] = {}
    for rec in batch:
        if rec.problem is not None or rec.url is None:
            continue
        if rec.url in existing:
            counts["found"] += 1
        elif rec.url in pending:
            counts["duplicates"] += 1
        else:
            pending[rec.url] = rec
    counts["sent"] = len(pending)
    for attempt in range(args.item_retries + 1):
        if not pending:
            break
        if attempt:
            await asyncio.sleep(backoff(attempt, client.backoff_max))
        answer = await post_batch(client, list(pending.values()))
        counts["added"] += len(answer.get("added", []))
        counts["found"] += len(answer.get("found", []))
        retry: dict[str, Record] = {}
        for f in answer.get("failed", []):
            url = f.get("url")
            sent = pending.get(url) if isinstance(url, str) else None
            if sent is None:
                continue
            if f.get("type") in TRANSIENT_TYPES and attempt < args.item_retries:
                retry[str(url)] = sent
            else:
                failures.append(failure(sent, str(f.get("error")), str(f.get("type"))))
        pending = retry
    counts["failed"] = len(failures)
    return counts, failures


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
    """Every url the model holds, paged through POST /urls."""
    urls: list[str] = []
    cursor: str | None = None
    while True:
        page = await client.request("POST", client.model_path("urls"), dumps({"cursor": cursor, "limit": URL_PAGE}))
        if not page:
            return frozenset(urls)
        urls.extend(page)
        cursor = page[-1]


async def produce(records: Iterator[Record], args: argparse.Namespace, done: DoneRanges, totals: Totals,
                  queue: asyncio.Queue[list[Record] | None]) -> None:
    """Feed batches to the senders, then one stop mark per sender."""
    try:
        for batch in batches(records, args, done, totals):
            await queue.put(batch)
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise ScriptError(f"cannot read {args.input}: {exc}", EXIT_USAGE) from None
    for _ in range(args.concurrency):
        await queue.put(None)


async def consume(client: ServiceClient, args: argparse.Namespace, existing: frozenset[str], log: StateLog,
                  totals: Totals, bar: Any, queue: asyncio.Queue[list[Record] | None]) -> None:
    """Send batches until the stop mark; record each finished one."""
    while (batch := await queue.get()) is not None:
        counts, failures = await settle(client, args, batch, existing)
        log.batch_done((r.position for r in batch), {k: counts[k] for k in ("added", "found", "failed")}, failures)
        for key, value in counts.items():
            setattr(totals, key, getattr(totals, key) + value)
        bar.update(len(batch))
        bar.set_postfix(added=totals.added, found=totals.found, failed=totals.failed, refresh=False)


async def ingest(args: argparse.Namespace) -> int:
    """The whole run: check the service, then stream the input through `--concurrency` senders."""
    header = {"bulk_ingest": 1, "model": args.model,
              "input": "-" if args.input == "-" else str(Path(args.input).resolve())}
    try:
        done = load_state(args.state, header) if args.state is not None else DoneRanges()
        total = count_records(args)
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise ScriptError(str(exc), EXIT_USAGE) from None
    totals = Totals()
    async with ServiceClient(args) as client:
        await client.check_model()
        existing = await stored_urls(client) if args.skip_existing else frozenset()
        if args.skip_existing:
            say(f"{args.model} holds {len(existing)} urls; those are not sent")
        log = StateLog(args.state, args.failed, header, done)
        bar = progress(args, total, "img", initial=done.below(total if total is not None else args.limit))
        queue: asyncio.Queue[list[Record] | None] = asyncio.Queue(maxsize=args.concurrency)
        try:
            with open_text(args.input) as stream:
                records = read_records(input_spec(args), stream)
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
