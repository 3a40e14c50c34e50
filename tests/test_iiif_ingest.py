"""IIIF Presentation input of bulk_ingest.py: manifests and collections built with iiif_prezi3 (3.0) and as the
2.1 spec's examples are shaped, served on loopback, their images by the reference IIIF Image server; walked alone,
and ingested by the script into the real embedded service."""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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

from idios import iiif
from tests.conftest import Service, make_settings, running_service
from tests.servers import serving
from tests.test_scripts import Result, script

import bulk_ingest  # noqa: E402  (scripts/, on sys.path via conftest)
import iiif_documents  # noqa: E402
from iiif_reference import ReferenceServer, reference_server  # noqa: E402
from iiif_walk import ACCEPT, DocumentHeaders, WalkOptions, iiif_records, retry_after, url_stem  # noqa: E402
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


def small_manifest(site: DocSite, name: str, canvases: int = 1,
                   images: str | None = None) -> tuple[str, dict[str, Any]]:
    """A 3.0 manifest (iiif_prezi3) of plain image urls (on `images`, else on the site, which does not serve
    them), not served: (its url, its JSON)."""
    mid = f"{site.url}/{name}.json"
    manifest = Manifest(id=mid, label=name)
    for i in range(canvases):
        canvas = manifest.make_canvas(id=f"{mid}/c{i}", label=f"{name} {i}", height=10, width=10)
        canvas.add_image(f"{images or site.url}/img/{name}/{i}.jpg", anno_id=f"{mid}/a{i}",
                         anno_page_id=f"{mid}/p{i}")
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


async def test_document_servers_get_their_retry_after_and_their_own_headers(site: DocSite) -> None:
    """A 429 with Retry-After is asked again after that wait, not before; a wait longer than the document timeout
    fails the document at once; each host gets the headers --iiif-headers names for it, and a redirect to
    another host (localhost, the same server) does not carry the first host's token."""
    _, doc = small_manifest(site, "polite/m")
    seen: list[tuple[str, str | None, float]] = []
    busy = {"/polite/m.json": 1}

    async def handle(request: web.Request) -> web.Response:
        seen.append((request.path, request.headers.get("X-Token"), time.monotonic()))
        if request.path == "/polite/far.json":
            return web.Response(status=429, headers={"Retry-After": "3600"})
        if busy.get(request.path, 0) > 0:
            busy[request.path] -= 1
            return web.Response(status=429, headers={"Retry-After": "1"})
        if request.path == "/polite/moved.json":
            raise web.HTTPFound(str(request.url.with_host("localhost").with_path("/polite/m.json")))
        if request.headers.get("X-Token") != "t":
            return web.Response(status=401)
        return web.json_response(doc)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    async with serving(app) as url:
        headers = json.dumps({"127.0.0.1": {"X-Token": "t"}})
        records = await walk(f"{url}/polite/m.json", retries=2, headers=headers)
        assert [r.problem for r in records] == [None] and records[0].url == f"{site.url}/img/polite/m/0.jpg"
        first, again = [t for path, _, t in seen if path == "/polite/m.json"]
        assert again - first >= 0.95, "asked again before its Retry-After"
        assert all(token == "t" for _, token, _ in seen)
        started = time.monotonic()
        [far] = await walk(f"{url}/polite/far.json", retries=2, headers=headers, timeout=30)
        assert far.problem_type == "iiif_http_error" and "asked to wait 3600 s" in str(far.problem), far.problem
        assert time.monotonic() - started < 5 and [p for p, _, _ in seen].count("/polite/far.json") == 1
        [moved] = await walk(f"{url}/polite/moved.json", headers=headers)
        assert moved.problem_type == "iiif_http_error" and "HTTP 401" in str(moved.problem), moved.problem
        assert seen[-1][:2] == ("/polite/m.json", None), "the token followed the redirect to another host"
        [plain] = await walk(f"{url}/polite/m.json", headers=json.dumps({"*.example.org": {"X-Token": "t"}}))
        assert "HTTP 401" in str(plain.problem), "headers of another host pattern were sent"


