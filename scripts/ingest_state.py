"""bulk_ingest.py's memory across runs: which input records are done, and which of them failed.

The state file is JSON Lines, appended to and flushed after every finished batch, so a crash or Ctrl-C loses
at most the batches in flight (and those cost little: the service answers `found` for what it already holds).
Line 1 names the run ({"bulk_ingest": 1, "model": ..., "input": ...}); each further line is one finished
batch: {"positions": [[start, end], ...], "added": n, "found": n, "failed": n} with end exclusive.

A IIIF walk's positions shift when a document fails on one run and not on another, so its records are done by
their keys instead (Record.key: document url, index in it): the header has "done": "iiif_documents" and each
line {"documents": {url: [[start, end], ...], ...}, "added": ...}. Memory is one url and a few ranges per
document, not one entry per image. A document that failed has no key: it is never done, and walked again.

The failed file holds one JSON object per failed record: {"position", "url", "error", "type", "metadata"?}, and
for a keyed record "iiif_document" and "iiif_index". It always matches the state: on start, entries of records
the state does not hold done are dropped (so a IIIF document's failure is listed again only if it fails again).
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

from ingest_input import Record

Header = dict[str, Any]
IIIF_DONE = "iiif_documents"  # the header's "done" when records are done by key


def ranges(positions: Iterable[int]) -> list[list[int]]:
    """Sorted positions → [[start, end), …] runs."""
    out: list[list[int]] = []
    for p in sorted(positions):
        if out and out[-1][1] == p:
            out[-1][1] = p + 1
        else:
            out.append([p, p + 1])
    return out


class DoneRanges:
    """A set of positions kept as merged, sorted [start, end) ranges."""

    def __init__(self, spans: Iterable[Sequence[int]] = ()) -> None:
        merged: list[list[int]] = []
        for start, end in sorted((int(s), int(e)) for s, e in spans):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self._starts = [s for s, _ in merged]
        self._ends = [e for _, e in merged]

    def __contains__(self, position: int) -> bool:
        i = bisect.bisect_right(self._starts, position) - 1
        return i >= 0 and position < self._ends[i]

    def __len__(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def below(self, limit: int | None) -> int:
        """How many done positions are < limit (all of them when limit is None)."""
        if limit is None:
            return len(self)
        return sum(max(0, min(e, limit) - s) for s, e in zip(self._starts, self._ends, strict=True) if s < limit)

    def bounds(self) -> tuple[int, ...]:
        """The ranges as one flat tuple: (start, end, start, end, ...)."""
        return tuple(b for pair in zip(self._starts, self._ends, strict=True) for b in pair)

    def has(self, rec: Record) -> bool:
        return rec.position in self

    def line(self, records: Iterable[Record]) -> dict[str, Any]:
        """A finished batch as the state file's line says it."""
        return {"positions": ranges(r.position for r in records)}

    def keeps(self, entry: dict[str, Any]) -> bool:
        """Whether a failed-file entry is of a record done."""
        position = entry.get("position")
        return isinstance(position, int) and position in self


class DoneDocuments:
    """The records of a IIIF walk done, by key: per document url, its indexes done as merged [start, end) ranges
    in one flat tuple (start, end, start, end, ...). Beside the url that is ~60 bytes a document: 10^6 manifests of
    one image each take ~230 MB, most of it the urls (one DoneRanges each took ~400 MB)."""

    def __init__(self) -> None:
        self._documents: dict[str, tuple[int, ...]] = {}

    def add(self, url: str, spans: Iterable[Sequence[int]]) -> None:
        """Mark the indexes in `spans` of document `url` done."""
        old = self._documents.get(url, ())
        self._documents[url] = DoneRanges([*zip(old[::2], old[1::2], strict=True), *spans]).bounds()

    def __len__(self) -> int:
        return sum(sum(b[1::2]) - sum(b[::2]) for b in self._documents.values())

    def below(self, limit: int | None) -> int:
        """How many records are done, at most `limit` (which counts positions, and those are not kept)."""
        return len(self) if limit is None else min(len(self), limit)

    def has(self, rec: Record) -> bool:
        return rec.key is not None and self._holds(rec.key[0], rec.key[1])

    def _holds(self, url: str, index: int) -> bool:
        bounds = self._documents.get(url, ())
        return bisect.bisect_right(bounds, index) % 2 == 1  # past a start and not past its end

    def line(self, records: Iterable[Record]) -> dict[str, Any]:
        """A finished batch as the state file's line says it: the keyed records only (a failed document is not
        done)."""
        by_document: dict[str, list[int]] = {}
        for rec in records:
            if rec.key is not None:
                by_document.setdefault(rec.key[0], []).append(rec.key[1])
        return {"documents": {url: ranges(indexes) for url, indexes in by_document.items()}}

    def keeps(self, entry: dict[str, Any]) -> bool:
        url, index = entry.get("iiif_document"), entry.get("iiif_index")
        return isinstance(url, str) and isinstance(index, int) and self._holds(url, index)


