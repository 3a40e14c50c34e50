"""The client scripts as users run them (subprocesses) against the real embedded service and image server."""

from __future__ import annotations

import asyncio
import base64
import csv
import json
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import ROOT, Service, make_settings, running_service

import make_thumb_model  # noqa: E402  (scripts/, on sys.path through tests.conftest)

pytestmark = pytest.mark.timeout(150)
SCRIPTS = ROOT / "scripts"


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def summary(self) -> dict[str, Any]:
        assert self.rc == 0, self.err
        return json.loads(self.out.strip().splitlines()[-1])


async def start(script: str, *args: str | Path, stdin: bool = False,
                cwd: Path | None = None) -> asyncio.subprocess.Process:
    # A shell without job control starts background commands with SIGINT ignored, and an ignored signal stays
    # ignored across exec, so the script would never see the test's Ctrl-C (CI may run the suite that way).
    # A handled signal is reset to its default by exec: handle it here while the child starts. (Not with
    # preexec_fn: a fork that runs Python in the child aborts in gRPC's fork handlers, seen here.)
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable, str(SCRIPTS / script), *map(str, args),
            stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=cwd,
        )
    finally:
        if previous is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


async def script(script_name: str, *args: str | Path, stdin: bytes | None = None, cwd: Path | None = None) -> Result:
    """Run one of the scripts to the end, as a user would, while the service answers in this event loop; a script
    still running when this fails (timeout, cancellation) is killed."""
    proc = await start(script_name, *args, stdin=stdin is not None, cwd=cwd)
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout=120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return Result(proc.returncode or 0, out.decode(), err.decode())


def service_args(svc: Service, model: str = "thumb_grid") -> list[str]:
    return ["--server", svc.url, "--model", model, "--retries", "1", "--backoff-max", "0.2"]


async def stored(svc: Service, url: str) -> dict[str, Any] | None:
    """The stored metadata of url (found by indexed search), or None when it is not stored."""
    async with svc.http.post(svc.model("thumb_grid") + "/search", json={"url": url, "indexed": True, "limit": 1}) as r:
        if r.status == 404:
            return None
        hits = await r.json()
        assert r.status == 200 and hits[0]["url"] == url, hits
        return hits[0]["metadata"]


async def count(svc: Service) -> int:
    async with svc.http.get(svc.model("thumb_grid") + "/count") as r:
        return int(await r.json())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def bad_urls(images: str, uniq: str) -> dict[str, str]:
    """Urls the service refuses, with the failure type it reports."""
    return {
        f"{images}/missing/{uniq}.jpg": "image_http_error",
        f"{images}/not-an-image?{uniq}": "not_an_image",
        f"{images}/colour/1,2,3?size=100x100&{uniq}": "image_too_small",
        f"ftp://example.org/{uniq}.jpg": "validation_error",
    }


def write_input(path: Path, fmt: str, good: list[str], bad: list[str]) -> tuple[Path, dict[str, Any]]:
    """An input file in `fmt` holding good and bad urls plus one record without a url; the expected metadata."""
    expected: dict[str, Any] = {}
    if fmt == "text":
        lines = ["# a comment, then a blank line", "", *good, *bad]
        expected = {u: {} for u in good}
        path = path.with_suffix(".txt")
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "jsonl":
        rows: list[dict[str, Any]] = [{"url": u, "metadata": {"i": i, "tags": ["a", "b"]}} for i, u in enumerate(good)]
        rows += [{"url": u} for u in bad] + [{"metadata": {"no": "url"}}]
        expected = {u: {"i": i, "tags": ["a", "b"]} for i, u in enumerate(good)}
        path = path.with_suffix(".jsonl")
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    else:
        table = [["title", "url", "year"], *([f"T, {i}", u, str(2000 + i)] for i, u in enumerate(good))]
        table += [["bad", u, ""] for u in bad] + [["orphan", "", "1999"]]
        expected = {u: {"title": f"T, {i}", "year": str(2000 + i)} for i, u in enumerate(good)}
        path = path.with_suffix(".csv")
        with path.open("w", newline="") as f:
            csv.writer(f).writerows(table)
    return path, expected


