"""The built-in page with IIIF entries, in headless Chromium: thumbnails come through the Image API at 200 px
(never the master), and a hit from a manifest links to it. Against the reference IIIF server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from idios import iiif
from iiif_reference import ReferenceServer, reference_server
from tests.conftest import make_settings, running_service
from tests.imagekit import encode, picture
from tests.servers import serving
from tests.test_page import (  # noqa: F401  (driver: the module's browser, a fixture)
    add,
    console_errors,
    driver,
    fill,
    first_hit_is,
    open_page,
    wait_for,
)

pytestmark = pytest.mark.timeout(240)

CARDS_JS = """return [...document.querySelectorAll('#results .hit')].map(li => ({
  url: li.querySelector('.url').textContent,
  src: li.querySelector('img').src,
  loaded: li.querySelector('img').complete && li.querySelector('img').naturalWidth > 0,
  size: [li.querySelector('img').naturalWidth, li.querySelector('img').naturalHeight],
  manifest: li.querySelector('a.manifest') ? li.querySelector('a.manifest').href : null,
}));"""


@pytest.fixture(scope="module")
async def iiif_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ReferenceServer]:
    async with reference_server(tmp_path_factory.mktemp("iiif-page")) as server:
        yield server


async def test_iiif_hits_show_image_api_thumbnails_and_their_manifest(driver: Any, iiif_server: ReferenceServer,
                                                                     tmp_path: Path, models_dir: Path) -> None:
    level1 = web.Application()  # a level-1 server: `w,` sizes only (no `!w,h`)
    small = encode(picture("level1"), "JPEG")

    async def sized(request: web.Request) -> web.Response:
        if request.match_info["size"] == "200,":
            return web.Response(body=small, content_type="image/jpeg")
        return web.Response(status=400, text="level 1: no !w,h")

    level1.router.add_get("/iiif/l1/{region}/{size}/{rotation}/{name}", sized)
    async with serving(level1) as l1_url:
        await show_hits(driver, iiif_server, tmp_path, models_dir, f"{l1_url}/iiif/l1/full/max/0/default.jpg")


async def show_hits(driver: Any, iiif_server: ReferenceServer, tmp_path: Path, models_dir: Path, l1: str) -> None:
    coffee = f"{iiif_server.service('coffee')}/full/max/0/default.jpg"
    bare = iiif_server.service("chelsea")  # a bare base: only its metadata says it is IIIF
    manifest = "http://127.0.0.1:9/iiif/manifest/coffee.json"  # only linked to, never fetched by the page
    async with running_service(make_settings(tmp_path, models_dir)) as svc:
        await add(svc, "thumb_grid", coffee, {"iiif_manifest": manifest, "label": "Coffee"})
        await add(svc, "thumb_grid", bare, {"iiif_service": bare})
        # stored without being fetched from there: its key alone decides its thumbnail
        async with svc.http.post(svc.model("thumb_grid") + "/restore",
                                 json=[{"url": l1, "embedding": [1.0] + [0.0] * 191}]) as resp:
            assert resp.status == 204, await resp.text()
        before = len(iiif_server.requests())

        def scenario(d: Any) -> None:
            open_page(d, svc.url, "thumb_grid")
            fill(d, "search-url", coffee)
            d.find_element("css selector", "#search-url-form button").click()
            wait_for(d, "the results", first_hit_is(coffee))
            wait_for(d, "the thumbnails", lambda d: all(c["loaded"] for c in d.execute_script(CARDS_JS)))
            cards = {c["url"]: c for c in d.execute_script(CARDS_JS)}
            assert set(cards) == {coffee, bare, l1}, cards
            assert cards[l1]["src"] == l1.replace("/max/", "/200,/") and cards[l1]["loaded"], "w, after !w,h"
            assert cards[coffee]["src"] == iiif.thumbnail(coffee) and cards[coffee]["manifest"] == manifest
            assert cards[bare]["src"] == f"{bare}/full/!200,200/0/default.jpg" and cards[bare]["manifest"] is None
            assert max(cards[coffee]["size"]) == 200 and max(cards[bare]["size"]) == 200, cards
            assert console_errors(d) == []

        await asyncio.to_thread(scenario, driver)
        asked = [path for path, _ in iiif_server.requests()[before:]]
        assert "/3.0_pil/coffee/full/!200,200/0/default.jpg" in asked, asked
        assert not [p for p in asked if "/full/max/" in p or "/full/full/" in p], "the page never loads a master"
