"""Every endpoint of the embedded service over real HTTP: real images, real ONNX, real Milvus Lite."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from pymilvus import MilvusClient

from idios.api.restore_body import INLINE_BYTES
from idios.bus import LocalBus
from idios.schema import create_collection
from tests.conftest import Service, make_settings, running_service
from tests.imagekit import jpeg

pytestmark = pytest.mark.timeout(120)


async def post(svc: Service, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
    async with svc.http.post(svc.url + path, json=body, **kw) as resp:
        data = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, data


async def get(svc: Service, path: str) -> tuple[int, Any]:
    async with svc.http.get(svc.url + path) as resp:
        return resp.status, await resp.json()


async def count(svc: Service, model: str = "thumb_grid") -> int:
    status, n = await get(svc, f"/models/{model}/count")
    assert status == 200
    return int(n)


async def test_ping(service: Service) -> None:
    assert await get(service, "/ping") == (200, "pong")
    assert await get(service, "/ping?rpc=1") == (200, "pong")


async def test_add_then_search_finds_it_first(service: Service, images: str, uniq: str) -> None:
    before = await count(service)
    target = f"{images}/img/{uniq}/target.jpg"
    for i in range(3):
        status, _ = await post(service, "/models/thumb_grid/add", {"url": f"{images}/img/{uniq}/other{i}.jpg"})
        assert status == 204
    assert await post(service, "/models/thumb_grid/add", {"url": target, "metadata": {"n": 1}}) == (204, "")
    assert await count(service) == before + 4
    status, hits = await post(service, "/models/thumb_grid/search", {"url": target, "limit": 3})
    assert status == 200
    assert hits[0]["url"] == target and hits[0]["metadata"] == {"n": 1}
    assert hits[0]["similarity"] == pytest.approx(100, abs=0.01)
    assert [h["similarity"] for h in hits] == sorted((h["similarity"] for h in hits), reverse=True)
    assert all(0 <= h["similarity"] <= 100 for h in hits)


async def test_add_is_an_upsert(service: Service, images: str, uniq: str) -> None:
    url = f"{images}/img/{uniq}.jpg"
    await post(service, "/models/thumb_grid/add", {"url": url, "metadata": {"v": 1}})
    before = await count(service)
    assert (await post(service, "/models/thumb_grid/add", {"url": url, "metadata": {"v": 2}}))[0] == 204
    assert await count(service) == before
    _, hits = await post(service, "/models/thumb_grid/search", {"url": url, "indexed": True, "limit": 1})
    assert hits[0]["metadata"] == {"v": 2}


async def test_search_add_conflicts_on_a_stored_url(service: Service, images: str, uniq: str) -> None:
    url = f"{images}/img/{uniq}.jpg"
    assert (await post(service, "/models/thumb_grid/search_add", {"url": url}))[0] == 204
    status, body = await post(service, "/models/thumb_grid/search_add", {"url": url})
    assert status == 409 and body["detail"] == "Image already inserted"


async def test_add_bulk_reports_each_item(service: Service, images: str, uniq: str) -> None:
    stored = f"{images}/img/{uniq}/stored.jpg"
    await post(service, "/models/thumb_grid/add", {"url": stored})
    new = [f"{images}/img/{uniq}/new{i}.jpg" for i in range(5)]
    items = [
        *({"url": u, "metadata": {"i": i}} for i, u in enumerate(new)),
        {"url": new[0]},  # repeated in the same payload: added once
        {"url": stored},
        {"url": f"{images}/missing/{uniq}.jpg"},
        {"url": f"{images}/not-an-image"},
        {"url": f"{images}/colour/1,2,3?size=100x100"},
        {"url": "ftp://example.org/a.jpg"},
        {"nope": 1},
    ]
    before = await count(service)
    status, body = await post(service, "/models/thumb_grid/add_bulk", items)
    assert status == 200
    assert sorted(body["added"]) == sorted(new)
    assert body["found"] == [stored]
    failed = {f["url"]: f for f in body["failed"]}
    assert failed[f"{images}/missing/{uniq}.jpg"]["type"] == "image_http_error"
    assert failed[f"{images}/not-an-image"]["type"] == "not_an_image"
    assert failed[f"{images}/colour/1,2,3?size=100x100"]["type"] == "image_too_small"
    assert failed["ftp://example.org/a.jpg"]["type"] == "validation_error"
    assert failed[None]["type"] == "validation_error"
    assert len(body["failed"]) == 5
    assert all(isinstance(f["error"], str) and f["error"] for f in body["failed"])
    assert await count(service) == before + 5


async def test_restore_stores_unit_vectors(service: Service, uniq: str) -> None:
    """Collections compare by inner product, so rows are stored with length 1: a longer or shorter row keeps its
    direction (its cosines), a row of zeros has none and is refused."""
    prefix = f"http://unit.test/{uniq}/"
    long_row = np.zeros(192, dtype=np.float32)
    long_row[:2] = (3.0, 4.0)  # length 5: stored as (0.6, 0.8, 0, ...)
    tilted = np.zeros(192, dtype=np.float32)
    tilted[:2] = (0.28, 0.96)  # already unit length
    rows = [{"url": prefix + "long", "metadata": {}, "embedding": long_row.tolist()},
            {"url": prefix + "tilted", "metadata": {}, "embedding": tilted.tolist()}]
    assert (await post(service, "/models/thumb_grid/restore", rows))[0] == 204
    _, page = await post(service, "/models/thumb_grid/dump", {"cursor": prefix, "limit": 2})
    got = {r["url"]: np.float32(r["embedding"]) for r in page if r["url"].startswith(prefix)}
    assert np.allclose(got[prefix + "long"][:2], (0.6, 0.8)) and not got[prefix + "long"][2:].any()
    assert np.array_equal(got[prefix + "tilted"], tilted)
    _, hits = await post(service, "/models/thumb_grid/search",
                         {"url": prefix + "long", "indexed": True, "limit": 50})
    mine = {h["url"]: h["similarity"] for h in hits if h["url"].startswith(prefix)}
    assert mine[prefix + "long"] == pytest.approx(100.0, abs=1e-3)
    assert mine[prefix + "tilted"] == pytest.approx(100 * (0.6 * 0.28 + 0.8 * 0.96), abs=1e-3)  # the cosine

    zero = [{"url": prefix + "zero", "metadata": {}, "embedding": [0.0] * 192}]
    status, body = await post(service, "/models/thumb_grid/restore", zero)
    assert status == 422 and body["detail"][0]["loc"] == ["body", 0, "embedding"]
    assert "no direction" in body["detail"][0]["msg"]


async def test_restore_dump_round_trip_is_exact(service: Service, uniq: str) -> None:
    rng = np.random.default_rng(7)
    prefix = f"http://restore.test/{uniq}/"
    rows = []
    for i in range(40):
        v = rng.standard_normal(192).astype(np.float32)
        v /= np.linalg.norm(v)  # as every model stores them, so as every dump holds them
        rows.append({"url": f"{prefix}{i:03d}", "metadata": {"i": i, "s": f"x{i}"}, "embedding": v.tolist()})
    assert (await post(service, "/models/thumb_grid/restore", rows))[0] == 204
    got: list[dict[str, Any]] = []
    cursor = prefix
    while True:
        status, page = await post(service, "/models/thumb_grid/dump", {"cursor": cursor, "limit": 16})
        assert status == 200
        page = [r for r in page if r["url"].startswith(prefix)]
        if not page:
            break
        got.extend(page)
        cursor = page[-1]["url"]
    assert [r["url"] for r in got] == [r["url"] for r in rows]
    for want, have in zip(rows, got, strict=True):
        assert have["metadata"] == want["metadata"]
        assert np.array_equal(np.float32(have["embedding"]), np.float32(want["embedding"]))


def b64(vec: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode()


async def test_base64_embeddings_restore_and_dump_bit_for_bit(service: Service, uniq: str) -> None:
    """encoding_format "base64": restore takes embeddings as base64 of little-endian float32 (mixed with numbers
    in one body, large bodies in the helper process too), and dump gives them back so, the same bits."""
    rng = np.random.default_rng(11)
    prefix = f"http://b64.test/{uniq}/"
    vecs = rng.standard_normal((1500, 192)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    rows = [{"url": f"{prefix}{i:04d}", "metadata": {"i": i}, "embedding": b64(v) if i % 3 else v.tolist()}
            for i, v in enumerate(vecs)]
    for body in (orjson.dumps(rows[:30]), orjson.dumps(rows)):  # in place, then in the helper process
        assert (await post_bytes(service, "/models/thumb_grid/restore", body))[0] == 204
    assert service.backend.restore_bodies.started
    status, page = await post(service, "/models/thumb_grid/dump",
                              {"cursor": prefix, "limit": 1500, "encoding_format": "base64"})
    assert status == 200 and [r["url"] for r in page] == [r["url"] for r in rows]
    assert all(isinstance(r["embedding"], str) for r in page)
    got = np.stack([np.frombuffer(base64.b64decode(r["embedding"]), dtype="<f4") for r in page])
    assert np.array_equal(got, vecs) and [r["metadata"]["i"] for r in page] == list(range(1500))
    async with service.http.get(f"{service.url}/models/thumb_grid/dump",
                                params={"cursor": prefix, "limit": 2, "encoding_format": "base64"}) as resp:
        assert resp.status == 200 and (await resp.json())[1]["embedding"] == b64(vecs[1])
    _, numbers = await post(service, "/models/thumb_grid/dump", {"cursor": prefix, "limit": 2})
    assert np.array_equal(np.float32(numbers[1]["embedding"]), vecs[1])

    def refused(embedding: Any) -> list[dict[str, Any]]:
        return [{"url": prefix + "ok", "embedding": b64(vecs[0])}, {"url": prefix + "bad", "embedding": embedding}]

    for embedding, kind in (("not base64!", "base64_invalid"), (b64(vecs[0])[:-4], "base64_invalid"),
                            (b64(vecs[0][:191]), "value_error.dimension"), ("", "value_error.dimension")):
        status, body = await post(service, "/models/thumb_grid/restore", refused(embedding))
        assert status == 422, embedding
        assert body["detail"][0]["loc"] == ["body", 1, "embedding"] and body["detail"][0]["type"] == kind, body
    status, body = await post(service, "/models/thumb_grid/dump", {"encoding_format": "hex"})
    assert status == 422 and body["detail"][0]["loc"] == ["body", "encoding_format"]
    assert (await post(service, "/models/thumb_grid/urls", {"encoding_format": "base64"}))[0] == 422


async def test_restore_replaces_stored_rows_and_the_last_repeat_wins(service: Service, uniq: str) -> None:
    """Rows already stored are replaced, never doubled, and a url repeated in one body keeps its last row; on
    a Milvus Lite file new urls are inserted and stored ones upserted, so both paths run here."""
    prefix = f"http://replace.test/{uniq}/"

    def row(name: str, hot: int) -> dict[str, Any]:
        return {"url": prefix + name, "metadata": {"hot": hot}, "embedding": [0.0] * hot + [1.0] + [0.0] * (191 - hot)}

    before = await count(service)
    assert (await post(service, "/models/thumb_grid/restore", [row("a", 0), row("b", 1)]))[0] == 204
    body = [row("b", 2), row("c", 3), row("a", 4), row("c", 5), row("d", 6)]
    assert (await post(service, "/models/thumb_grid/restore", body))[0] == 204
    assert await count(service) == before + 4
    _, page = await post(service, "/models/thumb_grid/dump", {"cursor": prefix, "limit": 10})
    mine = {r["url"][len(prefix):]: r for r in page if r["url"].startswith(prefix)}
    assert {k: r["metadata"]["hot"] for k, r in mine.items()} == {"a": 4, "b": 2, "c": 5, "d": 6}
    assert all(int(np.argmax(r["embedding"])) == r["metadata"]["hot"] for r in mine.values())
    _, hits = await post(service, "/models/thumb_grid/search", {"url": prefix + "c", "indexed": True, "limit": 2})
    assert hits[0]["url"] == prefix + "c" and hits[1]["url"] != prefix + "c"


async def test_concurrent_restores_of_the_same_urls_never_double_a_row(service: Service, uniq: str) -> None:
    """Writes run side by side unless they share a url: six bodies over the same 1,500 urls (each body cut into
    several jobs, one url given twice) leave one row per url, and a url's row comes from one whole body."""
    prefix = f"http://race.test/{uniq}/"
    before = await count(service)

    def body(k: int) -> list[dict[str, Any]]:
        vec = [0] * 192  # integers keep the body under aiohttp's 1 MiB warning
        vec[k] = 1
        rows = [{"url": f"{prefix}{i:04d}", "metadata": {"k": k}, "embedding": vec} for i in range(1500)]
        return [{**rows[7], "metadata": {"k": -1}}, *rows]  # url 7 twice: its last row wins

    answers = await asyncio.gather(*(post(service, "/models/thumb_grid/restore", body(k)) for k in range(6)))
    assert [status for status, _ in answers] == [204] * 6
    assert await count(service) == before + 1500
    rows: list[dict[str, Any]] = []
    cursor = prefix
    while page := [r for r in (await post(service, "/models/thumb_grid/dump", {"cursor": cursor, "limit": 500}))[1]
                   if r["url"].startswith(prefix)]:
        rows.extend(page)
        cursor = page[-1]["url"]
    assert len(rows) == 1500 and len({r["url"] for r in rows}) == 1500
    assert all(int(np.argmax(r["embedding"])) == r["metadata"]["k"] >= 0 for r in rows)