@pytest.mark.parametrize("fmt", ["text", "jsonl", "csv"])
async def test_ingest_each_format(service: Service, images: str, uniq: str, tmp_path: Path, fmt: str) -> None:
    good = [f"{images}/img/{uniq}/{i}.jpg" for i in range(6)]
    bad = bad_urls(images, uniq)
    path, expected = write_input(tmp_path / "list", fmt, good, list(bad))
    before = await count(service)
    res = await script("bulk_ingest.py", path, *service_args(service), "--batch", "4", "--concurrency", "2")
    s = res.summary
    input_errors = {"text": 0, "jsonl": 2, "csv": 1}[fmt]
    assert (s["added"], s["found"], s["failed"]) == (len(good), 0, len(bad) + input_errors), s
    assert await count(service) == before + len(good)
    for url, metadata in expected.items():
        assert await stored(service, url) == metadata
    failed = read_jsonl(Path(f"{path}.thumb_grid.failed.jsonl"))
    assert {f["url"]: f["type"] for f in failed if f["type"] != "input_error"} == bad
    assert all(f["error"] for f in failed)
    assert sum(f["type"] == "input_error" for f in failed) == input_errors
    if fmt == "jsonl":  # a failure keeps the record's metadata, so the failed file can be fed back as input
        assert [f.get("metadata") for f in failed if f["type"] == "input_error"] == [{"no": "url"}, None]


async def test_ingest_from_stdin_with_a_json_metadata_column(service: Service, images: str, uniq: str,
                                                            tmp_path: Path) -> None:
    good = [f"{images}/img/{uniq}/{i}.png" for i in range(3)]
    rows = ["url;meta"] + [f'{u};"{{""k"": {i}}}"' for i, u in enumerate(good)]
    csv_text = "\n".join(r.replace(";", ",", 1) for r in rows) + "\n"
    failed = tmp_path / "failed.jsonl"
    res = await script("bulk_ingest.py", "-", *service_args(service), "--format", "csv", "--metadata-column", "meta",
                       "--failed", failed, stdin=csv_text.encode())
    assert res.summary["added"] == 3 and res.summary["failed"] == 0
    assert [await stored(service, u) for u in good] == [{"k": 0}, {"k": 1}, {"k": 2}]
    assert failed.read_text() == ""
    again = await script("bulk_ingest.py", "-", *service_args(service), "--failed", failed,
                         stdin="\n".join(good).encode())  # stdin keeps no state: the service reports them found
    assert (again.summary["added"], again.summary["found"]) == (0, 3)


async def test_limit_then_resume_adds_nothing_twice(service: Service, images: str, uniq: str, tmp_path: Path) -> None:
    good = [f"{images}/img/{uniq}/{i}.jpg" for i in range(10)]
    bad = bad_urls(images, uniq)
    path = tmp_path / "list.txt"
    path.write_text("\n".join(good[:5] + list(bad) + good[5:]) + "\n")
    before = await count(service)
    first = (await script("bulk_ingest.py", path, *service_args(service), "--batch", "2", "--limit", "7")).summary
    assert (first["records"], first["added"], first["failed"]) == (7, 5, 2)
    assert await count(service) == before + 5
    second = (await script("bulk_ingest.py", path, *service_args(service), "--batch", "3")).summary
    assert second["already_done"] == 7 and second["sent"] == 7
    assert (second["added"], second["found"], second["failed"]) == (5, 0, 2)
    assert await count(service) == before + len(good)
    failed = read_jsonl(Path(f"{path}.thumb_grid.failed.jsonl"))
    assert sorted(f["position"] for f in failed) == [5, 6, 7, 8]
    third = (await script("bulk_ingest.py", path, *service_args(service))).summary
    assert (third["already_done"], third["sent"]) == (14, 0)


async def test_killed_ingest_resumes_and_every_good_url_is_stored_once(
    service: Service, images: str, uniq: str, tmp_path: Path
) -> None:
    good = [f"{images}/img/{uniq}/{i}.jpg" for i in range(30)]
    bad = f"{images}/missing/{uniq}.jpg"
    path = tmp_path / "list.txt"
    path.write_text("\n".join(good[:15] + [bad] + good[15:]) + "\n")
    state = tmp_path / "state.jsonl"
    before = await count(service)
    proc = await start("bulk_ingest.py", path, *service_args(service), "--batch", "1", "--concurrency", "1",
                       "--state", state)
    while not state.exists() or len(state.read_text().splitlines()) < 4:  # header + 3 finished batches
        assert proc.returncode is None, "the ingest finished before it could be killed"
        await asyncio.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    lines = read_jsonl(state)
    done_before = sum(e - s for line in lines[1:] for s, e in line["positions"])
    added_before = sum(line["added"] for line in lines[1:])
    assert 3 <= done_before < 31
    res = (await script("bulk_ingest.py", path, *service_args(service), "--batch", "4", "--state", state)).summary
    assert res["already_done"] == done_before
    assert res["sent"] == 31 - done_before
    # a batch in flight at the kill may have been stored without being recorded: the service reports it found
    assert res["added"] + res["found"] + added_before == 30 and res["found"] <= 1
    assert await count(service) == before + 30
    assert [await stored(service, u) for u in good] == [{}] * 30
    failed = read_jsonl(Path(f"{path}.thumb_grid.failed.jsonl"))
    assert [(f["url"], f["position"], f["type"]) for f in failed] == [(bad, 15, "image_http_error")]


