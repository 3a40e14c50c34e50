#!/usr/bin/env python3
"""Restore a dump (dump.py's page files, or the original Idios dump's) into a model, without fetching images."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dump import page_files, summary
from service_client import EXIT_USAGE, ScriptError, ServiceClient, add_service_args, dumps, loads, progress, run

DESCRIPTION = """\
Send the rows of dump files to POST /models/MODEL/restore, in batches of at most --batch rows, with
--concurrency requests in flight. Each file is a JSON array of {"url", "embedding", "metadata"} objects;
a folder stands for its page-*.json files in page order. Rows are sent as they are: the service checks the
embedding's dimension against the model and stores url, metadata and embedding unchanged.

Restore is an upsert by url, so running it again (after a crash, or twice) is safe and stores nothing twice.
The progress bar counts bytes of the files (it knows their total); the final JSON line on stdout counts rows.
Exit status: 0 done; 2 bad arguments or unreadable files; 3 service unreachable after retries, or a batch
refused (for example a dimension that does not match the model); 130 Ctrl-C.
"""


@dataclass(frozen=True)
class Chunk:
    body: bytes
    rows: int
    size: int  # this chunk's share of its file's bytes, for the progress bar


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, help="dump folders and/or page files")
    add_service_args(p)
    p.add_argument("--batch", type=int, default=10_000,
                   help="rows per restore request, at most the server's limit of 10,000 (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=2, help="restore requests in flight (default: %(default)s)")
    args = p.parse_args(argv)
    if not 1 <= args.batch <= 10_000:
        p.error("--batch must be between 1 and 10000")
    if args.concurrency < 1:
        p.error("--concurrency must be at least 1")
    return args


def input_files(paths: list[Path]) -> list[Path]:
    """Files named, and the page files of folders named, in the order given."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(page_files(path))
        elif path.is_file():
            files.append(path)
        else:
            raise ScriptError(f"no such file or folder: {path}", EXIT_USAGE)
    return files


def chunks(path: Path, batch: int) -> Iterator[Chunk]:
    """A file's rows as request bodies; a file that fits one request is sent byte for byte."""
    data = path.read_bytes()
    try:
        rows = loads(data)
    except ValueError as exc:
        raise ScriptError(f"{path} is not JSON: {exc}", EXIT_USAGE) from None
    if not isinstance(rows, list):
        raise ScriptError(f"{path} holds a {type(rows).__name__}, not a list of rows", EXIT_USAGE)
    if len(rows) <= batch:
        if rows:
            yield Chunk(data, len(rows), len(data))
        return
    for start in range(0, len(rows), batch):
        part = rows[start : start + batch]
        yield Chunk(dumps(part), len(part), len(data) * len(part) // len(rows))


async def produce(files: list[Path], args: argparse.Namespace, queue: asyncio.Queue[Chunk | None]) -> None:
    """Read and split files in a thread, one file ahead of the senders at most."""
    for path in files:
        for chunk in await asyncio.to_thread(lambda p=path: list(chunks(p, args.batch))):  # type: ignore[misc]
            await queue.put(chunk)
    for _ in range(args.concurrency):
        await queue.put(None)


async def send(client: ServiceClient, queue: asyncio.Queue[Chunk | None], bar: object, counts: list[int]) -> None:
    """Restore chunks until the stop mark."""
    while (chunk := await queue.get()) is not None:
        await client.request("POST", client.model_path("restore"), chunk.body)
        counts[0] += chunk.rows
        bar.update(chunk.size)  # type: ignore[attr-defined]


async def restore(args: argparse.Namespace) -> int:
    files = input_files(args.paths)
    started, counts = time.monotonic(), [0]
    async with ServiceClient(args) as client:
        await client.check_model()
        bar = progress(args, sum(f.stat().st_size for f in files), "B")
        queue: asyncio.Queue[Chunk | None] = asyncio.Queue(maxsize=args.concurrency)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(produce(files, args, queue))
                for _ in range(args.concurrency):
                    tg.create_task(send(client, queue, bar, counts))
        except BaseExceptionGroup as group:
            raise next((e for e in group.exceptions if isinstance(e, ScriptError)), group.exceptions[0]) from None
        finally:
            bar.close()
    print(dumps(summary(len(files), counts[0], started)).decode(), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(lambda: restore(args))


if __name__ == "__main__":
    sys.exit(main())