async def test_a_large_restore_body_is_parsed_by_the_helper_process(service: Service, uniq: str) -> None:
    """Bodies over 1 MiB are parsed in a helper process (the event loop stays free meanwhile): same rows stored,
    same refusals as a body parsed in place."""
    prefix = f"http://big.test/{uniq}/"
    rng = np.random.default_rng(5)
    vecs = rng.standard_normal((1500, 192)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    rows = [{"url": f"{prefix}{i:04d}", "metadata": {"i": i}, "embedding": v.tolist()} for i, v in enumerate(vecs)]
    body = orjson.dumps(rows)
    assert len(body) > INLINE_BYTES
    before = await count(service)
    status, _ = await post_bytes(service, "/models/thumb_grid/restore", body)
    assert status == 204
    assert service.backend.restore_bodies.started, "the helper process was not used"
    assert await count(service) == before + 1500
    _, page = await post(service, "/models/thumb_grid/dump", {"cursor": prefix, "limit": 3})
    assert [r["url"] for r in page] == [f"{prefix}0000", f"{prefix}0001", f"{prefix}0002"]
    assert np.array_equal(np.float32(page[1]["embedding"]), vecs[1]) and page[1]["metadata"] == {"i": 1}

    rows[1200]["embedding"] = rows[1200]["embedding"][:5]
    status, refused = await post_bytes(service, "/models/thumb_grid/restore", orjson.dumps(rows))
    assert status == 422 and refused["detail"][0]["loc"] == ["body", 1200, "embedding"]
    assert refused["detail"][0]["type"] == "value_error.dimension"
    status, refused = await post_bytes(service, "/models/thumb_grid/restore", orjson.dumps(rows)[:-2])
    assert status == 422 and refused["detail"][0]["type"] == "json_invalid"


async def post_bytes(svc: Service, path: str, body: bytes) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    async with svc.http.post(svc.url + path, data=io.BytesIO(body), headers=headers) as resp:
        return resp.status, await resp.json() if resp.content_type == "application/json" else await resp.text()


async def test_restore_checks_the_dimension(service: Service) -> None:
    status, body = await post(
        service, "/models/thumb_grid/restore", [{"url": "http://dim.test/a", "metadata": {}, "embedding": [0.1] * 5}]
    )
    assert status == 422
    assert body["detail"][0]["loc"] == ["body", 0, "embedding"]
    assert body["detail"][0]["type"] == "value_error.dimension"


async def test_urls_pages_in_order_strictly_after_the_cursor(service: Service, uniq: str) -> None:
    prefix = f"http://page.test/{uniq}/"
    names = [f"{prefix}{i:02d}" for i in range(30)]
    shuffled = list(np.random.default_rng(1).permutation(names))
    rows = [{"url": u, "metadata": {}, "embedding": [1.0] + [0.0] * 191} for u in shuffled]
    assert (await post(service, "/models/thumb_grid/restore", rows))[0] == 204
    seen: list[str] = []
    cursor = prefix
    while True:
        status, page = await post(service, "/models/thumb_grid/urls", {"cursor": cursor, "limit": 7})
        assert status == 200
        assert page == sorted(page) and all(u > cursor for u in page)
        mine = [u for u in page if u.startswith(prefix)]
        seen.extend(mine)
        if len(mine) < len(page) or not page:
            break
        cursor = page[-1]
    assert seen == names
    status, first = await post(service, "/models/thumb_grid/urls", {"cursor": names[10], "limit": 2})
    assert first == names[11:13]
    assert (await post(service, "/models/thumb_grid/urls", {"limit": 0}))[0] == 422
    assert (await post(service, "/models/thumb_grid/urls", {"limit": 16385}))[0] == 422


async def test_remove(service: Service, images: str, uniq: str) -> None:
    url = f"{images}/img/{uniq}.jpg"
    await post(service, "/models/thumb_grid/add", {"url": url})
    before = await count(service)
    assert (await post(service, "/models/thumb_grid/remove", {"url": url}))[0] == 204
    assert await count(service) == before - 1
    status, _ = await post(service, "/models/thumb_grid/search", {"url": url, "indexed": True})
    assert status == 404
    assert (await post(service, "/models/thumb_grid/remove", {"url": url}))[0] == 204


async def test_hostile_url_through_every_route(service: Service, images: str, uniq: str) -> None:
    url = f"{images}/img/{uniq}/it's a \"quote\"\\and\\backslash.jpg".replace(" ", "_")
    meta = {"title": 'say "hi" \\ \' ]) or url != "', "k": uniq}
    assert (await post(service, "/models/thumb_grid/add", {"url": url, "metadata": meta}))[0] == 204
    status, hits = await post(service, "/models/thumb_grid/search", {"url": url, "indexed": True, "limit": 1})
    assert status == 200 and hits[0]["url"] == url and hits[0]["metadata"] == meta
    status, hits = await post(service, "/models/thumb_grid/search", {"url": url, "filter": {"title": meta["title"]}})
    assert [h["url"] for h in hits] == [url]
    _, page = await post(service, "/models/thumb_grid/urls", {"cursor": url[:-1], "limit": 5})
    assert url in page
    _, rows = await post(service, "/models/thumb_grid/dump", {"cursor": url[:-1], "limit": 5})
    assert url in [r["url"] for r in rows]
    assert (await post(service, "/models/thumb_grid/search_add", {"url": url}))[0] == 409
    assert (await post(service, "/models/thumb_grid/remove", {"url": url}))[0] == 204
    _, page = await post(service, "/models/thumb_grid/urls", {"cursor": url[:-1], "limit": 5})
    assert url not in page


async def test_search_filter_and_min_similarity(service: Service, images: str, uniq: str) -> None:
    urls = [f"{images}/img/{uniq}/{i}.jpg" for i in range(4)]
    for i, u in enumerate(urls):
        added = await post(service, "/models/thumb_grid/add", {"url": u, "metadata": {"group": uniq, "odd": i % 2 == 1}})
        assert added[0] == 204, added
    status, hits = await post(
        service, "/models/thumb_grid/search", {"url": urls[0], "filter": {"group": uniq, "odd": True}, "limit": 10}
    )
    assert status == 200 and sorted(h["url"] for h in hits) == [urls[1], urls[3]]
    _, hits = await post(service, "/models/thumb_grid/search", {"url": urls[2], "filter": {"group": [uniq, "zz"]}})
    assert len(hits) == 4 and hits[0]["url"] == urls[2]
    _, hits = await post(service, "/models/thumb_grid/search", {"url": urls[2], "min_similarity": 99.9})
    assert [h["url"] for h in hits] == [urls[2]]
    status, body = await post(service, "/models/thumb_grid/search", {"url": urls[2], "filter": {'a"b': 1}})
    assert status == 422


async def test_text_search(service: Service, images: str, uniq: str) -> None:
    red = f"{images}/colour/250,10,10?u={uniq}"
    blue = f"{images}/colour/10,10,250?u={uniq}"
    for u in (red, blue):
        assert (await post(service, "/models/thumb_text/add", {"url": u}))[0] == 204
    _, hits = await post(service, "/models/thumb_text/search", {"text": "Red", "limit": 1})
    assert hits[0]["url"].startswith(f"{images}/colour/250,10,10")
    _, hits = await post(service, "/models/thumb_text/search", {"text": "blue", "limit": 1})
    assert hits[0]["url"].startswith(f"{images}/colour/10,10,250")
    status, body = await post(service, "/models/thumb_grid/search", {"text": "red"})
    assert status == 422 and body["detail"][0]["type"] == "text_not_supported"
    assert await post(service, "/models/thumb_grid/search", {}) == (
        422, {"detail": "Either 'text' or 'url' must be provided."}
    )


async def test_concurrent_text_searches_share_runs_and_keep_their_own_answers(
    service: Service, images: str, uniq: str
) -> None:
    """Texts of different lengths padded into one run of the text tower each get their own embedding."""
    red = f"{images}/colour/250,10,10?u={uniq}"
    blue = f"{images}/colour/10,10,250?u={uniq}"
    for u in (red, blue):
        assert (await post(service, "/models/thumb_text/add", {"url": u}))[0] == 204
    texts = service.backend.texts["thumb_text"].texts
    batches, items = texts.batches, texts.items
    queries = ["red" if i % 2 else "the blue one over there please" for i in range(24)]
    results = await asyncio.gather(*(post(service, "/models/thumb_text/search", {"text": q, "limit": 1}) for q in queries))
    for q, (status, hits) in zip(queries, results, strict=True):
        want = red if q == "red" else blue
        assert status == 200 and hits[0]["url"].startswith(want.split("?")[0]), (q, hits)
    assert texts.items - items == len(queries)
    assert texts.batches - batches < len(queries) / 2


async def test_compare(service: Service, images: str, uniq: str) -> None:
    a, b = f"{images}/img/{uniq}/a.jpg", f"{images}/img/{uniq}/b.jpg"
    status, same = await post(service, "/models/thumb_grid/compare", {"url": a, "other": a + "?size=800x600"})
    assert status == 200 and same > 98
    _, diff = await post(service, "/models/thumb_grid/compare", {"url": a, "other": b})
    assert 0 <= diff < same
    status, body = await post(service, "/models/thumb_grid/compare", {"url": a})
    assert status == 422 and body["detail"][0]["loc"] == ["body", "other"]


async def test_uploads(service: Service, images: str, uniq: str) -> None:
    import aiohttp

    data = jpeg(f"upload-{uniq}")
    form = aiohttp.FormData()
    form.add_field("url", f"upload://{uniq}")
    form.add_field("image", data, filename="a.jpg", content_type="image/jpeg")
    status, body = await post(service, "/models/thumb_grid/add", data=form)
    assert status == 422 and body["detail"][0]["type"].startswith("value_error.url")
    form = aiohttp.FormData()
    form.add_field("url", f"https://uploads.example/{uniq}.jpg")
    form.add_field("metadata", '{"up": true}')
    form.add_field("image", data, filename="a.jpg", content_type="image/jpeg")
    assert (await post(service, "/models/thumb_grid/add", data=form))[0] == 204
    form = aiohttp.FormData()
    form.add_field("image", data, filename="q.jpg", content_type="image/jpeg")
    form.add_field("limit", "1")
    status, hits = await post(service, "/models/thumb_grid/search", data=form)
    assert status == 200 and hits[0]["url"] == f"https://uploads.example/{uniq}.jpg" and hits[0]["metadata"] == {"up": True}
    form = aiohttp.FormData()
    form.add_field("image", data, filename="q.jpg", content_type="image/jpeg")
    form.add_field("other", f"{images}/img/{uniq}/other.jpg")
    status, score = await post(service, "/models/thumb_grid/compare", data=form)
    assert status == 200 and 0 <= score < 99


async def test_redirect_keeps_the_original_url(service: Service, images: str, uniq: str) -> None:
    url = f"{images}/redirect/{uniq}.jpg"
    assert (await post(service, "/models/thumb_grid/add", {"url": url}))[0] == 204
    _, hits = await post(service, "/models/thumb_grid/search", {"url": f"{images}/img/{uniq}.jpg", "limit": 1})
    assert hits[0]["url"] == url and hits[0]["similarity"] > 99.9


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/missing.jpg", "image_http_error"),
        ("/not-an-image", "not_an_image"),
        ("/colour/9,9,9?size=149x400", "image_too_small"),
    ],
)
async def test_image_problems_are_422_with_a_type(service: Service, images: str, path: str, kind: str) -> None:
    before = await count(service)
    status, body = await post(service, "/models/thumb_grid/add", {"url": images + path})
    assert status == 422
    assert body["detail"][0]["type"] == kind and body["detail"][0]["loc"] == ["body", "url"]
    assert await count(service) == before


