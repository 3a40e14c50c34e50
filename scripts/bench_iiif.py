#!/usr/bin/env python3
"""Ingest rate of a IIIF manifest of 4000x3000 masters, as a user runs it: `bulk_ingest.py MANIFEST_URL` into an
embedded service (`python -m idios serve`), through the Image API (the worker asks for a derivative sized for the
model), against the same kind of masters given as plain file urls. Passes alternate (IIIF, plain, plain, IIIF),
each on masters of its own, so a shared machine's drift hits both alike.

The reference IIIF server (scripts/iiif_reference.py) runs on this machine and decodes the whole master for every
request it answers, so its CPU is in the wall time here; the service's own CPU per image is reported apart (what
the Idios box pays). A production IIIF server reading pyramidal TIFF or JPEG 2000 does far less per derivative.

    python scripts/bench_iiif.py                       # 48 masters, models/thumb_grid
    python scripts/bench_iiif.py --images 96 --model /path/to/vit_b32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web
from PIL import ImageOps

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_deploy as deploy  # noqa: E402
from iiif_reference import PHOTOS, photo, reference_server  # noqa: E402

from idios.models import load_manifest  # noqa: E402

MASTER = (4000, 3000)
ORDER = ("iiif", "plain", "plain", "iiif")


def write_masters(folder: Path, count: int) -> list[str]:
    """`count` distinct 4000x3000 JPEG masters (the photos, shifted crops, mirrored every other), as m000.jpg..."""
    folder.mkdir(parents=True, exist_ok=True)
    names, sources = [], [photo(name, (4400, 3300)) for name in PHOTOS]
    for i in range(count):
        im = sources[i % len(sources)]
        dx, dy = (i // len(sources)) * 37 % 400, (i // len(sources)) * 23 % 300
        master = im.crop((dx, dy, dx + MASTER[0], dy + MASTER[1]))
        if i // len(sources) % 2:
            master = ImageOps.mirror(master)
        name = f"m{i:03d}"
        master.save(folder / f"{name}.jpg", quality=92)
        names.append(name)
    return names


def manifest(url: str, services: list[str]) -> dict[str, Any]:
    """A Presentation 3 manifest painting each service's image on a canvas of its own."""
    def canvas(i: int, service: str) -> dict[str, Any]:
        cid = f"{url}/canvas/{i}"
        body = {"id": f"{service}/full/max/0/default.jpg", "type": "Image", "format": "image/jpeg",
                "width": MASTER[0], "height": MASTER[1],
                "service": [{"id": service, "type": "ImageService3", "profile": "level1"}]}
        return {"id": cid, "type": "Canvas", "width": MASTER[0], "height": MASTER[1], "label": {"none": [f"p. {i}"]},
                "items": [{"id": f"{cid}/page", "type": "AnnotationPage", "items": [
                    {"id": f"{cid}/page/a", "type": "Annotation", "motivation": "painting", "body": body,
                     "target": cid}]}]}
    return {"@context": "http://iiif.io/api/presentation/3/context.json", "id": url, "type": "Manifest",
            "label": {"en": ["bench"]}, "items": [canvas(i, s) for i, s in enumerate(services)]}


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def ingest(source: str, model: str, server: str, tmp: Path, tag: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bulk_ingest.py"), source, "--model", model, "--server", server,
         "--no-state", "--failed", str(tmp / f"{tag}.failed.jsonl"), "--no-progress", "--batch", "16"],
        capture_output=True, text=True, timeout=3600, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"bulk_ingest exited {out.returncode}: {out.stderr[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


async def run(args: argparse.Namespace) -> None:
    spec = load_manifest(args.model)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        images = tmp / "iiif" / "images"
        print(f"writing {args.images} masters of {MASTER[0]}x{MASTER[1]}...", file=sys.stderr)
        names = write_masters(images, args.images)
        docs: dict[str, bytes] = {}

        async def handle(request: web.Request) -> web.StreamResponse:
            path = request.match_info["path"]
            if path in docs:
                return web.Response(body=docs[path], content_type="application/ld+json")
            file = images / path
            return web.FileResponse(file) if file.is_file() and file.parent == images else web.Response(status=404)

        app = web.Application()
        app.router.add_get("/{path:.+}", handle)
        models = tmp / "models"
        models.mkdir()
        (models / spec.name).symlink_to(Path(args.model).resolve())
        async with reference_server(tmp / "iiif") as server, serving(app) as files, \
                deploy.embedded(models, tmp) as svc:
            quarter = len(names) // len(ORDER)
            rows = []
            for k, mode in enumerate(ORDER):
                part = names[k * quarter:(k + 1) * quarter]
                if mode == "iiif":
                    docs[f"manifest-{k}.json"] = json.dumps(
                        manifest(f"{files}/manifest-{k}.json", [server.service(n, "3.0") for n in part])).encode()
                    source = f"{files}/manifest-{k}.json"
                else:
                    source = str(tmp / f"urls-{k}.txt")
                    Path(source).write_text("".join(f"{files}/{n}.jpg\n" for n in part))
                cpu, t0 = svc.cpu(), time.perf_counter()
                # in a thread: this loop serves the manifests and the master files meanwhile
                totals = await asyncio.to_thread(ingest, source, spec.name, svc.url, tmp, f"pass{k}")
                wall, used = time.perf_counter() - t0, svc.cpu() - cpu
                if totals["added"] != len(part):
                    raise RuntimeError(f"pass {k} ({mode}) added {totals['added']} of {len(part)}: {totals}")
                rows.append((mode, len(part), wall, used))
                print(f"pass {k} {mode}: {len(part)} images in {wall:.1f} s", file=sys.stderr)
    print(f"\n## Ingest of 4000x3000 masters into {spec.name} (embedded service, bulk_ingest.py, passes "
          f"{', '.join(ORDER)})\n")
    print("| input | images | img/s (wall) | service CPU per image, ms |")
    print("|---|---|---|---|")
    for mode in ("iiif", "plain"):
        mine = [r for r in rows if r[0] == mode]
        n, wall, cpu = sum(r[1] for r in mine), sum(r[2] for r in mine), sum(r[3] for r in mine)
        label = "IIIF manifest (sized derivatives)" if mode == "iiif" else "plain master urls"
        print(f"| {label} | {n} | {n / wall:.1f} | {1000 * cpu / n:.0f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=48, help="masters in all, a quarter per pass (default: 48)")
    p.add_argument("--model", type=Path, default=ROOT / "models" / "thumb_grid", help="a model folder")
    args = p.parse_args(argv)
    if args.images < len(ORDER):
        p.error(f"--images must be at least {len(ORDER)}")
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
