"""IIIF Presentation input of bulk_ingest.py: manifests and collections built with iiif_prezi3 (3.0) and as the
2.1 spec's examples are shaped, served on loopback, their images by the reference IIIF Image server; walked alone,
and ingested by the script into the real embedded service."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from iiif_prezi3 import (
    Annotation,
    AnnotationBody,
    AnnotationPage,
    Canvas,
    Choice,
    Collection,
    KeyValueString,
    Manifest,
    ServiceV3,
)

from tests.conftest import ROOT, Service, make_settings, running_service
from tests.servers import serving

import bulk_ingest  # noqa: E402  (scripts/, on sys.path via conftest)
from iiif_reference import ReferenceServer, reference_server  # noqa: E402
from iiif_walk import ACCEPT, WalkOptions, iiif_records  # noqa: E402
from ingest_input import Record  # noqa: E402

pytestmark = pytest.mark.timeout(120)
CC_BY = "http://creativecommons.org/licenses/by/4.0/"
CC0 = "https://creativecommons.org/publicdomain/zero/1.0/"


@dataclass
class Answer:
    body: bytes
    status: int = 200
    content_type: str = "application/ld+json"
    delay: float = 0.0
    chunked: bool = False  # streamed without a Content-Length


@dataclass
class DocSite:
    """A loopback web server of IIIF documents (and a plain image); records each request's path and Accept."""

    url: str
    answers: dict[str, Answer] = field(default_factory=dict)
    asked: list[tuple[str, str]] = field(default_factory=list)

    def put(self, path: str, doc: Any, **kw: Any) -> str:
        body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        self.answers[path] = Answer(body, **kw)
        return self.url + path

    def times(self, url: str) -> int:
        return sum(1 for path, _ in self.asked if self.url + path == url)


@pytest.fixture(scope="module")
async def site() -> AsyncIterator[DocSite]:
    holder: list[DocSite] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        docs = holder[0]
        docs.asked.append((request.path_qs, request.headers.get("Accept", "")))
        answer = docs.answers.get(request.path_qs)
        if answer is None:
            return web.Response(status=404, text="not found")
        await asyncio.sleep(answer.delay)
        if not answer.chunked:
            return web.Response(status=answer.status, body=answer.body, content_type=answer.content_type)
        resp = web.StreamResponse(status=answer.status, headers={"Content-Type": answer.content_type})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(answer.body), 65536):
            await resp.write(answer.body[i:i + 65536])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    async with serving(app) as url:
        holder.append(DocSite(url))
        yield holder[0]


@pytest.fixture(scope="module")
async def ref(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ReferenceServer]:
    async with reference_server(tmp_path_factory.mktemp("iiif-ref")) as server:
        yield server


async def walk(url: str, **options: Any) -> list[Record]:
    async with iiif_records(url, WalkOptions(**{"retries": 0, "backoff_max": 0.05, **options})) as records:
        return [r async for r in records]


def full(service: str) -> str:
    return f"{service}/full/max/0/default.jpg"


def prezi(resource: Any) -> dict[str, Any]:
    """What iiif_prezi3 writes for `resource`, as parsed JSON."""
    return dict(json.loads(resource.json()))


# --- the documents ------------------------------------------------------------------------------------------------