async def test_unreachable_host(service: Service) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    status, body = await post(service, "/models/thumb_grid/add", {"url": f"http://127.0.0.1:{port}/a.jpg"})
    assert status == 422 and body["detail"][0]["type"] == "image_unreachable"


async def test_validation_errors(service: Service, images: str) -> None:
    long_url = "http://x.test/" + "a" * 2070
    status, body = await post(service, "/models/thumb_grid/add", {"url": long_url})
    assert status == 422 and body["detail"][0]["loc"] == ["body", "url"] and len(long_url) == 2084
    for bad in ("file:///etc/passwd", "http://", "not a url", "javascript:alert(1)"):
        status, body = await post(service, "/models/thumb_grid/add", {"url": bad})
        assert status == 422 and body["detail"][0]["type"].startswith("value_error.url"), bad
    big = {"k": "x" * 65530}
    status, body = await post(service, "/models/thumb_grid/add", {"url": f"{images}/img/m.jpg", "metadata": big})
    assert status == 422
    assert body["detail"] == [{"loc": ["body", "metadata"], "msg": "metadata json too long (65538 > 65535)",
                               "type": "value_error.metadata_json_too_long"}]
    status, body = await post(service, "/models/thumb_grid/add", {"url": f"{images}/img/m.jpg", "metadata": [1]})
    assert status == 422
    status, body = await post(service, "/models/thumb_grid/add", {"url": f"{images}/img/m.jpg", "colour": "red"})
    assert status == 422 and body["detail"][0]["type"] == "extra_forbidden"
    status, body = await post(service, "/models/thumb_grid/search", {"url": f"{images}/img/m.jpg", "limit": 0})
    assert status == 422 and body["detail"][0]["loc"] == ["body", "limit"]
    async with service.http.post(service.url + "/models/thumb_grid/add", data=b"{nope") as resp:
        assert resp.status == 422 and (await resp.json())["detail"][0]["type"] == "json_invalid"
    status, body = await post(service, "/models/nope/add", {"url": f"{images}/img/m.jpg"})
    assert status == 404 and body["type"] == "model_not_found" and body["models"] == ["thumb_grid", "thumb_text"]
    status, body = await get(service, "/nowhere")
    assert status == 404 and body["type"] == "not_found"


