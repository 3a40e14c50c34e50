"""The built-in page and /docs in headless Chromium, against the embedded service with real models and images.

Selenium calls block, so each browser scenario runs in a thread while the event loop keeps serving the service
and the image server. Screenshots go to artifacts/ (git-ignored).
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.browser import chromium
from tests.conftest import ROOT, Service
from tests.imagekit import encode, picture

pytestmark = pytest.mark.timeout(240)
ARTIFACTS = ROOT / "artifacts"
WAIT_S = 60.0

HITS_JS = """return [...document.querySelectorAll('#results .hit')].map(li => ({
  url: li.querySelector('.url').textContent,
  similarity: parseFloat(li.querySelector('.similarity').textContent.split('·')[1]),
  metadata: li.querySelector('.metadata') ? li.querySelector('.metadata').textContent : null,
  loaded: !!li.querySelector('img') && li.querySelector('img').complete && li.querySelector('img').naturalWidth > 0,
}));"""


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    with chromium() as d:
        yield d


def wait_for(d: Any, what: str, cond: Callable[[Any], Any], timeout: float = WAIT_S) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(d, timeout, poll_frequency=0.1).until(cond)
    except TimeoutException:
        raise AssertionError(f"timed out waiting for {what}; page says: {statuses(d)}") from None


def statuses(d: Any) -> dict[str, str]:
    return d.execute_script("return Object.fromEntries([...document.querySelectorAll('.status')]"
                            ".map(e => [e.id, e.className + ': ' + e.textContent]))")


def status(d: Any, which: str) -> tuple[str, str]:
    el = d.find_element("id", which)
    return el.get_attribute("class"), el.text


def hits(d: Any) -> list[dict[str, Any]]:
    return d.execute_script(HITS_JS)


def first_hit_is(url: str) -> Callable[[Any], bool]:
    """A wait condition: the results grid shows `url` first."""
    def check(d: Any) -> bool:
        shown = hits(d)
        return bool(shown) and shown[0]["url"] == url
    return check


def thumbnails_loaded(prefix: str, scroll: bool = False) -> Callable[[Any], bool]:
    """A wait condition: the thumbnails of the hits whose url starts with `prefix` have loaded. They load lazily,
    near the viewport only: with `scroll`, each check brings the first one still missing into view."""
    def check(d: Any) -> bool:
        missing = [i for i, h in enumerate(hits(d)) if h["url"].startswith(prefix) and not h["loaded"]]
        if missing and scroll:
            d.execute_script("document.querySelectorAll('#results .hit')[arguments[0]].scrollIntoView()", missing[0])
        return not missing
    return check


def open_page(d: Any, base: str, model: str) -> None:
    from selenium.webdriver.support.ui import Select

    d.get(base + "/")
    wait_for(d, "the model list", lambda d: len(d.find_elements("css selector", "#model option")) == 2)
    Select(d.find_element("id", "model")).select_by_value(model)
    wait_for(d, "the count", lambda d: d.find_element("id", "count").text.endswith(("image", "images")))


def shown_count(d: Any) -> int:
    return int(d.find_element("id", "count").text.split()[0])


def fill(d: Any, element_id: str, text: str) -> None:
    el = d.find_element("id", element_id)
    el.clear()
    if text:
        el.send_keys(text)


def api_get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.load(resp)


def console_errors(d: Any) -> list[str]:
    """Console errors other than failed loads (expected: the API's 4xx answers, thumbnails of unreachable hosts)."""
    return [e["message"] for e in d.get_log("browser")
            if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]]


def foreign_resources(d: Any, service: str, shown: frozenset[str] = frozenset()) -> list[str]:
    """What the page loaded from anywhere but the service (no CDN), leaving out the thumbnails of urls it showed:
    `shown` and those in the page now. Thumbnails come from wherever the stored urls point, by design."""
    loaded = d.execute_script(
        "return performance.getEntriesByType('resource').map(e => [e.name, e.initiatorType])")
    shown = shown | set(d.execute_script("return [...document.querySelectorAll('img')].map(i => i.src)"))
    return [name for name, kind in loaded if not name.startswith((service + "/", "blob:"))
            and not (kind == "img" and name in shown)]


