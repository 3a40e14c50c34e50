"""Real IIIF Image API servers for the tests and benchmarks, serving real photographs (scikit-image's):

- the reference implementation's `iiif_testserver.py` (pip `iiif`, Image API 2.1 and 3.0 at level 1-2, Pillow
  manipulator) in a process of its own, always stopped; what it was asked for is read back from its access log;
- a level-0 static site made by the same package's `iiif_static.py` (only the tiles and the `sizes` it lists,
  as a museum serves from a bucket), served by aiohttp, which records the paths asked for.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web
from PIL import Image

# name → (size, format): a 12-megapixel master as archives keep them, and smaller ones
PHOTOS = {"coffee": ((4000, 3000), "jpg"), "astronaut": ((2048, 2048), "jpg"), "chelsea": ((1353, 900), "png"),
          "rocket": ((1200, 1800), "jpg")}
ACCESS = re.compile(r'"(?:\x1b\[[\d;]*m)?GET (\S+) HTTP/[\d.]+(?:\x1b\[0m)?" (\d{3})')  # werkzeug colours 3xx
START_S = 30.0


def photo(name: str, size: tuple[int, int]) -> Image.Image:
    """scikit-image's photograph `name`, resized to `size` (bicubic, as a scan's derivative would be)."""
    from skimage import data  # imported when needed: ~1 s

    return Image.fromarray(getattr(data, name)()).convert("RGB").resize(size, Image.Resampling.BICUBIC)


def write_photos(folder: Path) -> dict[str, Path]:
    """The PHOTOS as files (the server's image folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (size, fmt) in PHOTOS.items():
        path = folder / f"{name}.{fmt}"
        if not path.exists():
            photo(name, size).save(path, quality=92) if fmt == "jpg" else photo(name, size).save(path)
        out[name] = path
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ReferenceServer:
    """The running reference server: `service(name, "3.0")` is an image's service base url."""

    url: str
    log: Path
    folder: Path

    def service(self, name: str, version: str = "3.0") -> str:
        return f"{self.url}/{version}_pil/{name}"

    def requests(self) -> list[tuple[str, int]]:
        """(path, status) of every request it answered, in order."""
        return [(m[1], int(m[2])) for m in ACCESS.finditer(self.log.read_text(errors="replace"))]


def _script(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@asynccontextmanager
async def reference_server(folder: Path) -> AsyncIterator[ReferenceServer]:
    """Start iiif_testserver.py over the photos in `folder`/images; always stopped on the way out."""
    images = folder / "images"
    write_photos(images)
    port = free_port()
    log = folder / "iiif_testserver.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [_script("iiif_testserver.py"), "--host", "127.0.0.1", "--port", str(port), "--image-dir", str(images),
             "--api-versions", "2.1,3.0", "--manipulators", "pil"],
            stdout=out, stderr=subprocess.STDOUT, cwd=folder)
    try:
        url = f"http://127.0.0.1:{port}"
        await _wait_up(url, proc, log)
        yield ReferenceServer(url, log, images)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _wait_up(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_S
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"iiif_testserver.py exited {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                async with http.get(url + "/") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"iiif_testserver.py did not answer within {START_S:g} s: {log.read_text()[-2000:]}")


@dataclass
class StaticSite:
    """A level-0 IIIF site: `service(name)` is a base url whose info.json lists sizes; `asked` the paths requested."""

    url: str
    asked: list[str] = field(default_factory=list)

    def service(self, name: str) -> str:
        return f"{self.url}/static/{name}"


def build_static(folder: Path, url: str, tiles: dict[str, int]) -> Path:
    """Level-0 files for the photos named in `tiles` (iiif_static.py, Image API 2.1): info.json, tiles of the
    size given, and the `sizes` those make (the whole image at each scale that fits a tile)."""
    photos = write_photos(folder / "images")
    out = folder / "site"
    for name, tile in tiles.items():
        subprocess.run([_script("iiif_static.py"), "-d", str(out / "static"), "-p", f"{url}/static", "-t", str(tile),
                        str(photos[name])], check=True, capture_output=True, timeout=120)
    return out


@asynccontextmanager
async def static_site(folder: Path, tiles: dict[str, int]) -> AsyncIterator[StaticSite]:
    """Serve a level-0 site (build_static) on loopback; iiif_static.py writes files without extensions, so they
    are served as the image or JSON they are."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    root = build_static(folder, url, tiles)
    site = StaticSite(url)

    async def handle(request: web.Request) -> web.StreamResponse:
        site.asked.append(request.path)
        path = (root / request.path.lstrip("/")).resolve()
        if not path.is_relative_to(root.resolve()) or not path.is_file():
            return web.Response(status=404, text="not found")
        kind = "application/json" if path.name == "info.json" else "image/jpeg"
        return web.Response(body=path.read_bytes(), content_type=kind)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield site
    finally:
        await runner.cleanup()