async def test_large_metadata_within_the_limit_is_stored(service: Service, images: str, uniq: str) -> None:
    """The limit counts UTF-8 bytes, as a Milvus server does (it refused 130,008 bytes of 65,004 characters)."""
    meta = {"k": "é" * 32700}  # 65,408 bytes
    url = f"{images}/img/{uniq}.jpg"
    assert (await post(service, "/models/thumb_grid/add", {"url": url, "metadata": meta}))[0] == 204
    status, body = await post(service, "/models/thumb_grid/add", {"url": url, "metadata": {"k": "é" * 32800}})
    assert status == 422 and body["detail"][0]["type"] == "value_error.metadata_json_too_long"
    _, hits = await post(service, "/models/thumb_grid/search", {"url": url, "indexed": True, "limit": 1})
    assert hits[0]["metadata"] == meta


async def test_concurrent_adds_share_model_batches(service: Service, images: str, uniq: str) -> None:
    if not isinstance(service.backend.bus, LocalBus):
        pytest.skip("the worker's batch counters are in another process; tests/test_distributed.py covers batching")
    runtime = service.backend.bus.handler.runtimes["thumb_grid"]
    batches, items = runtime.images.batches, runtime.images.items
    before = await count(service)
    urls = [f"{images}/img/{uniq}/{i}.jpg" for i in range(48)]
    results = await asyncio.gather(*(post(service, "/models/thumb_grid/add", {"url": u}) for u in urls))
    assert [r[0] for r in results] == [204] * len(urls)
    assert await count(service) == before + len(urls)
    ran_batches = runtime.images.batches - batches
    assert runtime.images.items - items == len(urls)
    assert ran_batches < len(urls) / 2, f"{len(urls)} images took {ran_batches} model runs"