def v3_manifest(site: DocSite, ref: ReferenceServer, name: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """A 3.0 manifest built with iiif_prezi3 (two canvases from the reference server's info.json, read by
    iiif_prezi3 itself) served at /NAME.json; what each painted image should be stored as, in walk order."""
    mid, base = f"{site.url}/{name}.json", f"{site.url}/{name}"
    manifest = Manifest(id=mid, label={"en": ["A v3 manifest"], "de": ["Ein v3-Manifest"]}, rights=CC_BY,
                        requiredStatement=KeyValueString(label={"en": ["Attribution"]},
                                                         value={"en": ["Provided by the v3 test"]}))
    manifest.make_canvas_from_iiif(url=ref.service("coffee", "3.0"), id=f"{base}/c0", anno_id=f"{base}/a0",
                                   anno_page_id=f"{base}/p0", label={"en": ["Coffee"], "fr": ["Café"]})
    manifest.make_canvas_from_iiif(url=ref.service("chelsea", "2.1"), id=f"{base}/c1", anno_id=f"{base}/a1",
                                   anno_page_id=f"{base}/p1", label={"fr": ["Chat"], "none": ["Chelsea"]})
    plain = site.put(f"/{name}/astronaut.jpg", (ref.folder / "astronaut.jpg").read_bytes(), content_type="image/jpeg")
    # a Choice: the first item (a plain image, no service) is the one taken
    choice = Choice(items=[AnnotationBody(id=plain, type="Image", format="image/jpeg"),
                           AnnotationBody(id=full(ref.service("rocket", "3.0")), type="Image")])
    manifest.add_item(painted(f"{base}/c2", "<p>An <b>astronaut</b> &amp; a flag</p>", [choice]))
    sound = AnnotationBody(id=f"{base}/sound.mp3", type="Sound", format="audio/mpeg", duration=3.0)
    manifest.add_item(painted(f"{base}/c3", "only sound", [sound]))
    rocket = AnnotationBody(id=full(ref.service("rocket", "3.0")), type="Image",
                            service=[ServiceV3(id=ref.service("rocket", "3.0"), type="ImageService3", profile="level1")])
    coffee2 = AnnotationBody(id=f"{ref.service('coffee', '2.1')}/full/full/0/default.jpg", type="Image",
                             service=[{"@id": ref.service("coffee", "2.1"), "@type": "ImageService2",
                                       "profile": "http://iiif.io/api/image/2/level1.json"}])
    manifest.add_item(painted(f"{base}/c4", {"de": ["Eins", "Zwei"]}, [rocket, coffee2]))
    site.put(f"/{name}.json", prezi(manifest))
    common = {"iiif_manifest": mid, "manifest_label": "A v3 manifest", "rights": CC_BY,
              "required_statement": "Attribution: Provided by the v3 test"}

    def image(canvas: int, label: str, url: str, service: str | None) -> tuple[str, dict[str, Any]]:
        meta = {**common, "iiif_canvas": f"{base}/c{canvas}", "canvas_index": canvas, "label": label}
        return url, meta if service is None else {**meta, "iiif_service": service}

    images = [image(0, "Coffee", full(ref.service("coffee", "3.0")), ref.service("coffee", "3.0")),
              image(1, "Chelsea", full(ref.service("chelsea", "2.1")), ref.service("chelsea", "2.1")),
              image(2, "An astronaut & a flag", plain, None),
              image(4, "Eins; Zwei", full(ref.service("rocket", "3.0")), ref.service("rocket", "3.0")),
              image(4, "Eins; Zwei", full(ref.service("coffee", "2.1")), ref.service("coffee", "2.1"))]
    return mid, dict(images)


def painted(cid: str, label: Any, bodies: list[Any]) -> Canvas:
    """A canvas painting `bodies`, one annotation each."""
    canvas = Canvas(id=cid, label=label, height=100, width=100)
    annos = [Annotation(id=f"{cid}/a{i}", motivation="painting", body=b, target=cid) for i, b in enumerate(bodies)]
    canvas.add_item(AnnotationPage(id=f"{cid}/page", items=annos))
    return canvas


def v2_manifest(site: DocSite, ref: ReferenceServer, name: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """A 2.1 manifest shaped as the spec's examples, served at /NAME.json; its images as they should be stored."""
    mid, base = f"{site.url}/{name}.json", f"{site.url}/{name}"

    def resource(photo: str) -> dict[str, Any]:
        service = ref.service(photo, "2.1")
        return {"@id": f"{service}/full/full/0/default.jpg", "@type": "dctypes:Image", "format": "image/jpeg",
                "service": {"@context": "http://iiif.io/api/image/2/context.json", "@id": service,
                            "profile": "http://iiif.io/api/image/2/level1.json"}}

    def canvas(i: int, label: Any, res: dict[str, Any]) -> dict[str, Any]:
        cid = f"{base}/canvas/p{i}"
        return {"@id": cid, "@type": "sc:Canvas", "label": label, "height": 1000, "width": 750,
                "images": [{"@type": "oa:Annotation", "motivation": "sc:painting", "on": cid, "resource": res}]}

    choice = {"@type": "oa:Choice", "default": resource("rocket"), "item": [resource("astronaut")]}
    doc = {"@context": "http://iiif.io/api/presentation/2/context.json", "@id": mid, "@type": "sc:Manifest",
           "label": [{"@value": "Un manifeste v2", "@language": "fr"}, {"@value": "A v2 manifest", "@language": "en"}],
           "license": CC0, "attribution": "Provided by the v2 test",
           "sequences": [{"@id": f"{base}/sequence/normal", "@type": "sc:Sequence",
                          "canvases": [canvas(0, "p. 1", resource("astronaut")),
                                       canvas(1, {"@value": "Seite 2", "@language": "de"}, choice)]}]}
    site.put(f"/{name}.json", doc)
    common = {"iiif_manifest": mid, "manifest_label": "A v2 manifest", "rights": CC0,
              "required_statement": "Attribution: Provided by the v2 test"}
    images = {full(ref.service(photo, "2.1")): {**common, "iiif_canvas": f"{base}/canvas/p{i}", "canvas_index": i,
                                                "label": label, "iiif_service": ref.service(photo, "2.1")}
              for i, (photo, label) in enumerate([("astronaut", "p. 1"), ("rocket", "Seite 2")])}
    return mid, images


def small_manifest(site: DocSite, name: str, canvases: int = 1) -> tuple[str, dict[str, Any]]:
    """A 3.0 manifest (iiif_prezi3) of plain image urls, not served: (its url, its JSON)."""
    mid = f"{site.url}/{name}.json"
    manifest = Manifest(id=mid, label=name)
    for i in range(canvases):
        canvas = manifest.make_canvas(id=f"{mid}/c{i}", label=f"{name} {i}", height=10, width=10)
        canvas.add_image(f"{site.url}/img/{name}/{i}.jpg", anno_id=f"{mid}/a{i}", anno_page_id=f"{mid}/p{i}")
    return mid, prezi(manifest)


def urls_of(records: list[Record]) -> list[str | None]:
    return [r.url for r in records]


# --- the walker alone ---------------------------------------------------------------------------------------------


async def test_v3_and_v2_fields_and_language_maps(site: DocSite, ref: ReferenceServer) -> None:
    v3, v3_images = await asyncio.to_thread(v3_manifest, site, ref, "fields-v3")
    v2, v2_images = v2_manifest(site, ref, "fields-v2")
    for url, expected in ((v3, v3_images), (v2, v2_images)):
        records = await walk(url)
        assert [(r.position, r.url, r.metadata, r.problem) for r in records] == [
            (i, u, m, None) for i, (u, m) in enumerate(expected.items())]
    french = await walk(v3, language="fr")
    assert [r.metadata["label"] for r in french if r.metadata] == [
        "Café", "Chat", "An astronaut & a flag", "Eins; Zwei", "Eins; Zwei"]
    assert {r.metadata["manifest_label"] for r in await walk(v2, language="fr") if r.metadata} == {"Un manifeste v2"}
    assert all(accept == ACCEPT for path, accept in site.asked if path.startswith("/fields-"))


async def test_html_that_is_not_plain_and_long_values(site: DocSite) -> None:
    mid, doc = small_manifest(site, "values", canvases=3)
    doc["items"][0]["label"] = {"en": ["<span>1 < 2</span>"]}
    doc["items"][1]["label"] = {"none": ["a" * 10_000]}
    doc["items"][2]["label"] = {"none": ["\U0001d538" * 5000]}  # 4 bytes each in UTF-8
    doc["label"] = {"none": ["\x01" * 5000]}  # 6 bytes each in JSON: with the above, 40 KB of metadata
    site.put("/values.json", doc)
    metadata = [r.metadata for r in await walk(mid) if r.metadata]
    assert metadata[0]["label"] == "<span>1 < 2</span>"
    assert metadata[1]["label"] == "a" * 3999 + "…"
    assert metadata[2]["label"].startswith("\U0001d538" * 100) and metadata[2]["manifest_label"].startswith("\x01")
    sizes = [len(json.dumps(m, ensure_ascii=False).encode()) for m in metadata]
    assert max(sizes) <= 32 * 1024 and sizes[2] > 16 * 1024, sizes


async def test_a_collection_that_loops_is_walked_once_in_document_order(site: DocSite) -> None:
    a, b = f"{site.url}/loop/A.json", f"{site.url}/loop/B.json"
    m1, m1_doc = small_manifest(site, "loop/M1", canvases=2)
    m2, m2_doc = small_manifest(site, "loop/M2", canvases=2)
    m3, m3_doc = small_manifest(site, "loop/M3")  # embedded whole in A: never fetched (not even served)
    site.put("/loop/M1.json", m1_doc)
    site.put("/loop/M2.json", m2_doc)
    collection = Collection(id=a, label={"en": ["A"]})
    collection.make_manifest(id=m1, label="M1")
    collection.make_collection_ref(id=b, label="B", type="Collection")
    doc = prezi(collection)
    doc["items"] += [m3_doc, {"id": m1, "type": "Manifest", "label": {"none": ["M1 again"]}}]
    site.put("/loop/A.json", doc)
    site.put("/loop/B.json", {"@context": "http://iiif.io/api/presentation/2/context.json", "@id": b,
                              "@type": "sc:Collection", "label": "B (2.1)",
                              "manifests": [{"@id": m2, "@type": "sc:Manifest", "label": "M2"}],
                              "collections": [{"@id": a, "@type": "sc:Collection", "label": "back to A"}]})
    records = await walk(a)
    expected = [f"{site.url}/img/loop/{m}/{i}.jpg" for m, n in (("M1", 2), ("M2", 2), ("M3", 1)) for i in range(n)]
    assert urls_of(records) == expected and [r.position for r in records] == list(range(5))
    assert [r.metadata["iiif_manifest"] for r in records if r.metadata] == [m1, m1, m2, m2, m3]
    assert [site.times(u) for u in (a, b, m1, m2, m3)] == [1, 1, 1, 1, 0]
    assert await walk(a) == records  # the same input walks to the same positions: what resuming relies on


async def test_depth_and_document_limits_are_failures_of_their_own(site: DocSite) -> None:
    chain = [f"{site.url}/chain/C{i}.json" for i in range(5)]
    for i, cid in enumerate(chain):
        mid, mdoc = small_manifest(site, f"chain/M{i}")
        site.put(f"/chain/M{i}.json", mdoc)
        collection = Collection(id=cid, label=f"C{i}")
        collection.make_manifest(id=mid, label=f"M{i}")
        if i + 1 < len(chain):
            collection.make_collection_ref(id=chain[i + 1], label=f"C{i + 1}", type="Collection")
        site.put(f"/chain/C{i}.json", prezi(collection))
    image = f"{site.url}/img/chain/M{{}}/0.jpg"
    deep = await walk(chain[0], max_depth=2)
    assert [(r.url, r.problem_type if r.problem else None) for r in deep] == [
        (image.format(0), None), (image.format(1), None), (f"{site.url}/chain/M2.json", "iiif_limit"),
        (chain[3], "iiif_limit")]
    assert deep[2].metadata == {"iiif_parent": chain[2]} and "--iiif-max-depth (2)" in str(deep[2].problem)
    few = await walk(chain[0], max_documents=3)
    assert [(r.url, r.problem_type if r.problem else None) for r in few] == [
        (image.format(0), None), (f"{site.url}/chain/M1.json", "iiif_limit"), (chain[2], "iiif_limit")]


async def test_hostile_members_fail_one_by_one_and_the_walk_goes_on(site: DocSite) -> None:
    u = f"{site.url}/hostile"
    good, good_doc = small_manifest(site, "hostile/good", canvases=2)
    site.put("/hostile/good.json", good_doc)
    site.put("/hostile/html.json", b"<html><body>a web page</body></html>", content_type="text/html")
    site.put("/hostile/other.json", {"hello": "world", "type": "Thing"})
    site.put("/hostile/big.json", b'{"pad": "' + b"x" * 300_000 + b'"}', chunked=True)
    site.put("/hostile/slow.json", good_doc, delay=2.0)
    site.put("/hostile/busy.json", b"busy", status=503)
    members = [f"{u}/missing.json", f"{u}/html.json", f"{u}/other.json", f"{u}/big.json", f"{u}/slow.json",
               f"{u}/busy.json", "urn:uuid:4d1b2c64-0c44-4d8a-9b59-5a1d3c2e1f00", good]
    site.put("/hostile/top.json", {"@context": "http://iiif.io/api/presentation/2/context.json", "@id": f"{u}/top.json",
                                   "@type": "sc:Collection", "label": "hostile",
                                   "manifests": [{"@id": m, "@type": "sc:Manifest"} for m in members]
                                   + [{"@type": "sc:Manifest", "label": "no id"}]})
    started = time.monotonic()
    records = await walk(f"{u}/top.json", retries=1, timeout=0.5, max_bytes=200_000)
    assert [r.position for r in records] == list(range(len(members) + 2))
    assert [(r.url, r.problem_type) for r in records[:7]] == [
        (f"{u}/missing.json", "iiif_http_error"), (f"{u}/html.json", "iiif_not_json"),
        (f"{u}/other.json", "iiif_not_iiif"), (f"{u}/big.json", "iiif_too_large"), (f"{u}/slow.json", "iiif_timeout"),
        (f"{u}/busy.json", "iiif_http_error"), (members[6], "iiif_bad_member")]
    assert all(r.problem and r.metadata == {"iiif_parent": f"{u}/top.json"} for r in records[:7])
    assert "HTTP 404" in str(records[0].problem) and "HTTP 503" in str(records[5].problem)
    assert urls_of(records[7:9]) == [f"{site.url}/img/hostile/good/{i}.jpg" for i in range(2)]
    assert records[9].problem_type == "iiif_bad_member" and records[9].url is None
    assert site.times(f"{u}/busy.json") == 2 and site.times(f"{u}/missing.json") == 1  # 5xx retried, 404 not
    assert time.monotonic() - started < 10
    for top, kind in ((f"{u}/missing.json", "iiif_http_error"), (f"{u}/other.json", "iiif_not_iiif")):
        assert [(r.position, r.url, r.problem_type) for r in await walk(top)] == [(0, top, kind)]


async def test_a_manifest_of_100000_canvases_flows_out_in_order(site: DocSite) -> None:
    n, mid = 100_000, f"{site.url}/huge.json"
    canvases = [{"id": f"{mid}/c{i}", "type": "Canvas", "label": {"none": [f"page {i}"]}, "height": 10, "width": 10,
                 "items": [{"id": f"{mid}/p{i}", "type": "AnnotationPage", "items": [{
                     "id": f"{mid}/a{i}", "type": "Annotation", "motivation": "painting", "target": f"{mid}/c{i}",
                     "body": {"id": f"{site.url}/iiif/{i}/full/max/0/default.jpg", "type": "Image",
                              "service": [{"id": f"{site.url}/iiif/{i}", "type": "ImageService3",
                                           "profile": "level0"}]}}]}]} for i in range(n)]
    site.put("/huge.json", {"@context": "http://iiif.io/api/presentation/3/context.json", "id": mid,
                            "type": "Manifest", "label": {"en": ["huge"]}, "items": canvases})
    del canvases
    started = time.monotonic()
    count = 0
    async with iiif_records(mid, WalkOptions()) as records:
        async for rec in records:
            assert rec.position == count and rec.metadata is not None and rec.metadata["canvas_index"] == count
            assert rec.url == f"{site.url}/iiif/{count}/full/max/0/default.jpg"
            count += 1
    assert count == n and time.monotonic() - started < 30


# --- through bulk_ingest.py into the service ----------------------------------------------------------------------


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def summary(self) -> dict[str, Any]:
        assert self.rc == 0, self.err
        return dict(json.loads(self.out.strip().splitlines()[-1]))


async def ingest(*args: str | Path, cwd: Path) -> Result:
    """bulk_ingest.py run to the end as a user would; killed if this fails first."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "scripts" / "bulk_ingest.py"), *map(str, args), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=cwd)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=90)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return Result(proc.returncode or 0, out.decode(), err.decode())


async def dump(svc: Service) -> dict[str, Any]:
    async with svc.http.post(svc.model("thumb_grid") + "/dump", json={"limit": 1000}) as r:
        assert r.status == 200, await r.text()
        return {row["url"]: row["metadata"] for row in await r.json()}


async def test_bulk_ingest_stores_every_painted_image_and_resumes(
    site: DocSite, ref: ReferenceServer, tmp_path: Path, models_dir: Path
) -> None:
    v3, v3_images = await asyncio.to_thread(v3_manifest, site, ref, "e2e-v3")
    v2, v2_images = v2_manifest(site, ref, "e2e-v2")
    top, missing = f"{site.url}/e2e/collection.json", f"{site.url}/e2e/missing.json"
    collection = Collection(id=top, label={"en": ["everything"]})
    collection.make_manifest(id=v3, label="v3")
    collection.make_manifest(id=missing, label="gone")
    collection.make_manifest(id=v2, label="v2")
    collection.make_collection_ref(id=top, label="itself", type="Collection")
    site.put("/e2e/collection.json", prezi(collection))
    expected = {**v3_images, **v2_images}
    async with running_service(make_settings(tmp_path / "data", models_dir)) as svc:
        common = ["--server", svc.url, "--model", "thumb_grid", "--retries", "1", "--backoff-max", "0.2", "--batch", "2"]
        first = (await ingest(top, *common, "--limit", "3", cwd=tmp_path)).summary
        assert (first["records"], first["added"], first["failed"]) == (3, 3, 0)
        second = (await ingest(top, *common, cwd=tmp_path)).summary
        assert (second["records"], second["already_done"], second["sent"], second["added"], second["failed"]) == (
            8, 3, 4, 4, 1)
        asked = len(ref.requests())
        third = (await ingest(top, *common, cwd=tmp_path)).summary
        assert (third["already_done"], third["sent"], len(ref.requests())) == (8, 0, asked)
        assert await dump(svc) == expected
        failed = [json.loads(line) for f in tmp_path.glob("*.thumb_grid.failed.jsonl")
                  for line in f.read_text().splitlines()]
        assert [(f["position"], f["url"], f["type"]) for f in failed] == [(5, missing, "iiif_http_error")]
        async with svc.http.post(svc.model("thumb_grid") + "/search", json={
                "url": full(ref.service("coffee", "3.0")), "indexed": True, "limit": 10,
                "filter": {"iiif_manifest": v2}}) as r:
            assert r.status == 200, await r.text()
            assert {hit["url"] for hit in await r.json()} == set(v2_images)
        local = tmp_path / "v2.json"  # a .json file that is a manifest: --format auto reads it as IIIF
        local.write_text(json.dumps(json.loads(site.answers["/e2e-v2.json"].body), indent=2))
        again = (await ingest(local, *common, "--no-state", cwd=tmp_path)).summary
        assert (again["records"], again["found"], again["failed"]) == (2, 2, 0)


async def test_format_choices_are_checked_in_one_line(tmp_path: Path) -> None:
    page = tmp_path / "list.json"  # a .json file that is not IIIF keeps the old detection (JSON Lines here)
    page.write_text('{"url": "http://127.0.0.1:9/a.jpg"}\n')
    for bad, words in ((["http://127.0.0.1:9/m.json", "--format", "csv"], "read as IIIF only"),
                       (["-", "--format", "iiif"], "not stdin"),
                       ([page, "--format", "iiif", "--iiif-max-documents", "0"], "must be positive")):
        res = await ingest(*bad, "--model", "m", cwd=tmp_path)
        assert res.rc == 2 and words in res.err.strip().splitlines()[-1], (bad, res.err)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"@context": "http://iiif.io/api/presentation/3/context.json",
                                    "id": "http://127.0.0.1:9/m", "type": "Manifest", "items": []}, indent=2))
    assert [bulk_ingest.parse_args([str(f), "--model", "m"]).format for f in (page, manifest)] == ["auto", "iiif"]
    url = bulk_ingest.parse_args(["https://example.org/iiif/m.json", "--model", "m"])
    assert url.format == "iiif" and url.state.name.endswith(".m.state.jsonl") and "/" not in url.state.name