def test_document_headers_follow_the_services_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """--iiif-headers as IDIOS_FETCH_HEADERS: credentials never over plain http to another machine, host patterns
    (names, *.suffix, bracketed IPv6) matched alike, nonsense refused; Retry-After dates read as GMT whatever the
    local time zone."""
    from service_client import ScriptError

    rules = DocumentHeaders(json.dumps({"h.test, [::1]": {"Authorization": "Bearer x", "User-Agent": "ua"},
                                        "*.museum.test": {"Cookie": "c"}}))
    assert rules.for_url("http://h.test/m.json") == {"User-Agent": "ua"}
    assert rules.for_url("https://h.test/m.json") == {"Authorization": "Bearer x", "User-Agent": "ua"}
    assert rules.for_url("http://[::1]:8080/m.json") == {"Authorization": "Bearer x", "User-Agent": "ua"}
    assert rules.for_url("https://a.museum.test/m.json") == {"Cookie": "c"}
    assert rules.for_url("https://museum.test/m.json") == {} and rules.for_url("https://other.test/") == {}
    for bad in ('{"*": {"A": "b"}}', '{"h, ": {"A": "b"}}', '{"h": {"Bad Name": "b"}}', '{"h": {"A": "b\\nc"}}'):
        with pytest.raises(ScriptError):
            DocumentHeaders(bad)
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        soon = email.utils.format_datetime(datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
                                           + datetime.timedelta(seconds=30))  # "... -0000"
        assert soon.endswith("-0000") and 25 < (retry_after(soon) or 0) <= 31, soon
        assert retry_after("7") == 7 and retry_after("٣") is None and retry_after("soon") is None
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_the_clients_copy_of_the_header_rules_is_the_services() -> None:
    """iiif_walk's retry_after, loopback and DocumentHeaders answer as idios.hostlimits' (its HostHeaders, with the
    host patterns of idios.netguard.HostAllowlist) over the same inputs: the copy cannot drift unseen."""
    import iiif_walk
    from yarl import URL

    from idios import hostlimits

    now = 1_790_000_000.0
    values = ["7", " 12 ", "0", "-3", "1.5", "\u0663", "soon", "", None, "Wed, 21 Oct 2026 07:28:00 GMT",
              "Wed, 21 Oct 2026 07:28:00 -0000", "Wed, 21 Oct 2026 09:28:00 +0200", "Tue, 01 Jan 2030 00:00:00 GMT",
              "Mon, 01 Jan 2001 00:00:00 GMT", "Wed, 21 Oct 2026 07:28"]
    assert [iiif_walk.retry_after(v, now) for v in values] == [hostlimits.retry_after(v, now) for v in values]
    hosts = ["localhost", "a.localhost", "LOCALHOST.", "127.0.0.1", "127.8.9.10", "[::1]", "::1",
             "::ffff:127.0.0.1", "[::ffff:127.0.0.1]", "10.0.0.1", "h.test", "localhost.example.org", "[::2]"]
    assert [iiif_walk.loopback(h) for h in hosts] == [hostlimits.is_loopback(h) for h in hosts]
    spec = json.dumps({"h.test, [::1], 10.0.0.1": {"Authorization": "Bearer x", "User-Agent": "ua"},
                       "*.museum.test": {"Cookie": "c", "User-Agent": "museum"}, "H.Test.": {"X-Late": "1"}})
    ours, theirs = iiif_walk.DocumentHeaders(spec), hostlimits.HostHeaders(spec)
    urls = [f"{scheme}://{host}/m.json" for scheme in ("http", "https") for host in (
        "h.test", "H.TEST", "h.test.", "[::1]:8080", "10.0.0.1", "a.museum.test", "b.a.museum.test", "museum.test",
        "xmuseum.test", "other.test", "localhost")]
    assert [ours.for_url(u) for u in urls] == [dict(theirs.for_url(URL(u))) for u in urls]
    assert sum(bool(ours.for_url(u)) for u in urls) >= 10  # the list does exercise the matching


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


async def ingest(*args: str | Path, cwd: Path) -> Result:
    """bulk_ingest.py run to the end as a user would (tests/test_scripts.py's runner)."""
    return await script("bulk_ingest.py", *args, cwd=cwd)


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
        # the missing manifest is not done: each run asks for it again and lists it again, once
        assert (third["already_done"], third["sent"], third["failed"], len(ref.requests())) == (7, 0, 1, asked)
        assert site.times(missing) == 2  # the first run stopped (--limit) before it
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


