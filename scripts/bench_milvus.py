#!/usr/bin/env python3
"""Idios at scale on a real Milvus server, beside Milvus Lite: restore, search, dump and recall through the API.

    python scripts/bench_milvus.py [--rows 100000] [--searches 60] [--efs 16,32,64,128] [--skip lite] [--json F]

Starts a Milvus 2.3.5 standalone server (scripts/milvus_standalone.py, the `milvus` package of
requirements/dev.txt) and the distributed deployment on it (`api` + one `worker` over the local RabbitMQ),
restores `--rows` unit vectors of 512 values through the API (`--data`: clustered as embeddings are, or uniform), waits for the HNSW index, then measures:
search by indexed url and by text (p50/p95; the bare text tower's own time beside), dump (cursor pages),
recall@10 of the service's answers against the exact top-10 (numpy over the same vectors), recall and latency
of the bare server at each ef in --efs, the bare server's insert rate (the floor under restore), Milvus's RSS
and disk. Then the same restore/search/dump on the embedded deployment (Milvus Lite), unless --skip lite.
The model is the toy thumb model widened to 512 values (its text tower knows four colour words): the store's
work depends on the dimension, not on what made the vectors.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_deploy as deploy  # noqa: E402
import make_thumb_model  # noqa: E402
from benchmark import dump, latencies, measure_text, note, post_ok, quantiles_ms  # noqa: E402
from milvus_standalone import MILVUS_VERSION, MilvusStandalone  # noqa: E402

from idios import milvus_rows  # noqa: E402
from idios.models import discover  # noqa: E402
from idios.settings import Settings  # noqa: E402
from idios.schema import create_collection  # noqa: E402

DIM = 512
MODEL = "thumb512"
RESTORE_ROWS = 10_000  # rows per restore request (the service's default limit)
REPEAT_ROWS = 20_000  # rows restored a second time with numbers for embeddings, beside base64
Figures = dict[str, Any]


def unit_rows(rows: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((rows, DIM), dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return vecs


def clustered_rows(rows: int, per_cluster: int = 50, spread: float = 0.75, seed: int = 1) -> np.ndarray:
    """Unit rows in groups, as image embeddings come (a collection holds series, copies and subjects): random
    centres, each row its centre plus noise (cosine 0.8 to it, about 0.64 to its neighbours, about 0 to the rest).
    Uniform random rows are the other extreme: every row almost equally far from every other, so an exact top-10
    is a matter of noise and no graph index finds it at a small ef."""
    rng = np.random.default_rng(seed)
    centres = unit_rows(max(1, rows // per_cluster), seed + 1000)
    noise = rng.standard_normal((rows, DIM), dtype=np.float32) * (spread / np.sqrt(DIM))
    vecs = centres[rng.integers(0, len(centres), rows)] + noise
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return vecs


def nearby_queries(vecs: np.ndarray, n: int, spread: float = 0.3, seed: int = 9) -> np.ndarray:
    """Queries close to stored rows (a re-encoded or cropped copy of a stored image), not stored rows."""
    rng = np.random.default_rng(seed)
    picks = vecs[rng.integers(0, len(vecs), n)]
    q = picks + rng.standard_normal(picks.shape, dtype=np.float32) * (spread / np.sqrt(DIM))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def url(i: int) -> str:
    return f"http://bench.invalid/r/{i:09d}"


def restore_body(vecs: np.ndarray, start: int, encoding: str) -> bytes:
    """One restore request: numbers (the original format) or base64 embeddings (encoding_format "base64")."""
    if encoding == "base64":
        raw = np.ascontiguousarray(vecs, dtype="<f4").tobytes()
        width = vecs.shape[1] * 4
        return orjson.dumps([{"url": url(start + i), "metadata": {"i": start + i},
                              "embedding": base64.b64encode(raw[i * width : (i + 1) * width]).decode()}
                             for i in range(len(vecs))])
    return orjson.dumps([{"url": url(start + i), "metadata": {"i": start + i}, "embedding": v}
                         for i, v in enumerate(vecs)], option=orjson.OPT_SERIALIZE_NUMPY)


async def restore(svc: deploy.Deployment, vecs: np.ndarray, encoding: str, clients: int = 2,
                  server_pid: int | None = None) -> Figures:
    """Restore every row through the API, `clients` requests at a time; bodies are encoded just before each
    request (a million rows of JSON would not fit in memory at once), so the wall time includes the encoding.
    CPU seconds per 10,000 rows are counted for the service's processes, the Milvus server and this client: on a
    small machine they share the cores, and their sum over the wall time says whether the cores were the limit."""
    base = svc.url
    headers = {"Content-Type": "application/json"}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for start in range(0, len(vecs), RESTORE_ROWS):
        queue.put_nowait(start)

    async def client(http: aiohttp.ClientSession) -> None:
        while not queue.empty():
            start = queue.get_nowait()
            body = restore_body(vecs[start : start + RESTORE_ROWS], start, encoding)
            await post_ok(http, f"{base}/models/{MODEL}/restore", data=body, headers=headers)

    def cpu() -> tuple[float, float, float]:
        milvus = tree_cpu(server_pid) if server_pid else 0.0
        return svc.cpu(), milvus, time.process_time()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as http:
        before = cpu()
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
        used = [b - a for a, b in zip(before, cpu(), strict=True)]
    per = 10_000 / len(vecs)
    return {"rows": len(vecs), "rows_per_s": len(vecs) / wall, "clients": clients, "encoding": encoding,
            "cpu_s_per_10k": {"service": used[0] * per, "milvus": used[1] * per, "client": used[2] * per},
            "cores_busy": sum(used) / wall}


async def restore_and_dump(svc: deploy.Deployment, vecs: np.ndarray, fig: Figures, where: str,
                           clients: int, server_pid: int | None = None) -> None:
    """Restore in base64 (every row), then again in numbers (the first REPEAT_ROWS rows, replacing themselves:
    the same upserts on a server), and dump in both encodings."""
    note(f"{where}: restore {len(vecs):,} rows through the API, base64 embeddings")
    fig["restore"] = await restore(svc, vecs, "base64", clients, server_pid)
    fig["restore_float"] = await restore(svc, vecs[:REPEAT_ROWS], "float", clients, server_pid)


async def dumps(svc: deploy.Deployment, fig: Figures, where: str) -> None:
    note(f"{where}: dump, base64 and numbers")
    fig["dump"] = await dump(svc, MODEL, encoding="base64")
    fig["dump_float"] = await dump(svc, MODEL, encoding="float")


def exact_top10(vecs: np.ndarray, queries: np.ndarray) -> list[set[int]]:
    out = []
    for q in queries:
        scores = vecs @ q
        top = np.argpartition(-scores, 10)[:10]
        out.append(set(int(i) for i in top))
    return out


def recall(found: list[list[int]], exact: list[set[int]]) -> float:
    return float(np.mean([len(set(f[:10]) & e) / 10 for f, e in zip(found, exact, strict=True)]))


async def search_phase(base: str, vecs: np.ndarray, n: int, seed: int = 5) -> Figures:
    """Search by indexed url (one request at a time) and by text; recall@10 of the indexed-url answers."""
    rng = np.random.default_rng(seed)
    picks = [int(i) for i in rng.integers(0, len(vecs), n + 1)]
    api = f"{base}/models/{MODEL}/search"
    answers: dict[int, list[int]] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        async def by_url(i: int) -> None:
            hits = await post_ok(http, api, json={"url": url(picks[i]), "indexed": True, "limit": 10})
            answers[i] = [int(h["url"].rsplit("/", 1)[1]) for h in hits]

        out: Figures = {"indexed_url": await latencies(n, by_url)}
        out["text"] = await latencies(n, lambda i: post_ok(http, api, json={"text": "red blue", "limit": 10}))
    order = list(range(n))
    out["recall_at_10"] = recall([answers[i] for i in order], exact_top10(vecs, vecs[[picks[i] for i in order]]))
    return out


def wait_indexed(uri: str, db: str, collection: str, rows: int, timeout: float = 3600) -> float:
    """Flush, then wait until the index covers every row; returns the seconds waited."""
    from pymilvus import MilvusClient

    client = MilvusClient(uri, db_name=db, timeout=120)
    start = time.perf_counter()
    try:
        client.flush(collection)
        while time.perf_counter() - start < timeout:
            info = client.describe_index(collection, "embedding")
            if int(info.get("indexed_rows", 0)) >= rows and int(info.get("pending_index_rows", 0)) == 0:
                break
            time.sleep(2)
    finally:
        client.close()
    return time.perf_counter() - start


def bare_server(uri: str, db: str, collection: str, vecs: np.ndarray, efs: list[int], n: int,
                floor_rows: int) -> Figures:
    """The server through a bare pymilvus client: recall@10 and latency per ef on the restored collection
    (queries near stored rows, see nearby_queries), then the insert rate into a scratch collection."""
    from pymilvus import MilvusClient

    client = MilvusClient(uri, db_name=db, timeout=120)
    out: Figures = {"ef": {}}
    try:
        queries = nearby_queries(vecs, n)
        exact = exact_top10(vecs, queries)
        for ef in efs:
            times, found = [], []
            for q in queries:
                t = time.perf_counter()
                res = client.search(collection, data=[q.tolist()], limit=10, output_fields=["url"],
                                    search_params={"metric_type": "IP", "params": {"ef": ef}},
                                    consistency_level="Bounded")
                times.append(time.perf_counter() - t)
                found.append([int(h["entity"]["url"].rsplit("/", 1)[1]) for h in res[0]])
            out["ef"][str(ef)] = {"recall_at_10": recall(found, exact)} | quantiles_ms(times)
        create_collection(client, "floor", DIM, "HNSW", phash=False)  # the rows below carry no hash
        extra = unit_rows(floor_rows, seed=11)
        start = time.perf_counter()
        for at in range(0, floor_rows, 5000):
            client.insert("floor", [{"url": f"f{at + i}", "embedding": v, "metadata": {}}
                                    for i, v in enumerate(extra[at : at + 5000])])
        out["insert_rows_per_s_one_caller"] = floor_rows / (time.perf_counter() - start)
        out["insert_rows_per_s_packed"] = asyncio.run(packed_inserts(uri, db, "floor", extra))
        client.drop_collection("floor")
    finally:
        client.close()
    return out


async def packed_inserts(uri: str, db: str, collection: str, vecs: np.ndarray, step: int = 1000) -> float:
    """The same rows inserted again as the service writes them (idios.milvus_rows, chunks of 1,000, four at
    once): the server's floor under a restore, without pymilvus's row packing."""
    from pymilvus import AsyncMilvusClient

    client = AsyncMilvusClient(uri, db_name=db, timeout=120)
    gate = asyncio.Semaphore(4)

    async def chunk(at: int) -> None:
        async with gate:
            part = vecs[at : at + step]
            await milvus_rows.write(client, collection, [f"p{at + i}" for i in range(len(part))], part,
                                    [{}] * len(part), upsert=False, timeout=120)

    try:
        start = time.perf_counter()
        await asyncio.gather(*(chunk(at) for at in range(0, len(vecs), step)))
        return len(vecs) / (time.perf_counter() - start)
    finally:
        await client.close()


def tree_cpu(pid: int) -> float:
    return sum(deploy.cpu_seconds(p) for p in (pid, *deploy.children(pid)))


def tree_rss_mb(pid: int) -> float:
    return sum(deploy.status_mb(p, "VmRSS") for p in (pid, *deploy.children(pid)))


def disk_mb(path: Path) -> float:
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0]) / 1024


async def server_phases(args: argparse.Namespace, models: Path, tmp: Path, vecs: np.ndarray) -> Figures:
    fig: Figures = {"milvus": f"{MILVUS_VERSION} standalone", "rows": len(vecs), "search_ef": args.ef}
    with MilvusStandalone(tmp / "milvus-server") as server:
        assert server.pid is not None
        async with deploy.distributed(models, tmp, server.uri, workers=1, search_ef=args.ef) as svc:
            db = svc.milvus_db
            await restore_and_dump(svc, vecs, fig, "server", args.restore_clients, server.pid)
            collection = discover(models)[MODEL].collection
            note("server: waiting for the HNSW index")
            fig["index_wait_s"] = await asyncio.to_thread(wait_indexed, server.uri, db, collection, len(vecs))
            note("server: search")
            fig["search"] = await search_phase(svc.url, vecs, args.searches)
            await dumps(svc, fig, "server")
            fig["milvus_rss_mb"] = tree_rss_mb(server.pid)
            note("server: bare client, recall per ef and the insert floor")
            fig["bare"] = await asyncio.to_thread(bare_server, server.uri, db, collection, vecs, args.efs,
                                                  args.searches, min(len(vecs), 50_000))
        fig["milvus_disk_mb"] = disk_mb(tmp / "milvus-server")
    return fig


async def lite_phases(args: argparse.Namespace, models: Path, tmp: Path, vecs: np.ndarray) -> Figures:
    fig: Figures = {"milvus": "Milvus Lite (embedded serve)", "rows": len(vecs)}
    async with deploy.embedded(models, tmp) as svc:
        await restore_and_dump(svc, vecs, fig, "lite", args.restore_clients)
        note("lite: search")
        fig["search"] = await search_phase(svc.url, vecs, args.searches)
        await dumps(svc, fig, "lite")
    return fig


def table(fig: Figures) -> str:
    lines, row = deploy.figure_table(fig, [k for k in ("server", "lite") if k in fig], 34, 22)

    row("rows", lambda f: f"{f['rows']:,}")
    row("restore rows/s (API), base64", lambda f: f"{f['restore']['rows_per_s']:,.0f}")
    row("restore rows/s (API), numbers", lambda f: f"{f['restore_float']['rows_per_s']:,.0f}")
    row("restore CPU s/10k: svc/milvus/client", lambda f: "{service:.2f} / {milvus:.2f} / {client:.2f}".format(
        **f["restore"]["cpu_s_per_10k"]))
    row("restore cores busy (of {})".format(os.cpu_count()), lambda f: f"{f['restore']['cores_busy']:.2f}")
    row("dump rows/s (API), base64", lambda f: f"{f['dump']['rows_per_s']:,.0f}")
    row("dump rows/s (API), numbers", lambda f: f"{f['dump_float']['rows_per_s']:,.0f}")
    row("search indexed url p50/p95 ms", lambda f: "{p50_ms:.1f} / {p95_ms:.1f}".format(**f["search"]["indexed_url"]))
    row("search text p50/p95 ms", lambda f: "{p50_ms:.1f} / {p95_ms:.1f}".format(**f["search"]["text"]))
    row("recall@10 indexed url (API)", lambda f: f"{f['search']['recall_at_10']:.3f}")
    s = fig.get("server", {})
    if "bare" in s:
        lines.append(f"bare server: insert {s['bare']['insert_rows_per_s_one_caller']:,.0f} rows/s one pymilvus caller, "
                     f"{s['bare']['insert_rows_per_s_packed']:,.0f} rows/s packed (4 x 1,000 rows at once); "
                     f"index ready {s['index_wait_s']:.0f} s after restore; RSS {s['milvus_rss_mb']:,.0f} MB; "
                     f"disk {s['milvus_disk_mb']:,.0f} MB")
        for ef, r in s["bare"]["ef"].items():
            lines.append(f"bare server ef {ef:>4}: recall@10 {r['recall_at_10']:.3f} (queries near stored rows), "
                         f"p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms")
    if "text_model" in fig:
        lines.append(f"bare text tower p50 {fig['text_model']['p50_ms']:.1f} ms")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> Figures:
    fig: Figures = {"meta": {"when": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
                             "loadavg_before": os.getloadavg(), "dim": DIM, "data": args.data}}
    vecs = clustered_rows(args.rows) if args.data == "clustered" else unit_rows(args.rows)
    with tempfile.TemporaryDirectory(prefix="idios-bench-milvus-") as name:
        tmp = Path(name)
        make_thumb_model.build(tmp / "models" / MODEL, name=MODEL, text=True, dim=DIM)
        models = tmp / "models"
        fig["server"] = await server_phases(args, models, tmp, vecs)
        if "lite" not in args.skip:
            fig["lite"] = await lite_phases(args, models, tmp, vecs)
        spec = discover(models)[MODEL]
        fig["text_model"] = measure_text(spec, Settings(), args.searches)
    fig["meta"]["loadavg_after"] = os.getloadavg()
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--searches", type=int, default=60)
    p.add_argument("--ef", type=int, default=Settings().search_ef, help="IDIOS_SEARCH_EF of the service")
    p.add_argument("--efs", default="16,32,64,128,256", help="ef values the bare server is measured at")
    p.add_argument("--restore-clients", type=int, default=2, help="restore requests in flight")
    p.add_argument("--skip", default="", help="comma-separated: lite")
    p.add_argument("--data", choices=("clustered", "random"), default="clustered",
                   help="rows in groups, as embeddings come (default), or uniform random unit rows (worst case)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.efs = [int(e) for e in args.efs.split(",") if e.strip()]
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    fig = asyncio.run(run(args))
    print(table(fig))
    if args.json:
        args.json.write_text(orjson.dumps(fig, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
