"""IIIF Image API (2.x and 3.0): recognise a service's urls, read its info.json, ask for the smallest derivative
that keeps the model's preprocessing exact, and name each image by one canonical key.

The canonical key (what Idios stores as the image's id):
- an image request `{base}/{region}/{size}/{rotation}/{quality}.{format}` is keyed with its size set to `max`:
  `{base}/{region}/max/{rotation}/{quality}.{format}`; so `full/full`, `full/max`, `full/!800,800` and `full/1024,`
  of one image are one entry, while a region (`x,y,w,h`, `pct:...`, `square`), a rotation or a quality is an entry
  of its own;
- an `info.json` url is keyed as the full image, `{base}/full/max/0/default.jpg`;
- a service's bare base url cannot be told from any other url without asking its server, so it stays as given
  (the worker finds out it is IIIF when the server answers with an info.json).
The worker never fetches the key itself: it reads the service's info.json and asks for a derivative (ImageSource).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from idios import errors

INFO_MAX_BYTES = 1024 * 1024  # an info.json is a few KB; a server answering MBs is not a IIIF service
MAX_SIDE = 1_000_000  # a side past this in info.json is absurd (the largest published images are ~10^5 px)
MAX_SIZES = 1000  # entries of `sizes` read
INFO_ACCEPT = "application/ld+json, application/json;q=0.9, */*;q=0.1"

_REGION = r"full|square|\d+,\d+,\d+,\d+|pct:\d+(?:\.\d+)?,\d+(?:\.\d+)?,\d+(?:\.\d+)?,\d+(?:\.\d+)?"
_SIZE = r"full|\^?max|\^?\d+,|\^?,\d+|\^?!?\d+,\d+|\^?pct:\d+(?:\.\d+)?"
_ROTATION = r"!?\d+(?:\.\d+)?"
_QUALITY = r"default|color|gray|bitonal|native|grey|colour"
_FORMAT = r"jpg|jpeg|png|gif|webp|tif|tiff|jp2|pdf"
# ASCII digits only (re.ASCII: Python's \d takes any script's digits, JavaScript's not); the scheme in any case.
# A query string (an access token, say) is kept: in the key, and on every request made for the image.
_BASE = r"(?P<base>[hH][tT][tT][pP][sS]?://[^/?#]+/[^?#]*[^/?#])"
_QUERY = r"(?P<query>\?[^#]*)?"
IMAGE_REQUEST = re.compile(
    rf"^{_BASE}/(?P<region>{_REGION})/(?P<size>{_SIZE})/"
    rf"(?P<rotation>{_ROTATION})/(?P<quality>{_QUALITY})\.(?P<format>{_FORMAT}){_QUERY}$", re.ASCII)
INFO_URL = re.compile(rf"^{_BASE}/info\.json{_QUERY}$", re.ASCII)


@dataclass(frozen=True)
class ImageRef:
    """An image of a IIIF service: its base and the region, rotation, quality and format asked for."""

    base: str
    region: str = "full"
    rotation: str = "0"
    quality: str = "default"
    format: str = "jpg"
    query: str = ""  # "?..." as the url had it, sent with every request for the image

    @property
    def key(self) -> str:
        return self.request("max")

    def request(self, size: str) -> str:
        return f"{self.base}/{self.region}/{size}/{self.rotation}/{self.quality}.{self.format}{self.query}"

    @property
    def info(self) -> str:
        return f"{self.base}/info.json{self.query}"


def _normal_base(base: str) -> str:
    """The base with its scheme and host in lower case, as URLs compare."""
    scheme, rest = base.split("://", 1)
    host, _, path = rest.partition("/")
    return f"{scheme.lower()}://{host.lower()}/{path}"


def parse(url: str) -> ImageRef | None:
    """The IIIF image `url` names (an image request or an info.json url), or None for any other url."""
    if m := IMAGE_REQUEST.match(url):
        return ImageRef(_normal_base(m["base"]), m["region"], m["rotation"], m["quality"], m["format"],
                        m["query"] or "")
    if m := INFO_URL.match(url):
        return ImageRef(_normal_base(m["base"]), query=m["query"] or "")
    return None


def bare(url: str) -> ImageRef:
    """The full image of a service whose base `url` is (the url of a JSON answer that is an info.json): a
    trailing slash, `/info.json` and the query string are not part of the base; the query is kept for requests."""
    path, sep, query = url.partition("?")
    path = path.rstrip("/")
    if path.endswith("/info.json"):
        path = path[: -len("/info.json")]
    return ImageRef(path, query=sep + query if sep else "")


def canonical(url: str) -> str:
    """The key Idios stores `url` under (see the module's docstring); any url that is not IIIF is its own key."""
    ref = parse(url)
    return url if ref is None else ref.key


def thumbnail(url: str, side: int = 200) -> str | None:
    """A JPEG of the IIIF image `url` that fits side x side (what the built-in page shows, app.js thumbSource),
    or None when `url` is not recognisably IIIF."""
    ref = parse(url)
    return None if ref is None else dataclasses.replace(ref, format="jpg").request(f"!{side},{side}")


@dataclass(frozen=True)
class ImageService:
    """What an info.json says that the size choice needs."""

    version: int  # 2 or 3
    level: int  # compliance level 0, 1 or 2
    width: int
    height: int
    sizes: tuple[tuple[int, int], ...] = ()  # the sizes a level-0 server has ready
    max_width: int | None = None
    max_height: int | None = None
    max_area: int | None = None
    features: frozenset[str] = frozenset()  # extraFeatures (3) / profile supports (2)
    formats: frozenset[str] = frozenset({"jpg"})  # formats it serves: jpg always, png at level 2, extras listed

    def format_for(self, ref: ImageRef, preferred: str) -> str:
        """The format to ask for: the url's own unless it is the default jpg, then `preferred` where served."""
        if ref.format != "jpg" or preferred not in self.formats:
            return ref.format
        return preferred

    def supports_region(self, region: str) -> bool:
        """Whether the compliance level (or a listed feature) covers `region`: regionByPx at level 1 and up,
        regionByPct at 2; regionSquare at level 1 in 3.0 but at no level in 2.x (a 2.x server lists it)."""
        if region == "full":
            return True
        wanted = "regionSquare" if region == "square" else "regionByPct" if region.startswith("pct:") else "regionByPx"
        if wanted == "regionSquare":
            return wanted in self.features or self.version == 3 and self.level >= 1
        if self.level >= 2 or self.level == 1 and wanted == "regionByPx":
            return True
        return wanted in self.features


def looks_like_json(data: bytes) -> bool:
    return data[:1] == b"{" or data.lstrip()[:1] == b"{"


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SIDE:
        raise errors.IIIFInfoInvalid(f"info.json: {what} must be a whole number from 1 to {MAX_SIDE}, not {value!r:.40}")
    return value


def _strings(value: Any) -> set[str]:
    return {str(v) for v in value} if isinstance(value, list) else set()


def _level(profile: Any) -> tuple[int, set[str], set[str]]:
    """Compliance level, features and formats from a profile (2.x: [uri, {supports, formats}]; 3.0: "levelN")."""
    first = profile[0] if isinstance(profile, list) and profile else profile
    level = 0
    if isinstance(first, str) and (m := re.search(r"level([0-2])", first)):
        level = int(m[1])
    features: set[str] = set()
    formats = {"jpg", "png"} if level == 2 else {"jpg"}
    for extra in profile[1:] if isinstance(profile, list) else ():
        if isinstance(extra, dict):
            features |= _strings(extra.get("supports"))
            formats |= _strings(extra.get("formats"))
    return level, features, formats


def parse_info(data: bytes) -> ImageService:
    """Read an info.json; raise IIIFInfoInvalid when it is not one this service can use."""
    try:
        info = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise errors.IIIFInfoInvalid("The IIIF info.json is not JSON") from None
    if not isinstance(info, dict):
        raise errors.IIIFInfoInvalid("The IIIF info.json is not a JSON object")
    context = info.get("@context")
    contexts = " ".join(c for c in (context if isinstance(context, list) else [context]) if isinstance(c, str))
    if "iiif.io/api/image/3" in contexts or info.get("type") == "ImageService3":
        version = 3
    elif "iiif.io/api/image/2" in contexts:
        version = 2
    elif "iiif.io/api/image/1" in contexts:
        raise errors.IIIFUnsupported("IIIF Image API 1.x services are not supported; 2.x and 3.0 are")
    else:
        raise errors.IIIFInfoInvalid("The JSON is not a IIIF Image API info.json (no Image API @context)")
    width, height = _int(info.get("width"), "width"), _int(info.get("height"), "height")
    level, features, formats = _level(info.get("profile"))
    if version == 3:
        features |= _strings(info.get("extraFeatures"))
        formats |= _strings(info.get("extraFormats"))
    sizes: list[tuple[int, int]] = []
    for entry in info.get("sizes") or [] if isinstance(info.get("sizes"), list) else []:
        if len(sizes) >= MAX_SIZES:
            break
        w, h = (entry.get("width"), entry.get("height")) if isinstance(entry, dict) else (None, None)
        if isinstance(w, int) and isinstance(h, int) and 0 < w <= width and 0 < h <= height:
            sizes.append((w, h))  # a listed size larger than the image, or malformed, is skipped
    limits = [info.get(k) for k in ("maxWidth", "maxHeight", "maxArea")]
    max_width, max_height, max_area = (v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None
                                       for v in limits)
    return ImageService(version, level, width, height, tuple(sorted(set(sizes))), max_width, max_height,
                        max_area, frozenset(features), frozenset(formats))


def region_box(service: ImageService, region: str) -> tuple[int, int]:
    """The width and height of `region` of the image, clipped to it as the Image API says."""
    w, h = service.width, service.height
    if region == "full":
        return w, h
    if region == "square":
        return min(w, h), min(w, h)
    if region.startswith("pct:"):
        px, py, pw, ph = (float(v) for v in region[4:].split(","))
        x, y, rw, rh = px * w / 100, py * h / 100, pw * w / 100, ph * h / 100
    else:
        x, y, rw, rh = (float(v) for v in region.split(","))
    cw, ch = min(rw, w - x), min(rh, h - y)
    if cw < 1 or ch < 1:
        raise errors.IIIFUnsupported(f"The region {region} lies outside the {w}x{h} image")
    return max(1, round(cw)), max(1, round(ch))


def _full(service: ImageService) -> str:
    return "max" if service.version == 3 else "full"


def _fit_limits(service: ImageService, w: int, h: int) -> tuple[int, int]:
    """(w, h) scaled down, keeping its shape, until the server's maxWidth / maxHeight / maxArea allow it. Only
    the width is asked for (`w,`) and the server rounds the height it derives, so the width is lowered until
    the height rounded up fits too."""
    scale = 1.0
    if service.max_width:
        scale = min(scale, service.max_width / w)
    if service.max_height or service.max_width:
        scale = min(scale, (service.max_height or service.max_width or h) / h)
    if service.max_area:
        scale = min(scale, math.sqrt(service.max_area / (w * h)))
    if scale >= 1.0:
        return w, h
    fw = max(1, math.floor(w * scale))
    while fw > 1 and not _allowed(service, fw, -(-h * fw // w)):
        fw -= 1
    return fw, max(1, -(-h * fw // w))


def _allowed(service: ImageService, w: int, h: int) -> bool:
    max_h = service.max_height or service.max_width
    return ((not service.max_width or w <= service.max_width) and (not max_h or h <= max_h)
            and (not service.max_area or w * h <= service.max_area))


def size_choices(service: ImageService, ref: ImageRef, short_side: int, max_pixels: int | None = None) -> list[str]:
    """The size parameters to ask for, best first: the smallest derivative whose short side is at least
    `short_side`; the whole region when it is smaller. On a level-0 server: the smallest listed size that is large
    enough, else the full image (unless it has more than `max_pixels`, which the decoder would refuse) and then
    the largest listed size."""
    if not service.supports_region(ref.region):
        raise errors.IIIFUnsupported(
            f"The IIIF server (level {service.level}) cannot cut the region {ref.region}; index the full image")
    rw, rh = region_box(service, ref.region)
    if service.level == 0:
        return _level0_choices(service, ref, short_side, (rw, rh), max_pixels)
    if min(rw, rh) <= short_side:
        w, h = rw, rh
    else:
        # in whole numbers: the short side exactly, the long one rounded up (floats made 896 into 897)
        w, h = (short_side, -(-rh * short_side // rw)) if rw <= rh else (-(-rw * short_side // rh), short_side)
    fw, fh = _fit_limits(service, w, h)
    return [_full(service) if (fw, fh) == (rw, rh) else f"{fw},"]


def _level0_choices(service: ImageService, ref: ImageRef, short_side: int, region: tuple[int, int],
                    max_pixels: int | None) -> list[str]:
    listed = list(service.sizes) if ref.region == "full" else []
    whole = [] if max_pixels is not None and region[0] * region[1] > max_pixels else [_full(service)]
    fits = [size for size in listed if min(size) >= short_side]
    if fits:
        w, h = fits[0]
        if (w, h) == region:  # the listed size is the image itself: asked for as the full image, then as listed
            return [_full(service), _listed(service, w, h)]
        return [_listed(service, w, h)]
    largest = [_listed(service, w, h) for w, h in listed[-1:] if (w, h) != region]
    return whole + largest or [_full(service)]


def _listed(service: ImageService, w: int, h: int) -> str:
    # a level-0 server has files only under the canonical size form: `w,` in 2.x, `w,h` in 3.0
    return f"{w},{h}" if service.version == 3 else f"{w},"


class Fetcher(Protocol):
    async def fetch(self, url: str, *, max_bytes: int | None = None, accept: str | None = None) -> bytes: ...


class InfoCache:
    """info.json of the services seen lately, by base url: at most `size`, each for `ttl` seconds."""

    def __init__(self, size: int, ttl: float) -> None:
        self._size, self._ttl = max(0, size), ttl
        self._items: OrderedDict[str, tuple[float, ImageService]] = OrderedDict()

    def get(self, base: str) -> ImageService | None:
        item = self._items.get(base)
        if item is None:
            return None
        if item[0] < time.monotonic():
            del self._items[base]
            return None
        self._items.move_to_end(base)
        return item[1]

    def put(self, base: str, service: ImageService) -> None:
        if not self._size:
            return
        self._items[base] = (time.monotonic() + self._ttl, service)
        self._items.move_to_end(base)
        while len(self._items) > self._size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class DerivativePolicy:
    """What to ask a IIIF server for (IDIOS_IIIF_SCALE, IDIOS_IIIF_FORMAT): a short side `scale` x the model's
    input side, in `format` where the server offers it. Measured (scripts/measure_iiif.py, README "IIIF"): the
    server's own JPEG (quality ~75) is what moves an embedding, not the size. A JPEG-sensitive real-weights CNN
    stayed at cosine >= 0.991 of the server's full image at 4x in JPEG (0.90 at 2x), 0.9990 at 4x in PNG; a PNG
    costs ~12x the bytes and, on the reference server, ~3x the time. thumb_grid: 1.0000 at any size, either way.
    """

    scale: float = 4.0
    format: str = "jpg"

    def __post_init__(self) -> None:
        if not self.scale > 0 or not re.fullmatch(_FORMAT, self.format):
            raise SystemExit(f"IDIOS_IIIF_SCALE must be above 0 and IDIOS_IIIF_FORMAT one of {_FORMAT.replace('|', ', ')}"
                             f" (not {self.scale!r}, {self.format!r})")

    def short_side(self, input_side: int) -> int:
        return max(1, math.ceil(self.scale * input_side))


class ImageSource:
    """The bytes to embed for a url: through the IIIF Image API when the url is a IIIF image (or its server
    answers an info.json), a derivative just large enough for the model; else the url's own bytes."""

    def __init__(self, fetcher: Fetcher, cache: InfoCache, policy: DerivativePolicy | None = None,
                 max_pixels: int | None = None) -> None:
        self._fetcher = fetcher
        self.cache = cache
        self.policy = policy or DerivativePolicy()
        self._max_pixels = max_pixels  # the decoder's limit (IDIOS_MAX_IMAGE_PIXELS): a larger full image is skipped

    async def fetch(self, url: str, input_side: int) -> bytes:
        ref = parse(url)
        if ref is None:
            data = await self._fetcher.fetch(url)
            if not looks_like_json(data):
                return data
            # a bare service base answers (or redirects to) its info.json
            ref = bare(url)
            service = _info_or_not_an_image(data)
            self.cache.put(ref.base, service)
        else:
            try:
                service = await self._service(ref)
            except (errors.IIIFInfoInvalid, errors.IIIFUnsupported, errors.ImageHttpError) as exc:
                if isinstance(exc, errors.ImageHttpError) and not _refused(exc):
                    raise  # the server is failing (5xx, 429): so would the image
                return await self._without_info(ref, exc)
        return await self._derivative(service, ref, self.policy.short_side(input_side))

    async def _service(self, ref: ImageRef) -> ImageService:
        service = self.cache.get(ref.base)
        if service is None:
            data = await self._fetcher.fetch(ref.info, max_bytes=INFO_MAX_BYTES, accept=INFO_ACCEPT)
            service = parse_info(data)
            self.cache.put(ref.base, service)
        return service

    async def _without_info(self, ref: ImageRef, why: errors.IdiosError) -> bytes:
        """An image request whose info.json cannot be used (Image API 1.x, a 401 or 404 for info.json, not
        IIIF after all): the image itself at its full size, as `max` (2.1, 3.0) and then `full` (1.x, 2.0)."""
        for size in ("max", "full"):
            try:
                return await self._fetcher.fetch(ref.request(size))
            except errors.ImageHttpError as exc:
                if not _refused(exc):
                    raise
        raise why

    async def _derivative(self, service: ImageService, ref: ImageRef, short_side: int) -> bytes:
        choices = size_choices(service, ref, short_side, self._max_pixels)
        ref = dataclasses.replace(ref, format=service.format_for(ref, self.policy.format))
        for i, size in enumerate(choices):
            try:
                return await self._fetcher.fetch(ref.request(size))
            except (errors.ImageHttpError, errors.ImageTooLarge) as exc:
                # a level-0 server may lack the full image, or have one too large: the next choice; any other
                # failure is the answer
                last = i == len(choices) - 1
                if last or isinstance(exc, errors.ImageHttpError) and not _refused(exc):
                    raise
        raise AssertionError("size_choices returns at least one choice")


def _refused(exc: errors.ImageHttpError) -> bool:
    """A 4xx that says this request will not be served (as opposed to a failing or busy server)."""
    return exc.extra.get("http_status") in (400, 401, 403, 404, 405, 406, 410, 415, 501)


def _info_or_not_an_image(data: bytes) -> ImageService:
    try:
        return parse_info(data)
    except errors.IIIFInfoInvalid as exc:
        raise errors.NotAnImage(f"The url answered JSON that is not an image: {exc.message}") from None