async def add(svc: Service, model: str, url: str, metadata: dict[str, Any] | None = None) -> None:
    async with svc.http.post(f"{svc.model(model)}/add", json={"url": url, "metadata": metadata}) as resp:
        assert resp.status == 204, await resp.text()


async def test_search_by_upload_and_by_url(driver: Any, service: Service, images: str, uniq: str,
                                           tmp_path: Path) -> None:
    target = f"{images}/img/{uniq}/target.jpg"
    photos = [f"{images}/img/{uniq}/photo{i}.jpg" for i in range(7)]
    # long metadata (other tests store up to 64 KB too): its card must not stretch the grid out of the browser's
    # lazy-loading reach, which once left the thumbnails of the next rows unloaded
    await add(service, "thumb_grid", target, {"title": "the target", "n": 0, "notes": "é " * 20000})
    for i, url in enumerate(photos):
        await add(service, "thumb_grid", url, {"title": f"photo {i}"})
    query = tmp_path / "query.jpg"  # the target picture at another size and quality: not the stored bytes
    query.write_bytes(encode(picture(f"{uniq}/target.jpg", (800, 600)), "JPEG", quality=75))

    def scenario(d: Any) -> None:
        open_page(d, service.url, "thumb_grid")
        assert not d.find_element("id", "search-text-form").is_displayed(), "thumb_grid has no text tower"
        d.find_element("id", "search-file").send_keys(str(query))
        wait_for(d, "upload results", first_hit_is(target))
        got = hits(d)
        assert got[0]["similarity"] > 99 and "the target" in got[0]["metadata"]
        assert [h["similarity"] for h in got] == sorted((h["similarity"] for h in got), reverse=True)
        n = min(12, shown_count(d))  # the options' default limit
        assert len(got) == n and status(d, "search-status") == ("status ok", f"{n} results, best first.")
        # this test's own pictures (other tests' stored urls may be slow, redirects or deliberately odd)
        mine = f"{images}/img/{uniq}/"
        assert any(h["url"].startswith(mine) for h in hits(d))
        tallest = d.execute_script("return Math.max(...[...document.querySelectorAll('#results .hit')]"
                                   ".map(li => li.getBoundingClientRect().height))")
        assert tallest < 450, f"a result card is {tallest} px tall: long metadata stretches the grid"
        wait_for(d, "thumbnails", thumbnails_loaded(mine))
        ARTIFACTS.mkdir(exist_ok=True)
        d.find_element("css selector", "section.results").screenshot(str(ARTIFACTS / "results-grid.png"))
        d.save_screenshot(str(ARTIFACTS / "page.png"))

        fill(d, "search-url", photos[3] + "?size=900x700")
        d.find_element("css selector", "#search-url-form button").click()
        wait_for(d, "url results", first_hit_is(photos[3]))
        assert hits(d)[0]["similarity"] > 99
        assert foreign_resources(d, service.url, frozenset(h["url"] for h in got)) == []
        assert console_errors(d) == []

    await asyncio.to_thread(scenario, driver)


def api_search(svc: Service, model: str, body: dict[str, Any], loop: asyncio.AbstractEventLoop,
               upload: bytes | None = None) -> list[dict[str, Any]]:
    """POST search from a browser scenario's thread, through the service's session on the test's loop: JSON, or
    with `upload` a multipart form whose `image` is that file and whose fields are the body's."""
    async def go() -> list[dict[str, Any]]:
        if upload is None:
            kwargs: dict[str, Any] = {"json": body}
        else:
            form = aiohttp.FormData()
            form.add_field("image", upload, filename="q.png", content_type="image/png")
            for k, v in body.items():
                form.add_field(k, v if isinstance(v, str) else json.dumps(v))
            kwargs = {"data": form}
        async with svc.http.post(f"{svc.model(model)}/search", **kwargs) as resp:
            assert resp.status == 200, await resp.text()
            return list(await resp.json())
    return asyncio.run_coroutine_threadsafe(go(), loop).result(60)


