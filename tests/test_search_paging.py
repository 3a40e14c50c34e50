"""search's `offset`: pages concatenate exactly to the unpaged answer, ties in similarity ordered by url, in both
deployments (issue #17, paging)."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from tests.conftest import Service

DIM = 192  # thumb_grid


async def post(svc: Service, path: str, body: Any) -> tuple[int, Any]:
    async with svc.http.post(f"{svc.model('thumb_grid')}{path}", json=body) as resp:
        return resp.status, await resp.json() if resp.status != 204 else None


def unit(v: np.ndarray) -> str:
    v = (v / np.linalg.norm(v)).astype("<f4")
    return base64.b64encode(v.tobytes()).decode()


async def test_pages_concatenate_to_the_unpaged_answer(service: Service, uniq: str) -> None:
    """8 groups of 5 rows with one vector each (5-way ties), each group less like the query than the one
    before, stored in an order unlike the url order: every page of 7 comes out as its slice of the whole."""
    rng = np.random.default_rng(17)
    query, away = rng.standard_normal(DIM), rng.standard_normal(DIM)
    tag = {"paging": uniq}
    rows = []
    for g in range(8):
        vector = unit(query + 0.15 * g * away)
        for k in (3, 0, 4, 1, 2):
            rows.append({"url": f"http://paging.test/{uniq}/g{g}-{k}.jpg", "metadata": tag, "embedding": vector})
    rows.append({"url": f"http://paging.test/{uniq}/query.jpg", "metadata": {"other": uniq},
                 "embedding": unit(query)})
    assert (await post(service, "/restore", rows))[0] == 204
    ask = {"url": f"http://paging.test/{uniq}/query.jpg", "indexed": True, "filter": tag}
    status, whole = await post(service, "/search", {**ask, "limit": 40})
    assert status == 200 and len(whole) == 40, whole
    assert [h["url"].rsplit("/", 1)[1] for h in whole] == [f"g{g}-{k}.jpg" for g in range(8) for k in range(5)], \
        "most alike first, ties by url"
    pages = []
    for offset in range(0, 42, 7):
        status, page = await post(service, "/search", {**ask, "limit": 7, "offset": offset})
        assert status == 200 and len(page) == min(7, max(0, 40 - offset)), (offset, page)
        pages += page
    assert [h["url"] for h in pages] == [h["url"] for h in whole]
    assert [h["similarity"] for h in pages] == [h["similarity"] for h in whole]
    # a page that starts inside a tie and ends inside the next one
    status, page = await post(service, "/search", {**ask, "limit": 4, "offset": 3})
    assert [h["url"] for h in page] == [h["url"] for h in whole[3:7]]
    # min_similarity cuts the whole answer, then the page is taken from what is left
    threshold = whole[12]["similarity"] - 1e-6
    status, page = await post(service, "/search", {**ask, "limit": 10, "offset": 5, "min_similarity": threshold})
    assert [h["url"] for h in page] == [h["url"] for h in whole[5:15] if h["similarity"] >= threshold]


async def test_offset_past_what_one_search_answers_is_a_422(service: Service) -> None:
    ask = {"text": "x", "limit": 10}
    for body, where in (({**ask, "offset": 16_380}, "offset + limit must be at most 16384"),
                        ({**ask, "offset": -1}, "greater than or equal to 0")):
        status, got = await post(service, "/search", body)
        assert status == 422 and where in str(got), got
    status, got = await post(service, "/search", {**ask, "offset": 16_380})
    assert got["detail"][0]["type"] == "value_error.offset", got
