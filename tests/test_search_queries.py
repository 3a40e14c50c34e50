"""search's `queries`: a weighted mix of stored urls, image urls, texts and an upload, in both deployments
(issue #17, weighted multi-queries)."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import aiohttp
import numpy as np
import pytest

from tests.conftest import Service
from tests.imagekit import jpeg

DIM = 192  # thumb_grid


def b64(v: np.ndarray) -> str:
    return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()


async def post(svc: Service, path: str, body: Any, model: str = "thumb_grid") -> tuple[int, Any]:
    async with svc.http.post(f"{svc.model(model)}{path}", json=body) as resp:
        return resp.status, await resp.json() if resp.status != 204 else None


@pytest.fixture(scope="module")
async def rows(service: Service) -> tuple[str, dict[str, np.ndarray]]:
    """24 stored unit vectors under a scope of their own: name -> vector."""
    scope = uuid.uuid4().hex[:12]
    rng = np.random.default_rng(41)
    vectors = {f"http://queries.test/{scope}/{i}.jpg": v / np.linalg.norm(v)
               for i, v in enumerate(rng.standard_normal((24, DIM)))}
    body = [{"url": u, "metadata": {"scope": scope}, "embedding": b64(v)} for u, v in vectors.items()]
    assert (await post(service, "/restore", body))[0] == 204
    return scope, vectors


async def test_the_query_is_the_normalised_weighted_sum_of_unit_vectors(
        service: Service, rows: tuple[str, dict[str, np.ndarray]]) -> None:
    scope, vectors = rows
    a, b, c = list(vectors)[:3]
    parts = [{"url": a, "indexed": True, "weight": 1}, {"url": b, "indexed": True, "weight": 0.5},
             {"url": c, "indexed": True, "weight": -0.75}]
    status, hits = await post(service, "/search", {"queries": parts, "limit": 24, "filter": {"scope": scope}})
    assert status == 200, hits
    q = vectors[a] + 0.5 * vectors[b] - 0.75 * vectors[c]
    q /= np.linalg.norm(q)
    expected = sorted(((100 * float(q @ v), u) for u, v in vectors.items()), reverse=True)
    alike = [(u, s) for s, u in expected if s > 1]  # below that, similarity is clamped at 0 and ties
    assert len(alike) >= 8 and len(hits) == 24
    assert [h["url"] for h in hits[: len(alike)]] == [u for u, _ in alike]
    assert [h["similarity"] for h in hits[: len(alike)]] == pytest.approx([s for _, s in alike], abs=2e-3)
    assert hits[0]["url"] == a and c not in [h["url"] for h in hits[:12]], "less like c: c sinks"
    # weights scale together: doubling all of them asks the same
    doubled = [{**p, "weight": 2 * p["weight"]} for p in parts]
    status, again = await post(service, "/search", {"queries": doubled, "limit": 24, "filter": {"scope": scope}})
    assert [h["url"] for h in again] == [h["url"] for h in hits]


async def test_each_kind_of_part_asks_what_its_single_search_asks(service: Service, images: str) -> None:
    """A part alone (any weight > 0) is its single search: an image url, a text, an upload."""
    url = f"{images}/img/queries-{uuid.uuid4().hex[:8]}.jpg"
    assert (await post(service, "/add", {"url": url}, "thumb_text"))[0] == 204
    for single, part in (({"url": url}, {"url": url, "weight": 3}), ({"text": "red"}, {"text": "red", "weight": 0.2}),
                         ({"url": url, "indexed": True}, {"url": url, "indexed": True}),
                         ({"url": url, "indexed": True}, {"indexed": url, "weight": 0.7})):
        _, one = await post(service, "/search", {**single, "limit": 5}, "thumb_text")
        _, mixed = await post(service, "/search", {"queries": [part], "limit": 5}, "thumb_text")
        assert [h["url"] for h in mixed] == [h["url"] for h in one], (single, part)
        assert [h["similarity"] for h in mixed] == pytest.approx([h["similarity"] for h in one], abs=2e-3)
    picture = jpeg("queries-upload")
    answers = []
    for fields in ({}, {"queries": json.dumps([{"image": True, "weight": 1.5}])}):
        form = aiohttp.FormData()
        form.add_field("image", picture, filename="q.jpg", content_type="image/jpeg")
        form.add_field("limit", "5")
        for k, v in fields.items():
            form.add_field(k, v)
        async with service.http.post(service.model("thumb_text") + "/search", data=form) as resp:
            assert resp.status == 200, await resp.text()
            answers.append(await resp.json())
    assert answers[0] and [h["url"] for h in answers[0]] == [h["url"] for h in answers[1]]
    assert [h["similarity"] for h in answers[0]] == pytest.approx([h["similarity"] for h in answers[1]], abs=2e-3)


async def test_bad_queries_are_refused_clearly(service: Service, images: str,
                                               rows: tuple[str, dict[str, np.ndarray]]) -> None:
    scope, vectors = rows
    a = next(iter(vectors))
    not_an_image = f"{images}/not-an-image"
    cases: list[tuple[str, Any, int, str, list[Any] | None]] = [
        ("thumb_grid", {"queries": [{"url": a, "indexed": True}, {"url": a, "indexed": True, "weight": -1}]},
         422, "value_error", ["body", "queries"]),
        ("thumb_grid", {"queries": [{"url": a, "text": "x"}]}, 422, "value_error.query_part", ["body", "queries", 0]),
        ("thumb_grid", {"queries": [{"weight": 1}]}, 422, "value_error.query_part", ["body", "queries", 0]),
        ("thumb_grid", {"queries": [{"text": "x", "indexed": True}]}, 422, "value_error.query_part",
         ["body", "queries", 0]),
        ("thumb_grid", {"url": a, "queries": [{"url": a}]}, 422, "value_error.queries", ["body"]),
        ("thumb_grid", {"queries": []}, 422, "too_short", ["body", "queries"]),
        ("thumb_grid", {"queries": [{"url": a, "indexed": True}] * 11}, 422, "too_long", ["body", "queries"]),
        ("thumb_grid", {"queries": [{"url": a, "indexed": True, "weight": 101}]}, 422, "less_than_equal",
         ["body", "queries", 0, "weight"]),
        ("thumb_grid", {"queries": [{"image": True}]}, 422, "value_error", ["body", "queries", 0, "image"]),
        ("thumb_grid", {"queries": [{"upload": True}]}, 422, "extra_forbidden", ["body", "queries", 0, "upload"]),
        ("thumb_grid", {"queries": [{"indexed": a, "url": a}]}, 422, "value_error.query_part", ["body", "queries", 0]),
        ("thumb_grid", {"queries": [{"indexed": "ftp://x/a.jpg"}]}, 422, "value_error.url.scheme",
         ["body", "queries", 0, "indexed"]),
        ("thumb_grid", {"queries": [{"indexed": 1}]}, 422, "value_error.indexed", ["body", "queries", 0, "indexed"]),
        ("thumb_grid", {"queries": [{"indexed": a + "x"}]}, 404, "not_found", None),
        ("thumb_grid", {"queries": [{"indexed": a}, {"url": not_an_image, "weight": 2}]}, 422, "not_an_image",
         ["body", "queries", 1, "url"]),
        ("thumb_grid", {"queries": [{"url": a, "indexed": True}, {"text": "red"}]}, 422, "text_not_supported",
         ["body", "queries", 1, "text"]),
        ("thumb_grid", {"queries": [{"url": a + "x", "indexed": True}]}, 404, "not_found", None),
    ]
    for model, body, status, kind, loc in cases:
        got, answer = await post(service, "/search", body, model)
        assert got == status, (body, answer)
        if loc is None:
            assert answer["type"] == kind, answer
        else:
            assert answer["detail"][0]["type"] == kind and answer["detail"][0]["loc"] == loc, (body, answer)


async def test_a_batch_answers_each_body_as_its_own_search_would(
        service: Service, images: str, rows: tuple[str, dict[str, np.ndarray]]) -> None:
    scope, vectors = rows
    urls = list(vectors)
    bodies: list[dict[str, Any]] = [
        {"url": urls[0], "indexed": True, "limit": 5, "filter": {"scope": scope}},
        {"url": urls[1], "indexed": True, "limit": 5, "filter": {"scope": scope}},
        {"url": urls[2], "indexed": True, "limit": 3, "offset": 2, "filter": {"scope": scope}},
        {"url": urls[3], "indexed": True, "limit": 24, "min_similarity": 5, "filter": {"scope": scope}},
        {"queries": [{"url": urls[4], "indexed": True}, {"url": urls[5], "indexed": True, "weight": -0.5}],
         "limit": 4, "filter": {"scope": scope}},
        {"url": urls[6], "indexed": True, "limit": 4, "filter": {"scope": scope, "not": {"missing": 1}}},
        {"url": f"{images}/img/queries-batch.jpg", "limit": 2},
        {"url": urls[0], "indexed": True, "limit": 5, "filter": {"scope": scope}},
    ]
    status, batch = await post(service, "/search_batch", bodies)
    assert status == 200 and len(batch) == len(bodies), batch
    for body, hits in zip(bodies, batch, strict=True):
        _, single = await post(service, "/search", body)
        assert [h["url"] for h in hits] == [h["url"] for h in single], body
        assert [h["similarity"] for h in hits] == pytest.approx([h["similarity"] for h in single], abs=1e-4)
    assert batch[0] == batch[7] and batch[0][0]["url"] == urls[0] and len(batch[2]) == 3


async def test_a_bad_body_fails_the_batch_naming_it(service: Service, images: str,
                                                    rows: tuple[str, dict[str, np.ndarray]]) -> None:
    scope, vectors = rows
    good = {"url": next(iter(vectors)), "indexed": True}
    not_an_image = f"{images}/not-an-image"
    cases: list[tuple[Any, int, str, list[Any] | int | None]] = [
        ([good, {"url": good["url"], "indexed": True, "limit": 0}], 422, "greater_than_equal", ["body", 1, "limit"]),
        ([good, {"indexed": True}], 422, "value_error", ["body", 1, "url"]),
        ([good, good, {"limit": 3}], 422, "value_error", ["body", 2]),
        ([good, {**good, "filter": {"k": {"gtx": 1}}}], 422, "value_error", ["body", 1, "filter", "k", "gtx"]),
        ([good, {"text": "red"}], 422, "text_not_supported", ["body", 1, "text"]),
        ([good, {"queries": [{"text": "red"}]}], 422, "text_not_supported", ["body", 1, "queries", 0, "text"]),
        ([good, {"url": not_an_image}], 422, "not_an_image", ["body", 1, "url"]),
        ([good, {"queries": [good, {"url": not_an_image}]}], 422, "not_an_image",
         ["body", 1, "queries", 1, "url"]),
        ([{"url": good["url"] + "x", "indexed": True}], 404, "not_found", None),
        ([good, {"queries": [{"indexed": good["url"] + "x"}]}], 404, "not_found", 1),
        ([], 422, "list_type", ["body"]),
        ([good] * 101, 422, "list_type", ["body"]),
        (good, 422, "list_type", ["body"]),
    ]
    for body, status, kind, loc in cases:
        got, answer = await post(service, "/search_batch", body)
        assert got == status, (body, answer)
        if loc is None or isinstance(loc, int):  # a 404: its body's index (0 unless given)
            assert answer["type"] == kind and answer["index"] == (loc or 0), answer
        else:
            assert answer["detail"][0]["type"] == kind and answer["detail"][0]["loc"] == loc, (body, answer)


async def test_group_by_answers_the_best_hits_of_each_value(service: Service) -> None:
    """30 rows in 6 manifests of 5 (one manifest nested under a key of its own), plus 3 rows without the key:
    groups come in the order of their best hit, each with its group_size best hits; a row without the key is a
    group of its own. Held against the same collapse done here over the whole ranking."""
    scope = uuid.uuid4().hex[:12]
    rng = np.random.default_rng(5)
    query = rng.standard_normal(DIM)
    vectors, metadata = {}, {}
    for i in range(33):
        url = f"http://groups.test/{scope}/{i:02d}.jpg"
        v = query + 1.2 * rng.standard_normal(DIM)
        vectors[url] = v / np.linalg.norm(v)
        metadata[url] = {"scope": scope, **({"doc": {"m": f"manifest-{i % 6}"}} if i < 30 else {})}
    query_url = f"http://groups.test/{scope}/query.jpg"
    body = [{"url": u, "metadata": metadata[u], "embedding": b64(v)} for u, v in vectors.items()]
    body.append({"url": query_url, "metadata": {"other": scope}, "embedding": b64(query / np.linalg.norm(query))})
    assert (await post(service, "/restore", body))[0] == 204
    q = query / np.linalg.norm(query)
    ranked = sorted(vectors, key=lambda u: (-float(q @ vectors[u]), u))

    def expected(size: int) -> list[list[str]]:
        groups: dict[str, list[str]] = {}
        for u in ranked:
            members = groups.setdefault(metadata[u].get("doc", {}).get("m", u), [])
            if len(members) < size:
                members.append(u)
        return list(groups.values())

    ask = {"url": query_url, "indexed": True, "filter": {"scope": scope}, "group_by": "doc.m"}
    for size, limit, offset in ((1, 9, 0), (2, 4, 0), (3, 3, 2), (5, 20, 0)):
        status, hits = await post(service, "/search", {**ask, "group_size": size, "limit": limit, "offset": offset})
        assert status == 200, hits
        assert [h["url"] for h in hits] == [u for g in expected(size)[offset:offset + limit] for u in g], (size, limit)
    status, batch = await post(service, "/search_batch", [{**ask, "limit": 3}, {**ask, "limit": 3, "group_size": 2}])
    assert status == 200 and [[h["url"] for h in hits] for hits in batch] == \
        [[g[0] for g in expected(1)[:3]], [u for g in expected(2)[:3] for u in g]]
    assert (await post(service, "/search", {**ask, "group_by": "a b"}))[0] == 422
    status, answer = await post(service, "/search", {**ask, "limit": 1000, "group_size": 20})
    assert status == 422 and answer["detail"][0]["type"] == "value_error.offset", answer