def shows(expected: list[dict[str, Any]]) -> Callable[[Any], bool]:
    """A wait condition: the grid shows these hits, in this order, with their similarity to one decimal."""
    def check(d: Any) -> bool:
        shown = hits(d)
        return ([h["url"] for h in shown] == [h["url"] for h in expected]
                and all(abs(a["similarity"] - b["similarity"]) < 0.051 for a, b in zip(shown, expected, strict=True)))
    return check


def click_hit_button(d: Any, url: str, which: str) -> None:
    """Click a hit's "More like this" (`more`) or "Less like this" (`less`) button."""
    for li in d.find_elements("css selector", "#results .hit"):
        if li.find_element("css selector", ".url").text == url:
            li.find_element("css selector", f".refine button.{which}").click()
            return
    raise AssertionError(f"{url} is not among the hits shown")


def similarity_of(shown: list[dict[str, Any]], url: str) -> float | None:
    return next((h["similarity"] for h in shown if h["url"] == url), None)


async def test_more_and_less_like_this_refine_the_search(driver: Any, service: Service, images: str, uniq: str,
                                                         tmp_path: Path) -> None:
    """A hit's buttons add it to the query as a weighted part (search's `queries`): the page then shows exactly
    what the API answers to that weighted search, and the refinement can be changed or removed again."""
    photos = [f"{images}/img/{uniq}/refine{i}.jpg" for i in range(8)]
    for url in photos:
        await add(service, "thumb_grid", url, {"scope": uniq})
    query = f"{images}/img/{uniq}/refine-query.jpg"  # not stored: fetched as an image url
    upload = encode(picture(f"{uniq}/refine-upload.png", (320, 240)), "PNG")
    file = tmp_path / "refine.png"
    file.write_bytes(upload)
    opts: dict[str, Any] = {"limit": 8, "filter": {"scope": uniq}}  # all 8: every hit stays in view
    loop = asyncio.get_running_loop()

    def scenario(d: Any) -> None:
        open_page(d, service.url, "thumb_grid")
        d.find_element("css selector", ".options summary").click()
        fill(d, "limit", "8")
        fill(d, "filter", json.dumps({"scope": uniq}))
        fill(d, "search-url", query)
        d.find_element("css selector", "#search-url-form button").click()
        plain = api_search(service, "thumb_grid", {"url": query, **opts}, loop)
        wait_for(d, "the plain search", shows(plain))
        assert d.find_elements("css selector", "#query .refinement") == []

        more = plain[-1]["url"]  # the last hit shown: "more like this" must bring it closer
        click_hit_button(d, more, "more")
        parts: list[dict[str, Any]] = [{"url": query, "weight": 1}, {"indexed": more, "weight": 1}]
        refined = api_search(service, "thumb_grid", {"queries": parts, **opts}, loop)
        wait_for(d, "more like the last hit", shows(refined))
        assert similarity_of(refined, more) > plain[-1]["similarity"]
        chips = d.find_elements("css selector", "#query .refinement")
        assert [c.get_attribute("class") for c in chips] == ["refinement more"]
        assert more in chips[0].get_attribute("title")

        less = refined[0]["url"] if refined[0]["url"] != more else refined[1]["url"]
        click_hit_button(d, less, "less")
        parts.append({"indexed": less, "weight": -0.5})
        both = api_search(service, "thumb_grid", {"queries": parts, **opts}, loop)
        wait_for(d, "less like the best other hit", shows(both))
        before = similarity_of(refined, less)
        assert before is not None and (similarity_of(both, less) or -1.0) < before
        assert len(d.find_elements("css selector", "#query .refinement")) == 2
        ARTIFACTS.mkdir(exist_ok=True)
        d.find_element("css selector", "section.results").screenshot(str(ARTIFACTS / "refine.png"))

        d.find_element("css selector", "#query .refinement.more .remove").click()  # the first refinement goes
        del parts[1]
        wait_for(d, "without the first refinement", shows(api_search(
            service, "thumb_grid", {"queries": parts, **opts}, loop)))
        assert [c.get_attribute("class") for c in d.find_elements("css selector", "#query .refinement")] == [
            "refinement less"]

        click_hit_button(d, less, "more")  # clicked again the other way: the latest choice counts
        parts[1]["weight"] = 1
        turned = api_search(service, "thumb_grid", {"queries": parts, **opts}, loop)
        wait_for(d, "the refinement turned round", shows(turned))
        assert [c.get_attribute("class") for c in d.find_elements("css selector", "#query .refinement")] == [
            "refinement more"]

        fill(d, "search-url", f"{images}/not-an-image")  # a search that fails leaves the page as it was
        d.find_element("css selector", "#search-url-form button").click()
        wait_for(d, "the failed search", lambda d: status(d, "search-status")[0] == "status error")
        assert shows(turned)(d) and len(d.find_elements("css selector", "#query .refinement")) == 1
        other = next(h["url"] for h in turned if h["url"] != less)
        click_hit_button(d, other, "less")  # ... and the buttons still refine what is shown
        parts.append({"indexed": other, "weight": -0.5})
        wait_for(d, "the shown search refined", shows(api_search(
            service, "thumb_grid", {"queries": parts, **opts}, loop)))

        d.find_element("id", "search-file").send_keys(str(file))  # a new search starts over, here an upload
        plain = api_search(service, "thumb_grid", opts, loop, upload)
        wait_for(d, "the upload's search", shows(plain))
        assert d.find_elements("css selector", "#query .refinement") == []
        click_hit_button(d, plain[-1]["url"], "more")
        wait_for(d, "the upload refined", shows(api_search(service, "thumb_grid", {
            "queries": [{"image": True, "weight": 1}, {"indexed": plain[-1]["url"], "weight": 1}], **opts},
            loop, upload)))
        assert console_errors(d) == []

    await asyncio.to_thread(scenario, driver)


