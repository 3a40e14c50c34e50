#!/usr/bin/env python3
"""What the richer searches cost (issue #17's targets), on an embedded service (`python -m idios serve`):

- a weighted query of three parts against a single query of the same kind, for image urls (each part fetched
  and embedded) and for stored urls (`indexed`); target: three parts cost at most 1.3x one;
- `search_batch` of 50 `indexed` bodies against the same 50 sent one after another; target: at least 5x the
  throughput.

Rounds alternate the two sides (A, B, B, A, ...) so a shared machine's drift hits both alike; medians reported.

    python scripts/bench_search.py                         # models/thumb_grid, 20,000 stored rows
    python scripts/bench_search.py --model /path/to/vit_b32 --rows 100000
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_deploy as deploy  # noqa: E402

from idios.models import load_manifest  # noqa: E402


def picture(seed: int, size: tuple[int, int] = (640, 480)) -> bytes:
    """A smooth random picture (blurred noise, so JPEG sizes are photo-like), as JPEG."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    im = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=90)
    return out.getvalue()


async def timed(http: aiohttp.ClientSession, url: str, body: Any) -> float:
    t0 = time.perf_counter()
    async with http.post(url, json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: {resp.status} {await resp.text()}")
        await resp.read()
    return time.perf_counter() - t0


async def run(args: argparse.Namespace) -> dict[str, float]:
    spec = load_manifest(Path(args.model))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        models = tmp / "models"
        models.mkdir()
        (models / spec.name).symlink_to(Path(args.model).resolve())

        pictures = [picture(k) for k in range(64)]  # made beforehand: this loop serves them while timing

        async def image(request: web.Request) -> web.Response:
            return web.Response(body=pictures[int(request.match_info["seed"]) % len(pictures)],
                                content_type="image/jpeg")

        app = web.Application()
        app.router.add_get("/img/{seed:[0-9]+}.jpg", image)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        files = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with deploy.embedded(models, tmp) as svc, aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=300)) as http:
                return await measure(args, spec.name, spec.dim, svc.url, files, http)
        finally:
            await runner.cleanup()


async def measure(args: argparse.Namespace, model: str, dim: int, server: str, files: str,
                  http: aiohttp.ClientSession) -> dict[str, float]:
    base = f"{server}/models/{model}"
    rng = np.random.default_rng(7)
    stored = [f"http://bench.test/{i}.jpg" for i in range(args.rows)]
    for start in range(0, args.rows, 5000):
        vectors = rng.standard_normal((min(5000, args.rows - start), dim)).astype("<f4")
        rows = [{"url": u, "embedding": v.tolist()} for u, v in zip(stored[start:start + 5000], vectors)]
        async with http.post(f"{base}/restore", json=rows) as resp:
            if resp.status != 204:
                raise RuntimeError(f"restore: {resp.status} {await resp.text()}")
    seed = iter(range(1_000_000))

    def fresh() -> str:  # an image url never asked for before: every part is fetched and embedded
        return f"{files}/img/{next(seed)}.jpg?u={uuid.uuid4().hex[:6]}"

    def some(n: int) -> list[str]:
        return [str(u) for u in rng.choice(stored, n, replace=False)]

    await timed(http, f"{base}/search", {"url": fresh()})  # warm: the first request compiles and connects
    times: dict[str, list[float]] = {k: [] for k in ("url1", "url3", "idx1", "idx3", "single50", "batch50")}
    for r in range(args.rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for side in order:
            if side == 0:
                times["url1"].append(await timed(http, f"{base}/search", {"url": fresh()}))
                times["idx1"].append(await timed(http, f"{base}/search", {"url": some(1)[0], "indexed": True}))
                t0 = time.perf_counter()
                for u in some(50):
                    await timed(http, f"{base}/search", {"url": u, "indexed": True})
                times["single50"].append(time.perf_counter() - t0)
            else:
                parts = [{"url": fresh(), "weight": w} for w in (1.0, 0.5, -0.5)]
                times["url3"].append(await timed(http, f"{base}/search", {"queries": parts}))
                parts = [{"url": u, "indexed": True, "weight": w} for u, w in zip(some(3), (1.0, 0.5, -0.5))]
                times["idx3"].append(await timed(http, f"{base}/search", {"queries": parts}))
                times["batch50"].append(await timed(http, f"{base}/search_batch",
                                                    [{"url": u, "indexed": True} for u in some(50)]))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "url_single_ms": 1000 * med["url1"], "url_three_parts_ms": 1000 * med["url3"],
        "url_three_parts_ratio": med["url3"] / med["url1"],
        "indexed_single_ms": 1000 * med["idx1"], "indexed_three_parts_ms": 1000 * med["idx3"],
        "indexed_three_parts_ratio": med["idx3"] / med["idx1"],
        "single_50_per_s": 50 / med["single50"], "batch_50_per_s": 50 / med["batch50"],
        "batch_speedup": med["single50"] / med["batch50"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "thumb_grid"), help="a model folder")
    ap.add_argument("--rows", type=int, default=20_000, help="stored rows (random unit vectors, restored)")
    ap.add_argument("--rounds", type=int, default=10, help="rounds of each side (alternating)")
    args = ap.parse_args(argv)
    fig = asyncio.run(run(args))
    print(f"\n## Richer search on {Path(args.model).name}, embedded, {args.rows} rows, {args.rounds} rounds (medians)\n")
    print("| query | one part, ms | three weighted parts, ms | ratio (target <= 1.3) |")
    print("|---|---|---|---|")
    print(f"| image urls (fetched, embedded) | {fig['url_single_ms']:.1f} | {fig['url_three_parts_ms']:.1f} | "
          f"{fig['url_three_parts_ratio']:.2f} |")
    print(f"| stored urls (indexed) | {fig['indexed_single_ms']:.1f} | {fig['indexed_three_parts_ms']:.1f} | "
          f"{fig['indexed_three_parts_ratio']:.2f} |")
    print(f"\n50 indexed searches: one by one {fig['single_50_per_s']:.0f}/s, search_batch {fig['batch_50_per_s']:.0f}/s: "
          f"{fig['batch_speedup']:.1f}x (target >= 5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
