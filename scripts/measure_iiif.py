#!/usr/bin/env python3
"""How small a IIIF derivative can be and still embed like the full image: the measurement behind
idios.iiif.DerivativePolicy's defaults (IDIOS_IIIF_SCALE, IDIOS_IIIF_FORMAT), and the bytes and time they save.

A real IIIF server (the reference implementation, scripts/iiif_reference.py) serves real photographs, among them
a 4000x3000 master. For each photo, each model and each factor F, the derivative whose short side is F x the
model's input side (what idios.iiif.size_choices asks for), as JPEG and as PNG, is fetched and embedded through
the service's own decoder and preprocessing, and compared (cosine) with the embeddings of the master file and of
the server's full image (`full/max`). Interleaved rounds then time, per image, fetch + decode of the master as a
plain file, of the server's full image and of the derivatives (the default policy's and a JPEG one).

    python scripts/measure_iiif.py                                   # models/thumb_grid
    python scripts/measure_iiif.py --model models/thumb_grid --model /path/to/effnet_lite0 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from iiif_reference import PHOTOS, reference_server  # noqa: E402

from idios import iiif  # noqa: E402
from idios.decode import DecodeLimits, load_rgb, preprocess  # noqa: E402
from idios.models import ModelSpec, load_manifest  # noqa: E402

FACTORS = (1.0, 1.5, 2.0, 3.0, 4.0)
LIMITS = DecodeLimits()


class Embedder:
    """One model's image tower in onnxruntime, fed by the service's own preprocessing."""

    def __init__(self, folder: Path) -> None:
        import onnxruntime as ort

        self.spec: ModelSpec = load_manifest(folder)
        self.session = ort.InferenceSession(str(self.spec.visual), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, data: bytes) -> np.ndarray:
        x = preprocess(data, self.spec, LIMITS)[None]
        v = np.asarray(self.session.run(None, {self.input: x})[0][0], dtype=np.float64)
        return v / np.linalg.norm(v)


async def get(http: aiohttp.ClientSession, url: str) -> bytes:
    async with http.get(url) as resp:
        resp.raise_for_status()
        return await resp.read()


async def service_of(http: aiohttp.ClientSession, base: str) -> iiif.ImageService:
    return iiif.parse_info(await get(http, f"{base}/info.json"))


def derivative(service: iiif.ImageService, base: str, short_side: int, fmt: str = "jpg") -> str:
    size = iiif.size_choices(service, iiif.ImageRef(base), short_side)[0]
    return iiif.ImageRef(base, format=fmt).request(size)


async def fidelity(http: aiohttp.ClientSession, server_url: str, folder: Path, models: list[Embedder],
                   factors: tuple[float, ...]) -> None:
    """Min cosine over photos and API versions of a derivative to (a) the master file, (b) the server's full
    image (`full/max`, which the server re-encodes too: what "the full image" is to a IIIF client)."""
    print("\n## Cosine of a derivative's embedding to the master file's / to the server's full image's "
          "(min over the photos and Image API 2.1 and 3.0)\n")
    print("| model | format | full/max vs master | " + " | ".join(f"F={f:g}" for f in factors) + " |")
    print("|---|---|---|" + "---|" * len(factors))
    for model in models:
        for fmt in ("jpg", "png"):
            full_vs_master = 1.0
            worst = {f: (1.0, 1.0) for f in factors}
            master_bytes: dict[float, int] = {}
            for name, (_, ext) in PHOTOS.items():
                master = model((folder / f"{name}.{ext}").read_bytes())
                for version in ("2.1", "3.0"):
                    base = f"{server_url}/{version}_pil/{name}"
                    service = await service_of(http, base)
                    full = model(await get(http, iiif.ImageRef(base, format=fmt).request(
                        "max" if version == "3.0" else "full")))
                    full_vs_master = min(full_vs_master, float(master @ full))
                    for f in factors:
                        data = await get(http, derivative(service, base, round(f * model.spec.image_size), fmt))
                        if name == "coffee":
                            master_bytes[f] = len(data)
                        v = model(data)
                        worst[f] = (min(worst[f][0], float(master @ v)), min(worst[f][1], float(full @ v)))
            cells = " | ".join(f"{a:.4f} / {b:.4f}" for a, b in (worst[f] for f in factors))
            print(f"| {model.spec.name} | {fmt} | {full_vs_master:.4f} | {cells} |", flush=True)
            sizes = " | ".join(f"{master_bytes[f] / 1000:,.0f} KB" for f in factors)
            print(f"| (bytes of the 4000x3000 master's derivative) | {fmt} | | {sizes} |", flush=True)


async def costs(http: aiohttp.ClientSession, server_url: str, folder: Path, input_side: int, rounds: int) -> None:
    """Bytes and fetch+decode seconds per image for the 4000x3000 master, three ways, interleaved."""
    app = web.Application()
    app.router.add_static("/", folder)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        plain = f"http://127.0.0.1:{runner.addresses[0][1]}/coffee.jpg"
        base = f"{server_url}/3.0_pil/coffee"
        service = await service_of(http, base)
        policy = iiif.DerivativePolicy()
        ways = {"master file (plain url)": plain, "IIIF full/max (jpg)": iiif.ImageRef(base).request("max"),
                f"IIIF sized, default: {policy.format} at {policy.scale:g}x":
                    derivative(service, base, policy.short_side(input_side), policy.format),
                "IIIF sized, png at 4x": derivative(service, base, 4 * input_side, "png"),
                "IIIF sized, jpg at 2x": derivative(service, base, 2 * input_side, "jpg")}
        times: dict[str, list[float]] = {k: [] for k in ways}
        decodes: dict[str, list[float]] = {k: [] for k in ways}
        sizes: dict[str, int] = {}
        for _ in range(rounds):
            for way, url in ways.items():
                t0 = time.perf_counter()
                data = await get(http, url)
                t1 = time.perf_counter()
                load_rgb(data, input_side, LIMITS)
                t2 = time.perf_counter()
                times[way].append(t2 - t0)
                decodes[way].append(t2 - t1)
                sizes[way] = len(data)
    finally:
        await runner.cleanup()
    print(f"\n## The 4000x3000 master, per image (median of {rounds} interleaved rounds; the IIIF server runs on "
          "this machine, so its resize is in the time)\n")
    print("| fetched as | bytes | fetch + decode, ms | of which decode (the worker's CPU), ms |")
    print("|---|---|---|---|")
    for way in ways:
        print(f"| {way} | {sizes[way]:,} | {1000 * statistics.median(times[way]):.0f} | "
              f"{1000 * statistics.median(decodes[way]):.1f} |")


async def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, action="append", help="a model folder (repeatable; default models/thumb_grid)")
    p.add_argument("--factors", default=",".join(f"{f:g}" for f in FACTORS))
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    models = [Embedder(m) for m in (args.model or [ROOT / "models" / "thumb_grid"])]
    factors = tuple(float(f) for f in args.factors.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        async with reference_server(Path(tmp)) as server, aiohttp.ClientSession() as http:
            await fidelity(http, server.url, server.folder, models, factors)
            await costs(http, server.url, server.folder, models[0].spec.image_size, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
