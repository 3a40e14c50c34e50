"""Input records for bulk_ingest.py: plain url lists, CSV and JSON Lines, from a file or stdin; or the rows another
model of the service holds (--from-model), paged through its dump. (IIIF manifests and collections: iiif_walk.py.)"""

from __future__ import annotations

import csv
import itertools
import json
import sys
from collections.abc import AsyncGenerator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from service_client import EXIT_SERVICE, ScriptError, ServiceClient, dumps

FORMATS = ("auto", "text", "csv", "jsonl", "iiif")
DUMP_PAGE = 1000  # rows per dump request of --from-model: ~1.1 MB of base64 at 192-d, ~2.8 MB at 512-d


@dataclass(frozen=True)
class Record:
    """One input record. `position` counts records from 0; `problem` is set when it cannot be sent, and
    `problem_type` is then the failed file's type for it. `key` is what a IIIF walk's record is done as, stable
    across runs where positions are not: (document url, index in that document); None for other input and for a
    document that failed."""

    position: int
    url: str | None
    metadata: dict[str, Any] | None = None
    problem: str | None = None
    problem_type: str = "input_error"
    key: tuple[str, int] | None = None

    def item(self) -> dict[str, Any]:
        """The add_bulk item for this record."""
        return {"url": self.url} if self.metadata is None else {"url": self.url, "metadata": self.metadata}


@dataclass(frozen=True)
class InputSpec:
    path: str  # "-" = stdin
    fmt: str = "auto"
    url_column: str = "url"
    metadata_column: str | None = None


def open_text(path: str) -> TextIO:
    """The input as text: stdin for '-', else the file (UTF-8, BOM tolerated)."""
    if path == "-":
        return sys.stdin
    return open(path, encoding="utf-8-sig", newline="")


def detect(path: str, lines: Iterator[str]) -> tuple[str, Iterator[str]]:
    """Pick the format from the extension, else from the first non-blank line ('{' = JSON Lines)."""
    suffix = Path(path).suffix.lower() if path != "-" else ""
    if suffix == ".csv":
        return "csv", lines
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl", lines
    head: list[str] = []
    for line in lines:
        head.append(line)
        if line.strip() and not line.lstrip().startswith("#"):
            break
    fmt = "jsonl" if head and head[-1].lstrip().startswith("{") else "text"
    return fmt, itertools.chain(head, lines)


def read_records(spec: InputSpec, stream: TextIO) -> Iterator[Record]:
    """Every record of the input, in order, numbered from 0."""
    lines: Iterator[str] = iter(stream)
    fmt = spec.fmt
    if fmt == "auto":
        fmt, lines = detect(spec.path, lines)
    if fmt == "csv":
        return csv_records(lines, spec.url_column, spec.metadata_column)
    if fmt == "jsonl":
        return jsonl_records(lines)
    return text_records(lines)


def count_records(spec: InputSpec, stream: TextIO) -> int:
    """How many records the input holds; for text and JSON Lines without parsing JSON (one per content line)."""
    lines: Iterator[str] = iter(stream)
    fmt = spec.fmt
    if fmt == "auto":
        fmt, lines = detect(spec.path, lines)
    if fmt == "csv":
        return sum(1 for _ in csv_records(lines, spec.url_column, spec.metadata_column))
    return sum(1 for _ in content_lines(lines))


def content_lines(lines: Iterable[str]) -> Iterator[str]:
    """Non-blank lines that are not '#' comments, stripped."""
    for line in lines:
        text = line.strip()
        if text and not text.startswith("#"):
            yield text


def text_records(lines: Iterable[str]) -> Iterator[Record]:
    """One url per line."""
    for pos, text in enumerate(content_lines(lines)):
        yield Record(pos, text)


def jsonl_records(lines: Iterable[str]) -> Iterator[Record]:
    """One JSON object per line: {"url": ..., "metadata": {...}?}; other keys are ignored."""
    for pos, text in enumerate(content_lines(lines)):
        try:
            obj = json.loads(text)
        except ValueError as exc:
            yield Record(pos, None, problem=f"not JSON: {exc}")
            continue
        if not isinstance(obj, dict):
            yield Record(pos, None, problem="not a JSON object")
            continue
        yield checked(pos, obj.get("url"), obj.get("metadata"))


def csv_records(lines: Iterable[str], url_column: str, metadata_column: str | None) -> Iterator[Record]:
    """A CSV with a header row. Metadata: the JSON object in `metadata_column` if given, else every other
    non-empty column as a string."""
    reader = csv.DictReader(lines)
    if reader.fieldnames is None:
        return
    if url_column not in reader.fieldnames:
        raise ValueError(f"the CSV header has no {url_column!r} column (columns: {', '.join(reader.fieldnames)})")
    if metadata_column and metadata_column not in reader.fieldnames:
        raise ValueError(f"the CSV header has no {metadata_column!r} column")
    for pos, row in enumerate(reader):
        url = row.get(url_column)
        if metadata_column:
            raw = (row.get(metadata_column) or "").strip()
            try:
                metadata = json.loads(raw) if raw else None
            except ValueError as exc:
                yield Record(pos, url, problem=f"metadata column is not JSON: {exc}")
                continue
        else:
            metadata = {k: v for k, v in row.items() if k != url_column and k is not None and v not in (None, "")}
        yield checked(pos, url.strip() if isinstance(url, str) else url, metadata or None)


def checked(pos: int, url: Any, metadata: Any) -> Record:
    """A record whose url is a non-empty string and metadata an object or nothing; else one with a problem."""
    if not isinstance(url, str) or not url:
        return Record(pos, None, metadata if isinstance(metadata, dict) else None, problem="no url")
    if metadata is not None and not isinstance(metadata, dict):
        return Record(pos, url, problem="metadata is not a JSON object")
    return Record(pos, url, metadata)


async def model_records(client: ServiceClient, model: str, page: int = DUMP_PAGE) -> AsyncGenerator[Record, None]:
    """Every row `model` holds as a record (url + metadata), in the service's cursor order (by url), numbered from 0.

    Pages of `page` rows are fetched one at a time, when the previous one is used up; each page's embeddings
    (base64, the smaller form) are dropped as soon as it is parsed, so memory stays at about one page.
    The numbering is stable as long as `model` is not written, which is what makes a re-run resume."""
    cursor: str | None = None
    position = 0
    while True:
        body = {"cursor": cursor, "limit": page, "encoding_format": "base64"}
        rows = await client.request("POST", client.model_path("dump", model), dumps(body))
        if not isinstance(rows, list):
            raise ScriptError(f"dump of {model} answered {type(rows).__name__}, not a list", EXIT_SERVICE)
        if not rows:
            return
        last = rows[-1].get("url") if isinstance(rows[-1], dict) else None
        if not isinstance(last, str) or last == cursor:
            raise ScriptError(f"the dump of {model} answered a page that does not move past {cursor!r}", EXIT_SERVICE)
        records = [checked(position + i, row.get("url"), row.get("metadata")) if isinstance(row, dict)
                   else Record(position + i, None, problem="not a row") for i, row in enumerate(rows)]
        del rows  # the embeddings
        for rec in records:
            yield rec
        position += len(records)
        cursor = last
