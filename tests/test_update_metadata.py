"""update_metadata: metadata edits without re-embedding, one or many, replace or merge, in both deployments
(issue #17, metadata edits)."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import numpy as np

from idios.limits import METADATA_MAX
from idios.writer import merge_patch
from tests.conftest import Service

DIM = 192  # thumb_grid


def unit(seed: int) -> str:
    v = np.random.default_rng(seed).standard_normal(DIM)
    return base64.b64encode((v / np.linalg.norm(v)).astype("<f4").tobytes()).decode()


async def post(svc: Service, path: str, body: Any) -> tuple[int, Any]:
    async with svc.http.post(f"{svc.model('thumb_grid')}{path}", json=body) as resp:
        return resp.status, await resp.json() if resp.status != 204 else None


async def rows(svc: Service, urls: list[str]) -> dict[str, dict[str, Any]]:
    """The stored rows of `urls`, as dump answers them (the urls share a prefix that nothing else has)."""
    prefix = min(urls).rsplit("/", 1)[0] + "/"
    status, page = await post(svc, "/dump", {"cursor": prefix, "limit": 100})
    assert status == 200, page
    return {r["url"]: r for r in page if r["url"] in urls}


def test_merge_patch_follows_rfc_7396() -> None:
    """RFC 7396's own examples (its appendix A), a few of them."""
    assert merge_patch({"a": "b"}, {"a": "c"}) == {"a": "c"}
    assert merge_patch({"a": "b"}, {"b": "c"}) == {"a": "b", "b": "c"}
    assert merge_patch({"a": "b"}, {"a": None}) == {}
    assert merge_patch({"a": "b", "b": "c"}, {"a": None}) == {"b": "c"}
    assert merge_patch({"a": ["b"]}, {"a": "c"}) == {"a": "c"}
    assert merge_patch({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}) == {"a": {"b": "d"}}
    assert merge_patch({"a": [{"b": "c"}]}, {"a": [1]}) == {"a": [1]}
    assert merge_patch({}, {"a": {"bb": {"ccc": None}}}) == {"a": {"bb": {}}}
    assert merge_patch({"e": None}, {"a": 1}) == {"e": None, "a": 1}


async def test_edits_replace_or_merge_and_keep_vector_and_phash(service: Service, uniq: str) -> None:
    # restored rows at a host that does not exist: an edit that fetched their images could not succeed
    base = f"http://edits.invalid/{uniq}"
    urls = [f"{base}/a.jpg", f"{base}/it's_\"b\".jpg", f"{base}/c.jpg"]
    stored = [{"url": urls[0], "metadata": {"title": "A", "n": {"x": 1, "y": 2}, "tags": ["p"]},
               "embedding": unit(1), "phash": "8f373714acfcf4d0"},
              {"url": urls[1], "metadata": {"title": "B"}, "embedding": unit(2)},
              {"url": urls[2], "metadata": {"title": "C"}, "embedding": unit(3)}]
    restored = await post(service, "/restore", stored)
    assert restored[0] == 204, restored
    before = await rows(service, urls)

    assert (await post(service, "/update_metadata", {"url": urls[0], "merge": True,
                                                     "metadata": {"n": {"y": None, "z": 3}, "year": 1901}}))[0] == 204
    assert (await post(service, "/update_metadata", {"url": urls[1], "metadata": {"only": True}}))[0] == 204
    after = await rows(service, urls)
    assert after[urls[0]]["metadata"] == {"title": "A", "n": {"x": 1, "z": 3}, "tags": ["p"], "year": 1901}
    assert after[urls[1]]["metadata"] == {"only": True}
    assert after[urls[2]]["metadata"] == {"title": "C"}
    for u in urls:
        assert after[u]["embedding"] == before[u]["embedding"], "the vector is the stored one, unchanged"
    assert after[urls[0]]["phash"] == "8f373714acfcf4d0"

    # what search answers and filters on is the new metadata at once
    status, hits = await post(service, "/search", {"url": urls[2], "indexed": True, "limit": 5,
                                                   "filter": {"n.z": 3, "year": {"gte": 1900}}})
    assert status == 200 and [(h["url"], h["metadata"]["year"]) for h in hits] == [(urls[0], 1901)], hits

    # a list: all edits in one request, those of one url in order; null clears the metadata
    status, _ = await post(service, "/update_metadata", [
        {"url": urls[2], "metadata": {"a": 1}},
        {"url": urls[1], "metadata": None},
        {"url": urls[2], "metadata": {"b": 2}, "merge": True},
        {"url": urls[2], "metadata": {"a": None}, "merge": True},
    ])
    assert status == 204
    after = await rows(service, urls)
    assert after[urls[2]]["metadata"] == {"b": 2} and after[urls[1]]["metadata"] == {}


