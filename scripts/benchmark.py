#!/usr/bin/env python3
"""Measure Idios on this machine in one run: the model's ceiling, ingest through the API (embedded and over
RabbitMQ with one worker), search latency with N stored rows, restore and dump rates, and peak RSS."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_deploy as deploy  # noqa: E402
from milvus_standalone import MilvusStandalone  # noqa: E402
from idios.decode import DecodeLimits, preprocess  # noqa: E402
from idios.embed import TextEncoder, model_threads  # noqa: E402
from idios.engines import EnginePlan, Tower, detect_machine, open_tower, plan  # noqa: E402
from idios.filters import url_in  # noqa: E402
from idios.models import ModelSpec, discover  # noqa: E402
from idios.settings import Settings  # noqa: E402
from idios.schema import METRIC, create_collection  # noqa: E402
from idios.writer import PARALLEL_WRITES  # noqa: E402

PHASES = ("ceiling", "ingest", "amqp", "restore", "search", "dump", "floors")
BULK_ITEMS = 32  # urls per add_bulk request
RESTORE_ROWS = 10_000  # rows per restore request (the service's default limit)
DUMP_PAGE = 10_000
Figures = dict[str, Any]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models-dir", type=Path, default=Path("models"), help="folder of model folders")
    p.add_argument("--model", help="model to measure (default: the first one found)")
    p.add_argument("--rows", type=int, default=100_000, help="rows restored for the search/dump phases")
    p.add_argument("--images", type=int, default=320, help="images ingested per deployment (half add, half add_bulk)")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent add clients")
    p.add_argument("--searches", type=int, default=60, help="requests per search kind")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds the bare-model ceiling is measured for")
    p.add_argument("--compare", default="", help="comma-separated other models (int8 copies, say) whose bare "
                   "ceilings are measured in the same interleaved rounds")
    p.add_argument("--skip", default="", help=f"comma-separated phases to skip: {', '.join(PHASES)}")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    p.add_argument("--milvus-uri", help="run the amqp phase on this Milvus server (default: start one, "
                   "scripts/milvus_standalone.py; one per machine)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a service setting for this run, as IDIOS_NAME would set it (repeatable), e.g. onnx_threads=1; "
                        "the bare-model figures use it too")
    args = p.parse_args(argv)
    args.settings = {}
    for item in args.set:
        name, _, value = item.partition("=")
        name = name.strip().lower().removeprefix("idios_")
        if not value or name not in {f.name for f in dataclasses.fields(Settings)}:
            p.error(f"--set {item!r}: expected NAME=VALUE with a setting name (python -m idios serve --help)")
        args.settings[name] = value
    args.service = Settings.from_env({f"IDIOS_{k.upper()}": v for k, v in args.settings.items()})
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    args.compare = [c.strip() for c in args.compare.split(",") if c.strip()]
    if args.skip - set(PHASES):
        p.error(f"unknown phase in --skip: {', '.join(sorted(args.skip - set(PHASES)))}")
    return args


def pick_model(args: argparse.Namespace, name: str | None = None) -> ModelSpec:
    specs = discover(args.models_dir)
    if not specs:
        raise SystemExit(f"no model under {args.models_dir}")
    name = name or args.model or next(iter(specs))
    if name not in specs:
        raise SystemExit(f"model {name!r} not found (models: {', '.join(specs)})")
    return specs[name]


def only_model(spec: ModelSpec, tmp: Path) -> Path:
    """A models folder holding just this model, so the service loads (and its RSS counts) only it."""
    folder = tmp / "models"
    folder.mkdir()
    (folder / spec.visual.parent.name).symlink_to(spec.visual.parent.resolve())
    return folder


def note(message: str) -> None:
    """Progress on stderr, so a long run shows where it is."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def quantiles_ms(samples: list[float]) -> Figures:
    q = np.percentile(np.asarray(samples) * 1000, [50, 95, 99])
    return {"p50_ms": float(q[0]), "p95_ms": float(q[1]), "p99_ms": float(q[2]), "n": len(samples)}


# ---- the bare model ---------------------------------------------------------------------------------------------

