#!/usr/bin/env python3
"""Dump a model's stored rows to numbered JSON page files, as the original Idios dump did; resumable."""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from pathlib import Path
from typing import Any

from service_client import EXIT_SERVICE, ScriptError, ServiceClient, add_service_args, dumps, loads, progress, run

DESCRIPTION = """\
Write every row of MODEL to OUT/page-00000.json, page-00001.json, … Each file is one JSON array of
{"url", "embedding", "metadata"} objects in url order (with "phash", the image's perceptual hash, where the
service knows it), exactly as POST /models/MODEL/dump answers it (the format of the original Idios dump);
restore.py reads it back. With --base64 each embedding is one string
instead, the base64 of its little-endian float32 values (encoding_format "base64"): the same values in 44% of
the bytes, fetched about 2.5x faster; restore.py and the service's restore read both forms.

Pages are fetched by cursor (the last url of the previous page). A file appears only once complete (it is
written as page-N.json.tmp, then renamed), so after a crash or Ctrl-C the same command continues after the
last complete file. Use one folder per model. The progress bar's total is GET /models/MODEL/count.
Exit status: 0 done; 2 bad arguments; 3 service unreachable after retries or refusing; 130 Ctrl-C.
"""

PAGE_RE = re.compile(r"^page-(\d{5,})\.json$")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="folder for the page files (created if missing)")
    add_service_args(p)
    p.add_argument("--page-size", type=int, default=2000,
                   help="rows per request and per file, at most 16384 (default: %(default)s; see the README)")
    p.add_argument("--base64", action="store_true",
                   help="embeddings as base64 of little-endian float32 (smaller, faster) instead of numbers")
    args = p.parse_args(argv)
    if not 1 <= args.page_size <= 16384:
        p.error("--page-size must be between 1 and 16384")
    return args


def page_files(folder: Path) -> list[Path]:
    """The complete page files of a folder, in page order."""
    found = [(int(m.group(1)), f) for f in folder.iterdir() if (m := PAGE_RE.match(f.name)) and f.is_file()]
    return [f for _, f in sorted(found)]


def resume_point(folder: Path) -> tuple[int, str | None, int]:
    """(next page number, cursor, rows already written, estimated) from the files already there."""
    for stale in folder.glob("page-*.json.tmp"):
        stale.unlink()
    pages = page_files(folder)
    if not pages:
        return 0, None, 0
    last = loads(pages[-1].read_bytes())
    if not isinstance(last, list) or not last:
        raise ScriptError(f"{pages[-1]} is not a page of rows: use an empty folder or remove it")
    first = len(loads(pages[0].read_bytes())) if len(pages) > 1 else 0
    number = int(PAGE_RE.match(pages[-1].name).group(1)) + 1  # type: ignore[union-attr]
    return number, str(last[-1]["url"]), first * (len(pages) - 1) + len(last)


def write_page(folder: Path, number: int, data: bytes) -> None:
    """Write one page so that it appears complete or not at all."""
    final = folder / f"page-{number:05d}.json"
    tmp = final.with_name(final.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(final)


async def fetch(client: ServiceClient, cursor: str | None, limit: int,
                encoding: str = "float") -> tuple[bytes, int, str | None]:
    """One page: its bytes as the service sent them, its row count and its last url."""
    body = {"cursor": cursor, "limit": limit} | ({"encoding_format": encoding} if encoding != "float" else {})
    data = await client.request("POST", client.model_path("dump"), dumps(body), raw=True)
    rows = loads(data)
    if not isinstance(rows, list):
        raise ScriptError(f"dump answered {type(rows).__name__}, not a list", EXIT_SERVICE)
    if not rows:
        return data, 0, None
    last = str(rows[-1]["url"])
    if last == cursor:
        raise ScriptError(f"the service answered a page that does not move past {cursor!r}", EXIT_SERVICE)
    return data, len(rows), last


async def dump(args: argparse.Namespace) -> int:
    """Fetch pages in order; write each file in a thread while the next page is fetched."""
    args.out.mkdir(parents=True, exist_ok=True)
    number, cursor, done = resume_point(args.out)
    started, rows, pages = time.monotonic(), 0, 0
    async with ServiceClient(args) as client:
        await client.check_model()
        total = await client.request("GET", client.model_path("count"))
        bar = progress(args, max(int(total), done), "row", initial=done)
        writing: asyncio.Task[None] | None = None
        try:
            while True:
                data, n, last = await fetch(client, cursor, args.page_size, "base64" if args.base64 else "float")
                if writing is not None:
                    await writing
                if n == 0:
                    break
                writing = asyncio.create_task(asyncio.to_thread(write_page, args.out, number, data))
                number, cursor, rows, pages = number + 1, last, rows + n, pages + 1
                bar.update(n)
        finally:
            if writing is not None:
                await asyncio.shield(writing)
            bar.close()
    print(dumps(summary(pages, rows, started)).decode(), flush=True)
    return 0


def summary(pages: int, rows: int, started: float) -> dict[str, Any]:
    seconds = time.monotonic() - started
    return {"pages": pages, "rows": rows, "seconds": round(seconds, 3),
            "rows_per_s": round(rows / seconds, 1) if seconds else 0}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(lambda: dump(args))


if __name__ == "__main__":
    sys.exit(main())