DROP_JS = """
const [kind, r, g, b] = arguments;
const canvas = document.createElement('canvas');
canvas.width = 320; canvas.height = 240;
const ctx = canvas.getContext('2d');
ctx.fillStyle = `rgb(${r},${g},${b})`;
ctx.fillRect(0, 0, 320, 240);
const bytes = Uint8Array.from(atob(canvas.toDataURL('image/png').split(',')[1]), (c) => c.charCodeAt(0));
const data = new DataTransfer();
data.items.add(new File([bytes], kind + '.png', {type: 'image/png'}));
if (kind === 'drop') {
  const drop = new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true});
  document.getElementById('drop').dispatchEvent(drop);
} else {
  document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true}));
}
"""
WATCH_BUSY_JS = """window.busySeen = false;
new MutationObserver(() => { if (!document.getElementById('busy').hidden) window.busySeen = true; })
  .observe(document.getElementById('busy'), {attributes: true});"""


async def test_search_by_dropped_and_pasted_image(driver: Any, service: Service, images: str, uniq: str) -> None:
    colours = {name: f"{images}/colour/{rgb}?u={uniq}"
               for name, rgb in (("red", "250,10,10"), ("green", "10,200,10"), ("blue", "10,10,250"))}
    for url in colours.values():
        await add(service, "thumb_grid", url)

    def scenario(d: Any) -> None:
        open_page(d, service.url, "thumb_grid")
        for kind, name, rgb in (("drop", "green", (12, 198, 14)), ("paste", "blue", (8, 12, 247))):
            d.execute_script(WATCH_BUSY_JS)
            d.execute_script(DROP_JS, kind, *rgb)
            wait_for(d, f"{kind} results", first_hit_is(colours[name]))
            assert d.find_element("css selector", "#query span").text == f"Query: {kind}.png"
            assert d.execute_script("return window.busySeen"), "the busy indicator never showed"
            assert not d.find_element("id", "busy").is_displayed(), "the busy indicator stayed on"
        assert console_errors(d) == []

    await asyncio.to_thread(scenario, driver)


