"""The built-in page's Duplicates view in headless Chromium: start a job, follow it, page through its groups and
cancel it, over both deployments (tests/test_page.py drives the rest of the page)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from tests.conftest import Service, make_settings, running_service
from tests.imagekit import encode, jpeg, picture
from tests.test_page import (  # noqa: F401  (driver: the module's browser, a fixture)
    ARTIFACTS,
    add,
    api_get,
    status,
    console_errors,
    driver,
    fill,
    foreign_resources,
    open_page,
    thumbnails_loaded,
    wait_for,
)

# rows of the job the cancel test stops: enough that it still runs when the page cancels it (~30 s of work)
CANCEL_ROWS = 20_000
SERVER_CANCEL_ROWS = 4_000


GROUPS_JS = """return [...document.querySelectorAll('#dup-groups .group')].map(li => ({
  urls: [...li.querySelectorAll('.strip li')].map(t => t.querySelector('.url').title),
  names: [...li.querySelectorAll('.strip li')].map(t => t.querySelector('.url').textContent),
  links: [...li.querySelectorAll('.strip a.thumb')].map(a => a.href),
  loaded: [...li.querySelectorAll('.strip img')].every(i => i.complete && i.naturalWidth > 0),
  similarity: parseFloat(li.querySelector('.similarity').textContent.replace('≥', '')),
  size: parseInt(li.querySelector('.size').textContent),
  exact: !!li.querySelector('.badge'),
}));"""


def groups(d: Any) -> list[dict[str, Any]]:
    return d.execute_script(GROUPS_JS)


def job_state(d: Any) -> dict[str, str]:
    """The duplicates view's job box: its data- attributes (job, state, done, total) and its text."""
    return d.execute_script("const b = document.getElementById('dup-job'); "
                            "return b.hidden ? {} : {...b.dataset, text: b.textContent.trim()}")


def job_is(state: str, job: str | None = None) -> Callable[[Any], bool]:
    return lambda d: job_state(d).get("state") == state and (job is None or job_state(d).get("job") == job)


def latest_job_shown(d: Any, service: Service, model: str) -> str | None:
    """Wait until the view shows the model's latest job (it loads it when the page opens); return its id."""
    jobs = api_get(f"{service.url}/jobs?model={model}")
    if not jobs:
        return None
    wait_for(d, "the latest job", lambda d: job_state(d).get("job") == jobs[0]["job"])
    return str(jobs[0]["job"])


def start_job(d: Any, before: str | None) -> dict[str, str]:
    """Click "Find duplicates" and wait until the view shows the job it started (not the one shown `before`)."""
    d.find_element("id", "dup-start").click()
    wait_for(d, "the new job", lambda d: job_state(d).get("job") not in (None, before))
    return job_state(d)


def ended(d: Any) -> dict[str, str]:
    """The job box once the job it shows is no longer running."""
    wait_for(d, "the job to end", lambda d: job_state(d).get("state") in ("done", "failed", "cancelled"))
    return job_state(d)


async def upload(svc: Service, model: str, url: str, data: bytes, metadata: dict[str, Any]) -> None:
    """Store `data` (not what `url` serves) under the id `url`."""
    form = aiohttp.FormData()
    form.add_field("url", url)
    form.add_field("image", data, filename="copy.jpg", content_type="image/jpeg")
    form.add_field("metadata", json.dumps(metadata))
    async with svc.http.post(f"{svc.model(model)}/add", data=form) as resp:
        assert resp.status == 204, await resp.text()


