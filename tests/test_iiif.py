"""IIIF Image API urls: canonical keys, info.json, the size asked for, against the reference IIIF server (pip
`iiif`, scripts/iiif_reference.py) and a level-0 static site it generated, through a running embedded service."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from aiohttp import web

from idios import errors, iiif
from iiif_reference import ReferenceServer, StaticSite, reference_server, static_site
from tests.conftest import Service, make_settings, running_service
from tests.servers import serving

MODEL = "thumb_grid"
SHORT = 4 * 224  # the default policy's short side for thumb_grid (224 px input, IDIOS_IIIF_SCALE 4)


# --- urls and keys ----------------------------------------------------------------------------------------------

def test_sizes_of_one_image_are_one_key_and_regions_their_own() -> None:
    base = "https://iiif.example.org/iiif/3/ms-12%2Ff1r"
    key = f"{base}/full/max/0/default.jpg"
    for size in ("full", "max", "^max", "!800,800", "1024,", ",768", "pct:50", "640,480", "^2000,"):
        assert iiif.canonical(f"{base}/full/{size}/0/default.jpg") == key, size
    assert iiif.canonical(f"{base}/info.json") == key
    assert iiif.canonical(base) == base, "a bare base is not recognisable without asking its server"
    for other in ("0,0,100,100", "pct:10,10,50,50", "square"):
        assert iiif.canonical(f"{base}/{other}/!300,300/0/default.jpg") == f"{base}/{other}/max/0/default.jpg"
    assert iiif.canonical(f"{base}/full/500,/90/gray.png") == f"{base}/full/max/90/gray.png"
    for plain in ("https://example.org/a/full/max/0/default.jpg?token=1",  # a query string: not an image request
                  "https://example.org/full/max/0/default.jpg",  # no identifier before the parameters
                  "https://example.org/photos/2024/07/12/beach.jpg", "https://example.org/info.json"):
        assert iiif.canonical(plain) == plain
    assert iiif.thumbnail(key) == f"{base}/full/!200,200/0/default.jpg"
    assert iiif.thumbnail("https://example.org/a.jpg") is None


def info(version: int = 3, **extra: Any) -> bytes:
    doc: dict[str, Any] = ({"@context": "http://iiif.io/api/image/3/context.json", "type": "ImageService3",
                            "profile": "level1"} if version == 3 else
                           {"@context": "http://iiif.io/api/image/2/context.json",
                            "profile": ["http://iiif.io/api/image/2/level1.json"]})
    doc.update({"id": "http://x.test/iiif/a", "width": 4000, "height": 3000})
    doc.update(extra)
    return orjson.dumps(doc)


def choice(service: iiif.ImageService, url: str, short: int = SHORT) -> list[str]:
    ref = iiif.parse(url)
    assert ref is not None
    return iiif.size_choices(service, ref, short)


def test_size_choice_honours_level_limits_and_listed_sizes() -> None:
    base = "http://x.test/iiif/a"
    v3, v2 = iiif.parse_info(info(3)), iiif.parse_info(info(2))
    assert (v3.version, v3.level, v3.width, v3.height) == (3, 1, 4000, 3000) and v2.version == 2
    # the smallest derivative with its short side >= 896: 1195 x 896 of a 4000 x 3000 image
    assert choice(v3, f"{base}/info.json") == choice(v2, f"{base}/info.json") == ["1195,"]
    assert choice(v3, f"{base}/0,0,1000,2000/max/0/default.jpg") == ["896,"]
    assert choice(v3, f"{base}/0,0,800,600/max/0/default.jpg") == ["max"], "a small region comes whole"
    assert choice(v2, f"{base}/0,0,800,600/full/0/default.jpg") == ["full"]
    assert choice(v3, f"{base}/3900,2900,500,500/max/0/default.jpg") == ["max"], "clipped to 100 x 100"
    capped = iiif.parse_info(info(3, maxWidth=1000))  # maxHeight = maxWidth when only maxWidth is given
    assert choice(capped, f"{base}/info.json") == ["1000,"]
    # 730 wide would be 730 x 548 (the server rounds the height up) = 400,040 > maxArea
    assert choice(iiif.parse_info(info(3, maxArea=400_000)), f"{base}/info.json") == ["729,"]
    listed = [{"width": w, "height": h} for w, h in ((500, 375), (1000, 750), (2000, 1500), (9000, 9000))]
    level0 = iiif.parse_info(info(3, profile="level0", sizes=listed))
    assert level0.sizes == ((500, 375), (1000, 750), (2000, 1500)), "a listed size past the image is skipped"
    assert choice(level0, f"{base}/info.json") == ["2000,1500"], "the smallest listed reaching 896, as w,h (3.0)"
    assert choice(level0, f"{base}/info.json", short=700) == ["1000,750"]
    assert choice(level0, f"{base}/info.json", short=2000) == ["max", "2000,1500"], "none large enough: full first"
    with pytest.raises(errors.IIIFUnsupported, match="cannot cut the region"):
        choice(level0, f"{base}/0,0,10,10/max/0/default.jpg")
    with pytest.raises(errors.IIIFUnsupported, match="outside"):
        choice(v3, f"{base}/5000,0,10,10/max/0/default.jpg")
    assert "png" in iiif.parse_info(info(3, extraFormats=["png"])).formats
    assert iiif.parse_info(info(2, profile=["http://iiif.io/api/image/2/level2.json"])).formats >= {"jpg", "png"}


@pytest.mark.parametrize("body, kind", [
    (b"<html>not json</html>", errors.IIIFInfoInvalid),
    (b"[1, 2]", errors.IIIFInfoInvalid),
    (orjson.dumps({"width": 10, "height": 10}), errors.IIIFInfoInvalid),  # JSON, but no Image API context
    (info(3, width=10**9), errors.IIIFInfoInvalid),
    (info(3, width=0), errors.IIIFInfoInvalid),
    (info(3, height="3000"), errors.IIIFInfoInvalid),
    (info(3, width=True), errors.IIIFInfoInvalid),
    (orjson.dumps({"@context": "http://library.stanford.edu/iiif/image-api/1.1/context.json"}),
     errors.IIIFInfoInvalid),
    (orjson.dumps({"@context": "http://iiif.io/api/image/1/context.json", "width": 9, "height": 9}),
     errors.IIIFUnsupported),
])
def test_unusable_info_json_is_refused(body: bytes, kind: type[errors.IdiosError]) -> None:
    with pytest.raises(kind):
        iiif.parse_info(body)


def test_info_cache_is_bounded_and_expires() -> None:
    cache = iiif.InfoCache(2, ttl=60)
    service = iiif.parse_info(info(3))
    for name in "abc":
        cache.put(name, service)
    assert len(cache) == 2 and cache.get("a") is None and cache.get("c") is service
    stale = iiif.InfoCache(2, ttl=-1)
    stale.put("a", service)
    assert stale.get("a") is None and len(stale) == 0


# --- through the service, against real IIIF servers ------------------------------------------------------------

@pytest.fixture(scope="module")
async def iiif_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ReferenceServer]:
    async with reference_server(tmp_path_factory.mktemp("iiif")) as server:
        yield server


@pytest.fixture(scope="module")
async def level0(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[StaticSite]:
    # coffee in one 4096-px tile a scale: sizes up to 2000 x 1500; astronaut in 512-px tiles: sizes up to 256
    async with static_site(tmp_path_factory.mktemp("iiif-static"), {"coffee": 4096, "astronaut": 512}) as site:
        yield site


@pytest.fixture(scope="module")
async def svc(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> AsyncIterator[Service]:
    async with running_service(make_settings(tmp_path_factory.mktemp("iiif-svc"), models_dir)) as s:
        yield s


async def post(svc: Service, path: str, body: Any) -> tuple[int, Any]:
    async with svc.http.post(f"{svc.model(MODEL)}{path}", json=body) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if text else None


async def stored(svc: Service, prefix: str) -> list[str]:
    status, urls = await post(svc, "/urls", {})
    assert status == 200
    return sorted(u for u in urls if u.startswith(prefix))


async def upload_search(svc: Service, data: bytes) -> list[dict[str, Any]]:
    import aiohttp

    form = aiohttp.FormData()
    form.add_field("image", io.BytesIO(data), filename="q.jpg", content_type="image/jpeg")
    form.add_field("limit", "3")
    async with svc.http.post(f"{svc.model(MODEL)}/search", data=form) as resp:
        assert resp.status == 200, await resp.text()
        return list(await resp.json())


def asked(server: ReferenceServer, since: int, name: str) -> list[str]:
    return [path for path, _ in server.requests()[since:] if f"/{name}/" in path or path.endswith(f"/{name}")]


async def test_an_image_is_fetched_at_the_size_the_model_needs_and_stored_once(
        svc: Service, iiif_server: ReferenceServer) -> None:
    base = iiif_server.service("coffee", "3.0")
    key = f"{base}/full/max/0/default.jpg"
    before = len(iiif_server.requests())
    assert await post(svc, "/add", {"url": f"{base}/full/full/0/default.jpg", "metadata": {"n": 1}}) == (204, None)
    assert asked(iiif_server, before, "coffee") == ["/3.0_pil/coffee/info.json",
                                                    "/3.0_pil/coffee/full/1195,/0/default.jpg"]
    # the same image at another size is the same entry: written again, not twice; info.json comes from the cache
    before = len(iiif_server.requests())
    for variant in ("/full/max/0/default.jpg", "/full/!300,300/0/default.jpg", "/info.json"):
        assert (await post(svc, "/add", {"url": base + variant, "metadata": {"n": 2}}))[0] == 204
    assert asked(iiif_server, before, "coffee") == ["/3.0_pil/coffee/full/1195,/0/default.jpg"] * 3
    assert await stored(svc, base) == [key]
    # it embeds like the master file it was cut from
    hits = await upload_search(svc, (iiif_server.folder / "coffee.jpg").read_bytes())
    assert hits[0]["url"] == key and hits[0]["metadata"] == {"n": 2} and hits[0]["similarity"] > 99.9, hits
    status, got = await post(svc, "/compare", {"url": f"{base}/full/pct:10/0/default.jpg", "other": key})
    assert status == 200 and got > 99.99, got
    assert await post(svc, "/remove", {"url": f"{base}/full/500,/0/default.jpg"}) == (204, None)
    assert await stored(svc, base) == []


async def test_version_2_info_urls_bare_bases_and_regions(svc: Service, iiif_server: ReferenceServer) -> None:
    v2 = iiif_server.service("astronaut", "2.1")
    before = len(iiif_server.requests())
    assert (await post(svc, "/add", {"url": f"{v2}/info.json"}))[0] == 204
    assert asked(iiif_server, before, "astronaut") == ["/2.1_pil/astronaut/info.json",
                                                       "/2.1_pil/astronaut/full/896,/0/default.jpg"]
    assert await stored(svc, v2) == [f"{v2}/full/max/0/default.jpg"]

    bare = iiif_server.service("chelsea", "3.0")  # its server redirects the base to info.json
    before = len(iiif_server.requests())
    assert (await post(svc, "/add", {"url": bare}))[0] == 204
    assert asked(iiif_server, before, "chelsea") == ["/3.0_pil/chelsea", "/3.0_pil/chelsea/info.json",
                                                     "/3.0_pil/chelsea/full/1347,/0/default.jpg"]
    assert await stored(svc, bare) == [bare], "a bare base stays the url given"

    rocket = iiif_server.service("rocket", "3.0")
    detail = f"{rocket}/0,0,600,900/max/0/default.jpg"
    before = len(iiif_server.requests())
    for url in (f"{rocket}/full/max/0/default.jpg", detail, f"{rocket}/0,0,600,900/!100,100/0/default.jpg"):
        assert (await post(svc, "/add", {"url": url}))[0] == 204
    assert asked(iiif_server, before, "rocket") == ["/3.0_pil/rocket/info.json",
                                                    "/3.0_pil/rocket/full/896,/0/default.jpg",
                                                    "/3.0_pil/rocket/0,0,600,900/max/0/default.jpg",
                                                    "/3.0_pil/rocket/0,0,600,900/max/0/default.jpg"]
    assert await stored(svc, rocket) == [detail, f"{rocket}/full/max/0/default.jpg"], "a region is its own entry"
    status, got = await post(svc, "/compare", {"url": detail, "other": f"{rocket}/full/max/0/default.jpg"})
    assert status == 200 and got < 99.5, got


async def test_add_bulk_folds_the_sizes_of_one_image(svc: Service, iiif_server: ReferenceServer) -> None:
    base = iiif_server.service("astronaut", "3.0")
    items = [{"url": f"{base}/full/{size}/0/default.jpg"} for size in ("max", "600,", "!256,256")]
    status, body = await post(svc, "/add_bulk", items)
    assert status == 200 and not body.get("failed"), body
    assert await stored(svc, base) == [f"{base}/full/max/0/default.jpg"]


async def test_a_level_0_site_serves_a_listed_size(svc: Service, level0: StaticSite) -> None:
    base = level0.service("coffee")
    level0.asked.clear()
    assert (await post(svc, "/add", {"url": f"{base}/info.json"}))[0] == 204
    assert level0.asked == ["/static/coffee/info.json", "/static/coffee/full/2000,/0/default.jpg"], \
        "the smallest listed size reaching 896 px, in 2.x's w, form"
    assert await stored(svc, base) == [f"{base}/full/max/0/default.jpg"]

    small = level0.service("astronaut")
    level0.asked.clear()
    assert (await post(svc, "/add", {"url": f"{small}/full/max/0/default.jpg"}))[0] == 204
    # no listed size reaches 896 px: the full image first (this static site has none), then the largest listed
    assert level0.asked == ["/static/astronaut/info.json", "/static/astronaut/full/full/0/default.jpg",
                            "/static/astronaut/full/256,/0/default.jpg"]  # 2048 / 8: the largest fitting a tile
    assert await stored(svc, small) == [f"{small}/full/max/0/default.jpg"]


# --- hostile IIIF servers ---------------------------------------------------------------------------------------

def impostor(master: bytes) -> web.Application:
    """A server that says it is IIIF: absurd or broken info.json files, an Image API 1.x service, an info.json
    behind a login, one that ignores the size asked for, and a level-0 one whose full image is too large.
    Its images: the whole master whatever the size asked (for `ignores`, `locked`, `v1` at size `full`, `level0big`
    but for its one listed size), a 404 for the others."""
    def doc(**fields: Any) -> web.Response:
        return web.Response(body=info(3, **fields), content_type="application/ld+json")

    routes: dict[str, Any] = {
        "absurd": lambda: doc(width=10**12, height=10**12),
        "html": lambda: web.Response(text="<html>IIIF?</html>", content_type="text/html"),
        "v1": lambda: web.json_response({"@context": "http://iiif.io/api/image/1/context.json",
                                         "width": 4000, "height": 3000}),
        "missing": lambda: web.Response(status=404),
        "locked": lambda: web.Response(status=401),
        "level0": lambda: doc(profile="level0"),
        "level0big": lambda: doc(profile="level0", sizes=[{"width": 500, "height": 375}]),
        "ignores": lambda: doc(),
    }
    small = encode_jpeg(master, (500, 375))

    async def handle(request: web.Request) -> web.Response:
        name, rest = request.match_info["name"], request.match_info["rest"]
        if rest == "info.json":
            return routes[name]()
        if name == "json":  # not an image, not IIIF: JSON where an image was expected
            return web.json_response({"hello": "world"})
        if name == "v1" and "/max/" in rest:
            return web.Response(status=400, text="size max: not in Image API 1.1")
        if name == "level0big" and rest.startswith("full/500,"):
            return web.Response(body=small, content_type="image/jpeg")
        if name in ("ignores", "locked", "v1", "level0big"):
            return web.Response(body=master, content_type="image/jpeg")  # any size asked: the whole master
        return web.Response(status=404)

    app = web.Application()
    app.router.add_get("/iiif/{name}/{rest:.*}", handle)
    return app


def encode_jpeg(data: bytes, size: tuple[int, int]) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").resize(size).save(out, format="JPEG", quality=90)
    return out.getvalue()


@pytest.mark.parametrize("name, path, kind", [
    ("absurd", "/full/max/0/default.jpg", "iiif_info_invalid"),
    ("html", "/info.json", "iiif_info_invalid"),
    ("missing", "/full/max/0/default.jpg", "image_http_error"),
    ("level0", "/0,0,500,500/max/0/default.jpg", "iiif_unsupported"),
    ("json", "/doc", "not_an_image"),
])
async def test_hostile_servers_get_a_clear_422(svc: Service, iiif_server: ReferenceServer, name: str, path: str,
                                               kind: str) -> None:
    async with serving(impostor((iiif_server.folder / "coffee.jpg").read_bytes())) as url:
        status, body = await post(svc, "/add", {"url": f"{url}/iiif/{name}{path}"})
        assert status == 422 and body["detail"][0]["type"] == kind, body
        assert await stored(svc, url) == []


async def test_a_server_ignoring_the_size_asked_still_embeds_right(svc: Service, iiif_server: ReferenceServer) -> None:
    master = (iiif_server.folder / "coffee.jpg").read_bytes()
    async with serving(impostor(master)) as url:
        key = f"{url}/iiif/ignores/full/max/0/default.jpg"
        assert await post(svc, "/add", {"url": f"{url}/iiif/ignores/info.json"}) == (204, None)
        hits = await upload_search(svc, master)
        assert hits[0]["url"] == key and hits[0]["similarity"] > 99.99, hits
        assert (await post(svc, "/remove", {"url": key}))[0] == 204


def test_derivative_policy_refuses_nonsense() -> None:
    with pytest.raises(SystemExit, match="IDIOS_IIIF_SCALE"):
        iiif.DerivativePolicy(scale=0)
    with pytest.raises(SystemExit, match="IDIOS_IIIF_FORMAT"):
        iiif.DerivativePolicy(format="bmp")
    assert iiif.DerivativePolicy(scale=1.5).short_side(224) == 336
    assert np.isclose(iiif.DerivativePolicy().scale, 4.0)


async def test_both_deployments_store_the_derivative_under_the_key(service: Service,
                                                                    iiif_server: ReferenceServer) -> None:
    """The same through the suite's two deployments: embedded, and an API with 2 worker processes over RabbitMQ on
    the Milvus server (a worker reads info.json and fetches the derivative in its own process)."""
    base = iiif_server.service("rocket", "2.1")
    key = f"{base}/full/max/0/default.jpg"
    before = len(iiif_server.requests())
    async with service.http.post(f"{service.model(MODEL)}/add",
                                 json={"url": f"{base}/full/!500,500/0/default.jpg", "metadata": {"t": 1}}) as resp:
        assert resp.status == 204, await resp.text()
    assert asked(iiif_server, before, "rocket")[-1] == "/2.1_pil/rocket/full/896,/0/default.jpg"
    hits = await upload_search(service, (iiif_server.folder / "rocket.jpg").read_bytes())
    assert hits[0]["url"] == key and hits[0]["similarity"] > 99.9, hits
    async with service.http.post(f"{service.model(MODEL)}/remove", json={"url": f"{base}/info.json"}) as resp:
        assert resp.status == 204, await resp.text()


async def test_remove_also_takes_a_row_stored_under_a_sized_url_before_keys_were_canonical(
        svc: Service, iiif_server: ReferenceServer) -> None:
    from idios.store import Row

    base = iiif_server.service("astronaut", "3.0")
    legacy = f"{base}/full/!400,400/0/default.jpg"  # how an older version stored it: the url as given
    await svc.backend.store.put(MODEL, [Row(legacy, np.full(192, 192 ** -0.5, dtype=np.float32), None)], upsert=False)
    assert (await post(svc, "/add", {"url": legacy}))[0] == 204  # now kept under the canonical key, beside it
    assert await stored(svc, base) == sorted([legacy, f"{base}/full/max/0/default.jpg"])
    assert (await post(svc, "/remove", {"url": legacy}))[0] == 204
    assert await stored(svc, base) == []


@pytest.mark.parametrize("name, asked", [
    ("v1", ["info.json", "full/max/0/default.jpg", "full/full/0/default.jpg"]),  # 1.x: no max, no sizing
    ("locked", ["info.json", "full/max/0/default.jpg"]),  # info.json behind a login, the image not
])
async def test_without_a_usable_info_json_the_image_comes_whole(svc: Service, iiif_server: ReferenceServer,
                                                                name: str, asked: list[str]) -> None:
    master = (iiif_server.folder / "coffee.jpg").read_bytes()
    seen: list[str] = []
    app = impostor(master)

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.append(request.path.split(f"/iiif/{name}/", 1)[-1])
        return await handler(request)

    app.middlewares.append(record)
    async with serving(app) as url:
        key = f"{url}/iiif/{name}/full/max/0/default.jpg"
        assert await post(svc, "/add", {"url": f"{url}/iiif/{name}/full/600,/0/default.jpg"}) == (204, None)
        assert seen == asked
        hits = await upload_search(svc, master)
        assert key in [h["url"] for h in hits if h["similarity"] > 99.9], hits
        assert (await post(svc, "/remove", {"url": key}))[0] == 204


async def test_a_level_0_full_image_too_large_falls_back_to_a_listed_size(
        tmp_path: Path, models_dir: Path, iiif_server: ReferenceServer) -> None:
    master = (iiif_server.folder / "coffee.jpg").read_bytes()
    async with serving(impostor(master)) as url, \
            running_service(make_settings(tmp_path, models_dir, max_image_bytes=len(master) - 1)) as small:
        assert await post(small, "/add", {"url": f"{url}/iiif/level0big/info.json"}) == (204, None)
        hits = await upload_search(small, master)
        assert hits[0]["url"] == f"{url}/iiif/level0big/full/max/0/default.jpg" and hits[0]["similarity"] > 99


def test_keys_keep_a_query_and_ignore_the_case_of_scheme_and_host() -> None:
    base = "https://iiif.example.org/iiif/3/a"
    assert iiif.canonical("HTTPS://IIIF.Example.org/iiif/3/a/full/full/0/default.jpg") == f"{base}/full/max/0/default.jpg"
    assert iiif.canonical(f"{base}/full/500,/0/default.jpg?token=s3") == f"{base}/full/max/0/default.jpg?token=s3"
    assert iiif.canonical(f"{base}/info.json?token=s3") == f"{base}/full/max/0/default.jpg?token=s3"
    ref = iiif.parse(f"{base}/info.json?token=s3")
    assert ref is not None and ref.info == f"{base}/info.json?token=s3"
    arabic = f"{base}/\u0661,\u0662,\u0663,\u0664/max/0/default.jpg"
    assert iiif.canonical(arabic) == arabic, "ASCII digits only, as in the page's JavaScript"
    assert iiif.bare(f"{base}/info.json?token=s3") == iiif.ImageRef(base, query="?token=s3")
    assert iiif.bare(f"{base}/").request("max") == f"{base}/full/max/0/default.jpg"


def test_level_0_choices_skip_a_full_image_the_decoder_would_refuse() -> None:
    base = "http://x.test/iiif/a"
    sizes = [{"width": 500, "height": 375}, {"width": 1000, "height": 750}]
    level0 = iiif.parse_info(info(3, profile="level0", sizes=sizes))
    assert choice(level0, f"{base}/info.json") == ["max", "1000,750"]
    ref = iiif.ImageRef(base)
    assert iiif.size_choices(level0, ref, SHORT, max_pixels=10_000_000) == ["1000,750"]
    whole = iiif.parse_info(info(3, profile="level0", width=1000, height=750, sizes=sizes))
    assert iiif.size_choices(whole, ref, 700) == ["max", "1000,750"], "the full size listed"


def test_max_area_holds_for_the_height_the_server_derives() -> None:
    tall = iiif.parse_info(info(3, width=1000, height=3665, maxArea=700_001))
    size, = iiif.size_choices(tall, iiif.ImageRef("http://x.test/a"), 2000)
    w = int(size.rstrip(","))
    assert w * -(-3665 * w // 1000) <= 700_001 and (w + 1) * -(-3665 * (w + 1) // 1000) > 700_001


def test_square_regions_are_a_2x_feature_but_3_0_level_1() -> None:
    assert not iiif.parse_info(info(2)).supports_region("square")
    assert iiif.parse_info(info(2, profile=["http://iiif.io/api/image/2/level1.json",
                                           {"supports": ["regionSquare"]}])).supports_region("square")
    assert iiif.parse_info(info(3)).supports_region("square")
    assert not iiif.parse_info(info(3, profile="level0")).supports_region("square")
