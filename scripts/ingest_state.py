"""bulk_ingest.py's memory across runs: which input positions are done, and which of them failed.

The state file is JSON Lines, appended to and flushed after every finished batch, so a crash or Ctrl-C loses
at most the batches in flight (and those cost little: the service answers `found` for what it already holds).
Line 1 names the run ({"bulk_ingest": 1, "model": ..., "input": ...}); each further line is one finished
batch: {"positions": [[start, end], ...], "added": n, "found": n, "failed": n} with end exclusive.
The failed file holds one JSON object per failed record: {"position", "url", "error", "type", "metadata"?}.
It always matches the state: on start, entries whose position the state does not hold are dropped.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

Header = dict[str, Any]


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


def load_state(path: Path, header: Header) -> DoneRanges:
    """The positions a previous run finished; refuses a state file written for another model or input."""
    if not path.exists():
        return DoneRanges()
    spans: list[Sequence[int]] = []
    with path.open(encoding="utf-8") as f:
        first = f.readline()
        if first.strip():
            old = json.loads(first)
            for key in ("model", "input"):
                if old.get(key) != header.get(key):
                    raise ValueError(f"state file {path} belongs to {key} {old.get(key)!r}, not {header.get(key)!r}: "
                                     "pass another --state (or delete it to start over)")
        for line in f:
            try:
                spans.extend(json.loads(line)["positions"])
            except (ValueError, KeyError, TypeError):
                break  # a line torn by a crash: everything after it is unknown
    return DoneRanges(spans)


class StateLog:
    """Appends finished batches to the state file and their failures to the failed file."""

    def __init__(self, state: Path | None, failed: Path, header: Header, done: DoneRanges) -> None:
        keep_failures(failed, done if state is not None else DoneRanges())
        self._failed = failed.open("a", encoding="utf-8")
        self._state: TextIO | None = None
        if state is not None:
            fresh = not state.exists() or state.stat().st_size == 0
            truncate_torn_tail(state)
            self._state = state.open("a", encoding="utf-8")
            if fresh:
                self._write(self._state, header)

    def batch_done(self, positions: Iterable[int], counts: dict[str, int], failures: list[dict[str, Any]]) -> None:
        """Record one finished batch: failures first, then the state line that makes them count."""
        for entry in failures:
            self._failed.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._failed.flush()
        if self._state is not None:
            self._write(self._state, {"positions": ranges(positions), **counts})

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


def keep_failures(path: Path, done: DoneRanges) -> None:
    """Drop failed-file entries of positions the state does not hold (written just before a crash)."""
    if not path.exists():
        return
    kept = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                pos = json.loads(line).get("position")
                if isinstance(pos, int) and pos in done:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, AttributeError):
                continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(path)