async def test_a_collection_made_as_cosine_keeps_working(tmp_path: Path, models_dir: Path, images: str) -> None:
    """Earlier versions made COSINE collections; the service reads the stored metric and searches with it."""
    settings = make_settings(tmp_path, models_dir)
    client = MilvusClient(settings.milvus_target)
    create_collection(client, "idios_thumb_grid", 192, "FLAT", metric="COSINE", phash=False)  # as they made it
    old = np.zeros(192, dtype=np.float32)
    old[:2] = (3.0, 4.0)  # a row stored as it came, not of unit length
    client.insert("idios_thumb_grid", [{"url": "http://old.test/a", "embedding": old, "metadata": {"v": 1}}])
    client.close()
    async with running_service(settings) as svc:
        a, b = f"{images}/img/cosine/a.jpg", f"{images}/img/cosine/b.jpg"
        for url in (a, b):
            assert (await post(svc, "/models/thumb_grid/add", {"url": url}))[0] == 204
        status, hits = await post(svc, "/models/thumb_grid/search", {"url": a, "indexed": True, "limit": 3})
        assert status == 200 and hits[0]["url"] == a and hits[0]["similarity"] == pytest.approx(100, abs=1e-3)
        _, hits = await post(svc, "/models/thumb_grid/search", {"url": "http://old.test/a", "indexed": True})
        assert hits[0]["url"] == "http://old.test/a" and hits[0]["similarity"] == pytest.approx(100, abs=1e-3)
    client = MilvusClient(settings.milvus_target)
    try:
        assert client.describe_index("idios_thumb_grid", "embedding")["metric_type"] == "COSINE"
    finally:
        client.close()


