"""The perceptual hash stored beside each embedding: imagehash's pHash bit for bit on real photos, copies within
EXACT_BITS and other photos far from it, and the hash through the service (add, dump, restore, old collections)."""

from __future__ import annotations

import io
import itertools
from pathlib import Path
from typing import Any

import aiohttp
import imagehash
import numpy as np
import orjson
import pytest
from PIL import Image
from pymilvus import DataType, MilvusClient

from idios.api.restore_body import INLINE_BYTES
from idios.decode import DecodeLimits, load_rgb, prepare
from idios.models import load_manifest
from idios.phash import EXACT_BITS, distance, phash, valid
from tests.conftest import Service, make_settings, running_service
from tests.test_api import post, post_bytes
from tests.test_duplicates import all_groups, finished

pytestmark = pytest.mark.timeout(120)

# real photographs bundled with scikit-image (colour and grey), as RGB
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "moon", "coins", "hubble_deep_field", "retina")
LIMITS = DecodeLimits(min_side=1)


def photo(name: str) -> Image.Image:
    from skimage import data

    return Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB")


def encode(im: Image.Image, fmt: str = "PNG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def decoded_hash(data: bytes) -> str:
    return phash(load_rgb(data, 224, LIMITS))


def scaled(im: Image.Image, f: float) -> Image.Image:
    return im.resize((round(im.width * f), round(im.height * f)), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return {name: photo(name) for name in PHOTOS}


def test_the_hash_is_imagehash_phash_bit_for_bit(photos: dict[str, Image.Image]) -> None:
    """Same bits in the same order as imagehash's str(phash), on the photos and on copies of them (other sizes,
    JPEG-decoded pixels): 9 x 4 images."""
    for im in photos.values():
        for variant in (im, scaled(im, 0.37), scaled(im, 1.6), Image.open(io.BytesIO(encode(im, "JPEG", quality=40)))):
            ours = phash(variant)
            assert valid(ours) and ours == str(imagehash.phash(variant))


def test_distance_counts_differing_bits() -> None:
    assert distance("0" * 16, "f" * 16) == 64
    assert distance("8000000000000001", "0000000000000000") == 2
    assert distance("c2924c5532bddfc8", "c2924c5532bddfc8") == 0
    assert not valid("C2924C5532BDDFC8") and not valid("c2924c5532bddfc") and not valid("g2924c5532bddfc8")


def test_copies_are_within_exact_bits_and_other_photos_and_crops_far_above(photos: dict[str, Image.Image]) -> None:
    """Measured in full by scripts/measure_phash.py; here a sample through the service's decoder."""
    exif = Image.Exif()
    exif[0x0112] = 6  # the viewer turns the stored pixels 90 degrees clockwise
    copies = {
        "jpeg q50": lambda im: encode(im, "JPEG", quality=50),
        "jpeg q95": lambda im: encode(im, "JPEG", quality=95),
        "webp q80": lambda im: encode(im, "WEBP", quality=80),
        "resize 50%": lambda im: encode(scaled(im, 0.5)),
        "resize 150%": lambda im: encode(scaled(im, 1.5), "JPEG", quality=90),
        "exif rotated": lambda im: encode(im.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif),
    }
    originals = {name: decoded_hash(encode(im)) for name, im in photos.items()}
    for name, im in photos.items():
        for kind, make in copies.items():
            assert distance(originals[name], decoded_hash(make(im))) <= EXACT_BITS, (name, kind)
        w, h = im.size
        crop = im.crop((round(w * 0.075), round(h * 0.075), round(w * 0.925), round(h * 0.925)))  # 85%
        assert distance(originals[name], decoded_hash(encode(crop))) > EXACT_BITS, name
    for a, b in itertools.combinations(originals, 2):
        assert distance(originals[a], originals[b]) >= 5 * EXACT_BITS, (a, b)  # 20-40 bits measured


def test_the_jpeg_draft_decode_moves_the_hash_by_two_bits_at_most(photos: dict[str, Image.Image]) -> None:
    """The decoder reads a large JPEG at 1/2 or 1/4 size (draft mode): the hash of that decode is within 2 bits of
    the full decode's (0 for 19 of 20 photos in scripts/measure_phash.py)."""
    for im in list(photos.values())[:5]:
        data = encode(scaled(im, 2800 / min(im.size)), "JPEG", quality=90)
        drafted, full = load_rgb(data, 224, LIMITS), Image.open(io.BytesIO(data)).convert("RGB")
        assert drafted.width <= (full.width + 1) // 2  # decoded at half size (or less)
        assert distance(phash(drafted), phash(full)) <= 2


def test_prepare_hashes_only_when_asked(photos: dict[str, Image.Image], models_dir: Path) -> None:
    spec = load_manifest(models_dir / "thumb_grid")
    data = encode(photos["coffee"], "JPEG", quality=90)
    hashed, bare = prepare(data, spec, LIMITS, hashed=True), prepare(data, spec, LIMITS, hashed=False)
    assert hashed.phash == decoded_hash(data) and bare.phash == ""
    assert np.array_equal(hashed.tensor, bare.tensor)


async def dumped(svc: Service, prefix: str, model: str = "thumb_grid") -> list[dict[str, Any]]:
    """The dumped rows whose url starts with `prefix`."""
    status, page = await post(svc, f"/models/{model}/dump", {"cursor": prefix, "limit": 1000})
    assert status == 200
    return [r for r in page if r["url"].startswith(prefix)]


async def upload(svc: Service, url: str, data: bytes, model: str = "thumb_grid") -> int:
    form = aiohttp.FormData()
    form.add_field("url", url)
    form.add_field("image", data, filename="a.jpg", content_type="image/jpeg")
    return (await post(svc, f"/models/{model}/add", data=form))[0]


async def test_an_added_image_stores_the_hash_of_its_decode(service: Service, images: str, uniq: str) -> None:
    """By url and by upload: the stored hash is the pHash of the decoded image (a large JPEG drafted as the
    model's input needs), and a resized, re-encoded copy of it is within EXACT_BITS."""
    assert service.backend.store.has_phash("thumb_grid")
    served = f"{images}/img/{uniq}/p.jpg"
    resized = f"{images}/img/{uniq}/p.jpg?size=300x225"
    for url in (served, resized):
        assert (await post(service, "/models/thumb_grid/add", {"url": url}))[0] == 204
    big = encode(scaled(photo("rocket"), 2800 / 427), "JPEG", quality=90)  # drafted to 1/2 by the decoder
    copy = encode(scaled(photo("rocket"), 0.6), "JPEG", quality=60)
    prefix = f"https://uploads.phash.test/{uniq}/"
    assert await upload(service, prefix + "big.jpg", big) == 204
    assert await upload(service, prefix + "copy.jpg", copy) == 204
    async with service.http.get(served) as resp:
        served_bytes = await resp.read()
    stored = {r["url"]: r["phash"] for r in await dumped(service, f"{images}/img/{uniq}/")}
    assert stored[served] == decoded_hash(served_bytes)
    assert distance(stored[served], stored[resized]) <= EXACT_BITS
    uploaded = {r["url"]: r["phash"] for r in await dumped(service, prefix)}
    assert uploaded[prefix + "big.jpg"] == decoded_hash(big)
    assert distance(uploaded[prefix + "big.jpg"], uploaded[prefix + "copy.jpg"]) <= EXACT_BITS
    assert distance(uploaded[prefix + "big.jpg"], stored[served]) > 5 * EXACT_BITS


def unit_rows(n: int, seed: int) -> np.ndarray:
    vecs = np.random.default_rng(seed).standard_normal((n, 192)).astype(np.float32)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


async def test_restore_keeps_the_hash_and_dump_gives_it_back(service: Service, uniq: str) -> None:
    """A dump/restore round trip keeps each row's hash; a row without one is dumped without the key; large
    bodies (parsed in the helper process) carry it too; an uppercase hash is stored as dump gives it."""
    prefix = f"http://phash-restore.test/{uniq}/"
    vecs = unit_rows(700, 5)
    hashes = [f"{(i * 0x9E3779B97F4A7C15) % (1 << 64):016x}" for i in range(len(vecs))]
    rows = [{"url": f"{prefix}{i:04d}", "metadata": {"i": i}, "embedding": v.tolist(), "phash": h}
            for i, (v, h) in enumerate(zip(vecs, hashes, strict=True))]
    rows[1].pop("phash")
    rows[2]["phash"] = None
    rows[3]["phash"] = hashes[3].upper()
    small = rows[:10]
    assert (await post(service, "/models/thumb_grid/restore", small))[0] == 204
    got = await dumped(service, prefix)
    assert [r.get("phash") for r in got] == [hashes[0], None, None, *hashes[3:10]]
    assert "phash" not in got[1] and "phash" not in got[2]
    assert (await post(service, "/models/thumb_grid/restore", got))[0] == 204  # the dump restored as it is
    assert await dumped(service, prefix) == got
    body = orjson.dumps(rows)
    assert len(body) > INLINE_BYTES
    assert (await post_bytes(service, "/models/thumb_grid/restore", body))[0] == 204
    assert service.backend.restore_bodies.started
    again = await dumped(service, prefix)
    assert len(again) == 700 and [r.get("phash") for r in again[10:]] == hashes[10:]


@pytest.mark.parametrize("bad", ["", "abc", "0123456789abcdeg", "0123456789abcdef0", 12])
async def test_restore_refuses_a_malformed_hash(service: Service, uniq: str, bad: object) -> None:
    vecs = unit_rows(2, 6)
    rows = [{"url": f"http://phash-bad.test/{uniq}/{i}", "metadata": {}, "embedding": v.tolist()}
            for i, v in enumerate(vecs)]
    rows[1]["phash"] = bad
    status, body = await post(service, "/models/thumb_grid/restore", rows)
    assert status == 422
    [item] = body["detail"]
    assert item["loc"] == ["body", 1, "phash"]
    assert item["type"] == ("string_type" if bad == 12 else "phash_invalid")
    assert await dumped(service, f"http://phash-bad.test/{uniq}/") == []


def old_collection(target: str) -> None:
    """A collection as versions before the hash made it (url, embedding, metadata; COSINE then), with a row."""
    client = MilvusClient(target)
    try:
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("url", DataType.VARCHAR, is_primary=True, max_length=2083)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=192)
        schema.add_field("metadata", DataType.JSON)
        index = client.prepare_index_params()
        index.add_index("embedding", index_type="FLAT", metric_type="COSINE")
        client.create_collection("idios_thumb_grid", schema=schema, index_params=index, consistency_level="Strong")
        client.insert("idios_thumb_grid", [{"url": "http://old.test/a", "embedding": unit_rows(1, 7)[0],
                                            "metadata": {"old": True}}])
    finally:
        client.close()


async def test_a_collection_made_before_the_hash_keeps_working_without_it(
        tmp_path: Path, models_dir: Path, images: str) -> None:
    """add, search_add, restore (with a hash, dropped), search and dump work as before; no row has a phash key;
    the model's newer sibling, created now, stores hashes."""
    settings = make_settings(tmp_path, models_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    old_collection(settings.milvus_target)
    async with running_service(settings) as svc:
        store = svc.backend.store
        assert not store.has_phash("thumb_grid") and store.has_phash("thumb_text")
        url = f"{images}/img/old-collection/a.jpg"
        assert (await post(svc, "/models/thumb_grid/add", {"url": url, "metadata": {"new": 1}}))[0] == 204
        other = f"{images}/img/old-collection/b.jpg"
        assert (await post(svc, "/models/thumb_grid/search_add", {"url": other}))[0] == 204
        restored = {"url": "http://old.test/r", "metadata": {}, "embedding": unit_rows(1, 8)[0].tolist(),
                    "phash": "0123456789abcdef"}
        assert (await post(svc, "/models/thumb_grid/restore", [restored]))[0] == 204
        status, hits = await post(svc, "/models/thumb_grid/search", {"url": url, "limit": 2})
        assert status == 200 and hits[0]["url"] == url and hits[0]["similarity"] == pytest.approx(100, abs=1e-3)
        status, rows = await post(svc, "/models/thumb_grid/dump", {"limit": 100})
        assert status == 200 and len(rows) == 4
        assert all(set(r) == {"url", "embedding", "metadata"} for r in rows)
        # a duplicates job there groups by similarity alone: its groups have no `exact`
        twins = [{"url": f"http://old.test/twin{i}", "metadata": {}, "embedding": unit_rows(1, 9)[0].tolist()}
                 for i in range(2)]
        assert (await post(svc, "/models/thumb_grid/restore", twins))[0] == 204
        status, job = await post(svc, "/models/thumb_grid/duplicates", {"min_similarity": 99})
        assert status == 202, job
        assert (await finished(svc, job["job"]))["state"] == "done"
        groups = await all_groups(svc, job["job"], 10)
        assert {tuple(g["urls"]) for g in groups} >= {("http://old.test/twin0", "http://old.test/twin1")}, groups
        assert all("exact" not in g for g in groups), groups
        assert (await post(svc, "/models/thumb_text/add", {"url": url}))[0] == 204
        [row] = (await post(svc, "/models/thumb_text/dump", {"limit": 10}))[1]
        assert valid(row["phash"])
    client = MilvusClient(settings.milvus_target)
    try:  # the old collection is left as it was made
        fields = [f["name"] for f in client.describe_collection("idios_thumb_grid")["fields"]]
        assert fields == ["url", "embedding", "metadata"]
    finally:
        client.close()