def service_plan(spec: ModelSpec, settings: Settings, kind: str = "visual",
                 runs: tuple[str, str] | None = None) -> EnginePlan:
    """What the service would run a tower on (`runs` None), or the plan for the given (engine, precision)."""
    engine, precision = runs or (settings.engine, settings.precision)
    return plan(spec.tower_weights(kind), engine, precision, detect_machine(settings.execution_provider))


def bare_tower(spec: ModelSpec, settings: Settings, kind: str = "visual", runs: tuple[str, str] | None = None
               ) -> Tower:
    """A tower opened as the service would open it (`runs` None), or on the given (engine, precision)."""
    machine = detect_machine(settings.execution_provider)
    chosen = service_plan(spec, settings, kind, runs)
    return open_tower(spec.tower_weights(kind), chosen, machine, model_threads(settings), settings.onnx_spin)


Variant = tuple[ModelSpec, tuple[str, str]]


def engine_variants(spec: ModelSpec, settings: Settings, others: tuple[ModelSpec, ...] = ()) -> dict[str, Variant]:
    """What the bare-model ceilings compare: the service's choice first, then every engine/precision that runs
    this model, then the same for `others` (say its int8 copies, on the engine they were quantised for)."""
    service = service_plan(spec, settings).runs
    out: dict[str, Variant] = {"service": (spec, service)}
    machine = detect_machine(settings.execution_provider)
    for model in [spec, *others]:
        if model.precision == "int8":
            runs = [service_plan(model, settings, runs=("auto", "int8")).runs]
        else:
            runs = [("onnxruntime", "fp32")]
            if machine.openvino is not None:
                runs += [("openvino", "fp32")] + ([("openvino", "bf16")] if machine.bf16 else [])
        for r in runs:
            if (model, r) != (spec, service):
                out[f"{model.name} {' '.join(r)}" if model is not spec else " ".join(r)] = (model, r)
    return out


def measure_ceilings(settings: Settings, seconds: float, variants: dict[str, Variant]) -> dict[str, Figures]:
    """Bare throughput at the service's batch size, CPU per image and batch-1 latency of each engine/precision,
    same threads as the service, measured in interleaved rounds so that a change of load hits all alike."""
    batch = settings.max_batch
    towers = {name: bare_tower(model, settings, runs=runs) for name, (model, runs) in variants.items()}
    rng = np.random.default_rng(0)
    size = next(iter(variants.values()))[0].image_size
    x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    done = {name: [0, 0.0, 0.0] for name in towers}  # runs, wall, cpu
    single: dict[str, list[float]] = {name: [] for name in towers}
    for tower in towers.values():
        tower.run(x), tower.run(x[:1])  # warm-up: the first run of a shape allocates (and compiles)
    rounds = 4
    for _ in range(rounds):
        for name, tower in towers.items():
            runs, start, cpu = 0, time.perf_counter(), time.process_time()
            while runs < 1 or time.perf_counter() - start < seconds / rounds / len(towers):
                tower.run(x)
                runs += 1
            acc = done[name]
            acc[0] += runs
            acc[1] += time.perf_counter() - start
            acc[2] += time.process_time() - cpu
            for _ in range(max(3, min(10, int(seconds)))):
                t = time.perf_counter()
                tower.run(x[:1])
                single[name].append(time.perf_counter() - t)
    return {name: {"model": variants[name][0].name, "engine": variants[name][1][0],
                   "precision": variants[name][1][1], "batch": batch,
                   "images_per_s": acc[0] * batch / acc[1], "cpu_ms_per_image": 1000 * acc[2] / (acc[0] * batch),
                   "single_image_ms": 1000 * statistics.median(single[name])}
            for name, acc in done.items()}


def measure_ceiling(spec: ModelSpec, settings: Settings, seconds: float) -> Figures:
    """The service's engine beside bare onnxruntime fp32 (today's baseline), interleaved."""
    variants = engine_variants(spec, settings)
    keep = {k: v for k, v in variants.items() if k == "service" or v == (spec, ("onnxruntime", "fp32"))}
    out = measure_ceilings(settings, seconds, keep)
    baseline = out.get("onnxruntime fp32", out["service"])
    return out["service"] | {"onnxruntime_fp32_images_per_s": baseline["images_per_s"]}