async def test_text_search_can_be_turned_off(tmp_path: Path, models_dir: Path, images: str) -> None:
    """IDIOS_TEXT_SEARCH=false: no text tower is loaded (an image-only deployment saves its memory); /models
    says so, the page hides its text form from that, a text search is a 422, and image search still works."""
    async with running_service(make_settings(tmp_path, models_dir, text_search=False)) as svc:
        assert svc.backend.texts == {}
        async with svc.http.get(f"{svc.url}/models") as resp:
            assert {m["name"]: m["text"] for m in await resp.json()} == {"thumb_grid": False, "thumb_text": False}
        status, body = await post(svc, "/models/thumb_text/search", {"text": "red"})
        assert status == 422 and body["detail"][0]["type"] == "text_not_supported"
        assert "IDIOS_TEXT_SEARCH" in body["detail"][0]["msg"]
        url = f"{images}/img/textless/a.jpg"
        assert (await post(svc, "/models/thumb_text/add", {"url": url}))[0] == 204
        status, hits = await post(svc, "/models/thumb_text/search", {"url": url, "limit": 1})
        assert status == 200 and hits[0]["url"] == url
    async with running_service(make_settings(tmp_path / "on", models_dir)) as svc:
        async with svc.http.get(f"{svc.url}/models") as resp:
            assert {m["name"]: m["text"] for m in await resp.json()} == {"thumb_grid": False, "thumb_text": True}