class Done(Protocol):
    """What is done, by position (DoneRanges) or by key (DoneDocuments), and how a finished batch is written."""

    def below(self, limit: int | None) -> int: ...
    def has(self, rec: Record) -> bool: ...
    def line(self, records: Iterable[Record]) -> dict[str, Any]: ...
    def keeps(self, entry: dict[str, Any]) -> bool: ...


def load_state(path: Path | None, header: Header) -> Done:
    """What a previous run finished (nothing without a state file), by key when the header says so; refuses a
    state file written for another model or input, or keeping what is done another way."""
    by_key = header.get("done") == IIIF_DONE
    positions: list[Sequence[int]] = []
    documents = DoneDocuments()
    if path is not None and path.exists():
        with path.open(encoding="utf-8") as f:
            first = f.readline()
            if first.strip():
                check_header(path, json.loads(first), header)
            for line in f:
                try:
                    read_line(json.loads(line), positions, documents if by_key else None)
                except (ValueError, KeyError, TypeError, AttributeError):
                    break  # a line torn by a crash: everything after it is unknown
    return documents if by_key else DoneRanges(positions)


def read_line(entry: Any, positions: list[Sequence[int]], documents: DoneDocuments | None) -> None:
    """One finished batch's line into what is done (its positions, or by key into `documents`); a line that is
    not one raises before anything is taken from it."""
    if documents is None:
        positions.extend([(int(s), int(e)) for s, e in entry["positions"]])
        return
    done = [(str(url), [(int(s), int(e)) for s, e in spans]) for url, spans in entry["documents"].items()]
    for url, spans in done:
        documents.add(url, spans)


def check_header(path: Path, old: Header, header: Header) -> None:
    for key in ("model", "input"):
        if old.get(key) != header.get(key):
            raise ValueError(f"state file {path} belongs to {key} {old.get(key)!r}, not {header.get(key)!r}: "
                             "pass another --state (or delete it to start over)")
    if old.get("done") != header.get("done"):
        raise ValueError(f"state file {path} keeps what is done by {old.get('done') or 'positions'}, this run by "
                         f"{header.get('done') or 'positions'} (an older bulk_ingest.py kept a IIIF walk by positions, "
                         "which a failed document shifts): pass another --state (or delete it to start over)")


class StateLog:
    """Appends finished batches to the state file and their failures to the failed file."""

    def __init__(self, state: Path | None, failed: Path, header: Header, done: Done) -> None:
        keep_failures(failed, done if state is not None else None)
        self._done = done
        self._failed = failed.open("a", encoding="utf-8")
        self._state: TextIO | None = None
        if state is not None:
            fresh = not state.exists() or state.stat().st_size == 0
            truncate_torn_tail(state)
            self._state = state.open("a", encoding="utf-8")
            if fresh:
                self._write(self._state, header)

    def batch_done(self, records: Iterable[Record], counts: dict[str, int], failures: list[dict[str, Any]]) -> None:
        """Record one finished batch: failures first, then the state line that makes them count."""
        for entry in failures:
            self._failed.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._failed.flush()
        if self._state is not None:
            self._write(self._state, {**self._done.line(records), **counts})

    @staticmethod
    def _write(f: TextIO, obj: dict[str, Any]) -> None:
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())

    def close(self) -> None:
        self._failed.close()
        if self._state is not None:
            self._state.close()


def truncate_torn_tail(path: Path) -> None:
    """Cut a last line a crash left without its newline, so the next line starts clean."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def keep_failures(path: Path, done: Done | None) -> None:
    """Drop failed-file entries of records the state does not hold done (written just before a crash; a IIIF
    document that failed, which this run walks again); all of them without a state."""
    if not path.exists():
        return
    kept = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                if done is not None and done.keeps(json.loads(line)):
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, AttributeError):
                continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(path)