def measure_decode(spec: ModelSpec, pool: list[bytes]) -> tuple[float, float]:
    """Wall and CPU milliseconds per image of the service's decode + preprocess (one thread) on the benchmark's
    JPEGs: the first is printed, the second is the decode share of the ingest's CPU split."""
    defaults = Settings()  # decode limits are not tuning knobs
    limits = DecodeLimits(defaults.min_image_side, defaults.max_image_pixels)
    sample = pool[:64]
    preprocess(sample[0], spec, limits)
    start, cpu = time.perf_counter(), time.thread_time()
    for data in sample:
        preprocess(data, spec, limits)
    return (1000 * (time.perf_counter() - start) / len(sample), 1000 * (time.thread_time() - cpu) / len(sample))


def measure_text(spec: ModelSpec, settings: Settings, n: int) -> Figures:
    """The bare text tower (tokenizer + ONNX, one short text at a time), same threads as the service."""
    assert spec.text is not None
    tower = bare_tower(spec, settings, "text")
    encoder = TextEncoder(spec.text, tower)
    encoder.run(["warm up"])
    samples = []
    for i in range(n):
        t = time.perf_counter()
        encoder.run([f"a photo of thing {i}"])
        samples.append(time.perf_counter() - t)
    return quantiles_ms(samples) | {"trimmed": encoder.trimmed, "engine": tower.engine, "precision": tower.precision}


# ---- the bare vector store --------------------------------------------------------------------------------------

def measure_store(path: Path, rows: int, dim: int, n: int, index_type: str) -> Figures:
    """What Milvus Lite itself does on this machine, through a bare pymilvus client with no Idios code in the way,
    on a scratch collection shaped like the service's with `rows` rows: the floor under restore, dump and search.
    Same engine, same process layout (a Milvus Lite server process per file), measured just after the service."""
    from pymilvus import MilvusClient

    client = MilvusClient(str(path))
    try:
        create_collection(client, "floor", dim, index_type, phash=False)  # the rows below carry no hash
        rng = np.random.default_rng(3)
        chunk = 1000

        def rows_at(start: int, count: int) -> list[dict[str, Any]]:
            vecs = rng.standard_normal((count, dim)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            return [{"url": f"http://bench.invalid/f/{start + i:09d}", "embedding": v, "metadata": {"i": start + i}}
                    for i, v in enumerate(vecs)]

        # what a restore into an empty collection does: the first half one call at a time, the second half with
        # as many calls at once as the service makes (Milvus Lite's engine runs concurrent inserts side by side)
        half = rows // 2
        start = time.perf_counter()
        for at in range(0, half, chunk):
            client.insert("floor", rows_at(at, min(chunk, half - at)))
        insert = half / (time.perf_counter() - start)
        chunks = [rows_at(at, min(chunk, rows - at)) for at in range(half, rows, chunk)]
        start = time.perf_counter()
        with ThreadPoolExecutor(PARALLEL_WRITES) as pool:
            list(pool.map(lambda data: client.insert("floor", data), chunks))
        insert_parallel = (rows - half) / (time.perf_counter() - start)
        again = min(rows, 5000)
        start = time.perf_counter()
        for at in range(0, again, chunk):  # rows that are stored already
            client.upsert("floor", rows_at(at, min(chunk, again - at)))
        upsert = again / (time.perf_counter() - start)
        keys = [f"http://bench.invalid/f/{i:09d}" for i in rng.integers(0, rows, n)]
        lookups = []
        for key in keys:
            t = time.perf_counter()
            client.query("floor", filter=url_in([key]), output_fields=["embedding"])
            lookups.append(time.perf_counter() - t)
        query = rows_at(0, 1)[0]["embedding"].tolist()
        searches = []
        for _ in range(n):
            t = time.perf_counter()
            client.search("floor", data=[query], limit=10, output_fields=["url", "metadata"],
                          search_params={"metric_type": METRIC})
            searches.append(time.perf_counter() - t)
        read = min(rows, 20_000)
        start = time.perf_counter()
        for at in range(0, read, 500):
            names = [f"http://bench.invalid/f/{i:09d}" for i in range(at, min(read, at + 500))]
            client.query("floor", filter=url_in(names), output_fields=["url", "embedding", "metadata"],
                         strict_float32=True)
        by_key = read / (time.perf_counter() - start)
    finally:
        client.close()
    return {"rows": rows, "insert_rows_per_s": insert, "insert_parallel_rows_per_s": insert_parallel,
            "parallel_writes": PARALLEL_WRITES, "upsert_rows_per_s": upsert,
            "read_by_key_rows_per_s": by_key, "pk_lookup": quantiles_ms(lookups), "search_top10": quantiles_ms(searches)}


# ---- ingest -----------------------------------------------------------------------------------------------------

async def post_ok(http: aiohttp.ClientSession, url: str, **kw: Any) -> Any:
    async with http.post(url, **kw) as resp:
        body = await resp.read()
        if resp.status >= 300:
            raise RuntimeError(f"POST {url} answered {resp.status}: {body[:300]!r}")
        return orjson.loads(body) if body else None


async def batch_totals(http: aiohttp.ClientSession, svc: deploy.Deployment) -> dict[str, float]:
    """Sums of the worker's idios_batch_seconds / idios_batch_size histograms by stage (embed, write)."""
    if not svc.metrics_url:
        return {}
    async with http.get(svc.metrics_url) as resp:
        text = await resp.text()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r'idios_batch_(seconds|size)_(sum|count)\{.*stage="(\w+)".*\} (\S+)$', line)
        if m:
            key = f"{m[3]}_{m[1]}_{m[2]}"
            totals[key] = totals.get(key, 0.0) + float(m[4])
    return totals


