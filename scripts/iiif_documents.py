"""Reading one IIIF Presentation document (2.x and 3.0) for bulk_ingest.py: what it is (manifest or collection), its
members, and each painted image of each canvas with the record's metadata (language maps flattened as the
Presentation 3 spec suggests, HTML reduced to text, values cut to fit the service's metadata limit). Pure functions:
iiif_walk.py fetches the documents and walks them."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from service_client import dumps

VALUE_CHARS = 4000  # one metadata string
METADATA_BUDGET = 32 * 1024  # UTF-8 bytes of one record's metadata JSON, well under the service's 65,535
IMAGE_SERVICE_TYPES = frozenset({"ImageService1", "ImageService2", "ImageService3"})
TAG = re.compile(r"<[^<>]*>")
BREAK = re.compile(r"<(?:br|/p|/div|/li|/h\d)\b[^<>]*>", re.IGNORECASE)

# --- the key the service stores an image url under ------------------------------------------------------------------
# A copy of idios/iiif.py's IMAGE_REQUEST, INFO_URL and canonical() (with _normal_base): this client runs where only
# requirements/tools.txt is installed, without the service's package. tests/test_iiif_ingest.py holds the copy equal
# to idios.iiif.canonical; change both together.
_REGION = r"full|square|\d+,\d+,\d+,\d+|pct:\d+(?:\.\d+)?,\d+(?:\.\d+)?,\d+(?:\.\d+)?,\d+(?:\.\d+)?"
_SIZE = r"full|\^?max|\^?\d+,|\^?,\d+|\^?!?\d+,\d+|\^?pct:\d+(?:\.\d+)?"
_ROTATION = r"!?\d+(?:\.\d+)?"
_QUALITY = r"default|color|gray|bitonal|native|grey|colour"
_FORMAT = r"jpg|jpeg|png|gif|webp|tif|tiff|jp2|pdf"
_BASE = r"(?P<base>[hH][tT][tT][pP][sS]?://[^/?#]+/[^?#]*[^/?#])"
_QUERY = r"(?P<query>\?[^#]*)?"
IMAGE_REQUEST = re.compile(
    rf"^{_BASE}/(?P<region>{_REGION})/(?P<size>{_SIZE})/"
    rf"(?P<rotation>{_ROTATION})/(?P<quality>{_QUALITY})\.(?P<format>{_FORMAT}){_QUERY}$", re.ASCII)
INFO_URL = re.compile(rf"^{_BASE}/info\.json{_QUERY}$", re.ASCII)


def _normal_base(base: str) -> str:
    scheme, rest = base.split("://", 1)
    host, _, path = rest.partition("/")
    return f"{scheme.lower()}://{host.lower()}/{path}"


def canonical(url: str) -> str:
    """The key the service stores `url` under: a IIIF image request with its size as `max`, an info.json url as
    its full image (scheme and host in lower case, a query kept), any other url as it is. The service answers
    add_bulk in these keys."""
    if m := IMAGE_REQUEST.match(url):
        return (f"{_normal_base(m['base'])}/{m['region']}/max/{m['rotation']}/{m['quality']}.{m['format']}"
                f"{m['query'] or ''}")
    if m := INFO_URL.match(url):
        return f"{_normal_base(m['base'])}/full/max/0/default.jpg{m['query'] or ''}"
    return url


def choose_language(keys: list[str], language: str) -> str:
    """The Presentation 3 rule: the wanted language (or one of its variants), else "none", else the first."""
    if language in keys:
        return language
    primary = language.split("-")[0].lower()
    for key in keys:
        if key.split("-")[0].lower() == primary:
            return key
    for key in ("none", "@none"):
        if key in keys:
            return key
    return keys[0]


def flatten(value: Any, language: str) -> str | None:
    """A label or value as one string: a v3 language map, or v2's string / {"@value", "@language"} / list of them;
    several values joined with "; "."""
    by_language: dict[str, list[str]] = {}
    if isinstance(value, dict) and "@value" not in value:  # a v3 language map
        for key, texts in value.items():
            strings = [t for t in (texts if isinstance(texts, list) else [texts]) if isinstance(t, str)]
            if strings:
                by_language[str(key)] = strings
    else:
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                by_language.setdefault("none", []).append(item)
            elif isinstance(item, dict) and isinstance(item.get("@value"), str):
                by_language.setdefault(str(item.get("@language") or "none"), []).append(item["@value"])
    if not by_language:
        return None
    texts = [plain(t) for t in by_language[choose_language(list(by_language), language)]]
    return clip("; ".join(t for t in texts if t)) or None


def plain(text: str) -> str:
    """The text of a value given as HTML (it starts with < and ends with >, as Presentation 3 says), when removing
    the tags leaves plain text; anything else as given."""
    s = text.strip()
    if not (s.startswith("<") and s.endswith(">")) or "<script" in s.lower() or "<style" in s.lower():
        return text
    stripped = TAG.sub("", BREAK.sub(" ", s))
    if "<" in stripped or ">" in stripped:
        return text
    return " ".join(html.unescape(stripped).split())


def clip(text: str, limit: int = VALUE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def bounded(metadata: dict[str, Any]) -> dict[str, Any]:
    """`metadata` with its longest strings halved until its JSON fits METADATA_BUDGET (wide characters and escapes
    can make 4,000 characters 24 KB)."""
    while len(dumps(metadata)) > METADATA_BUDGET:
        key = max((k for k, v in metadata.items() if isinstance(v, str)), key=lambda k: len(metadata[k]))
        metadata[key] = clip(metadata[key], max(1, len(metadata[key]) // 2))
    return metadata


# --- documents: what they are, and what a manifest paints ----------------------------------------------------------


def as_list(value: Any) -> list[dict[str, Any]]:
    """The objects of a value that should be a list of objects (or one object); anything else in it is skipped."""
    if isinstance(value, list):
        return [v for v in value if isinstance(v, dict)]
    return [value] if isinstance(value, dict) else []


def doc_id(doc: dict[str, Any]) -> str | None:
    value = doc.get("id", doc.get("@id"))
    return value if isinstance(value, str) and value else None


def types(obj: dict[str, Any], *keys: str) -> list[str]:
    """The types (or motivations) `obj` gives under the first of `keys` it has: JSON-LD allows one value or a list
    of them (`"@type": ["ImageService2"]`); anything but a string is ignored."""
    for key in keys:
        if key in obj:
            value = obj[key]
            return [t for t in (value if isinstance(value, list) else [value]) if isinstance(t, str)]
    return []


def is_a(obj: dict[str, Any], key: str, name: str, absent: bool = False) -> bool:
    """Whether `obj` gives `name` among its `key` values; `absent` when it has no `key` at all."""
    return name in types(obj, key) if key in obj else absent


def first_of(kinds: list[str], wanted: tuple[str, ...]) -> str | None:
    return next((k for k in kinds if k in wanted), None)


def classify(doc: Any, hint: str | None = None) -> tuple[str, int] | None:
    """("Manifest" or "Collection", Presentation major version), or None for a document that is neither.
    `hint` is what the list holding an embedded v2 member says it is (`manifests`, `collections`)."""
    if not isinstance(doc, dict):
        return None
    if kind := first_of(types(doc, "type"), ("Manifest", "Collection")):
        return kind, 3
    if kind := first_of(types(doc, "@type"), ("sc:Manifest", "sc:Collection")):
        return kind[3:], 2
    if doc.get("@type") is None and hint is not None and "@id" in doc:
        return hint, 2
    return None


def is_image_service(entry: Any) -> bool:
    """An Image API service (not an auth or search service) of a painted image."""
    if not isinstance(entry, dict):
        return False
    kinds = types(entry, "type", "@type")
    if any(k in IMAGE_SERVICE_TYPES for k in kinds):
        return True
    if any(k not in ("", "iiif:ImageProfile") for k in kinds):
        return False
    profile = next(iter(entry["profile"]), None) if isinstance(entry.get("profile"), list) else entry.get("profile")
    context = entry.get("@context")
    return (isinstance(profile, str) and ("iiif.io/api/image" in profile or profile in ("level0", "level1", "level2"))
            or isinstance(context, str) and "iiif.io/api/image" in context)


def image_target(resource: dict[str, Any]) -> tuple[str | None, str | None]:
    """(the url to store, the image service's base): the service's full image when there is a service, else the
    resource's own id."""
    for entry in as_list(resource.get("service")):
        service = doc_id(entry) if is_image_service(entry) else None
        base, query = service_base(service) if service else ("", "")
        if base:
            return f"{base}/full/max/0/default.jpg{query}", base + query
    return doc_id(resource), None


def service_base(service: str) -> tuple[str, str]:
    """(base, query) of an image service id: published ids may end in `/info.json` or a slash, neither part of the
    base; a query string (an access token) goes after the path built on the base, as the service keeps it
    (idios/iiif.py `bare`); a fragment is dropped."""
    path, sep, query = service.split("#", 1)[0].partition("?")
    path = path.rstrip("/").removesuffix("/info.json").rstrip("/")
    return path, sep + query


def painted_v3(canvas: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The images painted on a v3 canvas: items -> AnnotationPage -> Annotation (painting) -> body. A Choice
    gives its first item (the default one); a SpecificResource its source; sound, video and text are skipped."""
    for page in as_list(canvas.get("items")):
        for anno in as_list(page.get("items")):
            if not is_a(anno, "motivation", "painting", absent=True):
                continue
            for body in as_list(anno.get("body")):
                if is_a(body, "type", "Choice"):
                    body = next(iter(as_list(body.get("items"))), {})
                if is_a(body, "type", "SpecificResource") and isinstance(body.get("source"), dict):
                    body = body["source"]
                if is_a(body, "type", "Image") or any(is_image_service(s) for s in as_list(body.get("service"))):
                    yield body


def painted_v2(canvas: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The images of a v2 canvas: images -> annotation (sc:painting) -> resource; oa:Choice gives its default,
    oa:SpecificResource its full image."""
    for anno in as_list(canvas.get("images")):
        if not is_a(anno, "motivation", "sc:painting", absent=True):
            continue
        resource = anno.get("resource")
        if isinstance(resource, dict) and is_a(resource, "@type", "oa:Choice"):
            resource = resource.get("default", next(iter(as_list(resource.get("item"))), None))
        if isinstance(resource, dict) and is_a(resource, "@type", "oa:SpecificResource"):
            resource = resource.get("full")
        if isinstance(resource, dict) and is_a(resource, "@type", "dctypes:Image", absent=True):
            yield resource


def manifest_fields(doc: dict[str, Any], version: int, language: str) -> dict[str, Any]:
    """What every record of a manifest carries: its id, label, rights and required statement."""
    fields: dict[str, Any] = {"iiif_manifest": doc_id(doc), "manifest_label": flatten(doc.get("label"), language)}
    if version == 3:
        rights = doc.get("rights")
        fields["rights"] = clip(rights) if isinstance(rights, str) else None
        statement = doc.get("requiredStatement")
        if isinstance(statement, dict):
            label, value = flatten(statement.get("label"), language), flatten(statement.get("value"), language)
            fields["required_statement"] = clip(f"{label}: {value}" if label and value else label or value or "")
    else:
        fields["rights"] = flatten(doc.get("license"), language)
        attribution = flatten(doc.get("attribution"), language)
        fields["required_statement"] = f"Attribution: {attribution}" if attribution else None
    return {k: v for k, v in fields.items() if v}


def canvases(doc: dict[str, Any], version: int) -> list[Any]:
    """A manifest's canvases in order: v3 items; v2 the first sequence's (the default order; further sequences
    list the same canvases again)."""
    if version == 3:
        return [c for c in as_list(doc.get("items")) if is_a(c, "type", "Canvas", absent=True)]
    sequence = next(iter(as_list(doc.get("sequences"))), {})
    return as_list(sequence.get("canvases"))


@dataclass(frozen=True)
class Painted:
    """One record of a manifest: a painted image (its url and metadata), or, with `problem` set, an image without
    an id or a canvas that could not be read."""

    url: str | None
    metadata: dict[str, Any]
    problem: str | None = None
    kind: str = "iiif_bad_image"


def manifest_images(doc: dict[str, Any], version: int, language: str) -> Iterator[Painted]:
    """Every painted image, canvas by canvas. A canvas that cannot be read is one record with its problem (type
    iiif_bad_canvas) and the canvases after it are read as usual: one odd canvas does not cost a manifest."""
    base = manifest_fields(doc, version, language)
    for index, canvas in enumerate(canvases(doc, version)):
        try:
            found = list(canvas_images(canvas, index, version, base, language))
        except (AttributeError, TypeError, KeyError, ValueError, RecursionError) as exc:
            found = [Painted(None, record_metadata(base, canvas, index), f"canvas {index} cannot be read: {exc!r}",
                             "iiif_bad_canvas")]
        yield from found


def canvas_images(canvas: dict[str, Any], index: int, version: int, base: dict[str, Any],
                  language: str) -> Iterator[Painted]:
    label = flatten(canvas.get("label"), language)
    for resource in (painted_v3 if version == 3 else painted_v2)(canvas):
        url, service = image_target(resource)
        meta = record_metadata(base, canvas, index, label=label, iiif_service=service)
        yield Painted(url, meta) if url else Painted(None, meta, "a painted image without an id")


def record_metadata(base: dict[str, Any], canvas: dict[str, Any], index: int, **more: Any) -> dict[str, Any]:
    """A record's metadata: the manifest's fields, the canvas's, `more`; strings clipped, the whole bounded."""
    meta = {**base, "iiif_canvas": doc_id(canvas), "canvas_index": index, **more}
    return bounded({k: clip(v) if isinstance(v, str) else v for k, v in meta.items() if v is not None})


def members(doc: dict[str, Any], version: int) -> Iterator[tuple[Any, str | None]]:
    """A collection's members in document order, with what their list says they are (v2): v3 items;
    v2 collections, manifests and members, in the order the keys come. A bare string is taken as a reference."""
    if version == 3:
        items = doc.get("items")
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict) or first_of(types(item, "type"), ("Manifest", "Collection")):
                yield item, None
        return
    hints = {"collections": "Collection", "manifests": "Manifest", "members": None}
    for key in doc:
        if key in hints:
            for item in doc[key] if isinstance(doc[key], list) else [doc[key]]:
                yield item, hints[key]


def embedded(member: dict[str, Any], version: int) -> bool:
    """Whether a member is given whole (used as it is) rather than as a reference to fetch."""
    keys = ("items",) if version == 3 else ("sequences", "collections", "manifests", "members")
    return any(isinstance(member.get(k), list) and member[k] for k in keys)


# --- fetching -------------------------------------------------------------------------------------------------------