async def test_images_that_hostile_servers_serve_fail_one_by_one_in_the_failed_file(
    site: DocSite, ref: ReferenceServer, tmp_path: Path, models_dir: Path
) -> None:
    """A manifest whose canvases point at hostile image servers (tests/test_iiif.py's impostor: an info.json of
    absurd size, a 404, one ignoring the size asked for) beside a good one: each bad image is a line of the failed
    file with its type and the others are stored; a re-run resumes, and the failed file fed back tries them again."""
    from tests.test_iiif import impostor

    async with serving(impostor((ref.folder / "coffee.jpg").read_bytes())) as hostile:
        mid, base = f"{site.url}/hostile.json", f"{site.url}/hostile"
        manifest = Manifest(id=mid, label="hostile servers")
        services = [ref.service("chelsea", "3.0")] + [f"{hostile}/iiif/{name}" for name in ("absurd", "missing",
                                                                                            "ignores")]
        for i, service in enumerate(services):
            body = AnnotationBody(id=full(service), type="Image",
                                  service=[ServiceV3(id=service, type="ImageService3", profile="level1")])
            manifest.add_item(painted(f"{base}/c{i}", f"canvas {i}", [body]))
        site.put("/hostile.json", prezi(manifest))
        async with running_service(make_settings(tmp_path / "data", models_dir)) as svc:
            common = ["--server", svc.url, "--model", "thumb_grid", "--retries", "1", "--backoff-max", "0.2"]
            first = (await ingest(mid, *common, cwd=tmp_path)).summary
            assert (first["records"], first["added"], first["failed"]) == (4, 2, 2), first
            failed = [json.loads(line) for f in tmp_path.glob("*.thumb_grid.failed.jsonl")
                      for line in f.read_text().splitlines()]
            assert [(f["position"], f["url"], f["type"]) for f in failed] == [
                (1, full(services[1]), "iiif_info_invalid"), (2, full(services[2]), "image_http_error")], failed
            assert set(await dump(svc)) == {full(services[0]), full(services[3])}
            again = (await ingest(mid, *common, cwd=tmp_path)).summary  # resumed: all four handled, none sent
            assert (again["already_done"], again["sent"], again["failed"]) == (4, 0, 0), again
            [listed] = tmp_path.glob("*.thumb_grid.failed.jsonl")
            assert len(listed.read_text().splitlines()) == 2, "the failed file keeps its lines, once each"
            retried = (await ingest(listed, *common, "--no-state", cwd=tmp_path)).summary  # fed back: tried again
            assert (retried["records"], retried["sent"], retried["failed"]) == (2, 2, 2), retried


async def test_format_choices_are_checked_in_one_line(tmp_path: Path) -> None:
    page = tmp_path / "list.json"  # a .json file that is not IIIF keeps the old detection (JSON Lines here)
    page.write_text('{"url": "http://127.0.0.1:9/a.jpg"}\n')
    for bad, words in ((["http://127.0.0.1:9/m.json", "--format", "csv"], "read as IIIF only"),
                       (["-", "--format", "iiif"], "not stdin"),
                       ([page, "--format", "iiif", "--iiif-max-documents", "0"], "must be positive"),
                       ([page, "--format", "iiif", "--iiif-headers", "{"], "--iiif-headers is not JSON"),
                       ([page, "--format", "iiif", "--iiif-headers", '{"h": {"A": 1}}'], "one-line string values")):
        res = await ingest(*bad, "--model", "m", cwd=tmp_path)
        assert res.rc == 2 and words in res.err.strip().splitlines()[-1], (bad, res.err)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"@context": "http://iiif.io/api/presentation/3/context.json",
                                    "id": "http://127.0.0.1:9/m", "type": "Manifest", "items": []}, indent=2))
    assert [bulk_ingest.parse_args([str(f), "--model", "m"]).format for f in (page, manifest)] == ["auto", "iiif"]
    url = bulk_ingest.parse_args(["https://example.org/iiif/m.json", "--model", "m"])
    assert url.format == "iiif" and url.state.name.endswith(".m.state.jsonl") and "/" not in url.state.name


# --- keys: what the client compares answers and --skip-existing by ------------------------------------------------