async def test_add_shows_the_outcome_and_the_count_changes(driver: Any, service: Service, images: str,
                                                           uniq: str) -> None:
    new = f"{images}/img/{uniq}/added.jpg"

    def scenario(d: Any) -> None:
        open_page(d, service.url, "thumb_grid")
        before = shown_count(d)
        fill(d, "add-url", new)
        fill(d, "add-metadata", '{"title": "added from the page"}')
        d.find_element("css selector", "#add-form button").click()
        wait_for(d, "added", lambda d: status(d, "add-status") == ("status ok", f"Added: {new}"))
        wait_for(d, "the new count", lambda d: shown_count(d) == before + 1)
        assert api_get(f"{service.model('thumb_grid')}/count") == before + 1
        assert d.find_element("id", "add-url").get_attribute("value") == "", "the form is cleared after adding"

        fill(d, "add-url", new)
        d.find_element("css selector", "#add-form button").click()
        wait_for(d, "already there", lambda d: status(d, "add-status")[0] == "status warn")
        assert status(d, "add-status")[1].startswith(f"Already there: {new}")
        assert shown_count(d) == before + 1

        d.find_element("id", "add-replace").click()
        d.find_element("css selector", "#add-form button").click()
        wait_for(d, "replaced", lambda d: status(d, "add-status") == ("status ok", f"Stored: {new}"))
        assert shown_count(d) == before + 1
        assert console_errors(d) == []

    await asyncio.to_thread(scenario, driver)


async def test_upload_with_an_id_then_find_it(driver: Any, service: Service, uniq: str, tmp_path: Path) -> None:
    file = tmp_path / "mine.png"
    file.write_bytes(encode(picture(f"upload-{uniq}"), "PNG"))
    image_id = f"https://archive.example/{uniq}.png"

    def scenario(d: Any) -> None:
        open_page(d, service.url, "thumb_grid")
        fill(d, "add-url", image_id)
        d.find_element("id", "add-file").send_keys(str(file))
        fill(d, "add-metadata", '{"from": "upload"}')
        d.find_element("css selector", "#add-form button").click()
        wait_for(d, "added", lambda d: status(d, "add-status") == ("status ok", f"Added: {image_id}"))
        d.find_element("id", "search-file").send_keys(str(file))
        wait_for(d, "its hit", first_hit_is(image_id))
        assert '"from": "upload"' in hits(d)[0]["metadata"]

    await asyncio.to_thread(scenario, driver)


async def test_errors_are_shown(driver: Any, service: Service, images: str, uniq: str) -> None:
    def scenario(d: Any) -> None:
        open_page(d, service.url, "thumb_grid")
        before = shown_count(d)
        fill(d, "add-url", f"{images}/missing/{uniq}.jpg")
        d.find_element("css selector", "#add-form button").click()
        wait_for(d, "the API's error", lambda d: status(d, "add-status")[0] == "status error")
        text = status(d, "add-status")[1]
        assert text.startswith("url: ") and text.endswith("(image_http_error)") and "404" in text, text
        assert shown_count(d) == before

        fill(d, "add-url", f"{images}/img/{uniq}.jpg")
        fill(d, "add-metadata", "{title: nope}")
        d.find_element("css selector", "#add-form button").click()
        wait_for(d, "the metadata error", lambda d: status(d, "add-status")[1].startswith("Metadata is not valid JSON"))

        fill(d, "search-url", "ftp://example.org/a.jpg")
        d.find_element("css selector", "#search-url-form button").click()
        wait_for(d, "the url error", lambda d: status(d, "search-status")[0] == "status error")
        assert status(d, "search-status")[1] == "url: URL scheme must be http or https (value_error.url.scheme)"

        fill(d, "compare-a", f"{images}/not-an-image")
        fill(d, "compare-b", f"{images}/img/{uniq}.jpg")
        d.find_element("css selector", "#compare-form button").click()
        wait_for(d, "the compare error", lambda d: "(not_an_image)" in status(d, "compare-status")[1])
        assert console_errors(d) == []

    await asyncio.to_thread(scenario, driver)