async def test_ctrl_c_stops_cleanly_and_a_torn_state_line_is_ignored(
    service: Service, images: str, uniq: str, tmp_path: Path
) -> None:
    # each image takes 0.2 s to arrive, so on a fast machine too the run is still going when Ctrl-C comes
    good = [f"{images}/slow/{uniq}/{i}.jpg?delay=0.2" for i in range(20)]
    path = tmp_path / "list.txt"
    path.write_text("\n".join(good) + "\n")
    state = Path(f"{path}.thumb_grid.state.jsonl")
    proc = await start("bulk_ingest.py", path, *service_args(service), "--batch", "1", "--concurrency", "1")
    while not state.exists() or len(state.read_text().splitlines()) < 3:
        assert proc.returncode is None, "the ingest finished before Ctrl-C"
        await asyncio.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = await proc.communicate()
    assert proc.returncode == 130 and "run the same command again to resume" in err.decode()
    done = sum(e - s for line in read_jsonl(state)[1:] for s, e in line["positions"])
    state.write_text(state.read_text() + '{"positions": [[0, 2')  # a line a power cut tore
    res = (await script("bulk_ingest.py", path, *service_args(service), "--api-key", "not-checked")).summary
    assert res["already_done"] == done and res["added"] + res["found"] == 20 - done and res["found"] <= 1
    assert [await stored(service, u) for u in good] == [{}] * 20
    assert all(line.endswith("}") for line in state.read_text().splitlines())


async def test_skip_existing_sends_nothing_the_service_holds(service: Service, images: str, uniq: str,
                                                            tmp_path: Path) -> None:
    urls = [f"{images}/img/{uniq}/{i}.jpg" for i in range(4)]
    path = tmp_path / "list.txt"
    path.write_text("\n".join(urls[:2]) + "\n")
    assert (await script("bulk_ingest.py", path, *service_args(service), "--no-state")).summary["added"] == 2
    path.write_text("\n".join(urls) + "\n")
    s = (await script("bulk_ingest.py", path, *service_args(service), "--no-state", "--skip-existing")).summary
    assert (s["sent"], s["added"], s["found"]) == (2, 2, 2)


async def test_own_errors_exit_non_zero(service: Service, tmp_path: Path) -> None:
    path = tmp_path / "list.txt"
    path.write_text("http://example.org/a.jpg\n")
    unreachable = await script("bulk_ingest.py", path, "--server", "http://127.0.0.1:9", "--model", "m",
                               "--retries", "1", "--backoff-max", "0.1")
    assert unreachable.rc == 3 and "error:" in unreachable.err
    unknown = await script("bulk_ingest.py", path, *service_args(service, "no_such_model"))
    assert unknown.rc == 2 and "thumb_grid" in unknown.err
    assert (await script("bulk_ingest.py", tmp_path / "missing.txt", "--model", "m")).rc == 2
    assert (await script("bulk_ingest.py", path, "--model", "m", "--batch", "20000")).rc == 2
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("link\nhttp://example.org/a.jpg\n")
    no_column = await script("bulk_ingest.py", csv_path, *service_args(service))
    assert no_column.rc == 2 and "'url' column" in no_column.err
    assert "position" in (await script("bulk_ingest.py", "--help")).out


@pytest.fixture
async def empty_service(tmp_path: Path, models_dir: Path) -> AsyncIterator[Service]:
    async with running_service(make_settings(tmp_path / "data2", models_dir)) as svc:
        yield svc