def where_time_goes(before: dict[str, float], after: dict[str, float], wall: float) -> Figures:
    """From the worker's own metrics over the timed ingest: how busy the model was, mean batch, Milvus time."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    if not d.get("embed_size_count"):
        return {}
    return {"model_busy_fraction": d["embed_seconds_sum"] / wall,
            "mean_embed_batch": d["embed_size_sum"] / d["embed_size_count"],
            "milvus_write_fraction": d.get("write_seconds_sum", 0.0) / wall}


async def run_clients(n: int, clients: int, one: Callable[[int], Awaitable[None]]) -> float:
    """Call one(i) for i in range(n) from `clients` concurrent tasks; return the seconds it took."""
    todo = iter(range(n))

    async def client() -> None:
        for i in todo:
            await one(i)

    start = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(clients):
            tg.create_task(client())
    return time.perf_counter() - start


async def ingest(svc: deploy.Deployment, model: str, images: str, tag: str, count: int, clients: int) -> Figures:
    """Images/s through add (one url a request) then add_bulk (BULK_ITEMS urls a request); every url distinct."""
    api = f"{svc.url}/models/{model}"
    url = lambda i: f"{images}/img/{i}/{tag}-{i}.jpg"  # noqa: E731
    n_add, n_bulk = count // 2, count - count // 2
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        await asyncio.gather(*(post_ok(http, f"{api}/add", json={"url": f"{images}/img/{i}/{tag}-warm.jpg"})
                               for i in range(8)))

        async def add(i: int) -> None:
            await post_ok(http, f"{api}/add", json={"url": url(i), "metadata": {"i": i}})

        async def bulk(k: int) -> None:
            items = [{"url": url(i)} for i in range(n_add + k * BULK_ITEMS, min(count, n_add + (k + 1) * BULK_ITEMS))]
            out = await post_ok(http, f"{api}/add_bulk", json=items)
            if out["failed"] or len(out["added"]) != len(items):
                raise RuntimeError(f"add_bulk failed: {out['failed'][:3]}")

        before = await batch_totals(http, svc)
        cpu_service, cpu_harness = svc.cpu(), time.process_time()
        t_add = await run_clients(n_add, clients, add)
        chunks = -(-n_bulk // BULK_ITEMS)
        t_bulk = await run_clients(chunks, max(2, clients // 8), bulk)
        cpu_service, cpu_harness = svc.cpu() - cpu_service, time.process_time() - cpu_harness
        profile = where_time_goes(before, await batch_totals(http, svc), t_add + t_bulk)
    return {"images": count, "add_images_per_s": n_add / t_add, "add_bulk_images_per_s": n_bulk / t_bulk,
            "images_per_s": count / (t_add + t_bulk), "service_cpu_ms_per_image": 1000 * cpu_service / count,
            "harness_cpu_ms_per_image": 1000 * cpu_harness / count, "cpus": os.cpu_count()} | profile


# ---- restore, search, dump --------------------------------------------------------------------------------------

def restore_bodies(rows: int, dim: int) -> list[bytes]:
    """Request bodies of random unit vectors, encoded before timing."""
    rng = np.random.default_rng(1)
    bodies = []
    for start in range(0, rows, RESTORE_ROWS):
        n = min(RESTORE_ROWS, rows - start)
        vecs = rng.standard_normal((n, dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        batch = [{"url": f"http://bench.invalid/r/{start + i}", "metadata": {"i": start + i}, "embedding": v}
                 for i, v in enumerate(vecs)]
        bodies.append(orjson.dumps(batch, option=orjson.OPT_SERIALIZE_NUMPY))
    return bodies


async def restore(svc: deploy.Deployment, model: str, rows: int, dim: int) -> Figures:
    bodies = restore_bodies(rows, dim)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        seconds = await run_clients(len(bodies), 2, lambda k: post_ok(
            http, f"{svc.url}/models/{model}/restore", data=bodies[k], headers=headers))
    return {"rows": rows, "rows_per_s": rows / seconds, "mb_per_s": sum(map(len, bodies)) / 1e6 / seconds}


async def dump(svc: deploy.Deployment, model: str, encoding: str = "float") -> Figures:
    """Page through every row by cursor, embeddings as numbers or base64 (encoding_format)."""
    total, cursor = 0, None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        start = time.perf_counter()
        while True:
            body: dict[str, Any] = {"limit": DUMP_PAGE, "encoding_format": encoding} | ({"cursor": cursor} if cursor else {})
            page = await post_ok(http, f"{svc.url}/models/{model}/dump", json=body)
            if not page:
                break
            total += len(page)
            cursor = page[-1]["url"]
        seconds = time.perf_counter() - start
    return {"rows": total, "rows_per_s": total / seconds}


async def latencies(n: int, one: Callable[[int], Awaitable[None]]) -> Figures:
    """One request at a time (latency, not throughput); the first call is a warm-up."""
    await one(n)
    samples = []
    for i in range(n):
        t = time.perf_counter()
        await one(i)
        samples.append(time.perf_counter() - t)
    return quantiles_ms(samples)


async def search(svc: deploy.Deployment, spec: ModelSpec, images: str, pool: list[bytes], rows: int,
                 n: int) -> Figures:
    api = f"{svc.url}/models/{spec.name}/search"
    rng = np.random.default_rng(2)
    stored = [f"http://bench.invalid/r/{int(i)}" for i in rng.integers(0, max(1, rows), n + 1)]
    out: Figures = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        out["indexed_url"] = await latencies(n, lambda i: post_ok(http, api, json={"url": stored[i], "indexed": True}))
        out["image_url"] = await latencies(n, lambda i: post_ok(
            http, api, json={"url": f"{images}/img/{i}/search-{i}.jpg"}))

        async def upload(i: int) -> None:
            form = aiohttp.FormData()
            form.add_field("image", pool[i % len(pool)], filename="q.jpg", content_type="image/jpeg")
            await post_ok(http, api, data=form)

        out["upload"] = await latencies(n, upload)
        if spec.has_text:
            out["text"] = await latencies(n, lambda i: post_ok(http, api, json={"text": f"a photo of thing {i}"}))
    return out


# ---- the run ----------------------------------------------------------------------------------------------------

async def ingest_against_ceiling(args: argparse.Namespace, spec: ModelSpec, svc: deploy.Deployment, images: str,
                                 tag: str) -> Figures:
    """Ingest, with the bare-model ceiling measured just before and just after (service started, idle), and
    the ratio taken against their mean: on a shared machine the CPU left to us changes by the minute, so only
    figures taken side by side make a fair ratio, and a drift during the ingest hits both ends alike."""
    note(f"ingest: {tag} (ceilings before and after)")
    before = await asyncio.to_thread(measure_ceiling, spec, args.service, args.seconds)
    out = await ingest(svc, spec.name, images, tag, args.images, args.concurrency)
    after = await asyncio.to_thread(measure_ceiling, spec, args.service, args.seconds)
    ceiling = {k: (before[k] + after[k]) / 2 for k in before if isinstance(before[k], float)}
    # The cores do the model's work and everything else (decode, HTTP, JSON, Milvus, and this harness's image
    # server and clients). If ingest keeps them busy, its rate over the bare model's cannot exceed the model's CPU
    # per image over all the CPU spent per image.
    all_cpu = out["service_cpu_ms_per_image"] + out["harness_cpu_ms_per_image"]
    model, decode = ceiling["cpu_ms_per_image"], args.decode_cpu_ms
    return out | {"ceiling_images_per_s": ceiling["images_per_s"], "model_cpu_ms_per_image": model,
                  "ceiling_before_images_per_s": before["images_per_s"],
                  "ceiling_after_images_per_s": after["images_per_s"],
                  "engine": f"{before['engine']} {before['precision']}",
                  "onnxruntime_fp32_ceiling_images_per_s": ceiling["onnxruntime_fp32_images_per_s"],
                  "decode_cpu_ms_per_image": decode,
                  "rest_cpu_ms_per_image": out["service_cpu_ms_per_image"] - model - decode,
                  "cpu_bound_on_ratio": model / all_cpu}


async def embedded_phases(args: argparse.Namespace, spec: ModelSpec, models: Path, tmp: Path, images: str,
                          pool: list[bytes], fig: Figures) -> None:
    async with deploy.embedded(models, tmp, **args.settings) as svc:
        if "ingest" not in args.skip:
            fig["ingest"]["embedded"] = await ingest_against_ceiling(args, spec, svc, images, "embedded")
        if "restore" not in args.skip:
            note(f"restore: {args.rows:,} rows")
            fig["restore"] = await restore(svc, spec.name, args.rows, spec.dim)
        if "search" not in args.skip:
            note("search")
            fig["search"] = await search(svc, spec, images, pool, args.rows, args.searches)
        if "dump" not in args.skip:
            note("dump")
            fig["dump"] = await dump(svc, spec.name)
        fig["rss_mb"]["embedded"] = svc.rss()


async def amqp_phases(args: argparse.Namespace, spec: ModelSpec, models: Path, tmp: Path, images: str,
                      fig: Figures) -> None:
    with contextlib.ExitStack() as stack:
        uri = args.milvus_uri or stack.enter_context(MilvusStandalone(tmp / "milvus-server")).uri
        async with deploy.distributed(models, tmp, uri, workers=1, **args.settings) as svc:
            fig["ingest"]["amqp_1_worker"] = await ingest_against_ceiling(args, spec, svc, images, "amqp")
            fig["rss_mb"]["amqp"] = svc.rss()


async def run(args: argparse.Namespace) -> Figures:
    spec = pick_model(args)
    batch = args.service.max_batch
    fig: Figures = {"meta": meta(args, spec, batch), "ingest": {}, "rss_mb": {}}
    if "ceiling" not in args.skip:
        variants = engine_variants(spec, args.service, tuple(pick_model(args, name) for name in args.compare))
        note(f"ceilings, batch {batch}: {', '.join(variants)}")
        fig["engines"] = measure_ceilings(args.service, 2 * args.seconds, variants)
        fig["ceiling"] = fig["engines"]["service"]
    pool = deploy.jpeg_pool(min(max(args.images, args.searches + 1), 256))
    fig["decode_ms_per_image"], args.decode_cpu_ms = measure_decode(spec, pool)
    with tempfile.TemporaryDirectory(prefix="idios-bench-") as name:
        tmp = Path(name)
        models = only_model(spec, tmp)
        async with deploy.image_server(pool) as images:
            await embedded_phases(args, spec, models, tmp, images, pool, fig)
            if "amqp" not in args.skip and "ingest" not in args.skip:
                await amqp_phases(args, spec, models, tmp, images, fig)
        if "floors" not in args.skip:
            note(f"floors: bare Milvus Lite with {args.rows:,} rows" + (", bare text tower" if spec.has_text else ""))
            fig["floors"] = await asyncio.to_thread(measure_store, tmp / "floor.db", args.rows, spec.dim, args.searches,
                                                    args.service.vector_index)
            if spec.has_text:
                fig["floors"]["text_model"] = measure_text(spec, args.service, args.searches)
    add_ratios(fig)
    fig["meta"]["loadavg_after"] = os.getloadavg()
    return fig


def meta(args: argparse.Namespace, spec: ModelSpec, batch: int) -> Figures:
    return {"model": spec.name, "dim": spec.dim, "text_tower": spec.has_text, "max_batch": batch,
            "rows": args.rows, "images": args.images, "concurrency": args.concurrency,
            "cpus": os.cpu_count(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "loadavg_before": os.getloadavg(), "settings": args.settings}


def add_ratios(fig: Figures) -> None:
    for figures in fig["ingest"].values():
        figures["ratio_to_ceiling"] = figures["images_per_s"] / figures["ceiling_images_per_s"]
        figures["over_onnxruntime_fp32_ceiling"] = (figures["images_per_s"]
                                                    / figures["onnxruntime_fp32_ceiling_images_per_s"])
    engines = fig.get("engines", {})
    base = next((f for f in engines.values() if (f["model"], f["engine"], f["precision"]) == (
        fig["meta"]["model"], "onnxruntime", "fp32")), None)
    for f in engines.values():
        if base:
            f["over_onnxruntime_fp32"] = f["images_per_s"] / base["images_per_s"]
    floors = fig.get("floors")
    if "search" in fig and "ceiling" in fig:
        single = fig["ceiling"]["single_image_ms"]
        fig["search"]["image_url_p50_over_single_image"] = fig["search"]["image_url"]["p50_ms"] / single
        if floors:
            fig["search"]["image_url_p50_over_model_and_search"] = fig["search"]["image_url"]["p50_ms"] / (
                single + floors["search_top10"]["p50_ms"])
    if floors:
        if "restore" in fig:
            fig["restore"]["over_bare_insert"] = fig["restore"]["rows_per_s"] / floors["insert_parallel_rows_per_s"]
        if "dump" in fig:
            fig["dump"]["over_bare_read"] = fig["dump"]["rows_per_s"] / floors["read_by_key_rows_per_s"]
        if "search" in fig:
            bare = floors["pk_lookup"]["p50_ms"] + floors["search_top10"]["p50_ms"]
            indexed = fig["search"]["indexed_url"]["p50_ms"]
            fig["search"]["indexed_url_p50_over_bare_lookup_and_search"] = indexed / bare
            if "text" in fig["search"] and "text_model" in floors:  # a text search embeds, then searches
                fig["search"]["text_p50_over_bare_text_and_search"] = fig["search"]["text"]["p50_ms"] / (
                    floors["text_model"]["p50_ms"] + floors["search_top10"]["p50_ms"])


def table(fig: Figures) -> str:
    """The figures as aligned text lines."""
    lines = [f"model {fig['meta']['model']} · batch {fig['meta']['max_batch']} · {fig['meta']['date']} · "
             f"load {fig['meta']['loadavg_before'][0]:.2f} before / {fig['meta']['loadavg_after'][0]:.2f} after"
             + "".join(f" · {k}={v}" for k, v in fig["meta"]["settings"].items())]

    def row(name: str, value: float, unit: str, digits: int = 1) -> None:
        lines.append(f"  {name:<44} {value:>12,.{digits}f} {unit}".rstrip())

    def quantiles(name: str, f: Figures) -> None:
        lines.append(f"  {name + ' p50/p95/p99':<44} {f['p50_ms']:>7.1f} / {f['p95_ms']:.1f} / {f['p99_ms']:.1f} ms")

    for name, f in fig.get("engines", {}).items():
        label = (f"{f['model']} " if f["model"] != fig["meta"]["model"] else "") + f"{f['engine']} {f['precision']}"
        label += " (the service's)" if name == "service" else ""
        row(f"bare {label}, service batch", f["images_per_s"], "img/s")
        row(f"bare {label}, batch 1", f["single_image_ms"], "ms")
        row(f"bare {label}, CPU per image", f["cpu_ms_per_image"], "ms")
        if "over_onnxruntime_fp32" in f:
            row(f"bare {label} / bare onnxruntime fp32", f["over_onnxruntime_fp32"], "", 2)
    row("decode + preprocess, one thread", fig["decode_ms_per_image"], "ms/image")
    for where, f in fig["ingest"].items():
        row(f"ingest {where}: add", f["add_images_per_s"], "img/s")
        row(f"ingest {where}: add_bulk", f["add_bulk_images_per_s"], "img/s")
        row(f"ingest {where}: all", f["images_per_s"], "img/s")
        row(f"ingest {where}: ceiling, mean of before/after ({f['engine']})", f["ceiling_images_per_s"], "img/s")
        row(f"ingest {where}: ceiling before", f["ceiling_before_images_per_s"], "img/s")
        row(f"ingest {where}: ceiling after", f["ceiling_after_images_per_s"], "img/s")
        row(f"ingest {where}: onnxruntime fp32 ceiling beside it", f["onnxruntime_fp32_ceiling_images_per_s"], "img/s")
        if "ratio_to_ceiling" in f:
            row(f"ingest {where} / its engine's ceiling", f["ratio_to_ceiling"], "", 3)
            row(f"ingest {where} / onnxruntime fp32 ceiling", f["over_onnxruntime_fp32_ceiling"], "", 3)
        row(f"ingest {where}: CPU per image, bare model", f["model_cpu_ms_per_image"], "ms")
        row(f"ingest {where}: CPU per image, decode (one thread)", f["decode_cpu_ms_per_image"], "ms")
        row(f"ingest {where}: CPU per image, rest of the service", f["rest_cpu_ms_per_image"], "ms")
        row(f"ingest {where}: CPU per image, service", f["service_cpu_ms_per_image"], "ms")
        row(f"ingest {where}: CPU per image, harness", f["harness_cpu_ms_per_image"], "ms")
        row(f"ingest {where}: CPU bound on the ratio", f["cpu_bound_on_ratio"], "", 3)
        if "model_busy_fraction" in f:
            row(f"ingest {where}: model busy fraction", f["model_busy_fraction"], "", 3)
            row(f"ingest {where}: Milvus write fraction", f["milvus_write_fraction"], "", 3)
            row(f"ingest {where}: mean model batch", f["mean_embed_batch"], "images")
    for kind, f in fig.get("search", {}).items():
        if isinstance(f, dict):  # the ratio is printed below
            quantiles(f"search {kind}", f)
    search = fig.get("search", {})
    if "image_url_p50_over_single_image" in search:
        row("search image_url p50 / model batch-1 latency", search["image_url_p50_over_single_image"], "", 2)
    if "image_url_p50_over_model_and_search" in search:
        row("search image_url p50 / (batch-1 + bare search)", search["image_url_p50_over_model_and_search"], "", 2)
    if "indexed_url_p50_over_bare_lookup_and_search" in search:
        row("search indexed_url p50 / bare lookup + search", search["indexed_url_p50_over_bare_lookup_and_search"],
            "", 2)
    if "text_p50_over_bare_text_and_search" in search:
        row("search text p50 / bare text tower + search", search["text_p50_over_bare_text_and_search"], "", 2)
    for phase in ("restore", "dump"):
        if phase in fig:
            row(f"{phase} ({fig[phase]['rows']:,} rows)", fig[phase]["rows_per_s"], "rows/s")
    floors = fig.get("floors")
    if floors:
        row(f"bare Milvus Lite insert ({floors['rows']:,} rows), one call at a time", floors["insert_rows_per_s"],
            "rows/s")
        row(f"bare Milvus Lite insert, {floors['parallel_writes']} calls at a time",
            floors["insert_parallel_rows_per_s"], "rows/s")
        row("bare Milvus Lite upsert of stored rows", floors["upsert_rows_per_s"], "rows/s")
        row("bare Milvus Lite read by key (500 a query)", floors["read_by_key_rows_per_s"], "rows/s")
        for name in ("pk_lookup", "search_top10"):
            quantiles(f"bare Milvus Lite {name}", floors[name])
        if "text_model" in floors:
            quantiles("bare text tower, one text,", floors["text_model"])
        for phase, key in (("restore", "over_bare_insert"), ("dump", "over_bare_read")):
            if key in fig.get(phase, {}):
                row(f"{phase} / bare Milvus Lite", fig[phase][key], "", 2)
    for where, procs in fig["rss_mb"].items():
        for role, mb in procs.items():
            row(f"peak RSS {where} {role}", mb, "MB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fig = asyncio.run(run(args))
    print(table(fig))
    if args.json:
        args.json.write_bytes(orjson.dumps(fig, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    return 0


if __name__ == "__main__":
    sys.exit(main())