async def test_compare_and_text_search(driver: Any, service: Service, images: str, uniq: str) -> None:
    red, blue = f"{images}/colour/250,10,10?u={uniq}", f"{images}/colour/10,10,250?u={uniq}"
    for url in (red, blue):
        await add(service, "thumb_text", url, {"colour": url.split("/")[-1][:9]})

    def scenario(d: Any) -> None:
        open_page(d, service.url, "thumb_grid")
        fill(d, "compare-a", f"{images}/img/{uniq}/a.jpg")
        fill(d, "compare-b", f"{images}/img/{uniq}/a.jpg?size=800x600")
        d.find_element("css selector", "#compare-form button").click()
        wait_for(d, "the score", lambda d: status(d, "compare-status")[0] == "status ok")
        text = status(d, "compare-status")[1]
        assert text.startswith("Similarity ") and text.endswith(" / 100") and float(text.split()[1]) > 98, text

        open_page(d, service.url, "thumb_text")
        assert d.find_element("id", "search-text-form").is_displayed()
        for word, want in (("red", red), ("Blue", blue)):
            fill(d, "search-text", word)
            d.find_element("css selector", "#search-text-form button").click()
            # other tests store the same plain colours: equal vectors tie, and an HNSW index orders ties as it
            # likes, so the first hit is this colour, not necessarily this test's url
            colour = want.split("?")[0]
            wait_for(d, f"{word} first", lambda d, colour=colour: bool(hits(d)) and hits(d)[0]["url"].startswith(colour))

    await asyncio.to_thread(scenario, driver)


async def test_usable_on_a_phone(driver: Any, service: Service, images: str, uniq: str) -> None:
    for i in range(4):
        await add(service, "thumb_grid", f"{images}/img/{uniq}/{i}.jpg", {"title": f"phone {i}"})

    def scenario(d: Any) -> None:
        d.set_window_size(390, 844)
        try:
            open_page(d, service.url, "thumb_grid")
            fill(d, "search-url", f"{images}/img/{uniq}/0.jpg")
            d.find_element("css selector", "#search-url-form button").click()
            wait_for(d, "results", first_hit_is(f"{images}/img/{uniq}/0.jpg"))
            width = d.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
            assert width[0] <= width[1], f"the page scrolls sideways on a phone: {width}"
            columns = d.execute_script(
                "return getComputedStyle(document.getElementById('results')).gridTemplateColumns.split(' ').length")
            assert columns == 2
            # this test's own pictures (other tests' stored urls may be slow, redirects or deliberately odd)
            mine = f"{images}/img/{uniq}/"
            assert any(h["url"].startswith(mine) for h in hits(d))
            # a phone shows a few rows at a time: scroll to each thumbnail not loaded yet, as its user would
            wait_for(d, "thumbnails", thumbnails_loaded(mine, scroll=True))
            ARTIFACTS.mkdir(exist_ok=True)
            d.save_screenshot(str(ARTIFACTS / "page-phone.png"))
        finally:
            d.set_window_size(1280, 1000)

    await asyncio.to_thread(scenario, driver)


async def test_docs_render_locally(driver: Any, service: Service) -> None:
    async with service.http.get(service.url + "/openapi.json") as resp:
        doc = await resp.json()
    operations = sum(len(ops) for ops in doc["paths"].values())

    def scenario(d: Any) -> None:
        d.get(service.url + "/docs")
        wait_for(d, "Swagger UI", lambda d: len(d.find_elements("css selector", ".opblock")) == operations)
        assert "Idios" in d.find_element("css selector", ".info .title").text
        paths = {e.text.replace("\u200b", "") for e in d.find_elements("css selector", ".opblock-summary-path")}
        assert "/models/{model}/search" in paths
        ARTIFACTS.mkdir(exist_ok=True)
        d.save_screenshot(str(ARTIFACTS / "docs.png"))
        assert foreign_resources(d, service.url) == []
        assert console_errors(d) == []

    await asyncio.to_thread(scenario, driver)