async def test_dump_restore_round_trip_into_an_empty_service(
    service: Service, images: str, uniq: str, tmp_path: Path, empty_service: Service
) -> None:
    rng = np.random.default_rng(11)
    rows = [{"url": f"http://restore.test/{uniq}/{i:03d}?q='\"", "metadata": {"i": i, "nested": {"s": f"é{i}"}},
             "embedding": unit(rng.standard_normal(192)).tolist()} for i in range(45)]
    for i, row in enumerate(rows[::2]):  # half the rows with an image hash, which both scripts carry through
        row["phash"] = f"{i:016x}"
    async with service.http.post(service.model("thumb_grid") + "/restore", json=rows) as r:
        assert r.status == 204
    first, second, third = tmp_path / "d1", tmp_path / "d2", tmp_path / "d3"
    d1 = (await script("dump.py", first, *service_args(service), "--page-size", "16")).summary
    total = await count(service)
    assert d1["rows"] == total and d1["pages"] == -(-total // 16)
    assert sorted(p.name for p in first.iterdir())[:2] == ["page-00000.json", "page-00001.json"]
    r = (await script("restore.py", first, *service_args(empty_service), "--batch", "10", "--concurrency", "3")).summary
    assert r["rows"] == total and await count(empty_service) == total
    assert (await script("dump.py", second, *service_args(empty_service), "--page-size", "16")).rc == 0
    assert dumped_rows(second) == dumped_rows(first)
    by_url = {row["url"]: row for row in dumped_rows(second)}
    for row in rows:
        got = by_url[row["url"]]
        assert got["metadata"] == row["metadata"] and got.get("phash") == row.get("phash")
        assert np.array_equal(np.float32(got["embedding"]), np.float32(row["embedding"]))
    # the dump format is the original's, one JSON list of {url, embedding, metadata} per file, plus a row's
    # "phash" where it is known
    for got in json.loads((first / "page-00000.json").read_text()):
        assert set(got) - {"phash"} == {"url", "embedding", "metadata"}
    d3 = (await script("dump.py", third, *service_args(service), "--page-size", "4096")).summary
    assert d3["rows"] == await count(service) and d3["pages"] == -(-d3["rows"] // 4096)
    # --base64: embeddings as base64 of float32, the same values; restore.py sends such files as they are
    packed, again = tmp_path / "b64", tmp_path / "again"
    assert (await script("dump.py", packed, *service_args(empty_service), "--base64", "--page-size", "16")).rc == 0
    as_b64 = dumped_rows(packed)
    assert all(isinstance(row["embedding"], str) for row in as_b64)
    assert [{**r, "embedding": None} for r in as_b64] == [{**r, "embedding": None} for r in dumped_rows(first)]
    assert np.array_equal(np.stack([np.frombuffer(base64.b64decode(r["embedding"]), "<f4") for r in as_b64]),
                          np.float32([r["embedding"] for r in dumped_rows(first)]))
    assert (await script("restore.py", packed, *service_args(service))).summary["rows"] == total
    assert (await script("dump.py", again, *service_args(service), "--page-size", "16")).rc == 0
    assert dumped_rows(again) == dumped_rows(first)


def unit(v: np.ndarray) -> np.ndarray:
    """A float32 unit vector, as models store them and dumps hold them."""
    v = v.astype(np.float32)
    return v / np.linalg.norm(v)


def dumped_rows(folder: Path) -> list[dict[str, Any]]:
    return [row for f in sorted(folder.glob("page-*.json")) for row in json.loads(f.read_bytes())]


async def test_dump_resumes_after_the_last_complete_file(service: Service, uniq: str, tmp_path: Path) -> None:
    rows = [{"url": f"http://resume.test/{uniq}/{i:03d}", "metadata": None, "embedding": [float(i + 1)] * 192}
            for i in range(20)]
    async with service.http.post(service.model("thumb_grid") + "/restore", json=rows) as r:
        assert r.status == 204
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert (await script("dump.py", whole, *service_args(service), "--page-size", "8")).rc == 0
    assert (await script("dump.py", cut, *service_args(service), "--page-size", "8")).rc == 0
    pages = sorted(cut.glob("page-*.json"))
    assert len(pages) >= 3
    keep = len(pages) // 2
    for p in pages[keep:]:
        p.unlink()
    (cut / f"page-{keep:05d}.json.tmp").write_text('[{"url": "torn')  # what a crash mid-write leaves
    again = (await script("dump.py", cut, *service_args(service), "--page-size", "8")).summary
    assert again["pages"] == len(pages) - keep
    assert sorted(p.name for p in cut.iterdir()) == sorted(p.name for p in whole.iterdir())
    for a, b in zip(sorted(cut.iterdir()), sorted(whole.iterdir()), strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


async def test_restore_refuses_a_dimension_the_model_does_not_have(service: Service, uniq: str,
                                                                   tmp_path: Path) -> None:
    page = tmp_path / "page-00000.json"
    page.write_text(json.dumps([{"url": f"http://dim.test/{uniq}", "metadata": {}, "embedding": [1.0, 2.0]}]))
    res = await script("restore.py", page, *service_args(service))
    assert res.rc == 3 and "dimension" in res.err


@pytest.fixture
async def two_models(tmp_path: Path) -> AsyncIterator[Service]:
    """A service of its own holding thumb_grid (192-d) and thumb_wide (the same grid padded to 256-d, so that its
    embeddings are told apart from thumb_grid's); stopped with the test."""
    models = tmp_path / "two-models"
    shutil.copytree(ROOT / "models" / "thumb_grid", models / "thumb_grid")
    make_thumb_model.build(models / "thumb_wide", name="thumb_wide", dim=256)
    async with running_service(make_settings(tmp_path / "data-two", models)) as svc:
        yield svc


def move_args(svc: Service) -> list[str]:
    return ["--from-model", "thumb_grid", *service_args(svc, "thumb_wide")]


async def dump_rows(svc: Service, model: str) -> list[dict[str, Any]]:
    """Every row of `model` through the API, in its cursor order."""
    rows: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        async with svc.http.post(svc.model(model) + "/dump", json={"cursor": cursor, "limit": 7}) as r:
            assert r.status == 200, await r.text()
            page = await r.json()
        if not page:
            return rows
        rows += page
        cursor = page[-1]["url"]


async def add_to(svc: Service, model: str, items: list[dict[str, Any]]) -> None:
    async with svc.http.post(svc.model(model) + "/add_bulk", json=items) as r:
        answer = await r.json()
        assert r.status == 200 and len(answer["added"]) == len(items), answer


async def test_from_model_moves_every_url_and_metadata_into_the_new_model(
    two_models: Service, images: str, uniq: str, tmp_path: Path
) -> None:
    svc = two_models
    items: list[dict[str, Any]] = [{"url": f"{images}/img/{uniq}/{i}.jpg", "metadata": {"i": i, "s": f"é{i}"}}
                                   for i in range(11)]
    items.append({"url": f"{images}/img/{uniq}/bare.png"})
    await add_to(svc, "thumb_grid", items)
    gone = f"{images}/missing/{uniq}.jpg"  # a row whose image is no longer there: NEW cannot fetch it
    async with svc.http.post(svc.model("thumb_grid") + "/restore",
                             json=[{"url": gone, "metadata": {"kept": True}, "embedding": [1.0] + [0.0] * 191}]) as r:
        assert r.status == 204
    old = await dump_rows(svc, "thumb_grid")
    assert len(old) == 13
    res = await script("bulk_ingest.py", *move_args(svc), "--batch", "3", "--concurrency", "2", "--page-size", "4",
                       cwd=tmp_path)
    s = res.summary
    assert (s["records"], s["sent"], s["added"], s["found"], s["failed"]) == (13, 13, 12, 0, 1), s
    new = await dump_rows(svc, "thumb_wide")
    assert [(r["url"], r["metadata"]) for r in new] == [(r["url"], r["metadata"]) for r in old if r["url"] != gone]
    # the embeddings are thumb_wide's own, computed from the images, not thumb_grid's copied
    assert {len(r["embedding"]) for r in old} == {192} and {len(r["embedding"]) for r in new} == {256}
    async with svc.http.post(svc.model("thumb_wide") + "/search", json={"url": items[4]["url"], "limit": 3}) as r:
        hits = await r.json()
        assert r.status == 200, hits
    assert hits[0]["url"] == items[4]["url"] and hits[0]["similarity"] > 99.9
    assert hits[0]["metadata"] == {"i": 4, "s": "é4"}
    # the default files are named after both models, in the current folder; the failure is valid input
    state = read_jsonl(tmp_path / "from-thumb_grid.thumb_wide.state.jsonl")
    assert state[0] == {"bulk_ingest": 1, "model": "thumb_wide", "input": f"{svc.url}/models/thumb_grid"}
    assert sum(e - b for line in state[1:] for b, e in line["positions"]) == 13
    failed = read_jsonl(tmp_path / "from-thumb_grid.thumb_wide.failed.jsonl")
    position = [r["url"] for r in old].index(gone)
    assert [(f["url"], f["position"], f["type"], f["metadata"]) for f in failed] == [
        (gone, position, "image_http_error", {"kept": True})]
    again = (await script("bulk_ingest.py", *move_args(svc), cwd=tmp_path)).summary
    assert (again["already_done"], again["sent"]) == (13, 0)
    skip = (await script("bulk_ingest.py", *move_args(svc), "--no-state", "--skip-existing", cwd=tmp_path)).summary
    assert (skip["records"], skip["sent"], skip["found"], skip["failed"]) == (13, 1, 12, 1), skip
    assert await (await svc.http.get(svc.model("thumb_grid") + "/count")).json() == 13  # the old model is kept


async def test_from_model_with_a_limit_then_resumed_sends_only_the_rest(
    two_models: Service, images: str, uniq: str, tmp_path: Path
) -> None:
    svc = two_models
    items = [{"url": f"{images}/img/{uniq}/{i}.jpg", "metadata": {"i": i}} for i in range(10)]
    await add_to(svc, "thumb_grid", items)
    first = (await script("bulk_ingest.py", *move_args(svc), "--limit", "4", "--batch", "2", "--page-size", "3",
                          cwd=tmp_path)).summary
    assert (first["records"], first["sent"], first["added"]) == (4, 4, 4), first
    old_urls = [r["url"] for r in await dump_rows(svc, "thumb_grid")]
    assert [r["url"] for r in await dump_rows(svc, "thumb_wide")] == old_urls[:4]  # the first 4 in cursor order
    second = (await script("bulk_ingest.py", *move_args(svc), "--batch", "4", "--page-size", "3",
                           cwd=tmp_path)).summary
    assert (second["records"], second["already_done"], second["sent"], second["added"], second["found"]) == \
        (10, 4, 6, 6, 0), second
    new = await dump_rows(svc, "thumb_wide")
    assert [(r["url"], r["metadata"]) for r in new] == [(it["url"], it["metadata"]) for it in
                                                       sorted(items, key=lambda it: str(it["url"]))]
    assert [r["url"] for r in new] == old_urls


async def test_from_model_errors_are_one_line(two_models: Service, tmp_path: Path) -> None:
    svc = two_models
    unknown = await script("bulk_ingest.py", "--from-model", "no_such_model", *service_args(svc, "thumb_wide"),
                           cwd=tmp_path)
    assert unknown.rc == 2 and len(unknown.err.strip().splitlines()) == 1, unknown.err
    assert "no_such_model" in unknown.err and "thumb_grid" in unknown.err and "Traceback" not in unknown.err
    unreachable = await script("bulk_ingest.py", "--from-model", "thumb_grid", "--server", "http://127.0.0.1:9",
                               "--model", "thumb_wide", "--retries", "1", "--backoff-max", "0.1", cwd=tmp_path)
    assert unreachable.rc == 3 and len(unreachable.err.strip().splitlines()) == 1, unreachable.err
    assert not list(tmp_path.glob("from-*"))  # nothing was written for runs that never started
    list_file = tmp_path / "list.txt"
    list_file.write_text("http://example.org/a.jpg\n")
    for bad in (["--model", "thumb_wide"],  # neither INPUT nor --from-model
                [list_file, *move_args(svc)],  # both
                ["--from-model", "thumb_wide", "--model", "thumb_wide"],  # into itself
                [*move_args(svc), "--format", "csv"],
                [*move_args(svc), "--page-size", "0"],
                [list_file, "--model", "thumb_wide", "--page-size", "10"]):
        res = await script("bulk_ingest.py", *bad, cwd=tmp_path)
        assert res.rc == 2 and res.err.strip().splitlines()[-1].startswith("bulk_ingest.py: error:"), (bad, res.err)
    assert "from-OLD.MODEL.state.jsonl" in (await script("bulk_ingest.py", "--help")).out.replace("\n", " ")


def test_tool_pins_match_the_runtime_pins() -> None:
    def pins(name: str) -> dict[str, str]:
        lines = (ROOT / "requirements" / name).read_text().splitlines()
        return dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))

    tools, runtime = pins("tools.txt"), pins("runtime.txt")
    assert {k: v for k, v in tools.items() if k in runtime} == {k: runtime[k] for k in tools if k in runtime}
    assert "tqdm" in tools and "-r tools.txt" in (ROOT / "requirements" / "dev.txt").read_text()
    assert os.access(SCRIPTS / "bulk_ingest.py", os.R_OK)