def test_the_clients_copy_of_canonical_is_the_services() -> None:
    base = "https://iiif.example.org/iiif/2/abc%2F123"
    urls = [f"{base}/full/full/0/default.jpg", f"{base}/full/max/0/default.jpg", f"{base}/full/!800,800/0/default.jpg",
            f"{base}/full/1024,/0/default.png", f"{base}/full/,600/90/gray.jpg", f"{base}/full/^max/!90/color.webp",
            f"{base}/full/pct:50/0/default.jpg", f"{base}/full/^!900,900/0/native.jp2",
            f"{base}/0,0,100,200/full/0/default.jpg", f"{base}/pct:10,10.5,50,50/300,/0/bitonal.tif",
            f"{base}/square/max/0/default.gif", f"{base}/info.json", f"{base}/info.json?token=a%20b",
            f"{base}/full/600,/0/default.jpg?token=t&x=1", "HTTPS://IIIF.Example.ORG/Path/X/full/full/0/default.jpg",
            "https://iiif.example.org/i/full/full/0/default.jpg", f"{base}/full/full/0/default.jpg#xywh=0,0,1,1",
            f"{base}/full/\u0661\u0660\u0660,/0/default.jpg",  # Arabic-Indic digits: not a size
            f"{base}/full/full/0/default.bmp", f"{base}/full/full/0/default.jpg/", f"{base}/", base,
            "https://example.org/photo.jpg", "https://example.org/full/full/0/default.jpg",
            "ftp://example.org/a/full/full/0/default.jpg", "https://example.org/a/info.json/", "not a url", ""]
    ours = [iiif_documents.canonical(u) for u in urls]
    assert ours == [iiif.canonical(u) for u in urls]
    assert sum(a != b for a, b in zip(urls, ours, strict=True)) >= 10  # the list does exercise the rewriting
    assert len(set(ours[:3])) == 1 and ours[0] == f"{base}/full/max/0/default.jpg"