async def test_an_edit_of_an_url_not_stored_changes_nothing(service: Service, uniq: str) -> None:
    url, absent = f"http://edits.invalid/{uniq}/kept.jpg", f"http://edits.invalid/{uniq}/absent.jpg"
    assert (await post(service, "/restore", [{"url": url, "metadata": {"v": 1}, "embedding": unit(4)}]))[0] == 204
    status, body = await post(service, "/update_metadata", [{"url": url, "metadata": {"v": 2}},
                                                            {"url": absent, "metadata": {"v": 2}}])
    assert status == 404 and body["type"] == "not_found" and body["missing"] == [absent], body
    assert (await rows(service, [url]))[url]["metadata"] == {"v": 1}
    status, body = await post(service, "/update_metadata", {"url": absent, "metadata": {}})
    assert status == 404 and body["missing"] == [absent]
    async with service.http.post(f"{service.model('no_such_model')}/update_metadata",
                                 json={"url": url, "metadata": {}}) as resp:
        assert resp.status == 404 and (await resp.json())["type"] == "model_not_found"


async def test_bad_edits_are_422_naming_where(service: Service, uniq: str) -> None:
    url = f"http://edits.invalid/{uniq}/big.jpg"
    assert (await post(service, "/restore", [{"url": url, "metadata": {"a": "x" * 40_000}, "embedding": unit(5)}]))[0] \
        == 204
    cases: list[tuple[Any, list[str | int], str]] = [
        ({"url": url}, ["body", "metadata"], "missing"),
        ({"url": url, "metadata": [1]}, ["body", "metadata"], "dict_type"),
        ({"url": url, "metadata": {}, "merge": "perhaps"}, ["body", "merge"], "bool_parsing"),
        ({"url": url, "metadata": {}, "extra": 1}, ["body", "extra"], "extra_forbidden"),
        ({"url": "ftp://x/y.jpg", "metadata": {}}, ["body", "url"], "value_error.url.scheme"),
        ([{"url": url, "metadata": {}}, {"url": url}], ["body", 1, "metadata"], "missing"),
        ([], ["body"], "list_type"),
        ([{"url": url, "metadata": {}}] * (service.backend.settings.max_bulk_items + 1), ["body"], "list_type"),
        ({"url": url, "metadata": {"b": "y" * 40_000}, "merge": True}, ["body", "metadata"],
         "value_error.metadata_json_too_long"),
        ([{"url": url, "metadata": {"c": 1}, "merge": True}, {"url": url, "metadata": {"b": "y" * 40_000},
                                                               "merge": True}], ["body", 1, "metadata"],
         "value_error.metadata_json_too_long"),
    ]
    for edit, loc, kind in cases:
        status, body = await post(service, "/update_metadata", edit)
        assert status == 422, (edit if not isinstance(edit, list) else len(edit), body)
        item = body["detail"][0]
        assert item["loc"] == loc and item["type"] == kind, (loc, kind, body)
    assert len(str((await rows(service, [url]))[url]["metadata"])) < METADATA_MAX, "the row is as it was"
    assert (await rows(service, [url]))[url]["metadata"] == {"a": "x" * 40_000}


async def test_an_edit_waits_for_an_add_of_its_url_in_flight(service: Service, images: str, uniq: str) -> None:
    """The edit is sent while the add of its url is still fetching a slow image. It waits for the add, as a
    second add would, and then merges into what the add stored (without waiting it would find nothing: 404)."""
    url = f"{images}/slow/{uniq}.jpg?delay=1.5"
    adding = asyncio.create_task(post(service, "/add", {"url": url, "metadata": {"from": "add"}}))
    await asyncio.sleep(0.5)
    edit = await post(service, "/update_metadata", {"url": url, "merge": True, "metadata": {"edited": True}})
    assert (await adding)[0] == 204
    assert edit[0] == 204, edit
    status, hits = await post(service, "/search", {"url": url, "indexed": True, "limit": 1})
    assert hits[0]["url"] == url and hits[0]["metadata"] == {"from": "add", "edited": True}, hits


async def test_a_remove_waits_for_an_add_of_its_url_in_flight(service: Service, images: str, uniq: str) -> None:
    """A remove sent while the add of its url is still fetching a slow image is ordered after the add, as an
    edit is: the row is gone once both are answered (without waiting, the add would store it after the remove)."""
    url = f"{images}/slow/{uniq}-removed.jpg?delay=3"
    adding = asyncio.create_task(post(service, "/add", {"url": url}))
    await asyncio.sleep(1.0)  # the add holds its url at once; its image comes 3 s later
    removed = await post(service, "/remove", {"url": url})
    assert (await adding)[0] == 204
    assert removed[0] == 204, removed
    status, answer = await post(service, "/search", {"url": url, "indexed": True, "limit": 1})
    assert status == 404 and answer["type"] == "not_found", (status, answer)
