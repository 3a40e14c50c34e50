"""Real image bytes for tests: deterministic pictures encoded by Pillow, and an aiohttp server that serves them."""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from tests.servers import serving
from PIL import Image, ImageDraw, ImageFilter

BLOBS = web.AppKey("blobs", dict)


def picture(key: str, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """A distinct picture for each key: a gradient with coloured shapes, blurred a little like a photo.
    The same key at another size is the same picture resized."""
    rnd = random.Random(hashlib.sha256(key.encode()).digest())
    want, size = size, (640, 480)
    w, h = size
    im = Image.linear_gradient("L").resize(size).convert("RGB")
    tint = Image.new("RGB", size, tuple(rnd.randrange(256) for _ in range(3)))
    im = Image.blend(im, tint, 0.6)
    draw = ImageDraw.Draw(im)
    for _ in range(10):
        x0, x1 = sorted(rnd.randrange(w) for _ in range(2))
        y0, y1 = sorted(rnd.randrange(h) for _ in range(2))
        fill = tuple(rnd.randrange(256) for _ in range(3))
        (draw.ellipse if rnd.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    im = im.filter(ImageFilter.GaussianBlur(1.5))
    return im if want == size else im.resize(want, Image.Resampling.BICUBIC)


def encode(im: Image.Image, fmt: str = "JPEG", **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg(key: str, size: tuple[int, int] = (640, 480), quality: int = 90) -> bytes:
    return encode(picture(key, size), "JPEG", quality=quality)


def plain(colour: tuple[int, int, int], size: tuple[int, int] = (300, 300)) -> bytes:
    return encode(Image.new("RGB", size, colour), "PNG")


def _size(request: web.Request) -> tuple[int, int]:
    raw = request.query.get("size", "640x480")
    w, h = raw.split("x")
    return int(w), int(h)


async def _image(request: web.Request) -> web.Response:
    key = request.match_info["key"]
    im = picture(key, _size(request))
    if key.endswith(".png"):
        return web.Response(body=encode(im, "PNG"), content_type="image/png")
    return web.Response(body=encode(im, "JPEG", quality=90), content_type="image/jpeg")


async def _colour(request: web.Request) -> web.Response:
    r, g, b = (int(x) for x in request.match_info["rgb"].split(","))
    return web.Response(body=plain((r, g, b), _size(request)), content_type="image/png")


async def _redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound(f"/img/{request.match_info['key']}")


async def _text(request: web.Request) -> web.Response:
    return web.Response(text="<html>not an image</html>", content_type="image/jpeg")


async def _blob(request: web.Request) -> web.Response:
    return web.Response(body=request.app[BLOBS][request.match_info["name"]], content_type="image/jpeg")


@asynccontextmanager
async def image_server(blobs: dict[str, bytes] | None = None, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """Serve pictures on 127.0.0.1 and yield the base URL.

    /img/{key}            a distinct picture per key (PNG if the key ends in .png), ?size=WxH
    /colour/{r,g,b}       a plain colour, ?size=WxH
    /redirect/{key}       302 to /img/{key}
    /not-an-image         HTML served as image/jpeg
    /blob/{name}          fixed bytes given by the test
    /slow/{key}           /img/{key} after ?delay= seconds
    anything else         404
    """
    app = web.Application()
    app[BLOBS] = blobs or {}
    app.router.add_get("/img/{key:.+}", _image)
    app.router.add_get("/colour/{rgb}", _colour)
    app.router.add_get("/redirect/{key:.+}", _redirect)
    app.router.add_get("/not-an-image", _text)
    app.router.add_get("/blob/{name}", _blob)
    app.router.add_get("/slow/{key:.+}", _slow)
    hostile_routes(app)
    async with serving(app, host) as url:
        yield url


async def _slow(request: web.Request) -> web.Response:
    """A picture answered after ?delay= seconds: keeps jobs in flight while a test breaks something."""
    import asyncio

    await asyncio.sleep(float(request.query.get("delay", "1")))
    return await _image(request)


async def _drip(request: web.Request) -> web.StreamResponse:
    """A server that sends one byte a second, forever if let."""
    import asyncio

    resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
    await resp.prepare(request)
    for _ in range(3600):
        await resp.write(b"\xff")
        await asyncio.sleep(1)
    return resp


async def _hang(request: web.Request) -> web.Response:
    """A server that accepts the request and never answers."""
    import asyncio

    await asyncio.sleep(3600)
    return web.Response()


async def _loop(request: web.Request) -> web.Response:
    raise web.HTTPFound("/loop")


async def _chain(request: web.Request) -> web.Response:
    n = int(request.match_info["n"])
    if n <= 0:
        return await _image(request)
    raise web.HTTPFound(f"/chain/{n - 1}/{request.match_info['key']}")


async def _huge(request: web.Request) -> web.StreamResponse:
    """A body without Content-Length that goes on and on (6.5 GB if read to the end)."""
    resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
    await resp.prepare(request)
    chunk = b"\xff" * 65536
    for _ in range(100_000):
        await resp.write(chunk)
    return resp


def hostile_routes(app: web.Application) -> None:
    """Servers that misbehave on purpose."""
    app.router.add_get("/drip", _drip)
    app.router.add_get("/hang", _hang)
    app.router.add_get("/loop", _loop)
    app.router.add_get("/chain/{n}/{key:.+}", _chain)
    app.router.add_get("/huge", _huge)