@asynccontextmanager
async def hanging_up() -> AsyncIterator[tuple[str, list[int]]]:
    """A loopback server that closes every connection unanswered, so that fetching an image there fails as
    image_unreachable (a failure that may pass, retried); the list counts the connections. Stopped on the way out."""
    count = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        count[0] += 1
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", count
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture(scope="module")
async def svc(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> AsyncIterator[Service]:
    """The embedded service these tests share (each with urls of its own)."""
    async with running_service(make_settings(tmp_path_factory.mktemp("iiif-svc"), models_dir)) as service:
        yield service


def args_for(svc: Service, *more: str) -> list[str]:
    return ["--server", svc.url, "--model", "thumb_grid", "--retries", "1", "--backoff-max", "0.2", *more]


def read_failed(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_iiif_urls_not_in_canonical_form_settle_by_their_key(
    svc: Service, ref: ReferenceServer, images: str, uniq: str, tmp_path: Path
) -> None:
    coffee = ref.service("coffee", "2.1")
    region = f"{coffee}/0,0,1200,900"
    async with hanging_up() as (closed, connections):
        listed = [f"{region}/full/0/default.jpg",  # stored under .../0,0,1200,900/max/0/default.jpg
                  f"{region}/!500,500/0/default.jpg",  # the same image, in the same batch
                  f"{images}/missing/{uniq}/full/full/0/default.jpg",  # image_http_error, answered by its key
                  f"{closed}/iiif/{uniq}/full/600,/0/default.jpg"]  # image_unreachable: retried, then failed
        path = tmp_path / "list.txt"
        path.write_text("\n".join(listed) + "\n")
        once = tmp_path / "once.txt"
        once.write_text(f"{closed}/iiif/{uniq}-once/full/!300,300/0/default.jpg\n")
        assert (await ingest(once, *args_for(svc, "--item-retries", "0"), cwd=tmp_path)).summary["failed"] == 1
        per_try = connections[0]
        s = (await ingest(path, *args_for(svc, "--item-retries", "2", "--batch", "4"), cwd=tmp_path)).summary
        assert (s["records"], s["sent"], s["added"], s["duplicates"], s["failed"]) == (4, 3, 1, 1, 2), s
        assert per_try >= 1 and connections[0] == per_try * 4  # the first try and 2 more, as --item-retries says
    failed = read_failed(Path(f"{path}.thumb_grid.failed.jsonl"))
    assert sorted((f["position"], f["url"], f["type"]) for f in failed) == [
        (2, listed[2], "image_http_error"), (3, listed[3], "image_unreachable")]
    state = [json.loads(line) for line in Path(f"{path}.thumb_grid.state.jsonl").read_text().splitlines()]
    assert "done" not in state[0] and [line["positions"] for line in state[1:]] == [[[0, 4]]]
    async with svc.http.post(svc.model("thumb_grid") + "/urls", json={"limit": 1000}) as r:
        assert f"{region}/max/0/default.jpg" in await r.json()
    # --skip-existing: the stored image is not sent again under another size or a scheme in capitals
    again = tmp_path / "again.txt"
    again.write_text(f"{region}/1200,/0/default.jpg\n{region.replace('http://', 'HTTP://')}/max/0/default.jpg\n")
    skip = (await ingest(again, *args_for(svc, "--no-state", "--skip-existing"), cwd=tmp_path)).summary
    assert (skip["records"], skip["sent"], skip["found"], skip["failed"]) == (2, 0, 2, 0), skip


# --- resuming a walk ----------------------------------------------------------------------------------------------


def three_manifests(site: DocSite, images: str, name: str) -> tuple[str, list[str]]:
    """A collection (served) of three manifests of three images each (served; the images by `images`)."""
    top = f"{site.url}/{name}/top.json"
    collection = Collection(id=top, label=name)
    mids = []
    for m in range(3):
        mid, doc = small_manifest(site, f"{name}/m{m}", canvases=3, images=images)
        site.put(f"/{name}/m{m}.json", doc)
        collection.make_manifest(id=mid, label=f"m{m}")
        mids.append(mid)
    site.put(f"/{name}/top.json", prezi(collection))
    return top, mids


async def stored_under(svc: Service, prefix: str) -> list[str]:
    async with svc.http.post(svc.model("thumb_grid") + "/urls", json={"limit": 10000}) as r:
        assert r.status == 200, await r.text()
        return [u for u in await r.json() if u.startswith(prefix)]


async def test_a_document_that_fails_on_one_run_shifts_nothing_on_the_next(
    svc: Service, site: DocSite, images: str, uniq: str, tmp_path: Path
) -> None:
    common = args_for(svc, "--batch", "2", "--iiif-timeout", "0.5")
    # as reported: a run stops after m0 and m1; on the next m1 times out; m2's images must all be sent
    top, (m0, m1, m2) = three_manifests(site, images, f"resume-a-{uniq}")
    failed_file = tmp_path / f"{url_stem(top)}.thumb_grid.failed.jsonl"
    first = (await ingest(top, *common, "--limit", "6", cwd=tmp_path)).summary
    assert (first["records"], first["added"]) == (6, 6)
    site.put(f"/resume-a-{uniq}/m1.json", json.loads(site.answers[f"/resume-a-{uniq}/m1.json"].body), delay=1.0)
    second = (await ingest(top, *common, cwd=tmp_path)).summary
    assert (second["records"], second["already_done"], second["sent"], second["added"], second["failed"]) == (
        7, 3, 3, 3, 1), second
    assert len(await stored_under(svc, f"{images}/img/resume-a-{uniq}/")) == 9
    # the timeout is listed on the run where it happened, though the manifest's images were done before
    assert [(f["position"], f["url"], f["type"]) for f in read_failed(failed_file)] == [(3, m1, "iiif_timeout")]
    site.answers[f"/resume-a-{uniq}/m1.json"].delay = 0
    third = (await ingest(top, *common, cwd=tmp_path)).summary
    assert (third["records"], third["already_done"], third["sent"], third["failed"]) == (9, 9, 0, 0), third
    assert read_failed(failed_file) == []  # m1 is read now: its failure is gone with it
    # a manifest that fails is not done: the next run fetches it and sends its images
    top, (b0, b1, b2) = three_manifests(site, images, f"resume-b-{uniq}")
    failed_file = tmp_path / f"{url_stem(top)}.thumb_grid.failed.jsonl"
    kept = site.answers.pop(f"/resume-b-{uniq}/m1.json")
    first = (await ingest(top, *common, cwd=tmp_path)).summary
    assert (first["records"], first["added"], first["failed"]) == (7, 6, 1), first
    assert [(f["position"], f["url"], f["type"]) for f in read_failed(failed_file)] == [(3, b1, "iiif_http_error")]
    site.answers[f"/resume-b-{uniq}/m1.json"] = kept
    second = (await ingest(top, *common, cwd=tmp_path)).summary
    assert (second["records"], second["already_done"], second["sent"], second["added"], second["found"]) == (
        9, 6, 3, 3, 0), second
    assert read_failed(failed_file) == []
    assert sorted(await stored_under(svc, f"{images}/img/resume-b-{uniq}/")) == sorted(
        f"{images}/img/resume-b-{uniq}/m{m}/{i}.jpg" for m in range(3) for i in range(3))
    state_file = tmp_path / f"{url_stem(top)}.thumb_grid.state.jsonl"
    state = [json.loads(line) for line in state_file.read_text().splitlines()]
    assert state[0]["done"] == "iiif_documents"
    done: dict[str, list[int]] = {}
    for line in state[1:]:
        for url, spans in line["documents"].items():
            done.setdefault(url, []).extend(i for s, e in spans for i in range(s, e))
    assert {url: sorted(indexes) for url, indexes in done.items()} == {b: [0, 1, 2] for b in (b0, b1, b2)}


async def test_a_state_file_that_kept_a_walk_by_position_is_refused(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9/collection.json"
    state = tmp_path / "old.state.jsonl"
    state.write_text(json.dumps({"bulk_ingest": 1, "model": "m", "input": url}) + "\n"
                     + json.dumps({"positions": [[0, 4]], "added": 4, "found": 0, "failed": 0}) + "\n")
    res = await ingest(url, "--model", "m", "--state", state, "--server", "http://127.0.0.1:9", cwd=tmp_path)
    assert res.rc == 2 and "by positions" in res.err and "another --state" in res.err, res.err


# --- odd but valid documents --------------------------------------------------------------------------------------


async def test_listed_types_and_service_ids_as_published(site: DocSite) -> None:
    mid, svc = f"{site.url}/odd/v3.json", f"{site.url}/odd/iiif/a"

    def canvas(i: int, body: dict[str, Any], **extra: Any) -> dict[str, Any]:
        anno = {"id": f"{mid}/a{i}", "type": "Annotation", "motivation": ["painting"], "body": body,
                "target": f"{mid}/c{i}"}
        return {"id": f"{mid}/c{i}", "type": "Canvas", "height": 10, "width": 10,
                "items": [{"id": f"{mid}/p{i}", "type": "AnnotationPage", "items": [anno]}], **extra}

    def image(i: int, service: dict[str, Any]) -> dict[str, Any]:
        return {"id": f"{svc}{i}/full/full/0/default.jpg", "type": ["Image"], "service": [service]}

    canvases = [
        canvas(0, image(0, {"id": f"{svc}0/info.json", "type": ["ImageService3"], "profile": "level1"})),
        canvas(1, image(1, {"@id": f"{svc}1/", "@type": ["ImageService2"],
                            "profile": "http://iiif.io/api/image/2/level1.json"})),
        canvas(2, image(2, {"id": f"{svc}2?token=t%3D1", "type": "ImageService3", "profile": "level2"})),
        canvas(3, image(3, {"id": f"{svc}3/info.json?token=t", "type": ["ImageService3"]})),
        canvas(4, {"id": f"{site.url}/odd/plain.jpg", "type": ["Image"]}, type=["Canvas"]),
        canvas(5, image(5, {"id": f"{site.url}/odd/auth", "type": ["AuthCookieService1"]})),
    ]
    site.put("/odd/v3.json", {"@context": "http://iiif.io/api/presentation/3/context.json", "id": mid,
                              "type": "Manifest", "label": {"en": ["odd"]}, "items": canvases})
    records = await walk(mid)
    assert [(r.url, r.problem) for r in records] == [
        (full(f"{svc}0"), None), (full(f"{svc}1"), None), (f"{svc}2/full/max/0/default.jpg?token=t%3D1", None),
        (f"{svc}3/full/max/0/default.jpg?token=t", None), (f"{site.url}/odd/plain.jpg", None),
        (f"{svc}5/full/full/0/default.jpg", None)]  # an auth service is no image service: the image's own id
    assert [r.metadata.get("iiif_service") if r.metadata else None for r in records] == [
        f"{svc}0", f"{svc}1", f"{svc}2?token=t%3D1", f"{svc}3?token=t", None, None]
    assert [r.key for r in records] == [(mid, i) for i in range(6)]
    # a url built on a service is what the service stores it under, however the manifest spells the service's id
    assert all(iiif.canonical(str(r.url)) == r.url for r in records[:4])
    v2 = f"{site.url}/odd/v2.json"
    resource = {"@id": f"{svc}9/full/full/0/default.jpg", "@type": ["dctypes:Image"],
                "service": {"@id": f"{svc}9/info.json", "@type": ["ImageService2"]}}
    site.put("/odd/v2.json", {"@context": "http://iiif.io/api/presentation/2/context.json", "@id": v2,
                              "@type": ["sc:Manifest"], "label": "odd v2", "sequences": [{"canvases": [
                                  {"@id": f"{v2}/c{i}", "@type": "sc:Canvas", "images": [
                                      {"@type": "oa:Annotation", "motivation": ["sc:painting"], "resource": resource}]}
                                  for i in range(2)]}]})
    assert urls_of(await walk(v2)) == [full(f"{svc}9")] * 2
