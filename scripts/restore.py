#!/usr/bin/env python3
"""Restore a dump (dump.py's page files, or the original Idios dump's) into a model, without fetching images."""

from __future__ import annotations

import argparse
import asyncio
import base64
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dump import page_files, summary
from service_client import EXIT_USAGE, ScriptError, ServiceClient, add_service_args, dumps, loads, progress, run

DESCRIPTION = """\
Send the rows of dump files to POST /models/MODEL/restore, in batches of at most --batch rows, with
--concurrency requests in flight. Each file is a JSON array of {"url", "embedding", "metadata"} objects;
a folder stands for its page-*.json files in page order. Rows of small files are joined into full requests.
Embeddings given as numbers are sent as base64 of their float32 values (encoding_format "base64": the same
float32 values the service would store, in 44% of the bytes, parsed by the service 3-4x faster); rows whose
embedding is not a list of numbers are sent as they are, for the service to say what is wrong. The service
checks the embedding's dimension against the model and stores url, metadata, embedding and phash (if given).

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


def read_rows(path: Path) -> tuple[list[object], int]:
    """A file's rows and its size in bytes."""
    data = path.read_bytes()
    try:
        rows = loads(data)
    except ValueError as exc:
        raise ScriptError(f"{path} is not JSON: {exc}", EXIT_USAGE) from None
    if not isinstance(rows, list):
        raise ScriptError(f"{path} holds a {type(rows).__name__}, not a list of rows", EXIT_USAGE)
    return rows, len(data)


def packed(row: object) -> object:
    """The row with its embedding as base64 of little-endian float32 when it is a list of numbers."""
    if not isinstance(row, dict):
        return row
    vec = row.get("embedding")
    if not isinstance(vec, list) or not vec:
        return row
    try:
        raw = struct.pack(f"<{len(vec)}f", *vec)
    except (struct.error, OverflowError, TypeError):
        return row
    return {**row, "embedding": base64.b64encode(raw).decode()}


def encode(rows: list[object]) -> bytes:
    return dumps([packed(r) for r in rows])


async def produce(files: list[Path], args: argparse.Namespace, queue: asyncio.Queue[Chunk | None]) -> None:
    """Cut the rows of all files into requests of --batch rows (small page files are joined: each request
    costs the service a fixed overhead); files are read and parsed in a thread."""
    rows: list[object] = []
    size = 0.0
    for path in files:
        more, nbytes = await asyncio.to_thread(read_rows, path)
        per_row = nbytes / len(more) if more else 0.0
        taken = 0
        while taken < len(more):
            take = more[taken : taken + args.batch - len(rows)]
            taken += len(take)
            rows.extend(take)
            size += per_row * len(take)
            if len(rows) == args.batch:
                await queue.put(Chunk(await asyncio.to_thread(encode, rows), len(rows), round(size)))
                rows, size = [], 0.0
        size += nbytes - per_row * len(more)  # rounding, and files without rows
    if rows or size:
        await queue.put(Chunk(encode(rows), len(rows), round(size)))
    for _ in range(args.concurrency):
        await queue.put(None)


async def send(client: ServiceClient, queue: asyncio.Queue[Chunk | None], bar: object, counts: list[int]) -> None:
    """Restore chunks until the stop mark."""
    while (chunk := await queue.get()) is not None:
        if chunk.rows:
            await client.request("POST", client.model_path("restore"), chunk.body)
        counts[0] += chunk.rows
        bar.set_postfix(rows=counts[0], refresh=False)  # type: ignore[attr-defined]
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