async def test_duplicates_view(driver: Any, service: Service, images: str, uniq: str) -> None:
    base = f"{images}/img/{uniq}"
    tag = {"dups": uniq}  # the job runs under this filter: other tests' rows of thumb_grid stay out of it
    # a fixed picture whose 95% crop is alike (98.5 for thumb_grid) but not a copy (its pHash is 6 bits away);
    # the crop is stored from its bytes, so its thumbnail shows the uncropped picture its id points to
    cropped = f"{images}/img/cropped/g.jpg?u={uniq}"
    whole = picture("cropped/g.jpg")
    w, h = whole.size
    crop = encode(whole.crop((w * 5 // 200, h * 5 // 200, w - w * 5 // 200, h - h * 5 // 200)), "JPEG", quality=90)
    want = [  # largest first, then most alike (the two pairs of copies may tie)
        {f"{base}/a.jpg", f"{base}/a.jpg?size=800x600", f"{base}/a.jpg?size=1024x768", f"{base}/a.jpg?q=60"},
        {f"{base}/b.jpg", f"{base}/b.jpg?copy=1"},  # the same bytes twice
        {f"{base}/c.png", f"{base}/c.png?size=900x675"},
        {cropped, cropped + "&crop=95"},
    ]
    uploaded = {f"{base}/a.jpg?q=60": jpeg(f"{uniq}/a.jpg", quality=60), cropped + "&crop=95": crop}
    for url in sorted(set().union(*want) - set(uploaded)) + [f"{base}/d.jpg", f"{base}/e.jpg"]:
        await add(service, "thumb_grid", url, tag)
    for url, data in uploaded.items():
        await upload(service, "thumb_grid", url, data, tag)

    def scenario(d: Any) -> None:
        open_page(d, service.url, "thumb_grid")
        fill(d, "dup-min-similarity", "150")
        d.find_element("id", "dup-start").click()
        wait_for(d, "the range error", lambda d: status(d, "dup-status")[0] == "status error")
        assert "min_similarity" in status(d, "dup-status")[1], status(d, "dup-status")

        fill(d, "dup-min-similarity", "96")
        fill(d, "dup-filter", json.dumps(tag))
        fill(d, "dup-limit", "2")  # two pages
        start_job(d, latest_job_shown(d, service, "thumb_grid"))
        job = ended(d)
        assert job["state"] == "done" and job["done"] == job["total"] == "12", job
        assert job["text"].startswith("Done: 4 groups") and "min. similarity 96" in job["text"], job
        wait_for(d, "the first page of groups", lambda d: len(groups(d)) == 2)
        assert d.find_element("id", "dup-more").is_displayed()
        d.find_element("id", "dup-more").click()
        wait_for(d, "the second page", lambda d: len(groups(d)) == 4)
        assert not d.find_element("id", "dup-more").is_displayed(), "no more groups after the last page"
        shown = groups(d)
        assert [set(g["urls"]) for g in shown] in (want, [want[0], want[2], want[1], want[3]]), shown
        assert sorted(shown[0]["names"]) == ["a.jpg", "a.jpg?q=60", "a.jpg?size=1024x768", "a.jpg?size=800x600"]
        for g in shown:
            assert g["links"] == g["urls"] and g["size"] == len(g["urls"]) and 96 <= g["similarity"] <= 100, g
        answer = api_get(f"{service.url}/jobs/{job['job']}/groups?limit=10")["groups"]
        assert [g["urls"] for g in shown] == [g["urls"] for g in answer]
        assert [g["exact"] for g in shown] == [True, True, True, False], "resizes and re-encodings are copies"
        assert [g["exact"] for g in shown] == [g.get("exact") is True for g in answer]
        assert shown[3]["similarity"] == pytest.approx(answer[3]["similarity"], abs=0.05) and shown[3]["similarity"] < 99.5
        wait_for(d, "the group thumbnails", lambda d: all(g["loaded"] for g in groups(d)))
        section = d.find_element("css selector", "section.duplicates")
        d.execute_script("arguments[0].scrollIntoView()", section)
        ARTIFACTS.mkdir(exist_ok=True)
        section.screenshot(str(ARTIFACTS / "duplicates.png"))

        d.set_window_size(390, 844)
        try:
            d.execute_script("arguments[0].scrollIntoView()", section)
            width = d.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
            assert width[0] <= width[1], f"the duplicates view scrolls the page sideways on a phone: {width}"
            d.save_screenshot(str(ARTIFACTS / "duplicates-phone.png"))
        finally:
            d.set_window_size(1280, 1000)

        # after a reload the view finds the model's latest job by itself
        open_page(d, service.url, "thumb_grid")
        wait_for(d, "the latest job", job_is("done", job["job"]))
        wait_for(d, "its groups", lambda d: len(groups(d)) == 4)  # the page size is back to its default, 20
        assert not d.find_element("id", "dup-more").is_displayed()
        assert foreign_resources(d, service.url) == []
        assert console_errors(d) == []

    await asyncio.to_thread(scenario, driver)


async def test_duplicates_job_cancelled_from_the_page(driver: Any, tmp_path: Path, models_dir: Path,
                                                      uniq: str) -> None:
    """On a service of its own, so that its rows stay out of the shared collections (a dump of 20,000 more rows
    cost the script tests minutes), and with its vectors range-searched (IDIOS_DEDUP_MEMORY_MB=0: Milvus Lite's
    range search examines ~600 rows/s here) so that the job still runs when the page cancels it."""
    async with running_service(make_settings(tmp_path, models_dir, dedup_memory_mb=0)) as service:
        await cancel_from_the_page(driver, service, uniq, CANCEL_ROWS)


async def test_duplicates_job_cancelled_from_the_page_on_a_milvus_server(driver: Any, service: Service,
                                                                          uniq: str) -> None:
    """The same in the distributed deployment (API + workers over RabbitMQ, Milvus 2.3.5 server), whose range
    search examines a few hundred rows a second here: SERVER_CANCEL_ROWS keep the job running long enough."""
    if service.backend.store.is_milvus_lite:
        pytest.skip("the embedded deployment's run is test_duplicates_job_cancelled_from_the_page")
    await cancel_from_the_page(driver, service, uniq, SERVER_CANCEL_ROWS)


async def cancel_from_the_page(driver: Any, service: Service, uniq: str, count: int) -> None:
    tag = {"bulk": uniq}
    rng = np.random.default_rng(7)
    for start in range(0, count, 500):  # random directions: no duplicates, only rows to examine
        rows = [{"url": f"http://bulk.test/{uniq}/{i:06d}", "metadata": tag,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()}
                for i, v in enumerate(rng.standard_normal((500, 192), dtype=np.float32), start)]
        async with service.http.post(f"{service.model('thumb_grid')}/restore", json=rows) as resp:
            assert resp.status == 204, await resp.text()

    def scenario(d: Any) -> None:
        open_page(d, service.url, "thumb_grid")
        fill(d, "dup-filter", json.dumps(tag))
        job = start_job(d, latest_job_shown(d, service, "thumb_grid"))
        assert job["state"] == "running", f"the job ended before the page could cancel it (CANCEL_ROWS): {job}"
        assert job["total"] == str(count) and job["text"].startswith("Running: "), job
        assert not d.find_element("id", "dup-start").is_enabled(), "one job per model: start waits"
        d.find_element("id", "dup-cancel").click()
        job = ended(d)
        assert job["state"] == "cancelled" and job["text"].startswith("Cancelled after "), job
        assert not d.find_element("id", "dup-cancel").is_displayed()
        assert d.find_element("id", "dup-start").is_enabled()
        assert api_get(f"{service.url}/jobs/{job['job']}")["state"] == "cancelled"
        assert groups(d) == [] and not d.find_element("id", "dup-more").is_displayed()
        ARTIFACTS.mkdir(exist_ok=True)
        section = d.find_element("css selector", "section.duplicates")
        d.execute_script("arguments[0].scrollIntoView()", section)
        section.screenshot(str(ARTIFACTS / "duplicates-cancelled.png"))
        open_page(d, service.url, "thumb_grid")  # the latest job of the model, after a reload: this one
        wait_for(d, "the cancelled job", job_is("cancelled", job["job"]))
        assert console_errors(d) == []

    await asyncio.to_thread(scenario, driver)

