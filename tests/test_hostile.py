"""Hostile input, served for real, against the embedded service and through RabbitMQ: every case is a clear
4xx with a type, and the service keeps answering."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from PIL import Image

from idios.netguard import HostAllowlist
from idios.settings import Settings
from tests.conftest import Service, make_settings, running_service
from tests.imagekit import encode, image_server, picture
from tests.servers import serving
from tests.test_decode import png_header

pytestmark = pytest.mark.timeout(240)

LIMITS = {"fetch_timeout": 3.0, "max_image_bytes": 3_000_000, "max_redirects": 3,
          "max_request_bytes": 2_000_000, "max_bulk_items": 40}


def blobs() -> dict[str, bytes]:
    gif = io.BytesIO()
    frames = [picture("g1").convert("P"), picture("g2").convert("P")]
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    deep = Image.fromarray((np.asarray(picture("d").convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    return {
        "empty": b"",
        "truncated": encode(picture("tr"), "JPEG")[:3000],
        "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="900" height="900"><rect/></svg>',
        "bomb": png_header(50_000, 50_000),
        "tiny": encode(picture("tiny", (120, 90)), "PNG"),
        "animated": gif.getvalue(),
        "cmyk": encode(picture("c").convert("CMYK"), "JPEG"),
        "deep": encode(deep, "PNG"),
        "palette": encode(picture("p").convert("P"), "PNG"),
        "alpha": encode(picture("a").convert("RGBA"), "PNG"),
    }


BAD = {
    "/blob/empty": "not_an_image",
    "/blob/truncated": "not_an_image",
    "/blob/svg": "not_an_image",
    "/blob/bomb": "image_too_large",
    "/blob/tiny": "image_too_small",
    "/not-an-image": "not_an_image",
    "/missing": "image_http_error",
    "/drip": "image_timeout",
    "/hang": "image_timeout",
    "/loop": "image_too_many_redirects",
    "/chain/4/x.jpg": "image_too_many_redirects",
    "/huge": "image_too_large",
}
GOOD = ["/blob/animated", "/blob/cmyk", "/blob/deep", "/blob/palette", "/blob/alpha", "/chain/3/ok.jpg"]


@pytest.fixture(scope="module")
async def hostile() -> AsyncIterator[str]:
    async with image_server(blobs()) as base:
        yield base


@pytest.fixture(scope="module", params=["embedded", "amqp"])
async def strict(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                 models_dir: Path) -> AsyncIterator[Service]:
    tmp = tmp_path_factory.mktemp(f"strict-{request.param}")
    if request.param == "embedded":
        async with running_service(make_settings(tmp, models_dir, **LIMITS)) as svc:
            yield svc
    else:
        from tests.distributed import distributed

        async with distributed(tmp, models_dir, request.getfixturevalue("milvus"), workers=1, **LIMITS) as (svc, _, _):
            yield svc


async def post(svc: Service, route: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
    async with svc.http.post(svc.model("thumb_grid") + route, json=body, **kw) as resp:
        return resp.status, (await resp.json() if resp.content_type == "application/json" else await resp.text())


async def still_healthy(svc: Service, hostile: str, tag: str) -> None:
    async with svc.http.get(svc.url + "/ping?rpc=1") as resp:
        assert resp.status == 200
    url = f"{hostile}/img/healthy-{tag}.jpg"
    assert (await post(svc, "/add", {"url": url}))[0] == 204
    status, hits = await post(svc, "/search", {"url": url, "limit": 1})
    assert status == 200 and hits[0]["url"] == url


async def test_each_bad_image_is_a_typed_422_in_bounded_time(strict: Service, hostile: str) -> None:
    async def one(path: str) -> tuple[str, int, Any, float]:
        start = time.monotonic()
        status, body = await post(strict, "/add", {"url": hostile + path})
        return path, status, body, time.monotonic() - start

    results = await asyncio.gather(*(one(p) for p in BAD))
    for path, status, body, elapsed in results:
        assert status == 422, (path, body)
        assert body["detail"][0]["type"] == BAD[path], (path, body)
        assert body["detail"][0]["msg"], path
        assert elapsed < LIMITS["fetch_timeout"] + 10, (path, elapsed)  # the whole download is bounded
    await still_healthy(strict, hostile, "single")


async def test_odd_but_valid_images_are_accepted(strict: Service, hostile: str) -> None:
    for path in GOOD:
        status, body = await post(strict, "/add", {"url": hostile + path})
        assert status == 204, (path, body)


async def test_add_bulk_reports_every_bad_item_and_adds_the_good(strict: Service, hostile: str) -> None:
    items = [{"url": hostile + p} for p in [*BAD, *GOOD]] + [{"url": "gopher://x"}, {"url": 17}, "nope"]
    status, body = await post(strict, "/add_bulk", items)
    assert status == 200
    failed = {f["url"] if isinstance(f["url"], str) else repr(f["url"]): f["type"] for f in body["failed"]}
    for path, kind in BAD.items():
        assert failed[hostile + path] == kind
    assert failed["gopher://x"] == "validation_error" and len(body["failed"]) == len(BAD) + 3
    assert set(body["added"]) | set(body["found"]) == {hostile + p for p in GOOD}
    await still_healthy(strict, hostile, "bulk")


async def test_bad_requests(strict: Service, hostile: str) -> None:
    url = f"{hostile}/img/req.jpg"
    cases: list[tuple[str, Any, str]] = [
        ("/add", {"url": 5}, "string_type"),
        ("/add", {"url": url, "metadata": "x"}, "dict_type"),
        ("/add", {"url": url, "extra": 1}, "extra_forbidden"),
        ("/add", [], "model_type"),
        ("/search", {"url": url, "limit": 10**9}, "less_than_equal"),
        ("/search", {"url": url, "limit": "many"}, "int_parsing"),
        ("/search", {"url": url, "filter": {"k": {"$ne": 1}}}, "value_error"),
        ("/search", {"url": url, "min_similarity": 101}, "less_than_equal"),
        ("/add_bulk", [{"url": url}] * (LIMITS["max_bulk_items"] + 1), "list_type"),
        ("/restore", {"url": url}, "list_type"),
    ]
    for route, body, kind in cases:
        status, answer = await post(strict, route, body)
        assert status == 422, (route, body, answer)
        assert answer["detail"][0]["type"] == kind, (route, answer)
    big = io.BytesIO(b'{"url": "' + b"a" * 3_000_000 + b'"}')
    status, answer = await post(strict, "/add", data=big, headers={"Content-Type": "application/json"})
    assert status == 413 and answer["type"] == "payload_too_large"
    for hostile_value in ['"', "\\", "' or 1=1 --", '"] or url != "', "\u202e\u0000x"]:
        status, hits = await post(strict, "/search", {"url": url, "filter": {"k": hostile_value}})
        assert (status, hits) == (200, []), hostile_value  # escaped: a value like any other, matching nothing
    await still_healthy(strict, hostile, "requests")


async def test_fetch_hosts_limits_every_hop_before_any_lookup(tmp_path: Path, models_dir: Path) -> None:
    """IDIOS_FETCH_HOSTS: the listed host serves; an unlisted one is refused, directly or on a redirect, and a
    name is refused without being resolved (a .invalid name that DNS could not resolve answers host_not_allowed,
    not image_unreachable)."""
    settings = make_settings(tmp_path, models_dir, fetch_hosts="127.0.0.1, *.allowed.test")
    async with image_server() as listed, image_server(host="127.0.0.2") as unlisted:
        app = web.Application()

        async def away(request: web.Request) -> web.Response:
            raise web.HTTPFound(f"{unlisted}/img/elsewhere.jpg")

        app.router.add_get("/away.jpg", away)
        async with serving(app) as redirector, running_service(settings) as svc:
            assert (await post(svc, "/add", {"url": f"{listed}/img/ok.jpg"}))[0] == 204
            assert (await post(svc, "/add", {"url": f"{listed}/redirect/hop.jpg"}))[0] == 204  # same host
            for url in (f"{unlisted}/img/direct.jpg", f"{redirector}/away.jpg", "http://img.nowhere.invalid/a.jpg",
                        "http://allowed.test.invalid/a.jpg"):
                status, body = await post(svc, "/add", {"url": url})
                assert status == 422 and body["detail"][0]["type"] == "host_not_allowed", (url, body)
    allow = HostAllowlist("127.0.0.1, *.allowed.test, [::1], Iiif.Example.org.")
    assert [allow.allows(h) for h in ("deep.allowed.test", "a.b.allowed.test", "iiif.example.org", "::1", "[::1]")] \
        == [True] * 5
    assert not any(allow.allows(h) for h in ("allowed.test", "xallowed.test", "allowed.test.evil", "127.0.0.2"))
    assert HostAllowlist("").allows("anything.example")


async def test_a_redirect_to_a_private_address_is_refused(tmp_path: Path, models_dir: Path) -> None:
    """127.0.0.2 is allow-listed; the image it redirects to lives on 127.0.0.1, which is not."""
    settings = Settings.from_env({}, data_dir=tmp_path, models_dir=models_dir, private_allowlist="127.0.0.2/32")
    async with image_server() as inner, image_server(host="127.0.0.2") as outer:
        app = web.Application()

        async def go(request: web.Request) -> web.Response:
            raise web.HTTPFound(f"{inner}/img/private.jpg")

        app.router.add_get("/go.jpg", go)
        async with serving(app, "127.0.0.2") as redirector, running_service(settings) as svc:
            status, body = await post(svc, "/add", {"url": f"{outer}/img/allowed.jpg"})
            assert status == 204, body
            status, body = await post(svc, "/add", {"url": f"{redirector}/go.jpg"})
            assert status == 422 and body["detail"][0]["type"] == "private_address", body
            status, body = await post(svc, "/add", {"url": f"{inner}/img/direct.jpg"})
            assert status == 422 and body["detail"][0]["type"] == "private_address", body
